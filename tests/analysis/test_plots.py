"""End-of-run plots: what each figure draws, from synthetic metrics records."""
import json

import numpy as np
import pytest
from matplotlib.colors import to_rgba

from sparsejax.analysis import plots


def test_loss_figure_draws_interval_means_and_eval_error_bars(tmp_path):
    records = [{"step": 0, "corpus_fingerprint": "x"},
               {"step": 10, "loss": 3.0, "loss_last": 2.5}, {"step": 20, "loss": 2.0},
               {"step": 20, "eval_loss": 2.2, "eval_loss_stderr": 0.05, "eval_rows": 512},
               {"step": 40, "eval_loss": 1.9, "eval_loss_stderr": 0.04, "eval_rows": 512}]
    ax = plots.loss_figure(records).axes[0]
    train = [ln for ln in ax.get_lines() if ln.get_label().startswith("train")]
    np.testing.assert_array_equal(train[0].get_ydata(), [3.0, 2.0])  # `loss`, not `loss_last`
    (bars,) = ax.containers
    np.testing.assert_array_equal(bars.lines[0].get_ydata(), [2.2, 1.9])
    segs = bars.lines[2][0].get_segments()  # the error bars span eval_loss ± stderr
    np.testing.assert_allclose([s[:, 1] for s in segs], [[2.15, 2.25], [1.86, 1.94]])
    assert "512 validation rows" in bars.get_label()
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert plots.plot_loss_curve(str(path), str(tmp_path / "loss.png"))


def test_density_is_a_step_function_from_the_first_step_without_updates():
    layers = {f"sparsity/density/layer_{i}/mlp/wi/kernel": 0.05 * (i + 1) for i in (0, 2, 10)}
    records = [{"step": 0, "sparsity/density": 0.2, **layers},
               {"step": 10, "loss": 3.0, "sparsity/density": 0.2},
               {"step": 30, "loss": 2.0, "sparsity/density": 0.2}]
    ax = plots.density_figure(records).axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert list(lines) == ["layer_0", "layer_2", "layer_10", "overall"]  # numeric order, short names
    for name, want in (("layer_0", 0.05), ("layer_10", 0.55)):
        ln = lines[name]
        assert ln.get_drawstyle() == "steps-post"
        np.testing.assert_array_equal(ln.get_xdata(), [0, 30])  # flat from step 0 to the end
        np.testing.assert_allclose(ln.get_ydata(), [want, want])
    np.testing.assert_array_equal(lines["overall"].get_xdata(), [0, 10, 30])
    np.testing.assert_allclose(lines["overall"].get_ydata(), 0.2)
    assert len({ln.get_linestyle() for ln in lines.values()}) > 1
    assert ax.get_legend() is not None
    # a mask update at step 20 changes a layer's value from there on
    records.insert(2, {"step": 20, "sparsity/density/layer_0/mlp/wi/kernel": 0.02})
    ln = {ln.get_label(): ln for ln in plots.density_figure(records).axes[0].get_lines()}["layer_0"]
    np.testing.assert_array_equal(ln.get_xdata(), [0, 20, 30])
    np.testing.assert_allclose(ln.get_ydata(), [0.05, 0.02, 0.02])
    assert plots.density_figure([{"step": 1, "loss": 1.0}]) is None


def test_expert_load_has_a_panel_per_layer_numeric_experts_and_the_uniform_line():
    e = 12
    rng = np.random.default_rng(0)
    records = []
    for step in (10, 20, 30):
        rec = {"step": step}
        for layer in (10, 1, 3):
            load = rng.dirichlet(np.ones(e))
            rec[f"model/layer_{layer}/moe/expert_load"] = load.tolist()
        records.append(rec)
    fig = plots.expert_load_figure(records)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["layer_1/moe", "layer_3/moe", "layer_10/moe"]
    for ax, layer in zip(axes, (1, 3, 10)):
        lines = ax.get_lines()
        experts = [ln for ln in lines if ln.get_label().startswith("expert")]
        assert [ln.get_label() for ln in experts] == [f"expert {i}" for i in range(e)]
        want = np.array([r[f"model/layer_{layer}/moe/expert_load"] for r in records])
        for i, ln in enumerate(experts):
            np.testing.assert_allclose(ln.get_ydata(), want[:, i])
        assert len({to_rgba(ln.get_color()) for ln in experts}) == e  # distinct colours
        (uniform,) = [ln for ln in lines if ln.get_label().startswith("1/E")]
        np.testing.assert_allclose(uniform.get_ydata(), [1 / e, 1 / e])
    assert plots.expert_load_figure([{"step": 1, "loss": 1.0}]) is None


@pytest.mark.parametrize("n", [3, 10, 16, 40])
def test_distinct_colors(n):
    assert len({to_rgba(c) for c in plots.distinct_colors(n)}) == n
