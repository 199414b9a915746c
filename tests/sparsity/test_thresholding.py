"""Training-free thresholding: the sites against NumPy (TEAL on a projection input, CATS on
the gate activation, WINA's weight-norm scores), the histogram and its thresholds against
np.histogram, calibration reaching its target per site, and bad settings refused by name."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.models.layers import GatedMlp
from sparsejax.models.thresholds import BIN_EDGES, THRESHOLDS, Site, histogram
from sparsejax.models.transformer import ModelConfig, Transformer
from sparsejax.sparsity.activation.thresholding import (Thresholding, check_model, make_sites,
                                                        site_layout, threshold_for)


def test_histogram_matches_numpy_bins():
    rng = np.random.default_rng(0)
    s = np.concatenate([np.zeros(100), np.abs(rng.standard_normal(5000)) * 10.0 ** rng.uniform(-6, 2, 5000),
                        [1e-12, 5e5]]).astype(np.float32)
    got = np.asarray(histogram(jnp.asarray(s)))
    # bin 0: [0, 1e-10); bin j: [edge_j, edge_{j+1}); the last bin open-ended
    ref = np.histogram(s.astype(np.float64), bins=np.append(BIN_EDGES, np.inf))[0]
    assert got.sum() == s.size
    np.testing.assert_array_equal(got, ref)


def bin_mass_at(counts, target):
    cdf = np.cumsum(counts) / counts.sum()
    j = np.searchsorted(cdf, target)
    return counts[j] / counts.sum()


@pytest.mark.parametrize("target", [0.1, 0.5, 0.9, 0.99])
def test_threshold_for_is_the_nearest_bin_edge(target):
    rng = np.random.default_rng(1)
    s = np.abs(rng.standard_normal(200_000)).astype(np.float32)
    counts = np.asarray(histogram(jnp.asarray(s)))
    t = threshold_for(counts, target)
    masked = np.mean(s <= t)
    assert abs(masked - target) <= bin_mass_at(counts, target) / 2 + 1e-9
    i = int(np.flatnonzero(BIN_EDGES == np.float32(t))[0])  # t is an edge; its neighbours are worse
    for other in (BIN_EDGES[i - 1], BIN_EDGES[min(i + 1, len(BIN_EDGES) - 1)]):
        assert abs(np.mean(s <= other) - target) >= abs(masked - target) - 1e-9
    assert threshold_for(counts, 0.0) == 0.0


def mlp_with_site(site_name, site, x, name="silu"):
    mlp = GatedMlp(8, 16, activation=name)
    params = nn.meta.unbox(mlp.init(jax.random.key(1), x))["params"]
    y = mlp.apply({"params": params, THRESHOLDS: {site_name: site}}, x)
    k = {n: np.asarray(params[n]["kernel"], np.float64) for n in ("wi_gate", "wi_up", "wo")}
    return np.asarray(y).reshape(-1, 8), k, x.reshape(-1, 8).astype(np.float64)


def silu(g):
    return g / (1 + np.exp(-g))


def test_teal_site_on_the_down_projection_input_matches_numpy():
    x = np.asarray(jax.random.normal(jax.random.key(0), (2, 6, 8)))
    s = Site(jnp.float32(0.3), jnp.ones((16,)))
    y, k, t = mlp_with_site("wo_in", s, x)
    h = silu(t @ k["wi_gate"]) * (t @ k["wi_up"])
    h = np.where(np.abs(h) > 0.3, h, 0.0)
    np.testing.assert_allclose(y, h @ k["wo"], rtol=1e-5, atol=1e-5)


def test_wina_site_scores_by_weight_row_norms():
    x = np.asarray(jax.random.normal(jax.random.key(0), (2, 6, 8)))
    mlp = GatedMlp(8, 16)
    params = nn.meta.unbox(mlp.init(jax.random.key(1), x))["params"]
    layout = site_layout({"layer_0": {"mlp": params}}, ModelConfig(num_layers=1), "wina", ("gate",))
    scale = layout["layer_0"]["mlp"]["wi_gate_in"]
    wg = np.asarray(params["wi_gate"]["kernel"], np.float64)
    np.testing.assert_allclose(scale, np.linalg.norm(wg, axis=1), rtol=1e-6)  # [embed]
    y, k, t = mlp_with_site("wi_gate_in", Site(jnp.float32(0.8), jnp.asarray(scale)), x)
    xg = np.where(np.abs(t) * np.linalg.norm(wg, axis=1) > 0.8, t, 0.0)  # the gate's input only
    ref = (silu(xg @ k["wi_gate"]) * (t @ k["wi_up"])) @ k["wo"]
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_cats_site_masks_the_gate_activation():
    x = np.asarray(jax.random.normal(jax.random.key(0), (2, 6, 8)))
    y, k, t = mlp_with_site("gate_act", Site(jnp.float32(0.2), jnp.ones((16,))), x)
    a = silu(t @ k["wi_gate"])
    h = np.where(np.abs(a) > 0.2, a * (t @ k["wi_up"]), 0.0)
    np.testing.assert_allclose(y, h @ k["wo"], rtol=1e-5, atol=1e-5)


CFG1 = dict(num_layers=1, embed_dim=32, num_heads=2, num_kv_heads=2, head_dim=16, mlp_dim=64,
            max_seq_len=32)


@pytest.mark.parametrize("proj", ["q", "k", "v", "o"])
def test_attention_sites_are_wired_to_their_projection(proj):
    """Masking everything at v or o zeroes the attention output; a keep-all site changes
    nothing; masking q or k makes attention uniform over the visible keys."""
    cfg = ModelConfig(**CFG1)
    tokens = jax.random.randint(jax.random.key(0), (1, 8), 0, 259)
    model = Transformer(cfg)
    variables = nn.meta.unbox(model.init(jax.random.key(1), tokens))
    name = {"q": "query_in", "k": "key_in", "v": "value_in", "o": "out_in"}[proj]

    def attn_out(threshold):
        tree = {"layer_0": {"attn": {name: Site(jnp.float32(threshold), jnp.ones((32,)))}}}
        _, mut = model.apply({**variables, THRESHOLDS: tree}, tokens, capture_intermediates=True,
                             mutable=["intermediates"])
        return np.asarray(mut["intermediates"]["layer_0"]["attn"]["__call__"][0])

    base = np.asarray(model.apply(variables, tokens, capture_intermediates=True,
                                  mutable=["intermediates"])[1]["intermediates"]["layer_0"]["attn"]["__call__"][0])
    np.testing.assert_array_equal(attn_out(-1.0), base)
    masked = attn_out(1e9)
    if proj in ("v", "o"):
        np.testing.assert_array_equal(masked, 0.0)
    else:
        assert not np.allclose(masked, base)
        # position 0 sees only itself: uniform over one key equals the unmasked output there
        np.testing.assert_allclose(masked[:, 0], base[:, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method, proj, site", [("teal", ("q",), "attn/query_in"),
                                                ("teal", ("down",), "mlp/wo_in"),
                                                ("wina", ("up",), "mlp/wi_up_in"),
                                                ("cats", None, "mlp/gate_act")])
def test_calibration_reaches_the_target_on_the_calibration_rows(method, proj, site):
    from sparsejax.sparsity.activation.calibrate import ThresholdEval, histograms
    from sparsejax.train.build import build_run
    from sparsejax.train.trainer import TrainConfig
    from sparsejax import config
    from sparsejax.parallel.rules import LOGICAL_RULES
    config.parse_gin(["tiny.gin"], ["make_mesh.num_devices=1", "ModelConfig.num_layers=1"])
    cfg = TrainConfig(global_batch_size=4, seq_len=32)
    run = build_run(cfg)
    rng = np.random.default_rng(0)
    batches = [{"inputs": rng.integers(0, 259, (4, 32)).astype(np.int32),
                "targets": rng.integers(0, 259, (4, 32)).astype(np.int32),
                "loss_mask": np.ones((4, 32), np.float32),
                "segment_ids": np.ones((4, 32), np.int32),
                "positions": np.tile(np.arange(32, dtype=np.int32), (4, 1))} for _ in range(3)]
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(LOGICAL_RULES):
        state = run.init_state()
        th = Thresholding(method=method, target=0.6, projections=proj)
        layout = site_layout(jax.device_get(state.params), run.model_config, method,
                             th.chosen_projections())
        hists = histograms(run, state.params, None, layout, batches)
        res = ThresholdEval(run)(state.params, None, make_sites(layout, 0.6, hists), batches)
    got = res[f"threshold/sparsity/layer_0/{site}"]
    # the nearest bin edge: off by at most half the mass of the target's bin (SiLU's minimum
    # makes |silu| pile up in one bin; elsewhere that is well under 1%)
    bound = bin_mass_at(hists[f"layer_0/{site}"], 0.6) / 2 + 1e-6
    assert abs(got - 0.6) <= bound, (got, bound)
    assert bound < (0.02 if method == "cats" else 0.005)


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="teal", target=1.0), r"Thresholding.target=1.0 must be a sparsity in \[0, 1\)"),
    (dict(method="teal", target=-0.1), r"Thresholding.target=-0.1 must be a sparsity in \[0, 1\)"),
    (dict(method="teal"), r"needs Thresholding.target"),
    (dict(method="top_k", target=0.5), r"Thresholding.method='top_k' is not a registered "
                                       r"activation thresholding; valid: \['cats', 'teal', 'wina'\]"),
    (dict(method="cats", target=0.5, projections=("down",)),
     r"projections=\('down',\): must be a non-empty tuple of \('gate',\) for method 'cats'"),
    (dict(method="teal", target=0.5, projections=("ffn",)), r"projections=\('ffn',\)"),
    (dict(target=0.5), r"Thresholding.target=0.5 has no effect with Thresholding.method='none'"),
])
def test_bad_thresholding_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Thresholding(**kwargs)


def test_thresholding_a_model_without_the_projections_is_refused():
    cfg = ModelConfig(num_layers=2, mlp_kinds=("dense", "moe"))
    with pytest.raises(ValueError, match=r"projections \('gate', 'down'\): layers \[1\] are MoE "
                                         r"layers, which have no dense MLP projections"):
        check_model(cfg, "teal", ("q", "gate", "down"))
    check_model(cfg, "teal", ("q", "k", "v", "o"))  # attention projections: fine
    with pytest.raises(ValueError, match=r"layer_0 has no 'gate' projection"):
        site_layout({"layer_0": {"attn": {}}}, ModelConfig(num_layers=1), "teal", ("gate",))


def test_thresholding_a_scanned_model_is_refused_with_the_way_out():
    cfg = ModelConfig(num_layers=2, scan_layers=True)
    with pytest.raises(ValueError, match=r"'cats' sets activation thresholds per layer and needs "
                                         r"ModelConfig.scan_layers=False.*warm_start.from_workdir"):
        check_model(cfg, "cats", ("gate",))
