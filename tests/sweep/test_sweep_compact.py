"""A sweep over a block-sparse setting of compact runs (BlockSparse.density on
configs/sparsity/block_static.gin): every trial trains its own compact layout, and the table
counts what each stores."""
import csv
import json
import os

import numpy as np
import pytest

from sparsejax import cli
from sparsejax.train.checkpoint import restore_state_numpy

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
DENSITIES = (0.25, 0.5)
ARGS = ["--gin_file=tiny.gin", "--gin_file=sparsity/block_static.gin",
        f"--sweep=BlockSparse.density={list(DENSITIES)}", "--parallel=2",
        "--gin.TrainConfig.num_steps=2", "--gin.TrainConfig.eval_every=2",
        "--gin.TrainConfig.eval_tokens=64", "--gin.TrainConfig.checkpoint_every=2",
        "--gin.TrainConfig.log_every=1", "--gin.TrainConfig.progress_bar=False",
        "--gin.TrainConfig.async_checkpoints=False"]


def test_sweep_over_the_block_density_trains_compact_trials(tmp_path):
    out = str(tmp_path / "sweep")
    assert cli.main(["sweep", *ARGS, f"--out={out}"]) == 0
    with open(os.path.join(out, "results.csv")) as f:
        rows = {float(r["density"]): r for r in csv.DictReader(f)}
    assert set(rows) == set(DENSITIES)
    for d in DENSITIES:
        trial = os.path.join(out, "trials", f"density={d},seed=0")
        result = json.load(open(os.path.join(trial, "result.json")))
        assert result["density"] == pytest.approx(d)  # the stored fraction the run logged
        assert np.isfinite(result["final_eval_loss"])
        _, state = restore_state_numpy(trial)
        k = {0.25: 1, 0.5: 2}[d]  # round(d * 4) of the 4 input blocks of 16
        assert state["params"]["layer_0"]["mlp"]["wi_gate"]["values"].shape == (8, k, 16, 16)
        assert state["sparsity"]["layout"]["layer_0"]["mlp"]["wo"]["indices"].shape == (4, 2 * k)
        # tiny.gin: per layer 36864 projection entries (see test_sweep_run), d of them stored;
        # embedding and LM head 259 x 64 each (vocab padding not counted), 5 norms of 64
        stored = d * 2 * 36864
        assert float(rows[d]["params"]) == 2 * 259 * 64 + 5 * 64 + stored
        assert float(rows[d]["flops_per_token"]) == 2 * (stored + 64 * 259)
