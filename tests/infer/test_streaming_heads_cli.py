"""`sparsejax streaming-heads` on a tiny workdir: labels the asked share of KV heads, reports
the binding and the cache memory at the model's limit, and `sample` under that binding
decodes what the dense model decodes when the recent window covers the whole cache."""
import json

from sparsejax import cli


def run(capsys, *args):
    capsys.readouterr()
    rc = cli.main(list(args))
    out = capsys.readouterr()
    return rc, out.out.strip().splitlines()[-1] if out.out.strip() else "", out.err


ONE_DEVICE = "--gin.make_mesh.num_devices=1"  # compiling for 8 simulated devices costs more


def test_streaming_heads_command(make_source, tmp_path, capsys):
    w = make_source(tmp_path / "w", "--gin.ModelConfig.max_seq_len=1024")
    rc, out, err = run(capsys, "streaming-heads", f"--workdir={w}", "--fraction=0.5",
                       "--num_rows=2", "--length=768", "--recent_tokens=32", ONE_DEVICE)
    assert rc == 0, err
    res = json.loads(out)
    assert res["streaming_kv_heads"] == 2 and res["kv_heads"] == 4  # tiny: 2 layers x 2
    assert sum(len(h) for h in res["heads"]) == 2
    # 2 of 4 KV heads keep 4 + 32 slots of 1024
    assert 0.5 < res["cache_bytes"]["ratio"] < 0.55
    flat = sorted(e for layer in res["errors"] for e in layer)
    chosen = [res["errors"][i][h] for i, hs in enumerate(res["heads"]) for h in hs]
    assert sorted(chosen) == flat[:2]
    heads = tuple(tuple(h) for h in res["heads"])
    sample = ["sample", f"--workdir={w}", "--prompt=def f(x):", "--max_new_tokens=8",
              ONE_DEVICE]
    rc, dense, err = run(capsys, *sample)
    assert rc == 0, err
    rc, full, err = run(capsys, *sample, f"--gin.StreamingHeads.heads={heads!r}",
                        "--gin.StreamingHeads.recent_tokens=64")
    assert rc == 0, err
    assert json.loads(full)["tokens"] == json.loads(dense)["tokens"]
    rc, _, err = run(capsys, "streaming-heads", f"--workdir={w}", "--fraction=2")
    assert rc == 2 and "fraction=2.0 must be in [0, 1]" in err and err.count("\n") == 1
