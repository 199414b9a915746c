"""What the `sparsejax prune` tests start from: a small corpus of code-like documents and a
dense source workdir made without compiling a train step."""
import os

import flax.linen as nn
import jax
import pytest

from sparsejax import config as config_lib
from sparsejax.data.sharded import ShardedIteratorSave, ShardedTrainIterator
from sparsejax.parallel.rules import LOGICAL_RULES
from sparsejax.train import trainer
from sparsejax.train import workdir as workdir_lib
from sparsejax.train.build import build_run
from sparsejax.train.checkpoint import Checkpointer

TEXT = ["def add(a, b):\n    return a + b\n", "class Point:\n    x: int = 0\n    y: int = 0\n",
        "import os\nprint(os.getcwd())\n", "for i in range(10):\n    total += i * i\n"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """`--gin.TrainConfig.dataset=...`: 60 short documents read as `files:`."""
    root = tmp_path_factory.mktemp("corpus")
    for i in range(60):
        (root / f"doc_{i:02d}.txt").write_text(TEXT[i % 4] * (1 + i % 3))
    return f"--gin.TrainConfig.dataset='files:{root}/*.txt'"


def write_source(workdir, *bindings):
    """A workdir holding a run's step-0 checkpoint and config (what `train` writes at its
    first checkpoint) for tiny.gin plus `bindings` ('--gin.X=V'), made without compiling a
    train step."""
    config_lib.parse_gin(["tiny.gin"], [b[len("--gin."):] for b in bindings])
    cfg = trainer.TrainConfig()
    run = build_run(cfg)
    data = ShardedTrainIterator(global_batch_size=cfg.global_batch_size, seq_len=cfg.seq_len,
                                dataset=cfg.dataset)
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(LOGICAL_RULES):
        state = run.init_state()
    os.makedirs(workdir)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    ckpt.save(0, state, ShardedIteratorSave(data),
              {"step": 0, "bindings": config_lib.operative_bindings()}, force=True)
    ckpt.close()
    workdir_lib.write_config(workdir, config_lib.operative_config_text())
    return str(workdir)


@pytest.fixture(scope="session")
def make_source():
    """`make_source(workdir, *bindings)`: see `write_source`."""
    return write_source
