"""`sparsejax longeval` on an imported Hugging Face model (torch-free: a Llama checkpoint
written with safetensors.numpy, a byte-level BPE tokenizer.json trained here): prompts are
sized under the model's own tokenizer and every cell is scored; each prefill method runs it
through the CLI, and at full budget answers as the dense model does."""
import json
import os

import numpy as np
from safetensors.numpy import save_file

from sparsejax import cli

CFG = dict(model_type="llama", vocab_size=300, hidden_size=32, intermediate_size=48,
           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
           max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False,
           rope_theta=10000.0, hidden_act="silu", bos_token_id=1, eos_token_id=2,
           pad_token_id=0)


def write_llama(directory):
    d, f, v, hd = CFG["hidden_size"], CFG["intermediate_size"], CFG["vocab_size"], CFG["head_dim"]
    h, kv = CFG["num_attention_heads"], CFG["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,),
              "lm_head.weight": (v, d)}
    for i in range(CFG["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (d,),
                       p + "post_attention_layernorm.weight": (d,),
                       p + "self_attn.q_proj.weight": (h * hd, d),
                       p + "self_attn.k_proj.weight": (kv * hd, d),
                       p + "self_attn.v_proj.weight": (kv * hd, d),
                       p + "self_attn.o_proj.weight": (d, h * hd),
                       p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                       p + "mlp.down_proj.weight": (d, f)})
    rng = np.random.default_rng(0)
    os.makedirs(directory)
    save_file({k: (rng.standard_normal(s) * 0.2).astype(np.float32) for k, s in shapes.items()},
              os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "config.json"), "w") as fh:
        json.dump(CFG, fh)


def test_longeval_on_an_imported_model(tmp_path, bpe_tokenizer, capsys):
    src, w = str(tmp_path / "hf"), str(tmp_path / "w")
    write_llama(src)
    bpe_tokenizer(os.path.join(src, "tokenizer.json"))
    assert cli.main(["import-hf", f"--src={src}", f"--workdir={w}"]) == 0
    capsys.readouterr()
    rc = cli.main(["longeval", f"--workdir={w}", "--tasks=niah_single,niah_multikey",
                   "--num_samples=2"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    res = json.loads(out.out.strip().splitlines()[-1])
    assert res["lengths"] == [1024]  # the default: 1K up to the model's limit
    assert {t: res["accuracy"][t]["1024"]["n"] for t in res["tasks"]} == \
        {"niah_single": 2, "niah_multikey": 2}
    preds = [json.loads(line) for line in open(os.path.join(w, "longeval", "predictions.jsonl"))]
    assert len(preds) == 4 and all(isinstance(p["output"], str) for p in preds)

    def outputs(spec):
        capsys.readouterr()
        rc = cli.main(["longeval", f"--workdir={w}", "--tasks=niah_single,niah_multikey",
                       "--num_samples=2", f"--gin.attention_kernel.prefill_method={spec}"])
        assert rc == 0, capsys.readouterr().err
        return [json.loads(line)["output"]
                for line in open(os.path.join(w, "longeval", "predictions.jsonl"))]

    assert outputs("{'kind': 'xattention', 'threshold': 1.0, 'block_size': 64}") == \
        [p["output"] for p in preds]
    for spec in ("{'kind': 'xattention', 'threshold': 0.5, 'block_size': 64}",
                 "{'kind': 'flexprefill', 'gamma': 0.5, 'max_budget': 2, 'block_size': 64}",
                 "{'kind': 'minference', 'vertical_size': 64, 'slash_size': 64, "
                 "'block_size': 64}"):
        assert len(outputs(spec)) == 4

