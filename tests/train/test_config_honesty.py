"""Every gin line takes effect or is refused, through `sparsejax train|eval|list` the way a
user runs them: preset overrides win, config.gin is the operative config and is what eval
and resume use, a changed config or a binding without effect is refused, a plug-in module
registers a criterion and a router, and common mistakes give one line instead of a
traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from sparsejax import cli
from sparsejax.train.checkpoint import restore_state_numpy
from sparsejax.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAST = ["--gin.TrainConfig.num_steps=8", "--gin.TrainConfig.log_every=4",
        "--gin.TrainConfig.eval_every=8", "--gin.TrainConfig.eval_tokens=256",
        "--gin.TrainConfig.checkpoint_every=4", "--gin.TrainConfig.progress_bar=False",
        "--gin.TrainConfig.async_checkpoints=False", "--gin.make_mesh.num_devices=1",
        "--gin.ModelConfig.num_layers=1"]


def train(workdir, *args, files=("tiny.gin",)):
    return cli.main(["train", *[f"--gin_file={f}" for f in files], f"--workdir={workdir}",
                     "--quiet", *FAST, *args])


def masks(workdir):
    return restore_state_numpy(str(workdir))[1]["sparsity"]["masks"]


def leaves(tree):
    if isinstance(tree, dict):
        return [x for k in sorted(tree) for x in leaves(tree[k])]
    return [] if tree is None else [np.asarray(tree)]


def test_a_criterion_override_after_a_preset_changes_the_masks(tmp_path):
    """gmp.gin prunes by magnitude; the override must prune at random (it used to be dropped)."""
    assert train(tmp_path / "gmp", files=("tiny.gin", "sparsity/gmp.gin")) == 0
    assert train(tmp_path / "rand", "--gin.MaskedPruningMethod.criterion='random'",
                 files=("tiny.gin", "sparsity/gmp.gin")) == 0
    a, b = leaves(masks(tmp_path / "gmp")), leaves(masks(tmp_path / "rand"))
    assert [m.sum() for m in a] == [m.sum() for m in b]  # same schedule, same counts
    assert any((x != y).any() for x, y in zip(a, b))
    text = open(tmp_path / "rand" / "config.gin").read()
    assert "MaskedPruningMethod.criterion = 'random'" in text
    # the operative config: optimizer and method defaults, not only the parsed lines
    assert "make_optimizer.weight_decay = 0.1" in text
    assert "MaskedPruningMethod.structure = 'unstructured'" in text
    assert "PolynomialSchedule.exponent = 3.0" in text


def test_eval_and_resume_use_the_workdirs_config(tmp_path, capsys):
    w = tmp_path / "rigl"
    assert train(w, files=("tiny.gin", "sparsity/rigl.gin")) == 0
    capsys.readouterr()
    # no --gin_file: the workdir's config.gin (tiny, 1 layer, RigL), not base.gin
    assert cli.main(["eval", f"--workdir={w}"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ev = [r for r in read_metrics(str(w / "metrics.jsonl")) if "eval_loss" in r][-1]
    assert out["eval_loss"] == pytest.approx(ev["eval_loss"], rel=1e-6)
    # resuming with another method is refused, naming the changed bindings
    assert cli.main(["train", "--gin_file=sparsity/set.gin", f"--workdir={w}", "--quiet",
                     "--gin.TrainConfig.num_steps=8"]) == 2
    err = capsys.readouterr().err
    assert "MaskedPruningMethod.grow: 'gradient' -> 'random'" in err
    assert "--allow_config_change" in err


def test_a_binding_without_effect_is_refused(tmp_path, capsys):
    # gmp uses a polynomial schedule: a drop/grow setting would silently do nothing
    assert train(tmp_path / "w", "--gin.DropGrowSchedule.frequency=3",
                 files=("tiny.gin", "sparsity/gmp.gin")) == 2
    err = capsys.readouterr().err
    assert "DropGrowSchedule.frequency (from --gin.DropGrowSchedule.frequency=3)" in err
    assert not os.path.exists(tmp_path / "w" / "checkpoints" / "4")


@pytest.mark.parametrize("binding, needle", [
    ("make_method.name=rigl", "strings need quotes, e.g. --gin.make_method.name=\"'rigl'\""),
    ("TrainConfig.num_steps='20'", "TrainConfig.num_steps='20' has type str; expected int"),
    ("ModelConfig.num_layers=2.5", "ModelConfig.num_layers=2.5 has type float; expected int"),
    ("MaskedPruningMethod.criterion='hessian'", "not a registered criterion"),
    ("Nope.x=1", "Nope"),
])
def test_common_mistakes_give_one_line(tmp_path, capsys, binding, needle):
    files = ("tiny.gin", "sparsity/gmp.gin")
    assert train(tmp_path / "w", f"--gin.{binding}", files=files) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_workdir_that_is_a_file_or_unwritable(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert train(f) == 2
    assert "is an existing file, not a directory" in capsys.readouterr().err
    assert train(f / "sub") == 2  # under a file: cannot be created
    assert "is not writable" in capsys.readouterr().err


def test_a_run_whose_steps_are_all_skipped_stops(tmp_path, capsys):
    w = tmp_path / "w"
    assert train(w, "--gin.learning_rate_schedule.peak_lr=1e30",
                 "--gin.learning_rate_schedule.warmup_steps=0",
                 "--gin.TrainConfig.max_skipped_steps=3") == 1
    err = capsys.readouterr().err
    assert "3 steps in a row skipped" in err and "TrainConfig.max_skipped_steps=3" in err


def test_restart_from_scratch_moves_old_metrics_aside_and_a_cut_line_is_tolerated(tmp_path):
    w = tmp_path / "w"
    assert train(w) == 0
    # a crash left half a line at the end of metrics.jsonl: resuming still works
    with open(w / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "loss": 1.')
    assert train(w) == 0  # finished run: resumes at 8, nothing to do, metrics intact
    assert all(isinstance(r, dict) for r in read_metrics(str(w / "metrics.jsonl")))
    assert '{"step": 9, "loss": 1.' not in open(w / "metrics.jsonl").read()
    # every checkpoint unreadable: the run starts over at step 0 with fresh metrics
    for step in ("4", "8"):
        state = w / "checkpoints" / step / "state"
        for root, _, names in os.walk(state):
            for n in names:
                open(os.path.join(root, n), "w").close()
    old = read_metrics(str(w / "metrics.jsonl"))
    assert train(w) == 0
    assert os.path.isfile(w / "previous.1" / "metrics.jsonl")
    assert read_metrics(str(w / "previous.1" / "metrics.jsonl")) == old
    steps = [r["step"] for r in read_metrics(str(w / "metrics.jsonl")) if "loss" in r]
    assert steps == [4, 8]


PLUGIN = textwrap.dedent('''
    """An outside module registering a criterion and a router (it imports nothing private)."""
    import gin
    import jax
    import jax.numpy as jnp

    from sparsejax.models.moe.router import ROUTERS, Router, softmax_topk
    from sparsejax.sparsity.criteria import CRITERIA, Criterion

    CALLS = {"criterion": 0}


    @CRITERIA.register("neg_magnitude")
    class NegMagnitude(Criterion):
        """Keeps the smallest weights (a deliberately odd criterion)."""

        def scores(self, weights, *, grads=None, rng=None, state=None):
            CALLS["criterion"] += 1
            return jax.tree.map(lambda w: -jnp.abs(w), weights)


    @gin.configurable
    @ROUTERS.register("first_expert")
    class FirstExpert(Router):
        """Sends every token to expert 0 (top-1), whatever the logits say."""

        def __init__(self, strength: float = 1e6):
            self.strength = strength

        def route(self, logits, *, top_k, capacity, bias=None):
            forced = logits.at[:, 0].add(self.strength)
            return softmax_topk(forced, top_k, renormalize=True)
''')


def test_outside_criterion_and_router_train_through_the_cli(tmp_path):
    (tmp_path / "my_plugins.py").write_text(PLUGIN)
    w = tmp_path / "w"
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0",
               JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "sparsejax.cli", "train", "--import=my_plugins",
           "--gin_file=tiny.gin", "--gin_file=sparsity/magnitude_oneshot.gin",
           "--gin.MaskedPruningMethod.criterion='neg_magnitude'", "--gin.MoeMlp.num_experts=4",
           "--gin.MoeMlp.top_k=1", "--gin.MoeMlp.router='first_expert'",
           "--gin.FirstExpert.strength=1e3",
           "--gin.OneShotSchedule.step=6", f"--workdir={w}", "--quiet", *FAST,
           "--gin.ModelConfig.mlp_kinds=('moe',)"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    records = read_metrics(str(w / "metrics.jsonl"))
    loads = [np.asarray(v) for r in records for k, v in r.items() if k.endswith("expert_load")]
    assert loads and all(load[0] == pytest.approx(1.0) for load in loads)  # the router ran
    # the criterion ran: at the prune (step 6) it kept the smallest weights, so at step 4
    # (dense, 2 small steps before) the kept entries were far smaller than the pruned ones
    before = np.asarray(restore_state_numpy(str(w), 4)[1]["params"]["layer_0"]["attn"]["query"])
    kept = np.asarray(restore_state_numpy(str(w))[1]["sparsity"]["masks"]["layer_0"]["attn"]["query"])
    assert kept.mean() == pytest.approx(0.2, abs=0.01)
    assert np.abs(before[kept]).max() < np.median(np.abs(before[~kept]))
    text = open(w / "config.gin").read()
    assert text.startswith("import my_plugins")  # so eval and resume find the plug-ins
    assert "FirstExpert.strength = 1000.0" in text
    ev = subprocess.run([sys.executable, "-m", "sparsejax.cli", "eval", f"--workdir={w}"],
                        cwd=ROOT, env=env, capture_output=True, text=True)
    assert ev.returncode == 0, ev.stderr[-3000:]
    ls = subprocess.run([sys.executable, "-m", "sparsejax.cli", "list", "--import=my_plugins"],
                        cwd=ROOT, env=env, capture_output=True, text=True)
    assert "neg_magnitude" in ls.stdout and "Keeps the smallest weights" in ls.stdout
    assert "first_expert" in ls.stdout


def test_list_prints_configs_and_every_registry(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    from sparsejax.registry import REGISTRIES
    for kind, reg in REGISTRIES.items():
        assert f"\n{kind} ({len(reg)}):" in out
        for name, doc in reg.describe().items():
            assert name in out and doc, (kind, name)
    assert "sparsity/rigl.gin" in out and "RigL:" in out
    from sparsejax.interop.families import FAMILIES
    assert f"\nhugging face family (import-hf, export-hf) ({len(FAMILIES)}):" in out
    for name in ("llama", "qwen3", "qwen3_moe", "olmoe"):
        assert f"  {name:<34} {FAMILIES[name]}" in out
    for kind in ("criterion", "router", "schedule", "structure", "sparsity method",
                 "distribution"):
        assert kind in REGISTRIES


@pytest.mark.parametrize("files, binding, needle", [
    (("tiny.gin", "moe/top2.gin"), "MoeMlp.capacity_factor=2.0", "dropless"),
    (("tiny.gin", "moe/expert_choice.gin"), "MoeMlp.load_balance_weight=0.1", "by construction"),
    (("tiny.gin", "moe/top2.gin"), "MoeMlp.expert_parallel='ragged'", "no 'expert' axis"),
    (("tiny.gin", "moe/top2.gin"), "SigmoidTopKRouter.routed_scaling=2.5",
     "SigmoidTopKRouter.routed_scaling"),
])
def test_moe_settings_the_configuration_never_reads_are_refused(tmp_path, capsys, files,
                                                                binding, needle):
    assert train(tmp_path / "w", f"--gin.{binding}", "--gin.ModelConfig.mlp_kinds=('moe',)",
                 files=files) == 2
    assert needle in capsys.readouterr().err


def test_rigl_with_per_entry_bias_correction_restarts_counts_where_masks_changed(tmp_path):
    """The shipped RigL preset with `make_optimizer.bias_correction='per_entry'`: the
    checkpointed Adam counts restart exactly where the masks changed."""
    assert train(tmp_path, "--gin.make_optimizer.bias_correction='per_entry'",
                 "--gin.DropGrowSchedule.frequency=0.25",
                 files=("tiny.gin", "sparsity/rigl.gin")) == 0
    step, state = restore_state_numpy(str(tmp_path))
    counts = state["opt_state"][1][0]["count"]
    assert np.all(counts["final_norm"]["scale"] == step)  # never masked: counted every step
    kernel = counts["layer_0"]["mlp"]["wi_up"]["kernel"]
    restarted = kernel < step
    assert restarted.any() and (kernel >= 1).all() and (kernel[~restarted] == step).all()
    # mask updates at steps 2, 4, 6 of 8: an entry restarted there has seen 6, 4 or 2 steps
    assert np.isin(np.unique(kernel[restarted]), [2, 4, 6]).all()
