"""FLOP accounting of a trial's checkpoint for the sweep table."""
import numpy as np
import pytest

from sparsejax.sparsity import flops_per_token
from sparsejax.sweep.summary import effective_masks, flop_multipliers


def test_routed_experts_count_for_top_k_over_num_experts(tmp_path):
    (tmp_path / "config.gin").write_text(
        "MoeMlp.top_k = 1\nMoeMlp.num_experts = 4\nMoeMlp.mlp_dim = 8\n")
    mult = flop_multipliers(str(tmp_path))
    params = {"embed": {"embedding": np.ones((10, 4))},
              "layer_0": {"moe": {"experts": {"wi": np.ones((4, 4, 8))},
                                  "router_kernel": np.ones((4, 4))},
                          "mlp": {"wo": np.ones((8, 4))}}}
    # experts: 2 * 128 * 1/4; router and dense MLP: 2 * (16 + 32); embeddings: free
    assert float(flops_per_token(params, None, mult)) == pytest.approx(64 + 96)
    assert flop_multipliers(str(tmp_path / "none"))["moe/experts/"] == pytest.approx(2 / 8)


def test_effective_masks_apply_stored_masks_to_dense_weights():
    params = {"a": np.array([[1.0, 2.0], [0.0, 3.0]]), "norm": np.array([1.0, 0.0])}
    stored = {"a": np.array([[True, False], [True, True]]), "norm": None}
    got = effective_masks(params, stored)
    np.testing.assert_array_equal(got["a"], [[True, False], [False, True]])
    np.testing.assert_array_equal(got["norm"], [True, False])
    np.testing.assert_array_equal(effective_masks(params)["a"], [[True, True], [False, True]])
