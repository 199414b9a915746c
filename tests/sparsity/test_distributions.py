"""Per-layer densities against hand-computed values."""
import pytest
from hypothesis import given, settings, strategies as st

from sparsejax.sparsity import distributions as D


def test_erk_hand_worked_with_dense_layer():
    # raw ERK scales: a: (4+2)/8 = 0.75, b: 40/400 = 0.1, c: 50/400 = 0.125; 808 params, 404 kept.
    # eps = 404 / (6 + 40 + 50) -> a would get 3.16 > 1, so a is dense; then eps = 396 / 90 = 4.4.
    shapes = {"a": (4, 2), "b": (20, 20), "c": (10, 40)}
    d = D.layer_densities(shapes, 0.5, "erk")
    assert d["a"] == 1.0
    assert d["b"] == pytest.approx(0.44)
    assert d["c"] == pytest.approx(0.55)
    assert D.mean_density(shapes, d) == pytest.approx(0.5)


def test_erk_no_dense_layer_and_er_ignores_kernel_dims():
    shapes = {"b": (20, 20), "c": (10, 40)}
    d = D.layer_densities(shapes, 0.3, "erk")
    eps = 0.3 * 800 / 90
    assert d["b"] == pytest.approx(0.1 * eps) and d["c"] == pytest.approx(0.125 * eps)
    conv = {"conv": (3, 3, 4, 8), "fc": (32, 32)}
    er = D.layer_densities(conv, 0.2, "erdos_renyi")
    erk = D.layer_densities(conv, 0.2, "erk")
    # ER: (4+8)/32 = 0.375 vs 64/1024 = 0.0625; ERK: 18/288 = 0.0625 vs 0.0625 -> uniform.
    assert er["conv"] / er["fc"] == pytest.approx(6.0)
    assert erk["conv"] == pytest.approx(erk["fc"]) == pytest.approx(0.2)


def test_uniform_and_overrides():
    shapes = {"l0/kernel": (8, 8), "l1/kernel": (8, 8), "out/kernel": (8, 2)}
    d = D.layer_densities(shapes, 0.25, "uniform", overrides={"out": 1.0})
    assert d == {"l0/kernel": 0.25, "l1/kernel": 0.25, "out/kernel": 1.0}
    d = D.layer_densities(shapes, 0.25, "erk", overrides={"out": 0.5})
    assert d["out/kernel"] == 0.5
    assert D.mean_density({k: v for k, v in shapes.items() if k != "out/kernel"},
                          {k: v for k, v in d.items() if k != "out/kernel"}) == pytest.approx(0.25)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_bad_density_raises(bad):
    with pytest.raises(ValueError, match="density"):
        D.layer_densities({"a": (4, 4)}, bad)


def test_bad_override_and_distribution_raise():
    with pytest.raises(ValueError, match="overrides.*nomatch"):
        D.layer_densities({"a": (4, 4)}, 0.5, overrides={"nomatch": 0.5})
    with pytest.raises(ValueError, match="overrides"):
        D.layer_densities({"a": (4, 4)}, 0.5, overrides={"a": 2.0})
    with pytest.raises(ValueError, match="distribution"):
        D.layer_densities({"a": (4, 4)}, 0.5, "gaussian")


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 64), st.integers(1, 64)), min_size=1, max_size=6),
       st.floats(0.01, 1.0), st.sampled_from(["erk", "erdos_renyi"]))
def test_erk_mean_is_exact_and_densities_valid(dims, density, kind):
    shapes = {f"l{i}": s for i, s in enumerate(dims)}
    d = D.layer_densities(shapes, density, kind)
    assert all(0.0 < v <= 1.0 + 1e-12 for v in d.values())
    assert D.mean_density(shapes, d) == pytest.approx(density, rel=1e-9)
