"""Executes every notebook in notebooks/ top to bottom and checks its key outputs.

The kernel runs `sys.executable` (the test's own interpreter, whatever kernelspecs the machine
has installed) and inherits this process's environment, with JAX on one CPU device.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOKS = ("quickstart", "sparse_training", "moe_routing", "kernels", "pretrained")
KERNEL_NAME = "sparsejax-notebook-test"
CELL_TIMEOUT_S = 300
ROOT = Path(__file__).resolve().parents[2]


def repository_url() -> str:
    """The one place the repository's URL is written: [project.urls] in pyproject.toml."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.urls]", 1)[1].split("\n[", 1)[0]
    return re.search(r'^Repository\s*=\s*"([^"]+)"', section, re.MULTILINE).group(1)


def colab_url(name: str) -> str:
    repo = repository_url()
    assert repo.startswith("https://github.com/"), repo
    return (f"https://colab.research.google.com/github/{repo[len('https://github.com/'):]}"
            f"/blob/main/notebooks/{name}.ipynb")


def _load(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)


def _stdout(nb: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs if o.output_type == "stream" and o.name == "stdout")


@pytest.fixture(scope="module")
def kernel_spec_manager(tmp_path_factory) -> KernelSpecManager:
    """A kernelspec that launches ipykernel with this interpreter, found only by our manager."""
    kernels = tmp_path_factory.mktemp("kernels")
    spec_dir = kernels / KERNEL_NAME
    spec_dir.mkdir()
    # One CPU device, as on a Colab CPU runtime: the test process simulates 8 (conftest), which
    # doubles the notebooks' CPU time without testing anything the parallel/ tests do not.
    xla_flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                         if not f.startswith("--xla_force_host_platform_device_count"))
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "sparsejax test kernel", "language": "python",
            "env": {"JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
                    "XLA_FLAGS": xla_flags}}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return KernelSpecManager(kernel_dirs=[str(kernels)], ensure_native_kernel=False)


_executed: dict[str, nbformat.NotebookNode] = {}


@pytest.fixture
def run_notebook(kernel_spec_manager):
    """Executes a notebook once per test session (cwd = notebooks/); raises on a cell error."""
    def run(name: str) -> nbformat.NotebookNode:
        if name not in _executed:
            nb = _load(name)
            km = AsyncKernelManager(kernel_name=KERNEL_NAME,
                                    kernel_spec_manager=kernel_spec_manager)
            NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S, kernel_name=KERNEL_NAME,
                           resources={"metadata": {"path": str(NOTEBOOK_DIR)}}).execute()
            _executed[name] = nb
        return _executed[name]
    return run


def _check_common(nb: nbformat.NotebookNode) -> None:
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        assert not [o for o in cell.outputs if o.output_type == "error"], f"cell {i} errored"
        if "plot" in cell.metadata.get("tags", []):
            assert any("image/png" in o.get("data", {}) for o in cell.outputs), \
                f"plot cell {i} produced no PNG:\n{cell.source[:200]}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_colab_ready(name):
    """Static checks (no execution): valid nbformat v4, a badge for this file, a guarded
    install cell, a plot cell, and no stored outputs."""
    nb = _load(name)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    first = nb.cells[0]
    assert first.cell_type == "markdown" and colab_url(name) in first.source
    badges = re.findall(r"https://colab\.research\.google\.com/github/[^)\s]+", "".join(
        c.source for c in nb.cells if c.cell_type == "markdown"))
    assert badges == [colab_url(name)]
    install = next(c for c in nb.cells if c.cell_type == "code")
    # a non-editable install of the package with its notebook extra, from the one URL
    assert 'find_spec("sparsejax") is None' in install.source
    assert f'REPOSITORY = "{repository_url()}"' in install.source
    assert 'sparsejax[notebooks] @ git+{REPOSITORY}' in install.source
    assert "-e" not in install.source.split() and "git clone" not in install.source
    assert any("plot" in c.metadata.get("tags", []) for c in nb.cells)
    for c in nb.cells:
        if c.cell_type == "code":
            assert not c.outputs and c.execution_count is None, "commit notebooks cleared"


