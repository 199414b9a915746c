"""Every shipped config under configs/sparsity, configs/moe and configs/attention does what
its comment says, stacked the way the docs guides show.

* At the shipped lengths of tiny (60 steps), small (300) and base (200), each sparsity
  preset's schedule fires inside the run and reaches its target over the real model's shapes
  (the schedule, bound to the run as the trainer binds it, is simulated on the host: cheap).
* Trained through `sparsejax train` on tiny (shortened to 20 steps; the presets' steps are
  fractions, so they scale with it), the logged metrics and the final checkpoint show the
  intended state: final density at the target within 1%, drop/grow updates with nonzero
  churn, SPDF dense at the end, one-shot pruning at its step, the target average density,
  exact N:M groups, pruned and padded weights exactly zero.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sparsejax import cli, config
from sparsejax.models.transformer import ModelConfig, Transformer, padded_params
from sparsejax.sparsity import RunInfo, make_method, masks as masks_lib, paths as paths_lib
from sparsejax.sparsity import schedules as S
from sparsejax.train.metrics import read_metrics
from sparsejax.train.trainer import TrainConfig

MODELS = {"tiny.gin": 60, "experiments/small.gin": 300, "base.gin": 200}
NUM_STEPS = 20  # the trained runs on tiny
COMMON = [f"--gin.TrainConfig.num_steps={NUM_STEPS}", "--gin.TrainConfig.log_every=5",
          f"--gin.TrainConfig.eval_every={NUM_STEPS}", "--gin.TrainConfig.eval_tokens=512",
          f"--gin.TrainConfig.checkpoint_every={NUM_STEPS}", "--gin.TrainConfig.progress_bar=False",
          "--gin.TrainConfig.async_checkpoints=False",
          # a 1-device mesh: compiling for the 8 simulated test devices costs 1.5-4x more here
          "--gin.make_mesh.num_devices=1", "--gin.ModelConfig.num_layers=1"]
REL_TOL = 0.01  # final density within 1% of the target
SKIP = {"upcycle.gin"}  # needs a dense run's checkpoint to start from (tests/train/test_warm_start.py)

# What each preset promises, in fractions of the run: the final kept fraction of the prunable
# params, when its mask updates run, and what the checkpoint must show.
#   updates: "none" | "drop_grow" (>= 3, with churn) | "gradual" (>= 3, monotone) |
#            "stages" (compact GMP: >= 1 in the trained run, density falling at each) |
#            ("at", fraction) (exactly one update there)
# Monarch at nblocks 4 on tiny's projections [in, out] with middle width m = min(in, out):
# (in*m + m*out) / 4 stored of in*out (q, o: 64x64; k, v: 64x32; gate, up: 64x128; wo: 128x64)
_MONARCH_SHAPES = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]
MONARCH_TINY = (sum((i * min(i, o) + min(i, o) * o) / 4 for i, o in _MONARCH_SHAPES)
                / sum(i * o for i, o in _MONARCH_SHAPES))
SPARSITY = {
    "dense.gin": dict(density=1.0, updates="none"),
    "static_random.gin": dict(density=0.1, updates="none", ckpt="zeros"),
    "static_magnitude.gin": dict(density=0.1, updates="none", ckpt="zeros"),
    "magnitude_oneshot.gin": dict(density=0.2, updates=("at", 0.5), ckpt="zeros"),
    "gmp.gin": dict(density=0.1, updates="gradual", ckpt="zeros"),
    "global_gmp.gin": dict(density=0.1, updates="gradual", ckpt="zeros"),
    "movement.gin": dict(density=0.1, updates="gradual", ckpt="zeros"),
    "average_density.gin": dict(density=None, avg_density=0.5, updates="gradual", ckpt="zeros"),
    "snip.gin": dict(density=0.1, updates=("at", 0.0), ckpt="zeros"),
    "set.gin": dict(density=0.1, updates="drop_grow", ckpt="zeros"),
    "rigl.gin": dict(density=0.1, updates="drop_grow", ckpt="zeros"),
    "spdf.gin": dict(density=1.0, sparse_density=0.25, updates=("at", 0.5)),
    "nm_2of4.gin": dict(density=0.5, updates=("at", 0.5), ckpt="nm"),
    "srste_2of4.gin": dict(density=0.5, updates="none", ckpt="nm"),
    "learned_2of4.gin": dict(density=0.5, updates="none", ckpt="nm"),
    "sparse_finetune.gin": dict(density=0.01, updates=("at", 0.2), ckpt="frozen_base"),
    "spiel.gin": dict(density=0.01, updates="drop_grow", ckpt="frozen_base"),
    # k = max(1, round(0.1 * in_blocks)) stored 16x16 blocks per column: 1 of 4 for tiny's
    # 64-wide inputs, 1 of 8 for wo's 128: 2/9 of the projections' entries
    "block_static.gin": dict(density=2 / 9, updates="none", ckpt="compact"),
    "block_set.gin": dict(density=2 / 9, updates="drop_grow", ckpt="compact"),
    "block_rigl.gin": dict(density=2 / 9, updates="drop_grow", ckpt="compact"),
    # from every block to the same one-block floor, the fan-in shrinking in stages (the
    # stages are planned from the params at init: none are known before)
    "block_gmp.gin": dict(density=2 / 9, updates="stages", ckpt="compact"),
    # nblocks 4: two factors of 4 blocks each, (in*m + m*out) / 4 entries of in*out
    "monarch.gin": dict(density=MONARCH_TINY, updates="none"),
}
MOE = {  # num_experts, and whether routing is dropless (dropped_fraction must be 0)
    "expert_choice.gin": dict(experts=8, dropless=True, uniform=True),
    "relu_router.gin": dict(experts=8, dropless=True),
    "shared_sigmoid_auxfree.gin": dict(experts=16, dropless=True, bias_rate=0.001),
    "switch_top1.gin": dict(experts=8, dropless=False),
    "top2.gin": dict(experts=8, dropless=True),
}


def config_names(kind: str) -> list[str]:
    return sorted(c[len(kind) + 1:] for c in config.shipped_configs()
                  if c.startswith(kind + "/") and c[len(kind) + 1:] not in SKIP)


ACTIVATION = {"relu.gin": "relu", "relu2.gin": "relu2", "prosparse.gin": "relu"}


def test_every_shipped_config_has_expectations():
    assert config_names("sparsity") == sorted(SPARSITY)
    assert config_names("moe") == sorted(MOE)
    assert config_names("scale") == ["pod.gin"]  # test_scale_pod_config_trains
    assert config_names("activation") == sorted(ACTIVATION)


# --- the schedules at every model's own length -----------------------------------------------


def abstract_params(model_config: ModelConfig):
    model = Transformer(model_config)
    tokens = jax.ShapeDtypeStruct((1, 8), np.int32)
    variables = jax.eval_shape(lambda t: model.init({"params": jax.random.key(0), "router":
                                                     jax.random.key(0)}, t), tokens)
    return nn.meta.unbox(variables["params"])


def check_update_steps(kind, steps: list[int], n: int, name: str) -> None:
    if kind == "none":
        assert steps == [], (name, steps)
    elif kind == "stages":
        assert all(0 <= t < n for t in steps), (name, n, steps)
    elif kind in ("drop_grow", "gradual"):
        assert len(steps) >= 3 and all(0 <= t < n for t in steps), (name, n, steps)
    else:
        assert steps == [round(kind[1] * n)], (name, n, steps)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_sparsity_preset_fires_within_the_model_run(model):
    n = MODELS[model]
    config.parse_gin([model], [])
    assert TrainConfig().num_steps == n, "MODELS lists the shipped length"
    model_config = ModelConfig()
    params = abstract_params(model_config)
    for name, exp in SPARSITY.items():
        config.parse_gin([model, f"sparsity/{name}"], [])
        method = make_method().bind(RunInfo(num_steps=n, valid=padded_params(model_config)))
        steps = [t for t in range(n) if method.is_update_step(t)]
        check_update_steps(exp["updates"], steps, n, name)
        schedule = getattr(method, "schedule", None)
        if exp["updates"] == "gradual":  # the last update reaches the final density
            assert float(schedule.scale(steps[-1])) == pytest.approx(1.0), (name, steps[-1])
        if not hasattr(method, "layer_targets"):
            continue
        prunable = paths_lib.prunable_tree(params, method.include, method.exclude)
        masks = jax.tree.map(lambda p, ok: p if ok else None, params, prunable)
        targets = method.layer_targets(masks)
        sizes = masks_lib.real_sizes(masks, method.valid)
        mean = sum(targets[p] * sizes[p] for p in targets) / sum(sizes.values())
        if exp.get("avg_density") is not None:
            avg = S.realized_average_density(schedule, method.density, n)
            assert avg == pytest.approx(exp["avg_density"], rel=0.02), (model, name)
        else:
            target = exp.get("sparse_density", exp["density"])
            assert mean == pytest.approx(target, rel=REL_TOL), (model, name, mean)
        for path, m in paths_lib.named_leaves(masks):
            method.structure.check(path, m.shape)  # N:M groups fit every prunable kernel


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("kind", ["moe", "attention"])
def test_moe_and_attention_configs_build_on_every_model(model, kind):
    for name in config_names(kind):
        config.parse_gin([model, f"{kind}/{name}"], [])
        cfg = ModelConfig()
        params = abstract_params(cfg)
        if kind == "moe":
            assert any("moe" in p for p, _ in paths_lib.named_leaves(params)), (model, name)
        else:
            assert {"block_sparse", "nsa"} & set(cfg.attention_kinds), (model, name)


# --- trained on tiny -------------------------------------------------------------------------


def train(tmp_path, config_file: str, bindings: list[str] = (), extra_files: list[str] = ()
          ) -> list[dict]:
    rc = cli.main(["train", "--gin_file=tiny.gin", f"--gin_file={config_file}",
                   *[f"--gin_file={f}" for f in extra_files],
                   f"--workdir={tmp_path}", "--quiet", *COMMON, *[f"--gin.{b}" for b in bindings]])
    assert rc == 0, f"{config_file} failed to train (exit code {rc})"
    records = read_metrics(str(tmp_path / "metrics.jsonl"))
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == list(range(5, NUM_STEPS + 1, 5))
    for r in logged:
        for key in ("loss", "aux_loss", "grad_norm"):
            assert r[key] is not None and math.isfinite(r[key]), (config_file, r["step"], key)
        assert r["nonfinite"] == 0
    # No blow-up: no worse than at the first log or than predicting every byte uniformly
    # (pruning to 10% inside 20 steps may raise the loss for a while, and a 10% static or 1%
    # trainable model from scratch barely learns in 20 steps, so not "decreases").
    bound = max(1.05 * logged[0]["loss"], math.log(259))
    assert logged[-1]["loss"] < bound, (config_file, [r["loss"] for r in logged])
    evals = [r for r in records if "eval_loss" in r]
    assert len(evals) == 1 and math.isfinite(evals[0]["eval_loss"])
    return records


def restore_state(tmp_path) -> dict:
    return ocp.PyTreeCheckpointer().restore(str(tmp_path / "checkpoints" / str(NUM_STEPS) / "state"))


def masked_leaves(masks, *trees):
    """[(path, mask, leaf of each tree at that path)] over the non-None masks."""
    out = []

    def walk(m, ts, path):
        if m is None:
            return
        if isinstance(m, dict):
            for k in m:
                walk(m[k], [t[k] for t in ts], path + (k,))
        else:
            out.append(("/".join(path), np.asarray(m), *[np.asarray(t) for t in ts]))

    walk(masks, list(trees), ())
    return out


def check_checkpoint(tmp_path, kind: str, density: float):
    state = restore_state(tmp_path)
    sparsity, params = state["sparsity"], state["params"]
    leaves = masked_leaves(sparsity["masks"], params)
    assert leaves, "no masked params in the checkpoint"
    vocab = ModelConfig().vocab_size
    real = sum(m[:, :vocab].size if p == "lm_head/kernel" else m.size for p, m, _ in leaves)
    kept = sum(int(m.sum()) for _, m, _ in leaves) / real
    assert kept == pytest.approx(density, rel=REL_TOL)
    head = dict((p, m) for p, m, _ in leaves).get("lm_head/kernel")
    if head is not None:  # the vocab padding is never kept
        assert not head[:, vocab:].any(), "padded LM-head columns are kept"
    if kind == "zeros":
        for path, m, p in leaves:
            assert m.dtype == bool and m.shape == p.shape, path
            assert np.all(p[~m] == 0), f"{path}: pruned weights are not zero"
            # (kept weights can be 0: RigL/SET grow at 0, and unseen bytes' rows get no gradient)
            assert np.count_nonzero(p[m]) > 0.5 * m.sum(), f"{path}: kept weights are zero"
    elif kind == "nm":  # 2 of every 4 consecutive entries along the input (second-last) dim
        for path, m, _ in leaves:
            if path == "lm_head/kernel":
                m = m[:, :vocab]
            g = np.moveaxis(m, -2, -1)
            g = g.reshape(*g.shape[:-1], g.shape[-1] // 4, 4)
            assert np.all(g.sum(-1) == 2), f"{path}: mask is not 2:4"
    elif kind == "frozen_base":  # sparse fine-tuning: only the selected entries moved
        for path, m, p, b in masked_leaves(sparsity["masks"], params, sparsity["base"]):
            assert np.array_equal(p[~m], b[~m]), f"{path}: frozen entries moved"
    return state


def check_compact_checkpoint(tmp_path, density: float):
    """Compact weights: every attention and MLP projection is values + a layout in the
    sparsity state (distinct input blocks per column), Adam's moments are values-shaped, and
    the stored entries are `density` of the dense projections'."""
    state = restore_state(tmp_path)
    layout, params = state["sparsity"]["layout"], state["params"]
    stored = dense = 0  # tiny's projections are 64 wide, mlp 128
    assert sorted(layout) == ["layer_0"]  # COMMON trains one layer
    for layer in layout:
        for group, names in (("attn", ("query", "key", "value", "out")),
                             ("mlp", ("wi_gate", "wi_up", "wo"))):
            for name in names:
                values = np.asarray(params[layer][group][name]["values"])
                idx = np.asarray(layout[layer][group][name]["indices"])
                ob, k, bi, bo = values.shape
                in_features = 128 if name == "wo" else 64
                assert idx.shape == (ob, k) and idx.min() >= 0 and idx.max() < in_features // bi
                assert all(len(set(r)) == k for r in idx.tolist()), (layer, name)
                stored, dense = stored + values.size, dense + in_features * ob * bo
    assert "kernel" in params["lm_head"]
    assert stored / dense == pytest.approx(density)
    moments = [x for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x) == 4]
    assert moments and all(m.shape[2:] == (16, 16) for m in moments)


