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


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


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
