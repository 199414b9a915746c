"""Every registered plug-in honours its protocol: the tests iterate over the registries, so a
new criterion, structure, schedule, distribution, method, router, dispatch strategy or expert
reducer is checked the moment it registers itself."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import config
from sparsejax.models.moe.dispatch import DISPATCHES
from sparsejax.models.moe.experts import ExpertWeights
from sparsejax.models.moe.router import ROUTERS
from sparsejax.registry import REGISTRIES, describe
from sparsejax.sparsity import (CRITERIA, DISTRIBUTIONS, METHODS, SCHEDULES, STRUCTURES, RunInfo,
                                make_method)
from sparsejax.sparsity import masks as masks_lib
from sparsejax.sparsity.method import CompactProjection
from sparsejax.sparsity.posttrain.experts import EXPERT_REDUCERS, ExpertStats, constrained_plan

config.register_configurables()  # every plug-in of the package, as `sparsejax list` sees them
KEY = jax.random.PRNGKey(0)
W = {"a": {"kernel": jax.random.normal(KEY, (8, 8))}, "b": {"kernel": jnp.ones((8, 4))}}


def test_every_plugin_has_a_one_line_description():
    for kind, reg in REGISTRIES.items():
        for name in reg.names():
            assert describe(reg.get(name)), f"{kind} {name!r} has no docstring"


@pytest.mark.parametrize("name", CRITERIA.names())
def test_criterion_scores_every_masked_entry(name):
    crit = CRITERIA.get(name)()
    if getattr(crit, "needs_calibration", False):
        # scored from calibration statistics in `sparsejax prune` (tests/sparsity/posttrain
        # check the scores); a training run that names it is refused by name
        with pytest.raises(ValueError, match=f"'{name}'.*sparsejax prune"):
            crit.init_state(W)
        return
    grads = jax.tree.map(lambda w: jnp.cos(w) + 0.5, W)
    state = crit.init_state(W)
    if state is not None:
        state = crit.accumulate(state, W, grads)
    scores = crit.scores(W, grads=grads, rng=KEY, state=state)
    assert jax.tree.structure(scores) == jax.tree.structure(W)
    for s, w in zip(jax.tree.leaves(scores), jax.tree.leaves(W)):
        assert s.shape == w.shape and bool(jnp.all(jnp.isfinite(s)))
    if crit.needs_grads:
        with pytest.raises(ValueError, match=name):
            crit.scores(W, grads=None, rng=KEY, state=state)


@pytest.mark.parametrize("name", STRUCTURES.names())
def test_structure_keeps_the_requested_count(name):
    struct = STRUCTURES.get(name)()
    masks = jax.tree.map(lambda w: jnp.ones(w.shape, bool), W)
    for path, m in [("a/kernel", masks["a"]["kernel"]), ("b/kernel", masks["b"]["kernel"])]:
        struct.check(path, m.shape)
    counts = {"a/kernel": jnp.int32(32), "b/kernel": jnp.int32(16)}
    scores = jax.tree.map(jnp.abs, W)
    new = struct.select(scores, masks, counts, scale=1.0, alive_only=True)
    kept = {p: int(m.sum()) for p, m in masks_lib.mask_leaves(new)}
    want = {p: int(c) for p, c in counts.items()}
    if struct.fixed_density is not None:
        want = {p: round(struct.fixed_density * m.size) for p, m in masks_lib.mask_leaves(masks)}
    if name == "global":  # one ranking: only the total is fixed
        assert sum(kept.values()) == sum(want.values())
    else:
        assert kept == want


@pytest.mark.parametrize("name", SCHEDULES.names())
def test_schedule_binds_to_a_run_and_stays_in_range(name):
    s = SCHEDULES.get(name)().bind(100)
    steps = s.update_steps(100)
    assert all(0 <= t < 100 for t in steps)
    for t in range(0, 100, 7):
        assert 0.0 <= float(s.scale(t)) <= 1.0
        assert 0.0 <= float(s.update_fraction(t)) <= 1.0
    if s.kind == "drop_grow":
        assert len(steps) >= 3


@pytest.mark.parametrize("name", DISTRIBUTIONS.names())
def test_distribution_meets_the_mean_density(name):
    shapes = {"a": (64, 64), "b": (64, 256), "c": (256, 64), "d": (8, 512)}
    dens = DISTRIBUTIONS.get(name)(shapes, 0.2)
    sizes = {k: np.prod(v) for k, v in shapes.items()}
    assert sum(dens[k] * sizes[k] for k in shapes) / sum(sizes.values()) == pytest.approx(0.2)
    assert all(0 < d <= 1 for d in dens.values())


@pytest.mark.parametrize("name", METHODS.names())
def test_method_builds_binds_and_inits(name):
    if name in ("block_dst", "block_gmp"):  # compact weights: a block-sparse layer holding
        # both of its input blocks per column (block GMP shrinks it, block DST moves them)
        run = RunInfo(num_steps=50, compact={"layer": CompactProjection(16, 8, 128)})
        params = {"layer": {"values": jax.random.normal(KEY, (2, 2, 8, 4))}}
    else:
        run = RunInfo(num_steps=50)
        params = {"layer": {"kernel": jax.random.normal(KEY, (16, 8))}}
    method = METHODS.get(name)().bind(run)
    assert make_method(name).__class__ is type(method)
    params, state = method.init(params, KEY)
    assert "masks" in state and "avg_density" in state
    metrics = method.metrics(params, state)
    assert 0.0 < float(metrics["sparsity/density"]) <= 1.0


@pytest.mark.parametrize("name", ROUTERS.names())
def test_router_routes_every_token(name):
    t, e, k = 12, 4, 2
    logits = jax.random.normal(KEY, (t, e))
    r = ROUTERS.get(name)().route(logits, top_k=k, capacity=6)
    a = r.expert_index.shape[0]
    assert r.token_index.shape == r.weight.shape == r.mask.shape == (a,)
    assert r.probs.shape == (t, e) and r.num_experts == e
    assert bool(jnp.all((r.expert_index >= 0) & (r.expert_index < e)))
    assert bool(jnp.all(jnp.isfinite(r.weight)))
    load = r.expert_load()
    assert float(jnp.sum(load)) == pytest.approx(1.0, abs=1e-5) or not bool(jnp.any(r.mask))


@pytest.mark.parametrize("name", DISPATCHES.names())
def test_dispatch_matches_the_onehot_reference_without_drops(name):
    t, d, f, e, k = 10, 8, 6, 4, 2
    kx, kw = jax.random.split(KEY)
    x = jax.random.normal(kx, (t, d))
    w = ExpertWeights(*[0.3 * jax.random.normal(kk, s) for kk, s in
                        zip(jax.random.split(kw, 3), [(e, d, f), (e, d, f), (e, f, d)])])
    r = ROUTERS.get("softmax_topk")().route(jax.random.normal(KEY, (t, e)), top_k=k, capacity=t)
    want, _ = DISPATCHES.get("onehot")(x, r, w, t * k)
    got, dropped = DISPATCHES.get(name)(x, r, w, t * k)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert float(dropped) == 0.0


@pytest.mark.parametrize("name", EXPERT_REDUCERS.names())
def test_expert_reducer_plans_k_experts_and_honours_protection(name):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((30, 6))
    stats = ExpertStats(rng.integers(0, 20, 6).astype(float), logits.T @ logits,
                        gate_norm_sum=rng.random(6), output_max=rng.random(6))
    error = lambda kept: float(6 - len(kept)) + 0.01 * sum(kept)
    for protected in ((), (5,)):
        plan = constrained_plan(EXPERT_REDUCERS.get(name)(), stats, 3, protected, (), error)
        members = [e for g in plan.groups for e in g]
        assert len(plan.groups) == 3 and len(members) == len(set(members))
        assert all(0 <= e < 6 for e in members) and all(e in plan.kept for e in protected)
        assert all(abs(sum(w) - 1) < 1e-9 and len(w) == len(g)
                   for g, w in zip(plan.groups, plan.weights))
