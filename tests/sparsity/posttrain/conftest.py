"""What the `sparsejax prune` tests start from: a small corpus of code-like documents (the dense
source workdir: `make_source` in tests/conftest.py)."""

import pytest


TEXT = ["def add(a, b):\n    return a + b\n", "class Point:\n    x: int = 0\n    y: int = 0\n",
        "import os\nprint(os.getcwd())\n", "for i in range(10):\n    total += i * i\n"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """`--gin.TrainConfig.dataset=...`: 60 short documents read as `files:`."""
    root = tmp_path_factory.mktemp("corpus")
    for i in range(60):
        (root / f"doc_{i:02d}.txt").write_text(TEXT[i % 4] * (1 + i % 3))
    return f"--gin.TrainConfig.dataset='files:{root}/*.txt'"