@pytest.mark.parametrize("name", sorted(SPARSITY))
def test_sparsity_config_trains(name, tmp_path):
    exp = SPARSITY[name]
    records = train(tmp_path, f"sparsity/{name}")
    logged = [r for r in records if "loss" in r]
    updates = {r["step"]: r for r in records if "sparsity/churn" in r}
    check_update_steps(exp["updates"], sorted(updates), NUM_STEPS, name)
    final = logged[-1]
    if exp.get("avg_density") is not None:  # the running average over the whole run
        assert final["sparsity/avg_density"] == pytest.approx(exp["avg_density"], rel=0.02)
    else:
        assert final["sparsity/density"] == pytest.approx(exp["density"], rel=REL_TOL), name
    if exp["updates"] == "drop_grow":
        assert all(r["sparsity/churn"] > 0 for r in updates.values()), name
        assert len({round(r["sparsity/density"], 6) for r in updates.values()}) == 1
    if exp["updates"] == "stages":
        densities = [logged[0]["sparsity/density"]] + [
            updates[t]["sparsity/density"] for t in sorted(updates)]
        assert len(densities) >= 2 and all(b < a for a, b in zip(densities, densities[1:]))
    if exp["updates"] == "gradual":
        densities = [updates[t]["sparsity/density"] for t in sorted(updates)]
        assert all(b <= a + 1e-9 for a, b in zip(densities, densities[1:])), densities
        assert densities[0] > densities[-1]
    if name == "spdf.gin":  # sparse before the dense step, dense after
        first = logged[0]
        assert first["sparsity/density"] == pytest.approx(exp["sparse_density"], rel=REL_TOL)
    if name == "dense.gin":  # the dense method counts real parameters only (no vocab padding)
        params = restore_state(tmp_path)["params"]
        total = sum(np.asarray(x).size for x in jax.tree.leaves(params))
        cfg = ModelConfig(num_layers=1, vocab_size=259)
        padding = 2 * (cfg.padded_vocab_size - cfg.vocab_size) * 64  # embedding rows, head columns
        assert final["sparsity/param_count"] == total - padding
        assert not np.asarray(params["lm_head"]["kernel"])[:, 259:].any()
        assert not np.asarray(params["embed"]["embedding"])[259:].any()
    if exp.get("ckpt") == "compact":
        check_compact_checkpoint(tmp_path, exp["density"])
    elif "ckpt" in exp:  # (average_density: the final density its schedule solved for)
        check_checkpoint(tmp_path, exp["ckpt"], exp["density"] or final["sparsity/density"])


