"""REAP expert pruning of imported Qwen2-MoE and DeepSeek-V2 / V3 models (each with a shared expert;
skipped without transformers and torch): `sparsejax prune --method=none --experts=reap` keeps
the two most salient routed experts, the export is a valid checkpoint of the family with 2
experts that transformers loads with our logits, its kept experts and router rows (and
DeepSeek-V3's selection bias) are the original ones and its shared expert is untouched."""
import json
import os

import gin
import numpy as np
import pytest

pytestmark = pytest.mark.hf  # needs the [hf] extra (CI's --hf-only run)
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from sparsejax import cli  # noqa: E402
from sparsejax.models.transformer import ModelConfig, Transformer  # noqa: E402
from sparsejax.train.checkpoint import restore_state_numpy  # noqa: E402
from sparsejax.train.commands import parse_workdir_config  # noqa: E402

COMMON = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              num_experts_per_tok=2, moe_intermediate_size=16)
# family -> (config, model class, config options, the MoE layer, its shared-expert tensors,
#            its routed tensors indexed by expert, config.json's expert count)
FAMILIES = {
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM, dict(
        num_experts=4, shared_expert_intermediate_size=32, norm_topk_prob=False,
        mlp_only_layers=[1]), 0,
        ("shared_expert.gate_proj.weight", "shared_expert.up_proj.weight",
         "shared_expert.down_proj.weight", "shared_expert_gate.weight"),
        ("gate.weight", "experts.gate_up_proj", "experts.down_proj"), "num_experts"),
    "deepseek_v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM, dict(
        num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
        v_head_dim=6, q_lora_rank=None, first_k_dense_replace=1, n_shared_experts=1,
        n_routed_experts=4), 1,
        ("shared_experts.gate_proj.weight", "shared_experts.up_proj.weight",
         "shared_experts.down_proj.weight"),
        ("gate.weight", "experts.gate_up_proj", "experts.down_proj"), "n_routed_experts"),
    "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM, dict(
        num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
        v_head_dim=6, q_lora_rank=12, first_k_dense_replace=1, n_shared_experts=1,
        n_routed_experts=4, n_group=1, topk_group=1), 1,
        ("shared_experts.gate_proj.weight", "shared_experts.up_proj.weight",
         "shared_experts.down_proj.weight"),
        ("gate.weight", "gate.e_score_correction_bias", "experts.gate_up_proj",
         "experts.down_proj"), "n_routed_experts"),
}
TOKENS = np.random.default_rng(0).integers(0, 300, (2, 16))
DOCS = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_reap_pruned_model_exports_with_its_shared_expert(family, tmp_path, bpe_tokenizer,
                                                          hf_random_model):
    config_cls, model_cls, extra, layer, shared, routed, count = FAMILIES[family]
    src, w, out = tmp_path / "hf", str(tmp_path / "w"), str(tmp_path / "pruned")
    model = hf_random_model(config_cls, model_cls, str(src), {**COMMON, **extra})
    if family == "deepseek_v3":  # a selection bias that changes the routing
        with torch.no_grad():
            model.model.layers[1].mlp.gate.e_score_correction_bias.normal_(0, 0.5)
        model.save_pretrained(str(src))
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
    assert type(back) is model_cls and getattr(back.config, count) == 2
    before, after = model.state_dict(), back.state_dict()
    mlp = f"model.layers.{layer}.mlp."
    for name in shared:
        assert torch.equal(after[mlp + name], before[mlp + name]), name
    for name in routed:
        assert torch.equal(after[mlp + name], before[mlp + name][kept]), name

    gin.clear_config()
    parse_workdir_config(out, [], [])
    _, state = restore_state_numpy(out)
    moe_state = {"moe_state": state["moe_state"]} if state.get("moe_state") else {}
    ours = np.asarray(Transformer(ModelConfig()).apply({"params": state["params"], **moe_state},
                                                       TOKENS))
    with torch.no_grad():
        theirs = back(torch.from_numpy(TOKENS)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
