"""`sparsejax prefill-search` on a tiny workdir: writes the recall table and the chosen
patterns, and a gin file that `eval` takes, whose small budgets change the loss; bad input is
refused in one line before the model is loaded."""
import json

import pytest

from sparsejax import cli


def run(capsys, *args):
    capsys.readouterr()
    rc = cli.main(list(args))
    out = capsys.readouterr()
    return rc, out.out.strip().splitlines()[-1] if out.out.strip() else "", out.err


ONE_DEVICE = "--gin.make_mesh.num_devices=1"  # compiling for 8 simulated devices costs more
SMALL_EVAL = "--gin.TrainConfig.eval_tokens=1024"
BUDGETS = ("--vertical_size=4", "--slash_size=4", "--keep_global=1", "--keep_local=1",
           "--last_q=16", "--top_k=1", "--a_shape_blocks=1")


@pytest.fixture(scope="module")
def workdir(make_source, tmp_path_factory):
    return make_source(tmp_path_factory.mktemp("ps") / "w")


def test_search_writes_a_gin_file_that_eval_runs(workdir, capsys):
    w = workdir
    rc, out, err = run(capsys, "prefill-search", f"--workdir={w}", "--rows=2", "--seq_len=128",
                       "--block_size=16", *BUDGETS, ONE_DEVICE)
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["searched_layers"] == [0, 1] and sum(summary["heads"].values()) == 8
    assert 0 < summary["mean_density"] < 1 and 0 < summary["mean_recall"] <= 1
    with open(f"{w}/prefill_search.json") as f:
        report = json.load(f)
    assert report["rows"] == 2 and report["budgets"]["top_k"] == 1
    for layer in report["layers"]:  # each head's choice has the best recall of the three
        for h, name in enumerate(layer["patterns"]):
            best = max(layer["recall"][p][h] for p in report["patterns"])
            assert layer["recall"][name][h] >= best - 1e-6
            assert layer["chosen_recall"][h] == layer["recall"][name][h]
    assert report["prefill_method"]["layer_patterns"] == [layer["patterns"]
                                                          for layer in report["layers"]]

    def loss(*extra):
        rc, out, err = run(capsys, "eval", f"--workdir={w}", "--quiet", ONE_DEVICE, SMALL_EVAL,
                           *extra)
        assert rc == 0, err
        return json.loads(out)["eval_loss"]

    assert abs(loss(f"--gin_file={w}/prefill_search.gin") - loss()) > 1e-4


@pytest.mark.parametrize("flags, message", [
    (("--seq_len=256",), "--seq_len=256 is beyond the model's limit ModelConfig.max_seq_len=128"),
    (("--seq_len=60", "--block_size=16"), "--seq_len=60 is not a multiple of --block_size=16"),
    (("--top_k=x",), "--top_k='x' is not a valid int"),
    (("--gin.ModelConfig.kv_lora_rank=8", "--gin.ModelConfig.qk_rope_head_dim=4",
      "--gin.ModelConfig.v_head_dim=8", "--gin.ModelConfig.num_kv_heads=4"),
     "ModelConfig.kv_lora_rank=8: the prefill search needs standard attention"),
    (("--gin.ModelConfig.attention_kinds=('dense', 'nsa')",), "has 'nsa' layers"),
    (("--gin.MInferenceMask.pattern='a_shape'",), "the pattern search sets it"),
])
def test_bad_input_is_one_line(workdir, capsys, flags, message):
    rc, _, err = run(capsys, "prefill-search", f"--workdir={workdir}", *flags, ONE_DEVICE)
    assert rc == 2 and message in err and err.count("\n") == 1, err