@pytest.mark.parametrize("name", config_names("attention"))
def test_attention_config_trains(name, tmp_path):
    records = train(tmp_path, f"attention/{name}")
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0], (name, losses)


@pytest.mark.parametrize("name", config_names("moe"))
def test_moe_config_trains(name, tmp_path):
    exp = MOE[name]
    records = train(tmp_path, f"moe/{name}", ["ModelConfig.num_layers=2"])
    logged = [r for r in records if "loss" in r]
    for r in logged:
        loads = {k: v for k, v in r.items() if k.endswith("expert_load")}
        assert loads, f"{name}: no expert load logged"
        for key, load in loads.items():
            load = np.asarray(load)
            assert load.shape == (exp["experts"],), key
            assert np.all(load >= 0) and load.sum() == pytest.approx(1.0, abs=1e-4), (key, load)
            if exp.get("uniform"):  # expert choice: every expert takes the same number of tokens
                np.testing.assert_allclose(load, 1.0 / load.size, atol=1e-6)
        for key, v in r.items():
            if key.endswith("dropped_fraction"):
                assert 0.0 <= v < 1.0
                if exp.get("dropless"):
                    assert v == 0.0, (key, v)
    moe_state = restore_state(tmp_path).get("moe_state")
    if "bias_rate" in exp:  # aux-loss-free balancing: a bias per expert, moved by the updates
        biases = [np.asarray(b) for b in _leaves(moe_state)]
        assert biases, f"{name}: no moe_state in the checkpoint"
        for b in biases:
            assert b.shape == (exp["experts"],)
            assert np.any(b != 0), "bias never updated"
            assert np.max(np.abs(b)) <= NUM_STEPS * exp["bias_rate"] * (1 + 1e-5)
    else:
        assert not _leaves(moe_state), f"{name}: unexpected moe_state"


