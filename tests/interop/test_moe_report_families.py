"""`sparsejax moe-report` on an imported tiny random model of each kind of MoE routing (skipped
without transformers and torch): per MoE layer, the routed-token counts it reports are those of the
top-k of transformers' own router logits on the same calibration windows, shared experts
are not among the routed experts, and the JSON and plots are written."""
import json
import os

import gin
import numpy as np
import pytest

pytestmark = pytest.mark.hf  # needs the [hf] extra (CI's --hf-only run)
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from sparsejax import cli  # noqa: E402
from sparsejax.analysis.moe_report import MoeReport  # noqa: E402
from sparsejax.sparsity.posttrain.workdir import calibration_set  # noqa: E402
from sparsejax.train import trainer  # noqa: E402
from sparsejax.train.commands import parse_workdir_config  # noqa: E402

COMMON = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
MLA = dict(num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
           v_head_dim=6, first_k_dense_replace=1, n_shared_experts=1, moe_intermediate_size=16,
           n_routed_experts=4, num_experts_per_tok=2)
# One family per router and layer layout: softmax top-k on every layer (mixtral; olmoe and
# qwen3_moe route the same way, their attention is test_transformers_parity.py's), with a
# gated shared expert before a dense layer (qwen2_moe), with router and expert biases
# (gpt_oss), after a dense layer with MLA and ungated shared experts (deepseek_v2), sigmoid
# (deepseek_v3). The report runs the model's own blocks, whatever the family.
FAMILIES = {
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM, dict(
        num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM, dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=32, norm_topk_prob=False, mlp_only_layers=[1])),
    # router bias and per-expert biases; top-k of the biased logits
    "gpt_oss": (transformers.GptOssConfig, transformers.GptOssForCausalLM, dict(
        head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=5,
        layer_types=["sliding_attention", "full_attention"])),
    # MLA, a dense first layer, a shared expert (not among the routed ones); one expert group,
    # so V3's sigmoid selection (zero correction bias) is the top-k of the logits too
    "deepseek_v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM, dict(
        MLA, q_lora_rank=None)),
    "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM, dict(
        MLA, q_lora_rank=12, n_group=1, topk_group=1)),
}
MOE_LAYERS = {"mixtral": [0, 1], "qwen2_moe": [0], "gpt_oss": [0, 1], "deepseek_v2": [1],
              "deepseek_v3": [1]}
RUN = ["--gin.TrainConfig.seq_len=32", "--gin.TrainConfig.global_batch_size=8"]
DOCS = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n",
        "for i in range(10):\n    total += i * i\n"]


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    for i in range(6):
        (root / f"doc_{i}.txt").write_text(DOCS[i % 3] * 4)
    return f"files:{root}/*.txt"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_moe_report_of_an_imported_model(family, tmp_path, text, bpe_tokenizer, hf_random_model,
                                         capsys):
    config_cls, model_cls, extra = FAMILIES[family]
    src, w = tmp_path / "hf", str(tmp_path / "w")
    model = hf_random_model(config_cls, model_cls, str(src), {**COMMON, **extra})
    bpe_tokenizer(src / "tokenizer.json")
    assert cli.main(["import-hf", f"--src={src}", f"--workdir={w}"]) == 0
    gin.clear_config()
    capsys.readouterr()
    assert cli.main(["moe-report", f"--workdir={w}", "--quiet", *RUN, "--calibration_samples=4",
                     f"--calibration_data={text}", "--gin.MoeReport.segment_lengths=(4,8)"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    result = json.load(open(summary["file"]))
    assert all(os.path.isfile(p) for p in result["plots"])
    layers = result["layers"]
    assert [r["layer"] for r in layers] == MOE_LAYERS[family]
    assert all(r["num_experts"] == 4 and r["top_k"] == 2 for r in layers)  # no shared expert

    # transformers' router on the same windows: the top-2 of each MoE layer's logits
    gin.clear_config()
    parse_workdir_config(w, [], [b[len("--gin."):] for b in RUN] + [
        "MoeReport.calibration_samples=4", f"MoeReport.calibration_data='{text}'"])
    calib = calibration_set(trainer.TrainConfig(), MoeReport())
    with torch.no_grad():
        out = model(torch.from_numpy(calib.inputs.astype(np.int64)), output_router_logits=True)
    logits = [np.asarray(x) for x in out.router_logits if x is not None]
    assert len(logits) == len(layers)
    for r, lg in zip(layers, logits):
        top = np.argsort(-lg.reshape(-1, 4), axis=1)[:, :2]
        want = np.bincount(top.reshape(-1), minlength=4)
        assert r["counts"] == want.tolist(), (family, r["layer"])
        assert r["tokens"] == calib.inputs.size
