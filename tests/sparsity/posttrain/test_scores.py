"""Wanda and GBLM scores against hand computations, their per-output selection against a
numpy sort and the reference's per-row count (the floor of in x sparsity), dead inputs
pruned first, DSnoT against the reconstruction error it must never increase (and never
growing a dead input), OWL's allocation against its definition, and the refusal of
calibrated criteria in training."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.sparsity import CRITERIA, RunInfo
from sparsejax.sparsity.posttrain import allocation, dsnot, solvers, stats as st
from sparsejax.sparsity.pruning import MaskedPruningMethod


def data(seed=0, tokens=200, din=12, dout=5):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((tokens, din)) * rng.uniform(0.2, 3.0, din)
         + rng.standard_normal(din)).astype(np.float32)
    w = rng.standard_normal((din, dout)).astype(np.float32)
    return x, w


def calib(x, grad_sq=None, n=4):
    s = st.input_stats(jnp.asarray(x), jnp.ones(len(x)))
    return st.LayerCalibration(s, grad_sq, n)


def test_input_stats_are_the_sums_and_skip_padding():
    x, _ = data()
    wts = np.ones(len(x), np.float32)
    wts[-7:] = 0.0
    xx = x.copy()
    xx[-7:] = np.nan  # padding rows may hold anything
    s = st.input_stats(jnp.asarray(xx), jnp.asarray(wts))
    real = x[:-7].astype(np.float64)
    np.testing.assert_allclose(s.hessian, real.T @ real, rtol=1e-5)
    np.testing.assert_allclose(s.mean, real.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s.var, real.var(0), rtol=1e-4, atol=1e-5)
    assert float(s.count) == len(real)


def test_wanda_score_is_the_hand_computation():
    x, w = data()
    got = np.asarray(CRITERIA.get("wanda")().scores({"k": jnp.asarray(w)},
                                                     state={"k": calib(x)})["k"])
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            norm = np.sqrt(sum(float(x[t, i]) ** 2 for t in range(len(x))))
            assert got[i, j] == pytest.approx(abs(w[i, j]) * norm, rel=1e-5)


def test_gblm_score_is_the_hand_computation():
    x, w = data(1)
    g = np.random.default_rng(3).random(w.shape).astype(np.float32)
    n = 4
    got = np.asarray(CRITERIA.get("gblm")().scores(
        {"k": jnp.asarray(w)}, state={"k": calib(x, jnp.asarray(g), n)})["k"])
    act = np.sqrt((x.astype(np.float64) ** 2).sum(0) / n)
    np.testing.assert_allclose(got, np.abs(w) * (act[:, None] + 100.0 * np.sqrt(g)), rtol=1e-5)


def test_wanda_keeps_the_top_half_of_every_output_unit():
    x, w = data(2, din=10)
    pruned, keep = solvers.PRUNERS.get("wanda")().prune(
        jnp.asarray(w), calib(x), density=0.5, structure=solvers.make_structure("per_output"))
    score = np.abs(w) * np.linalg.norm(x, axis=0)[:, None]
    for j in range(w.shape[1]):
        top = set(np.argsort(-score[:, j], kind="stable")[:5])
        assert set(np.nonzero(np.asarray(keep)[:, j])[0]) == top
    np.testing.assert_array_equal(np.asarray(pruned), np.where(np.asarray(keep), w, 0.0))


def test_wanda_nm_is_exact():
    x, w = data(3, din=16)
    _, keep = solvers.PRUNERS.get("wanda")().prune(
        jnp.asarray(w), calib(x), density=0.5, structure=solvers.make_structure("nm", (2, 4)))
    assert np.all(np.asarray(keep).reshape(4, 4, -1).sum(1) == 2)


def test_calibrated_criteria_refuse_training_runs():
    with pytest.raises(ValueError, match="criterion 'wanda' scores weights with calibration"):
        m = MaskedPruningMethod(schedule="one_shot", criterion="wanda", density=0.5)
        m.bind(RunInfo(num_steps=10)).init({"d": {"kernel": jnp.ones((4, 4))}}, jax.random.key(0))


def recon(x, w, v):
    return ((x.astype(np.float64) @ (w - np.asarray(v, np.float64))) ** 2).sum(0)


@pytest.mark.parametrize("method,structure,nm", [("magnitude", "unstructured", None),
                                                 ("wanda", "per_output", None),
                                                 ("wanda", "nm", (2, 4)),
                                                 ("sparsegpt", "unstructured", None)])
def test_dsnot_never_increases_any_units_reconstruction_error(method, structure, nm):
    x, w = data(4, tokens=400, din=32, dout=16)
    c = calib(x)
    pruned, keep = solvers.PRUNERS.get(method)().prune(
        jnp.asarray(w), c, density=0.5, structure=solvers.make_structure(structure, nm))
    out, keep2, swaps = dsnot.DSnoT(update_threshold=0.0).refine(jnp.asarray(w), pruned, keep,
                                                                 c, nm)
    before, after = recon(x, w, pruned), recon(x, w, out)
    assert np.all(after <= before * (1 + 1e-5) + 1e-3)
    assert after.sum() < before.sum() and int(swaps.sum()) > 0
    keep, keep2 = np.asarray(keep), np.asarray(keep2)
    np.testing.assert_array_equal(keep.sum(0), keep2.sum(0))  # per-unit counts unchanged
    if nm:
        assert np.all(keep2.reshape(8, 4, -1).sum(1) == 2)
    assert np.all(np.asarray(out)[~keep2] == 0.0)
    changed = keep2 & ~keep  # grown weights take their dense values
    np.testing.assert_array_equal(np.asarray(out)[changed], w[changed])


def test_owl_densities_follow_outliers_and_average_to_the_target():
    owl = allocation.OWL(lam=0.08)
    sizes = {0: 100, 1: 300, 2: 100}
    ratios = {0: 0.01, 1: 0.05, 2: 0.03}
    d = owl.densities(sizes, 0.4, ratios)
    assert d[0] < d[2] < d[1]
    assert d[1] - d[0] == pytest.approx(0.16)  # the ratios' span maps to 2 * lam
    mean = sum(d[b] * sizes[b] for b in sizes) / sum(sizes.values())
    assert mean == pytest.approx(0.4)
    assert allocation.Uniform().densities(sizes, 0.4) == {0: 0.4, 1: 0.4, 2: 0.4}
    with pytest.raises(ValueError, match="OWL.lam=0.45: block densities"):
        allocation.OWL(lam=0.45).densities(sizes, 0.1, ratios)


def test_outlier_ratio_is_the_fraction_above_m_times_the_mean():
    scores = [jnp.asarray([1.0, 1.0, 1.0, 1.0]), jnp.asarray([1.0, 1.0, 1.0, 1.0, 1.0, 21.0])]
    # mean = 30 / 10 = 3; entries above 5 * 3 = 15: one of ten
    assert allocation.outlier_ratio(scores, 5.0) == pytest.approx(0.1)


@pytest.mark.parametrize("din,sparsity", [(10, 0.55), (10, 0.45), (100, 0.29), (12, 0.5)])
def test_wanda_prunes_the_floor_of_in_times_sparsity_per_output_unit(din, sparsity):
    x, w = data(5, din=din)
    _, keep = solvers.PRUNERS.get("wanda")().prune(
        jnp.asarray(w), calib(x), density=1.0 - sparsity,
        structure=solvers.make_structure("per_output"))
    pruned = int(w.T.shape[1] * sparsity)  # the reference: int(W.shape[1] * sparsity_ratio)
    assert np.all((~np.asarray(keep)).sum(0) == pruned)


def test_wanda_per_output_count_counts_real_inputs_of_a_padded_kernel():
    x, w = data(6, din=12)
    valid = np.zeros(w.shape, bool)
    valid[:10, :4] = True  # 10 real inputs, 4 real outputs
    _, keep = solvers.PRUNERS.get("wanda")().prune(
        jnp.asarray(w), calib(x), density=0.45, structure=solvers.make_structure("per_output"),
        valid=jnp.asarray(valid))
    keep = np.asarray(keep)
    assert not keep[~valid].any()
    assert np.all(keep[:10, :4].sum(0) == 10 - int(10 * 0.55))


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_dead_inputs_are_pruned_first(method):
    """Wanda's score |w|·‖X_j‖₂ is 0 on an input calibration never saw; SparseGPT zeroes
    those weights before its solve (as its reference code does)."""
    x, w = data(7, tokens=400, din=32, dout=16)
    dead = [3, 11, 20, 21]
    x[:, dead] = 0.0
    structure = solvers.make_structure(solvers.PRUNERS.get(method).default_structure)
    pruned, keep = solvers.PRUNERS.get(method)().prune(jnp.asarray(w), calib(x), density=0.5,
                                                       structure=structure)
    assert not np.asarray(keep)[dead].any() and np.all(np.asarray(pruned)[dead] == 0.0)


def test_dsnot_never_grows_a_dead_input():
    """A row whose pruned weights are a dead input's (growth rank 0) and one whose rank is
    negative, and a kept weight moved far off (pruning it lowers the error): the swap must
    grow the live weight, not restore the dead one (which cannot change the output)."""
    rng = np.random.default_rng(0)
    mu = np.array([0, 1, 1, 1, 1, 2, 1, 1], np.float32)
    x = (rng.standard_normal((64, 8)) * 0.3 + mu).astype(np.float32)
    x[:, 0] = 0.0
    w = np.array([[1.0], [0.5], [-1], [-1], [-1], [0.5], [-1], [-1]], np.float32)
    keep = np.ones((8, 1), bool)
    keep[[0, 1]] = False
    pruned = np.where(keep, w, 0.0)
    pruned[5] += 10.0
    out, keep2, swaps = dsnot.DSnoT(max_cycles=1, update_threshold=0.0).refine(
        jnp.asarray(w), jnp.asarray(pruned), jnp.asarray(keep), calib(x))
    assert int(swaps.sum()) == 1
    np.testing.assert_array_equal(np.asarray(keep2).ravel(), [0, 1, 1, 1, 1, 0, 1, 1])
    assert float(np.asarray(out)[0, 0]) == 0.0
