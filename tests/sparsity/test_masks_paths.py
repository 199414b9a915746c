"""Prunable-param selection, mask application and mask statistics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.sparsity import masks as M
from sparsejax.sparsity import paths as P


def _params():
    return {
        "embed": {"embedding": jnp.ones((10, 4))},
        "layer": {"norm": {"scale": jnp.ones(4)}, "Dense_0": {"kernel": jnp.ones((4, 8)), "bias": jnp.ones(8)},
                  "router": {"kernel": jnp.ones((4, 2))}, "experts": {"kernel": jnp.ones((2, 4, 8))}},
    }


def test_default_selection_prunes_only_kernels():
    sel = dict(P.named_leaves(P.prunable_tree(_params())))
    assert sel == {
        "embed/embedding": False, "layer/Dense_0/bias": False, "layer/Dense_0/kernel": True,
        "layer/experts/kernel": True, "layer/norm/scale": False, "layer/router/kernel": False,
    }


def test_include_and_exclude_override_defaults():
    sel = dict(P.named_leaves(P.prunable_tree(_params(), include=["router"], exclude=["experts"])))
    assert sel["layer/router/kernel"] and not sel["layer/experts/kernel"] and sel["layer/Dense_0/kernel"]


def test_bad_regex_and_no_prunable_params_raise():
    with pytest.raises(ValueError, match="include.*nothing_here"):
        P.prunable_tree(_params(), include=["nothing_here"])
    with pytest.raises(ValueError, match="exclude"):
        P.prunable_tree(_params(), exclude=["zzz"])
    with pytest.raises(ValueError, match="no prunable params"):
        P.prunable_tree({"norm": {"scale": jnp.ones(3)}, "bias": jnp.ones(3)})


def test_apply_masks_and_density_stats():
    params = {"a": {"kernel": jnp.arange(1.0, 9.0).reshape(2, 4)}, "b": {"bias": jnp.ones(3)}}
    masks = {"a": {"kernel": jnp.array([[True, False, True, False], [False, False, False, True]])},
             "b": {"bias": None}}
    out = M.apply_masks(params, masks)
    np.testing.assert_array_equal(out["a"]["kernel"], [[1, 0, 3, 0], [0, 0, 0, 8]])
    np.testing.assert_array_equal(out["b"]["bias"], jnp.ones(3))
    assert int(M.nnz(masks)) == 3
    assert float(M.overall_density(masks)) == pytest.approx(3 / 8)
    assert float(M.layer_densities(masks)["a/kernel"]) == pytest.approx(3 / 8)
    assert float(M.param_count(params, masks)) == 3 + 3
    new = {"a": {"kernel": jnp.array([[True, True, True, False], [False, False, False, False]])}, "b": {"bias": None}}
    assert float(M.mask_churn(masks, new)) == pytest.approx(2 / 8)
    assert float(M.average_param_count(params, masks, jnp.float32(0.5))) == pytest.approx(0.5 * 8 + 3)


def test_ste_masks_value_masked_gradient_dense():
    w = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    m = jnp.array([[True, False], [False, True]])
    val = M.ste_masks({"k": w}, {"k": m})["k"]
    np.testing.assert_array_equal(val, [[1, 0], [0, 4]])
    g = jax.grad(lambda w: jnp.sum(M.ste_masks({"k": w}, {"k": m})["k"] * 2.0))(w)
    np.testing.assert_array_equal(g, jnp.full((2, 2), 2.0))


def test_flops_per_token_with_multipliers():
    params = {"embed": {"embedding": jnp.ones((100, 4))}, "mlp": {"kernel": jnp.ones((4, 8)), "bias": jnp.ones(8)},
              "experts": {"kernel": jnp.ones((4, 4, 8))}}
    masks = {"embed": {"embedding": None}, "mlp": {"kernel": jnp.arange(32).reshape(4, 8) < 10, "bias": None},
             "experts": {"kernel": jnp.ones((4, 4, 8), bool)}}
    # embedding: 0; mlp: 2 * 10; experts: top-1 of 4 experts -> 2 * 128 * 0.25.
    f = M.flops_per_token(params, masks, {"embed": 0.0, "experts": 0.25})
    assert float(f) == pytest.approx(2 * 10 + 2 * 128 * 0.25)
    assert float(M.flops_per_token(params)) == pytest.approx(2 * 32 + 2 * 128)
