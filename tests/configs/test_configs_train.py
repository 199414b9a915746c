"""Every example config under configs/sparsity and configs/moe trains through `sparsejax train`
(on top of configs/tiny.gin, a few steps) and shows the behaviour it asks for: the density the
method should have at each logged step, mask churn at drop/grow updates, pruned weights exactly
zero in the checkpoint, expert loads summing to one, the aux-loss-free bias being updated."""
from __future__ import annotations

import math
import pathlib

import numpy as np
import orbax.checkpoint as ocp
import pytest

from sparsejax import cli
from sparsejax.train.metrics import read_metrics



CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"
NUM_STEPS = 6
# Train steps 0..5, log after steps 2, 4, 6; mask updates run before the train step of their step.
COMMON = [f"--gin.TrainConfig.num_steps={NUM_STEPS}", "--gin.TrainConfig.log_every=2",
          "--gin.TrainConfig.eval_every=6", "--gin.TrainConfig.eval_tokens=512",
          "--gin.TrainConfig.checkpoint_every=6", "--gin.TrainConfig.progress_bar=False",
          "--gin.TrainConfig.async_checkpoints=False",
          # a 1-device mesh: compiling for the 8 simulated test devices costs 1.5-4x more here
          "--gin.make_mesh.num_devices=1"]
ERK_TOL = 0.005  # overall density of per-layer rounded ERK / uniform counts
SKIP = {"upcycle.gin"}  # needs a dense run's checkpoint to start from

# Per sparsity config: schedule bindings that put mask updates inside the 6 steps, the density
# logged after steps 2/4/6, the mask-update records {step: (density, churn > 0)}, and what the
# checkpoint must show ("zeros": pruned params are exactly 0; "nm": 2 of every 4 along the
# input dim; "frozen_base": untrainable entries equal the stored base).
SPARSITY = {
    "dense.gin": dict(bind=[], logged=None, updates={}),
    "static_random.gin": dict(bind=[], logged={2: 0.1, 4: 0.1, 6: 0.1}, updates={}, ckpt="zeros"),
    "gmp.gin": dict(  # cubic: density 1 - (1 - (1 - p)^3) * 0.9 at p = 0, 1/2, 1
        bind=["PolynomialSchedule.start=1", "PolynomialSchedule.end=5",
              "PolynomialSchedule.frequency=2"],
        logged={2: 1.0, 4: 1 - 0.875 * 0.9, 6: 0.1},
        updates={1: (1.0, False), 3: (1 - 0.875 * 0.9, True), 5: (0.1, True)}, ckpt="zeros"),
    "magnitude_oneshot.gin": dict(bind=["OneShotSchedule.step=3"], logged={2: 1.0, 4: 0.2, 6: 0.2},
                                  updates={3: (0.2, True)}, ckpt="zeros"),
    "nm_2of4.gin": dict(bind=["OneShotSchedule.step=3"], logged={2: 1.0, 4: 0.5, 6: 0.5},
                        updates={3: (0.5, True)}, ckpt="nm"),
    "snip.gin": dict(bind=[], logged={2: 0.1, 4: 0.1, 6: 0.1}, updates={0: (0.1, True)},
                     ckpt="zeros"),
    "rigl.gin": dict(bind=["DropGrowSchedule.frequency=2"], logged={2: 0.1, 4: 0.1, 6: 0.1},
                     updates={2: (0.1, True), 4: (0.1, True)}, ckpt="zeros"),
    "set.gin": dict(bind=["DropGrowSchedule.frequency=2"], logged={2: 0.1, 4: 0.1, 6: 0.1},
                    updates={2: (0.1, True), 4: (0.1, True)}, ckpt="zeros"),
    "spdf.gin": dict(bind=["SparseThenDenseSchedule.dense_step=3"],
                     logged={2: 0.25, 4: 1.0, 6: 1.0}, updates={3: (1.0, True)}, ckpt="zeros"),
    "sparse_finetune.gin": dict(bind=["SparseFinetuneMethod.select_step=3"],
                                logged={2: 1.0, 4: 0.01, 6: 0.01}, updates={3: (0.01, True)},
                                ckpt="frozen_base"),
    "srste_2of4.gin": dict(bind=[], logged={2: 0.5, 4: 0.5, 6: 0.5}, updates={}, ckpt="nm"),
    "learned_2of4.gin": dict(bind=[], logged={2: 0.5, 4: 0.5, 6: 0.5}, updates={}, ckpt="nm"),
}
MOE = {  # num_experts, and whether routing is dropless (dropped_fraction must be 0)
    "expert_choice.gin": dict(experts=8, dropless=True, uniform=True),
    "relu_router.gin": dict(experts=8, dropless=True),
    "shared_sigmoid_auxfree.gin": dict(experts=16, dropless=True, bias_rate=0.001),
    "switch_top1.gin": dict(experts=8, dropless=False),
    "top2.gin": dict(experts=8, dropless=True),
}


