"""REAP expert pruning of an imported Qwen2-MoE model (a shared expert; skipped without
transformers and torch): `sparsejax prune --method=none --experts=reap` keeps the two most
salient routed experts, the export is a valid qwen2_moe checkpoint with 2 experts that
transformers loads with our logits, its kept experts and router rows are the original ones
and its shared expert is untouched."""
import json
import os

import gin
import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from sparsejax import cli  # noqa: E402
from sparsejax.models.transformer import ModelConfig, Transformer  # noqa: E402
from sparsejax.train.checkpoint import restore_state_numpy  # noqa: E402
from sparsejax.train.commands import parse_workdir_config  # noqa: E402

CONFIG = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
              shared_expert_intermediate_size=32, norm_topk_prob=False, mlp_only_layers=[1])
TOKENS = np.random.default_rng(0).integers(0, 300, (2, 16))
DOCS = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n"]


def test_reap_pruned_qwen2_moe_exports_with_its_shared_expert(tmp_path, bpe_tokenizer,
                                                              hf_random_model, capsys):
    src, w, out = tmp_path / "hf", str(tmp_path / "w"), str(tmp_path / "pruned")
    model = hf_random_model(transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM,
                            str(src), CONFIG)
    bpe_tokenizer(src / "tokenizer.json")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):  # some fall in the validation split
        (corpus / f"doc_{i:02d}.txt").write_text(DOCS[i % 2] * (1 + i % 3))
    assert cli.main(["import-hf", f"--src={src}", f"--workdir={w}"]) == 0
    gin.clear_config()
    assert cli.main(["prune", f"--workdir={w}", f"--out={out}", "--method=none",
                     "--experts=reap", "--num_experts=2", "--calibration_samples=4", "--quiet",
                     f"--calibration_data=files:{corpus}/*.txt",
                     f"--gin.TrainConfig.dataset='files:{corpus}/*.txt'",
                     "--gin.TrainConfig.seq_len=32", "--gin.TrainConfig.global_batch_size=8",
                     "--gin.TrainConfig.eval_tokens=256"]) == 0
    (info,) = json.load(open(os.path.join(out, "prune_report.json")))["experts"]
    sal = np.array(info["reap_saliency"])
    kept = sorted(np.argsort(-sal, kind="stable")[:2].tolist())
    assert info["groups"] == [[e] for e in kept] and info["protected"] == []

    gin.clear_config()
    assert cli.main(["export-hf", f"--workdir={out}", f"--out={tmp_path / 'hf_out'}"]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf_out").float().eval()
    assert type(back) is transformers.Qwen2MoeForCausalLM and back.config.num_experts == 2
    before, after = model.state_dict(), back.state_dict()
    mlp = "model.layers.0.mlp."
    for name in ("shared_expert.gate_proj.weight", "shared_expert.up_proj.weight",
                 "shared_expert.down_proj.weight", "shared_expert_gate.weight"):
        assert torch.equal(after[mlp + name], before[mlp + name]), name
    for name in ("gate.weight", "experts.gate_up_proj", "experts.down_proj"):
        assert torch.equal(after[mlp + name], before[mlp + name][kept]), name

    gin.clear_config()
    parse_workdir_config(out, [], [])
    _, state = restore_state_numpy(out)
    ours = np.asarray(Transformer(ModelConfig()).apply({"params": state["params"]}, TOKENS))
    with torch.no_grad():
        theirs = back(torch.from_numpy(TOKENS)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
