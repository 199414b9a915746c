"""The ProSparse regularizer: its sine-staged factor against the formula, its penalty against
an independent computation from the model's captured gate pre-activations (padding left out,
dense and MoE layers), its settings refused by name, and its refusal of expert parallelism."""
import math

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import config
from sparsejax.models.act_record import STATS
from sparsejax.models.transformer import ModelConfig, Transformer
from sparsejax.sparsity.activation.records import layer_records
from sparsejax.sparsity.activation.regularizer import (ProSparseRegularizer,
                                                       make_activation_regularizer)


def expected_factor(t, bounds, factors):
    lam, prev = 0.0, 0.0
    for b0, b1, f in zip(bounds, bounds[1:], factors):
        if t >= b0:
            lam = prev + (f - prev) * math.sin(math.pi / 2 * min((t - b0) / (b1 - b0), 1.0))
        prev = f
    return lam


def test_stage_boundaries_must_increase_once_resolved():
    # stage_ends=(0.3, 0.6, 100) resolves to steps 60, 120, 100 over a 200-step run
    with pytest.raises(ValueError, match=r"resolve to steps \[10, 60, 120, 100\]"):
        ProSparseRegularizer(factors=(0.1, 0.5, 0.5), stage_ends=(0.3, 0.6, 100), start=10).bind(200)


def test_factor_values():
    reg = ProSparseRegularizer(factors=(0.1, 0.4), stage_ends=(0.5, 0.75), start=0.1).bind(200)
    assert reg.bounds == [20, 100, 150]
    for t in (0, 19, 20, 21, 50, 99, 100, 101, 130, 150, 151, 199):
        assert float(reg.factor(t)) == pytest.approx(expected_factor(t, reg.bounds, (0.1, 0.4)),
                                                     abs=1e-7), t
    assert float(reg.factor(60)) == pytest.approx(0.1 * math.sin(math.pi / 4), rel=1e-6)
    steps = np.arange(200)
    lams = np.array([float(reg.factor(t)) for t in steps])
    assert np.all(np.diff(lams) >= -1e-9) and lams[-1] == pytest.approx(0.4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(factors=(0.2, 0.1), stage_ends=(0.5, 0.8)), r"never decrease"),
    (dict(factors=(0.1,), stage_ends=(0.5, 0.8)), r"of equal length"),
    (dict(factors=0.1, stage_ends=0.5), r"must be tuples"),
    (dict(factors=(0.1,), stage_ends=(1.5,)), r"stage_ends\[0\]=1.5: a float is a fraction"),
    (dict(factors=(-0.1,), stage_ends=(0.5,)), r">= 0"),
])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProSparseRegularizer(**kwargs)


def test_unknown_regularizer_is_refused():
    gin.parse_config("make_activation_regularizer.name = 'l1'")
    with pytest.raises(ValueError, match=r"make_activation_regularizer.name='l1' is not a "
                                         r"registered activation regularizer; valid: \['none', "
                                         r"'prosparse'\]"):
        make_activation_regularizer()


@pytest.mark.parametrize("kinds", [("dense",), ("moe",)])
def test_penalty_is_factor_times_mean_abs_gate_activation(kinds):
    cfg = ModelConfig(num_layers=2, embed_dim=16, num_heads=2, num_kv_heads=2, head_dim=8,
                      mlp_dim=32, max_seq_len=16, mlp_kinds=kinds, mlp_activation="relu")
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 259)
    seg = jnp.ones((2, 16), jnp.int32).at[1, 10:].set(0)  # padding at the end of row 1
    model = Transformer(cfg)
    variables = model.init({"params": jax.random.key(1), "router": jax.random.key(2)}, tokens)
    _, mut = jax.jit(lambda v: model.apply(v, tokens, None, seg, mutable=[STATS, "intermediates"],
                                           capture_intermediates=True))(variables)
    reg = ProSparseRegularizer(factors=(0.3,), stage_ends=(10,), start=0).bind(100)
    penalty, metrics = reg.loss(mut[STATS], seg, jnp.int32(5))
    lam = 0.3 * math.sin(math.pi / 4)
    valid = np.asarray(seg).reshape(-1) != 0
    means = []
    for i in range(2):
        inter = mut["intermediates"][f"layer_{i}"]
        if kinds == ("dense",):  # the captured gate pre-activation of wi_gate, ReLU in NumPy
            gate = np.asarray(inter["mlp"]["wi_gate"]["__call__"][0])
            means.append(np.abs(np.maximum(gate, 0))[valid].mean())
        else:  # routed experts: each real token's top-k assignments
            rec = layer_records(mut[STATS], seg)[f"layer_{i}/moe"]
            rows = np.asarray(rec.valid)
            assert rows.sum() == 2 * valid.sum()  # top-2 of every real token, none of the padding
            means.append(np.abs(np.asarray(rec.a))[rows].mean())
    assert float(metrics["factor"]) == pytest.approx(lam, rel=1e-6)
    assert float(metrics["l1"]) == pytest.approx(np.mean(means), rel=1e-5)
    assert float(penalty) == pytest.approx(lam * np.mean(means), rel=1e-5)


def test_expert_parallel_moe_is_refused(tmp_path):
    from sparsejax.train.build import build_run
    from sparsejax.train.trainer import TrainConfig
    config.parse_gin(["tiny.gin", "moe/top2.gin", "activation/prosparse.gin"],
                     ["make_mesh.expert=2", "TrainConfig.global_batch_size=8"])
    with pytest.raises(ValueError, match=r"expert parallelism \(mesh 'expert' axis 2\)"):
        build_run(TrainConfig())