def config_names(kind: str) -> list[str]:
    return sorted(p.name for p in (CONFIGS / kind).glob("*.gin") if p.name not in SKIP)


def train(tmp_path, config: str, bindings: list[str]) -> list[dict]:
    rc = cli.main(["train", "--gin_file=tiny.gin", f"--gin_file={config}",
                   f"--workdir={tmp_path}", "--quiet", *COMMON, *[f"--gin.{b}" for b in bindings]])
    assert rc == 0, f"{config} failed to train (exit code {rc})"
    records = read_metrics(str(tmp_path / "metrics.jsonl"))
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == [2, 4, 6]
    for r in logged:
        for key in ("loss", "aux_loss", "grad_norm"):
            assert r[key] is not None and math.isfinite(r[key]), (config, r["step"], key, r[key])
        assert r["nonfinite"] == 0
    # No blow-up (a one-shot prune may raise the loss for a step or two, so not "decreases").
    assert logged[-1]["loss"] < 1.05 * logged[0]["loss"], (config, [r["loss"] for r in logged])
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


def check_checkpoint(tmp_path, kind: str, expected_density: float):
    state = restore_state(tmp_path)
    sparsity, params = state["sparsity"], state["params"]
    leaves = masked_leaves(sparsity["masks"], params)
    assert leaves, "no masked params in the checkpoint"
    kept = sum(int(m.sum()) for _, m, _ in leaves) / sum(m.size for _, m, _ in leaves)
    assert kept == pytest.approx(expected_density, abs=ERK_TOL)
    if kind == "zeros":
        for path, m, p in leaves:
            assert m.dtype == bool and m.shape == p.shape, path
            assert np.all(p[~m] == 0), f"{path}: pruned weights are not zero"
            # (kept weights can be 0: RigL/SET grow at 0, and unseen bytes' rows get no gradient)
            assert np.count_nonzero(p[m]) > 0.5 * m.sum(), f"{path}: kept weights are zero"
    elif kind == "nm":  # 2 of every 4 consecutive entries along the input (second-last) dim
        for path, m, _ in leaves:
            g = np.moveaxis(m, -2, -1)
            g = g.reshape(*g.shape[:-1], g.shape[-1] // 4, 4)
            assert np.all(g.sum(-1) == 2), f"{path}: mask is not 2:4"
    elif kind == "frozen_base":  # LT-SFT: only the selected entries moved from the base
        for path, m, p, b in masked_leaves(sparsity["masks"], params, sparsity["base"]):
            assert np.array_equal(p[~m], b[~m]), f"{path}: frozen entries moved"
            assert np.any(p[m] != b[m]), f"{path}: trainable entries never moved"


@pytest.mark.parametrize("name", config_names("sparsity"))
def test_sparsity_config_trains(name, tmp_path):
    exp = SPARSITY.get(name, dict(bind=[], logged=None, updates=None))
    # One layer: the configs' behaviour does not depend on depth, compile time does.
    records = train(tmp_path, f"sparsity/{name}", ["ModelConfig.num_layers=1", *exp["bind"]])
    logged = {r["step"]: r for r in records if "loss" in r}
    update_recs = {r["step"]: r for r in records if "sparsity/churn" in r}
    if exp["logged"] is None:  # dense: the trainer runs without a sparsity method
        assert all(not k.startswith("sparsity/") for r in records for k in r), name
        return
    for step, want in exp["logged"].items():
        assert logged[step]["sparsity/density"] == pytest.approx(want, abs=ERK_TOL), (name, step)
        assert 0.0 < logged[step]["sparsity/avg_density"] <= 1.0
    if exp["updates"] is None:
        return
    assert sorted(update_recs) == sorted(exp["updates"]), (name, sorted(update_recs))
    for step, (density, churns) in exp["updates"].items():
        r = update_recs[step]
        assert r["sparsity/density"] == pytest.approx(density, abs=ERK_TOL), (name, step)
        assert (r["sparsity/churn"] > 0) == churns, (name, step, r["sparsity/churn"])
        layer = [v for k, v in r.items() if k.startswith("sparsity/density/")]
        assert layer and all(0.0 <= v <= 1.0 for v in layer)
    if "ckpt" in exp:
        check_checkpoint(tmp_path, exp["ckpt"], exp["logged"][NUM_STEPS])


@pytest.mark.parametrize("name", config_names("moe"))
def test_moe_config_trains(name, tmp_path):
    exp = MOE.get(name, {})
    records = train(tmp_path, f"moe/{name}", [])
    logged = [r for r in records if "loss" in r]
    for r in logged:
        loads = {k: v for k, v in r.items() if k.endswith("expert_load")}
        assert loads, f"{name}: no expert load logged"
        for key, load in loads.items():
            load = np.asarray(load)
            assert load.shape == (exp.get("experts", load.size),), key
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