def _leaves(tree) -> list:
    if tree is None:
        return []
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in _leaves(v)]
    return [tree]


def test_scale_pod_config_trains(tmp_path):
    """scale/pod.gin stacked on tiny (and a top-2 MoE layer with global-batch balancing, as
    the scaling guide shows): fsdp mesh, 4 micro-batches, scanned layers, the remat policy, bf16
    compute and the profile all take effect; the stacked checkpoint converts to per-layer."""
    from sparsejax.models.layer_stack import unstack_layers
    records = train(tmp_path, "scale/pod.gin", [
        "ModelConfig.num_layers=2", "ModelConfig.mlp_kinds=('dense', 'moe')",
        "MoeMlp.load_balance_weight=0.0", "MoeMlp.global_load_balance_weight=0.01",
        "MoeMlp.num_experts=4"])
    operative = (tmp_path / "config.gin").read_text()
    for line in ("TrainConfig.microbatches = 4", "ModelConfig.scan_layers = True",
                 "ModelConfig.remat_policy = 'save_attention_out'", "make_mesh.fsdp = -1",
                 "ModelConfig.dtype = 'bfloat16'", "TrainConfig.profile_steps = (10, 13)"):
        assert line in operative, line
    logged = [r for r in records if "loss" in r]
    assert all(k in logged[-1] for k in ("mfu", "flops_per_token/active",
                                          "model/layer_1/moe/global_load_balance_loss"))
    assert "model/layer_1/moe/expert_load" in logged[-1]
    params = restore_state(tmp_path)["params"]
    wo = params["layers"]["block_1"]["moe"]["experts"]["wo"]
    assert np.asarray(wo).shape[:2] == (1, 4)  # [layers / period, experts, ...]
    assert set(unstack_layers(params)) == {"embed", "final_norm", "lm_head", "layer_0",
                                           "layer_1"}
    traces = list((tmp_path / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1
    # activation statistics are sown on the stacked group and reported per layer
    ev = [r for r in records if "eval_loss" in r][-1]
    assert 0 <= ev["act/zero_fraction/layer_0/mlp"] <= 1 and "act/zero_fraction/layer_1/moe" in ev


# --- activation configs (configs/activation/) ------------------------------------------------


@pytest.fixture(scope="module")
def relu_run(tmp_path_factory):
    """tiny + activation/relu.gin, trained once for the activation tests below."""
    path = tmp_path_factory.mktemp("relu")
    return path, train(path, "activation/relu.gin")


def final_eval(records) -> dict:
    return [r for r in records if "eval_loss" in r][-1]


def test_relu_config_trains(relu_run):
    path, records = relu_run
    assert "ModelConfig.mlp_activation = 'relu'" in (path / "config.gin").read_text()
    ev = final_eval(records)
    assert 0.2 < ev["act/zero_fraction"] < 0.95  # a ReLU gate zeroes entries exactly


def test_relu2_config_trains(tmp_path):
    records = train(tmp_path, "activation/relu2.gin")
    assert "ModelConfig.mlp_activation = 'relu2'" in (tmp_path / "config.gin").read_text()
    assert 0.2 < final_eval(records)["act/zero_fraction"] < 0.95


def test_prosparse_config_trains_sparser_than_relu(relu_run, tmp_path):
    from sparsejax.sparsity.activation.regularizer import ProSparseRegularizer
    records = train(tmp_path, "activation/prosparse.gin")
    config.parse_gin(["activation/prosparse.gin"], [])
    reg = ProSparseRegularizer().bind(NUM_STEPS)
    logged = [r for r in records if "loss" in r]
    for r in logged:  # the factor of the step that produced the record (step - 1)
        assert r["model/act_reg/factor"] == pytest.approx(float(reg.factor(r["step"] - 1)), rel=1e-5)
        assert r["model/act_reg/l1"] > 0
    assert logged[-1]["model/act_reg/factor"] == pytest.approx(max(reg.factors))
    relu = final_eval(relu_run[1])["act/zero_fraction"]
    assert final_eval(records)["act/zero_fraction"] > relu + 0.005


def test_prosparse_combines_with_weight_sparsity_and_moe(tmp_path):
    """ProSparse + gradual magnitude pruning + top-2 MoE layers in one run: the masks reach
    their density, the penalty is on, and eval measures the dense and the routed MLPs."""
    records = train(tmp_path, "activation/prosparse.gin", ["ModelConfig.num_layers=2"],
                    extra_files=["sparsity/gmp.gin", "moe/top2.gin"])
    final = [r for r in records if "loss" in r][-1]
    assert final["sparsity/density"] == pytest.approx(0.1, rel=REL_TOL)
    assert final["model/act_reg/factor"] > 0 and final["model/act_reg/l1"] > 0
    ev = final_eval(records)
    assert "act/zero_fraction/layer_0/mlp" in ev and "act/zero_fraction/layer_1/moe" in ev
