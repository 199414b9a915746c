"""Test-wide setup: CPU with 8 simulated devices unless a GPU test asks for the GPU."""
import os

if os.environ.get("SPARSEJAX_TEST_GPU") != "1":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        flags = (flags + " --xla_force_host_platform_device_count=8").strip()
    # Tests compile hundreds of small programs and run each briefly: LLVM's optimization
    # passes are most of XLA:CPU's compile time (about a third of the suite's), and results
    # are compared with tolerances or between runs compiled the same way. Benchmarks and
    # real runs keep the default level.
    if "xla_backend_optimization_level" not in flags:
        flags += " --xla_backend_optimization_level=0"
    os.environ["XLA_FLAGS"] = flags

# One persistent compilation cache for the test run (workers and the CLI processes tests
# start inherit it): tests that build the same model compile it once. Keys hash the program,
# the jax version and the devices, so a stale entry is never used.
import tempfile  # noqa: E402

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "sparsejax-tests-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# Property tests draw the same examples on every run by default, so a CI result does not depend
# on luck; HYPOTHESIS_PROFILE=explore draws fresh random examples (and more of them) to hunt bugs.
settings.register_profile("ci", derandomize=True, deadline=None)
settings.register_profile("explore", derandomize=False, deadline=None, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _has_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def pytest_addoption(parser):
    parser.addoption(
        "--hf-only", action="store_true",
        help="run only the tests marked `hf` (those that need the [hf] / [eval] extras: torch, "
             "transformers, lm_eval), and fail where a test would skip for a missing import")


def pytest_ignore_collect(collection_path, config):
    """Under --hf-only, a test module whose source marks nothing `hf` is not imported (importing
    every test module costs more than some of the `hf` tests)."""
    if (config.getoption("hf_only") and collection_path.suffix == ".py"
            and collection_path.name.startswith("test_")
            and "mark.hf" not in collection_path.read_text()):
        return True
    return None


def pytest_collection_modifyitems(config, items):
    if config.getoption("hf_only"):
        hf = [item.get_closest_marker("hf") is not None for item in items]
        config.hook.pytest_deselected(items=[i for i, m in zip(items, hf) if not m])
        items[:] = [i for i, m in zip(items, hf) if m]
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


# --- the [hf] / [eval] extras: no test skipped for a missing import in both CI runs ---------
# CI runs the suite without the extras, then installs them and runs only the tests marked
# `hf` (`--hf-only`). A test skipped by `pytest.importorskip` therefore has to be marked `hf`
# (the test, or its module: `pytestmark = pytest.mark.hf`), and under `--hf-only` such a skip
# is a failure: a test that needs torch never goes unrun in both.

def _import_skip(excinfo) -> bool:
    """Whether `excinfo` is `pytest.importorskip`'s skip (a module that cannot be imported)."""
    return (excinfo is not None and excinfo.errisinstance(pytest.skip.Exception)
            and str(excinfo.value).startswith("could not import "))


def _module_marked_hf(path) -> bool:
    """Whether a test module's `pytestmark` (top level, read from its source: the module
    stopped importing at its skip) names the `hf` marker."""
    import ast
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and any(
                isinstance(t, ast.Name) and t.id == "pytestmark"
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target])):
            return any(isinstance(n, ast.Attribute) and n.attr == "hf"
                       for n in ast.walk(node.value))
    return False


def _import_skip_failure(config, reason: str, marked: bool):
    """Why an import skip fails the run (None where it may skip)."""
    if config.getoption("hf_only"):
        return (f"{reason} (--hf-only: the [hf] / [eval] extras must be installed; "
                "`pip install -e '.[test,hf,eval]'`)")
    if not marked:
        return (f"{reason}: a test that skips for a missing import must be marked `hf` "
                "(pytestmark = pytest.mark.hf), or CI's run with the extras (--hf-only) "
                "does not run it either")
    return None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.skipped and _import_skip(call.excinfo):
        why = _import_skip_failure(item.config, str(call.excinfo.value),
                                   item.get_closest_marker("hf") is not None)
        if why:
            report.outcome, report.longrepr = "failed", why
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    if (report.skipped and isinstance(collector, pytest.Module)
            and isinstance(report.longrepr, tuple)
            and "could not import " in str(report.longrepr[2])):
        reason = str(report.longrepr[2]).removeprefix("Skipped: ")
        why = _import_skip_failure(collector.config, reason, _module_marked_hf(collector.path))
        if why:
            report.outcome, report.longrepr = "failed", f"{collector.path}: {why}"
    return report


@pytest.fixture(autouse=True)
def _fresh_gin_config():
    """Gin bindings are process-global: no test sees another test's bindings."""
    import gin
    gin.clear_config()
    yield
    gin.clear_config()


# --- a run's step-0 workdir, made without compiling a train step ---------------------------
import flax.linen as nn  # noqa: E402

from sparsejax import config as config_lib  # noqa: E402
from sparsejax.data.sharded import ShardedIteratorSave, ShardedTrainIterator  # noqa: E402
from sparsejax.parallel.rules import LOGICAL_RULES  # noqa: E402
from sparsejax.train import trainer  # noqa: E402
from sparsejax.train import workdir as workdir_lib  # noqa: E402
from sparsejax.train.build import build_run  # noqa: E402
from sparsejax.train.checkpoint import Checkpointer  # noqa: E402


def write_source(workdir, *bindings, gin_files=("tiny.gin",)):
    """A workdir holding a run's step-0 checkpoint and config (what `train` writes at its
    first checkpoint) for `gin_files` plus `bindings` ('--gin.X=V'), made without compiling a
    train step."""
    config_lib.parse_gin(list(gin_files), [b[len("--gin."):] for b in bindings])
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
