"""Drives the trainer protocol (see sparsejax/sparsity/__init__.py) with a 2-layer MLP
under Adam for several methods and checks loss, scheduled density and exact zeros."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax.sparsity as sp
from sparsejax.sparsity import nm as nm_lib
from sparsejax.sparsity import schedules as S

STEPS = 60


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32)(x))
        return nn.Dense(4)(x)


def _data():
    kx, kw = jax.random.split(jax.random.PRNGKey(42))
    x = jax.random.normal(kx, (128, 16))
    y = jnp.tanh(x @ jax.random.normal(kw, (16, 4)))
    return x, y


MP = sp.MaskedPruningMethod
PRESETS = {  # the presets of configs/sparsity/, as Python (their gin files are tested elsewhere)
    "static_random": lambda **kw: MP(init_criterion="random", **kw),
    "set": lambda **kw: MP(init_criterion="random", grow="random", **kw),
    "rigl": lambda **kw: MP(init_criterion="random", grow="gradient", **kw),
    "gmp": lambda **kw: MP(criterion="magnitude", **kw),
    "movement": lambda **kw: MP(criterion="movement", **kw),
    "global_gmp": lambda **kw: MP(structure="global", **kw),
    "snip": lambda **kw: MP(criterion="snip", schedule=S.OneShotSchedule(0), **kw),
    "spdf": lambda **kw: MP(init_criterion="random", **kw),
    "average_density": lambda **kw: MP(**kw),
    "nm": lambda **kw: MP(structure=sp.NMStructure(2, 4), **kw),
    "srste": lambda **kw: sp.SRSTEMethod(**kw),
    "learned_nm": lambda **kw: sp.LearnedNMMethod(**kw),
    "lt_sft": lambda **kw: sp.SparseFinetuneMethod(mode="lt_sft", **kw),
    "spiel": lambda **kw: sp.SparseFinetuneMethod(mode="spiel", **kw),
}


def make(name, **kwargs):
    return PRESETS[name](**kwargs).bind(sp.RunInfo(num_steps=STEPS))


def train(method, steps=STEPS, lr=1e-2):
    """The exact call sequence the trainer uses; returns a history for checks."""
    model, (x, y) = MLP(), _data()
    params = model.init(jax.random.PRNGKey(0), x)["params"]
    params, sparsity = method.init(params, jax.random.PRNGKey(1))
    tx = method.wrap_optimizer(optax.adam(lr))
    opt_state = tx.init(params)

    def loss_fn(params, sparsity, step, rng):
        eff = method.forward_params(params, sparsity, step=step, rng=rng)
        loss = jnp.mean((model.apply({"params": eff}, x) - y) ** 2)
        return loss + method.regularizer(params, sparsity, step=step)

    @jax.jit
    def train_step(params, opt_state, sparsity, step, rng):
        loss, grads = jax.value_and_grad(loss_fn)(params, sparsity, step, rng)
        grads, sparsity = method.on_grads(params, sparsity, grads, step=step)
        updates, opt_state = tx.update(grads, opt_state, params, sparsity=sparsity)
        return optax.apply_updates(params, updates), opt_state, sparsity, loss

    update = jax.jit(method.update)
    dense_grad = jax.jit(jax.grad(loss_fn))
    hist = {"loss": [], "density": [], "update_metrics": {}, "zeros_ok": True, "nnz": []}
    for step in range(steps):
        rng = jax.random.PRNGKey(100 + step)
        if method.is_update_step(step):
            g = dense_grad(params, sparsity, step, rng) if method.needs_dense_grads else None
            params, opt_state, sparsity, metrics = update(params, opt_state, sparsity, step=step, rng=rng, grads=g)
            hist["update_metrics"][step] = jax.device_get(metrics)
        params, opt_state, sparsity, loss = train_step(params, opt_state, sparsity, step, rng)
        hist["loss"].append(float(loss))
        masks = sparsity["masks"]
        hist["density"].append(float(sp.overall_density(masks)) if masks is not None else 1.0)
        if masks is not None and isinstance(method, sp.MaskedPruningMethod):
            for p, m in zip(jax.tree.leaves(sp.masks.select_masked(params, masks)), jax.tree.leaves(masks)):
                hist["zeros_ok"] &= bool(np.all(np.asarray(p)[~np.asarray(m)] == 0.0))
            hist["nnz"].append(int(sp.nnz(masks)))
    return params, sparsity, hist, model, (x, y)


def _loss_decreases(hist):
    assert np.mean(hist["loss"][-5:]) < 0.8 * hist["loss"][0], hist["loss"][::10]


def test_dense_baseline():
    _, sparsity, hist, *_ = train(sp.DenseMethod().bind(sp.RunInfo(STEPS)))
    _loss_decreases(hist)
    assert float(sparsity["avg_density"]) == 1.0


@pytest.mark.parametrize("name,kwargs", [
    ("static_random", dict(density=0.3, schedule="constant")),
    ("set", dict(density=0.3, schedule=S.DropGrowSchedule(frequency=10, end=50))),
    ("rigl", dict(density=0.3, schedule=S.DropGrowSchedule(frequency=10, end=50))),
])
def test_fixed_density_methods(name, kwargs):
    method = make(name, **kwargs)
    params, sparsity, hist, *_ = train(method)
    _loss_decreases(hist)
    assert hist["zeros_ok"]
    assert len(set(hist["nnz"])) == 1  # drop/grow keeps the count exactly
    assert abs(hist["density"][-1] - 0.3) < 0.02
    if name != "static_random":
        assert sorted(hist["update_metrics"]) == [10, 20, 30, 40]
        assert all(m["sparsity/churn"] > 0 for m in hist["update_metrics"].values())
        assert hist["update_metrics"][10]["sparsity/churn"] > hist["update_metrics"][40]["sparsity/churn"]


@pytest.mark.parametrize("name", ["gmp", "movement", "global_gmp"])
def test_gradual_pruning_follows_schedule(name):
    sched = S.PolynomialSchedule(start=10, end=40, frequency=10)
    method = make(name, density=0.2, distribution="uniform", schedule=sched)
    params, sparsity, hist, *_ = train(method)
    _loss_decreases(hist)
    assert hist["zeros_ok"]
    for step in range(STEPS):
        last = max([t for t in (10, 20, 30, 40) if t <= step], default=None)
        want = 1.0 if last is None else 1 - float(sched.scale(last)) * 0.8
        assert abs(hist["density"][step] - want) < 0.01, (step, hist["density"][step], want)
    assert np.all(np.diff(hist["nnz"]) <= 0)  # monotone


def test_snip_prunes_at_step_zero():
    params, sparsity, hist, *_ = train(make("snip", density=0.25, distribution="uniform"))
    assert list(hist["update_metrics"]) == [0]
    assert hist["zeros_ok"] and all(abs(d - 0.25) < 0.01 for d in hist["density"])
    _loss_decreases(hist)


def test_spdf_becomes_dense_and_trains_revived_weights():
    method = make("spdf", density=0.25, distribution="uniform", schedule=S.SparseThenDenseSchedule(30))
    params, sparsity, hist, *_ = train(method)
    assert all(abs(d - 0.25) < 0.01 for d in hist["density"][:30]) and hist["density"][-1] == 1.0
    assert np.count_nonzero(np.asarray(params["Dense_0"]["kernel"])) > 0.9 * 16 * 32
    assert float(sparsity["avg_density"]) == pytest.approx(0.5 * 0.25 + 0.5 * 1.0, abs=0.01)
    _loss_decreases(hist)


def test_average_density_schedule_realized():
    sched = S.AverageDensitySchedule(avg_density=0.6, total_steps=STEPS, start=5, end=45, frequency=5)
    method = make("average_density", distribution="uniform", schedule=sched)
    assert method.density == pytest.approx(sched.final_density)
    params, sparsity, hist, *_ = train(method)
    assert float(sparsity["avg_density"]) == pytest.approx(0.6, abs=0.01)
    assert np.mean(hist["density"]) == pytest.approx(0.6, abs=0.01)
    m = method.metrics(params, sparsity)
    total = sum(p.size for p in jax.tree.leaves(params))
    assert float(m["sparsity/avg_param_count"]) == pytest.approx(0.6 * (16 * 32 + 32 * 4) + 32 + 4, rel=0.02)
    assert total == 16 * 32 + 32 + 32 * 4 + 4


@pytest.mark.parametrize("name", ["nm", "srste", "learned_nm"])
def test_nm_methods_end_with_exact_2of4(name):
    kwargs = {"nm": dict(schedule=S.OneShotSchedule(step=20)), "srste": {}, "learned_nm": dict(anneal_steps=STEPS)}[name]
    method = make(name, **kwargs)
    params, sparsity, hist, model, (x, y) = train(method)
    _loss_decreases(hist)
    final = method.finalize(params, sparsity)
    assert set(final) == {"Dense_0", "Dense_1"}
    for kernel in (final["Dense_0"]["kernel"], final["Dense_1"]["kernel"]):
        assert np.all(np.asarray(nm_lib.nm_group_counts(kernel != 0, 4)) == 2)
    hard_loss = float(jnp.mean((model.apply({"params": final}, x) - y) ** 2))
    assert hard_loss < hist["loss"][0]


@pytest.mark.parametrize("mode", ["lt_sft", "spiel"])
def test_sparse_finetune_and_export_diff(mode):
    kwargs = dict(select_step=20) if mode == "lt_sft" else dict(frequency=10, end=50)
    method = make(mode, density=0.2, **kwargs)
    model, (x, _) = MLP(), _data()
    base = model.init(jax.random.PRNGKey(0), x)["params"]
    params, sparsity, hist, *_ = train(method)
    _loss_decreases(hist)
    masks = sparsity["masks"]
    for b, p, m in zip(jax.tree.leaves(sp.masks.select_masked(base, masks)),
                       jax.tree.leaves(sp.masks.select_masked(params, masks)), jax.tree.leaves(masks)):
        np.testing.assert_array_equal(np.asarray(p)[~np.asarray(m)], np.asarray(b)[~np.asarray(m)])
    np.testing.assert_array_equal(params["Dense_0"]["bias"], base["Dense_0"]["bias"])  # frozen
    assert abs(hist["density"][-1] - 0.2) < 0.01
    diff = method.export_diff(params, sparsity)
    rebuilt = sp.apply_diffs(base, [diff])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), rebuilt, params)
    assert sum(d["indices"].size for d in diff.values()) <= int(sp.nnz(masks))