def test_quickstart(run_notebook):
    nb = run_notebook("quickstart")
    _check_common(nb)
    out = _stdout(nb)
    assert "checkpoints: [20, 40, 60]" in out
    assert "resumed run: last logged step 60" in out
    assert "learning_rate_schedule.peak_lr = 0.01" in out
    first, last = map(float, re.search(r"train loss ([\d.]+) -> ([\d.]+)", out).groups())
    assert last < first  # 40 steps of training lower the loss


def test_sparse_training(run_notebook):
    nb = run_notebook("sparse_training")
    _check_common(nb)
    out = _stdout(nb)
    assert "mask updates at steps [10, 20, 30]" in out
    ckpt, logged = map(float, re.search(
        r"from checkpoint masks: ([\d.]+) \(logged sparsity/density ([\d.]+)\)", out).groups())
    assert abs(ckpt - 0.1) < 2e-3 and abs(ckpt - logged) < 1e-3
    assert float(re.search(r"per-layer density: ([\d.e+-]+)", out).group(1)) < 1e-6
    grown, dropped, active = map(int, re.search(
        r"grown (\d+), dropped (\d+), active (\d+)", out).groups())
    assert grown == dropped > 0 and active > grown
    churn = [float(x) for x in re.search(r"churn: \[(.*)\]", out).group(1).split(",")]
    assert len(churn) == 3 and all(0 < c < 0.3 for c in churn)


def test_moe_routing(run_notebook):
    nb = run_notebook("moe_routing")
    _check_common(nb)
    out = _stdout(nb)
    assert "MoE layers: ['layer_0', 'layer_1']" in out
    diffs = [float(x) for x in re.findall(r"recomputed - sown expert load\| = ([\d.e+-]+)", out)]
    assert len(diffs) == 2 and max(diffs) < 1e-6
    top1 = re.findall(r"top-1 expert per token: (\d+)", out)
    assert len(top1) == 2 and all(len(t) == 38 for t in top1)  # one expert per character


def test_kernels(run_notebook):
    nb = run_notebook("kernels")
    _check_common(nb)
    out = _stdout(nb)
    attn = re.findall(r"attention (\S+)\s+(\S+(?: grad)?)\s+max abs error = ([\d.e+-]+)", out)
    assert len(attn) == 12, out
    for mask, backend, err in attn:
        assert float(err) < (1e-4 if "grad" in backend else 1e-5), (mask, backend, err)
    gmm = dict((b.strip(), float(e)) for b, e in
               re.findall(r"gmm (\S+(?: grad)?)\s+max abs error = ([\d.e+-]+)", out))
    assert set(gmm) == {"xla", "gpu", "tpu", "gpu grad"}, out
    assert max(gmm.values()) < 1e-3  # outputs are O(10); float32 accumulation


def test_pretrained(run_notebook):
    nb = run_notebook("pretrained")
    _check_common(nb)
    out = _stdout(nb)
    assert "ModelConfig.scale_embeddings = False" in out
    first, last = map(float, re.search(r"fine-tune loss ([\d.]+) -> ([\d.]+)", out).groups())
    assert last < first
    assert "2:4 groups with >= 2 zeros: 1.0" in out
    diff = re.search(r"max \|logit diff\| vs sparsejax: ([\d.e+-]+)", out)
    assert diff is None or float(diff.group(1)) < 1e-4, out


def test_notebook_badges_use_the_repository_url():
    """docs/notebooks.md has one Colab badge per notebook; neither it nor the README nor any
    other hand-written docs page names another GitHub URL than the repository's."""
    page = (ROOT / "docs" / "notebooks.md").read_text()
    badges = re.findall(r"https://colab\.research\.google\.com/github/[^)\s]+", page)
    assert sorted(badges) == sorted(colab_url(n) for n in NOTEBOOKS)
    docs = [p for p in (ROOT / "docs").rglob("*") if p.suffix in (".md", ".py", ".yaml")
            and not {"generated", "_build", "api"} & set(p.relative_to(ROOT / "docs").parts)]
    for path in [ROOT / "README.md", ROOT / ".readthedocs.yaml", *docs]:
        text = path.read_text().replace(repository_url(), "")
        assert "github.com" not in text.replace("colab.research.google.com/github", ""), path
