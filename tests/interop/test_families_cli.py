"""qwen3, qwen3_moe, olmoe and gpt_oss through the CLI (skipped without transformers and torch): a tiny
random checkpoint with a tokenizer.json and a config.json that defines neither BOS nor EOS is
imported; `sample` continues a prompt as transformers' `generate` does; `train` fine-tunes it on
a corpus holding empty files (skipped and counted, not an error); the fine-tuned model exports
and transformers loads it with our logits. Each is then pruned at 50% (PRUNE: SparseGPT,
Wanda, DSnoT and OWL among them), the MoE families' experts merged 4 -> 2, and the smaller
model exported and loaded with our logits; gpt_oss is also pruned by magnitude and Wanda, and
its biases and sinks come out of every pruning unpruned. DeepSeek-V2 / V3 (multi-head latent
attention, a dense layer then an MoE layer) go the same way and are pruned with magnitude,
Wanda + OWL, Wanda + DSnoT or SparseGPT: every projection, the low-rank ones included,
exports with its exact zeros."""
import json
import os
import shutil

import gin
import numpy as np
import pytest

pytestmark = pytest.mark.hf  # needs the [hf] extra (CI's --hf-only run)
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from sparsejax import cli  # noqa: E402
from sparsejax.data.stdlib_corpus import is_validation  # noqa: E402
from sparsejax.models.transformer import ModelConfig, Transformer  # noqa: E402
from sparsejax.train.checkpoint import restore_state_numpy  # noqa: E402
from sparsejax.train.commands import parse_workdir_config  # noqa: E402
from sparsejax.train.metrics import read_metrics  # noqa: E402

TOL = 1e-4
COMMON = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              bos_token_id=None, eos_token_id=None)
FAMILIES = {
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=16)),
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM, dict(
        head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        norm_topk_prob=True, mlp_only_layers=[0])),
    "olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM, dict(
        num_experts=4, num_experts_per_tok=2, clip_qkv=1.0)),
    # sinks, a window of 5 (shorter than the prompt + continuation and the training rows) on
    # layer 0, full attention on layer 1, biases everywhere
    "gpt_oss": (transformers.GptOssConfig, transformers.GptOssForCausalLM, dict(
        head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=5,
        layer_types=["sliding_attention", "full_attention"])),
}
TRAINED = {"qwen3": "model.layers.0.self_attn.q_norm.weight",  # a tensor fine-tuning changes
           "qwen3_moe": "model.layers.0.self_attn.q_norm.weight",
           "olmoe": "model.layers.0.self_attn.q_norm.weight",
           "gpt_oss": "model.layers.0.self_attn.sinks"}
# the post-training pruning each family goes through (with expert merging for the MoE ones)
PRUNE = {"qwen3": ["--method=sparsegpt", "--dsnot", "--allocation=owl"],
         "qwen3_moe": ["--method=sparsegpt", "--dsnot"],
         "olmoe": ["--method=wanda", "--allocation=owl"],
         "gpt_oss": ["--method=sparsegpt", "--dsnot", "--allocation=owl"]}
FAST = ["--gin.TrainConfig.global_batch_size=8", "--gin.TrainConfig.seq_len=32",
        "--gin.TrainConfig.log_every=1", "--gin.TrainConfig.eval_every=2",
        "--gin.TrainConfig.eval_tokens=256", "--gin.TrainConfig.checkpoint_every=2",
        "--gin.TrainConfig.progress_bar=False", "--gin.TrainConfig.async_checkpoints=False"]
TOKENS = np.random.default_rng(0).integers(0, 300, (2, 16))
DOCS = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n",
        "for i in range(10):\n    total += i * i\n"]
EMPTY = [f"empty_{i}.txt" for i in range(4)]  # three fall in the train split, one in validation


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """`files:` documents, some of them empty files."""
    root = tmp_path_factory.mktemp("corpus")
    for i in range(40):
        (root / f"doc_{i:02d}.txt").write_text(DOCS[i % 3] * (1 + i % 4))
    for name in EMPTY:
        (root / name).write_text("")
    return root


def our_logits(workdir):
    """Logits of TOKENS by the workdir's latest checkpoint (params with exact zeros; the MoE
    state, DeepSeek-V3's selection bias, when it keeps one)."""
    gin.clear_config()
    parse_workdir_config(workdir, [], [])
    _, state = restore_state_numpy(workdir)
    variables = {"params": state["params"]}
    if state.get("moe_state"):
        variables["moe_state"] = state["moe_state"]
    return np.asarray(Transformer(ModelConfig()).apply(variables, TOKENS))


def exported(workdir, out, model):
    """export-hf of `workdir`, loaded by transformers as the class of `model`."""
    gin.clear_config()
    assert cli.main(["export-hf", f"--workdir={workdir}", f"--out={out}"]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    assert type(back) is type(model)
    return back


def hf_logits(model):
    with torch.no_grad():
        return model(torch.from_numpy(TOKENS)).logits.numpy()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_import_sample_finetune_prune_export(family, tmp_path, corpus, bpe_tokenizer,
                                             hf_random_model, capsys):
    config_cls, model_cls, extra = FAMILIES[family]
    src, w = tmp_path / "hf", str(tmp_path / "w")
    model = hf_random_model(config_cls, model_cls, str(src), {**COMMON, **extra})
    bpe_tokenizer(src / "tokenizer.json")
    data = f"--gin.TrainConfig.dataset='files:{corpus}/*.txt'"
    assert cli.main(["import-hf", f"--src={src}", f"--workdir={w}"]) == 0

    # sample: the prompt encoded as the tokenizer does (no BOS), greedy as transformers'
    prompt = "def add(a, b):"  # 9 tokens: with the continuation, past gpt_oss's window
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(src / "tokenizer.json"))
    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                              do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    capsys.readouterr()
    gin.clear_config()
    assert cli.main(["sample", f"--workdir={w}", f"--prompt={prompt}",
                     "--max_new_tokens=5"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokens"][0] == want

    # fine-tune on a corpus with empty files: they encode to no tokens, and are skipped
    tuned = str(tmp_path / "tuned")
    shutil.copytree(w, tuned)
    gin.clear_config()
    assert cli.main(["train", f"--workdir={tuned}", "--quiet", data, *FAST,
                     "--gin.TrainConfig.num_steps=2", "--gin.learning_rate_schedule.peak_lr=1e-2",
                     "--gin.learning_rate_schedule.warmup_steps=0"]) == 0
    start = read_metrics(os.path.join(tuned, "metrics.jsonl"))[0]
    assert start["data_skipped_documents"] == sum(not is_validation(n, 5) for n in EMPTY) > 0
    assert start["eval_skipped_documents"] == sum(is_validation(n, 5) for n in EMPTY)
    back = exported(tuned, str(tmp_path / "tuned_hf"), model)
    np.testing.assert_allclose(hf_logits(back), our_logits(tuned), atol=TOL, rtol=0)
    assert not torch.equal(back.state_dict()[TRAINED[family]], model.state_dict()[TRAINED[family]])
    # pruned at 50% (each family another method, DSnoT and OWL among them) and the 4 experts of
    # each MoE layer merged into 2, exported
    moe = family != "qwen3"
    pruned = str(tmp_path / "pruned")
    gin.clear_config()
    assert cli.main(["prune", f"--workdir={w}", f"--out={pruned}", *PRUNE[family],
                     "--sparsity=0.5", *(["--experts=merge", "--num_experts=2"] if moe else []),
                     "--calibration_samples=8", "--quiet", data, *FAST[:2],
                     "--gin.TrainConfig.eval_tokens=256"]) == 0
    back = exported(pruned, str(tmp_path / "pruned_hf"), model)
    layer = back.model.layers[1]  # an MoE layer in every MoE family
    if moe:
        assert back.config.num_experts == 2
        router = layer.mlp.router if family == "gpt_oss" else layer.mlp.gate
        assert router.weight.shape[0] == 2
    zeros = [(back.model.layers[i].self_attn.q_proj.weight.detach().numpy() == 0).mean()
             for i in range(len(back.model.layers))]
    if "--allocation=owl" in PRUNE[family]:  # blocks pruned unevenly around the target
        assert np.mean(zeros) == pytest.approx(0.5, abs=0.05) and 0 < min(zeros)
    else:
        assert zeros == pytest.approx([0.5] * len(zeros))
    np.testing.assert_allclose(hf_logits(back), our_logits(pruned), atol=TOL, rtol=0)
    if family != "gpt_oss":
        return
    original = model.state_dict()
    for name, value in back.state_dict().items():  # biases and sinks: never pruned
        if name.endswith(("bias", "sinks")) and "mlp." not in name:
            assert torch.equal(value, original[name]), name

    # magnitude and Wanda at 50%, every expert kept: exact zeros in every projection, expert
    # projections included, and the biases, router bias and sinks exactly as they were
    for method in ("magnitude", "wanda"):
        pruned = str(tmp_path / method)
        gin.clear_config()
        assert cli.main(["prune", f"--workdir={w}", f"--out={pruned}", f"--method={method}",
                         "--sparsity=0.5", "--calibration_samples=8", "--quiet", data,
                         *FAST[:2], "--gin.TrainConfig.eval_tokens=256"]) == 0
        back = exported(pruned, str(tmp_path / f"{method}_hf"), model)
        np.testing.assert_allclose(hf_logits(back), our_logits(pruned), atol=TOL, rtol=0)
        for name, value in back.state_dict().items():
            if name.endswith(("bias", "sinks")):
                assert torch.equal(value, original[name]), name
            elif name.endswith(("proj.weight", "gate_up_proj", "down_proj")):
                assert (value == 0).float().mean().item() == pytest.approx(0.5, abs=0.01), name


MLA = dict(num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
           v_head_dim=6, first_k_dense_replace=1, n_shared_experts=1, moe_intermediate_size=16,
           num_experts_per_tok=2)
DEEPSEEK = {
    "deepseek_v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM, dict(
        MLA, q_lora_rank=None, n_routed_experts=4, routed_scaling_factor=1.5)),
    # plain rotary pairs and unnormalized top-k weights (not V3's defaults, which
    # test_transformers_parity.py compares)
    "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM, dict(
        MLA, q_lora_rank=12, n_routed_experts=4, n_group=2, topk_group=1,
        rope_interleave=False, norm_topk_prob=False)),
}
# the projections of each attention layer, where pruning must leave its zeros
MLA_PROJECTIONS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj",
                   "o_proj")


# each prune: its CLI flags (OWL spreads the 50% unevenly over the blocks, DSnoT keeps it)
@pytest.mark.parametrize("family, methods", [
    ("deepseek_v2", ("--method=magnitude", "--method=wanda --allocation=owl")),
    ("deepseek_v3", ("--method=wanda --dsnot", "--method=sparsegpt"))])
def test_deepseek_sample_finetune_prune_export(family, methods, tmp_path, corpus,
                                               bpe_tokenizer, hf_random_model, capsys):
    config_cls, model_cls, extra = DEEPSEEK[family]
    src, w = tmp_path / "hf", str(tmp_path / "w")
    model = hf_random_model(config_cls, model_cls, str(src), {**COMMON, **extra})
    if family == "deepseek_v3":  # a selection bias that changes the routing
        with torch.no_grad():
            model.model.layers[1].mlp.gate.e_score_correction_bias.normal_(0, 0.5)
        model.save_pretrained(str(src))
    bpe_tokenizer(src / "tokenizer.json")
    data = f"--gin.TrainConfig.dataset='files:{corpus}/*.txt'"
    assert cli.main(["import-hf", f"--src={src}", f"--workdir={w}"]) == 0

    prompt = "def add(a, b):"
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(src / "tokenizer.json"))
    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                              do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    capsys.readouterr()
    gin.clear_config()
    assert cli.main(["sample", f"--workdir={w}", f"--prompt={prompt}",
                     "--max_new_tokens=5"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokens"][0] == want

    if family == "deepseek_v2":  # fine-tune: the latent projections change, export loads
        tuned = str(tmp_path / "tuned")
        shutil.copytree(w, tuned)
        gin.clear_config()
        assert cli.main(["train", f"--workdir={tuned}", "--quiet", data, *FAST,
                         "--gin.TrainConfig.num_steps=2",
                         "--gin.learning_rate_schedule.peak_lr=1e-2",
                         "--gin.learning_rate_schedule.warmup_steps=0"]) == 0
        back = exported(tuned, str(tmp_path / "tuned_hf"), model)
        np.testing.assert_allclose(hf_logits(back), our_logits(tuned), atol=TOL, rtol=0)
        name = "model.layers.1.self_attn.kv_b_proj.weight"
        assert not torch.equal(back.state_dict()[name], model.state_dict()[name])

    for i, method in enumerate(methods):
        pruned = str(tmp_path / f"pruned_{i}")
        gin.clear_config()
        assert cli.main(["prune", f"--workdir={w}", f"--out={pruned}", *method.split(),
                         "--sparsity=0.5", "--calibration_samples=8", "--quiet", data,
                         *FAST[:2], "--gin.TrainConfig.eval_tokens=256"]) == 0
        back = exported(pruned, str(tmp_path / f"pruned_{i}_hf"), model)
        per_block = []
        for layer in back.model.layers:
            projs = [getattr(layer.self_attn, name, None) for name in MLA_PROJECTIONS]
            zeros = [(p.weight.detach().numpy() == 0).mean() for p in projs if p is not None]
            # one sparsity per block (Wanda keeps floor(in x s) per output: 16-24 inputs here)
            assert max(zeros) - min(zeros) < 0.07, (method, zeros)
            per_block.append(float(np.mean(zeros)))
        if "owl" in method:  # outlier-weighted: the blocks differ, their mean is the target
            assert np.mean(per_block) == pytest.approx(0.5, abs=0.05), per_block
        else:
            assert per_block == pytest.approx([0.5] * len(per_block), abs=0.02), (method,
                                                                                   per_block)
        if family == "deepseek_v3":  # the selection bias comes back unchanged
            assert torch.equal(back.model.layers[1].mlp.gate.e_score_correction_bias,
                               model.model.layers[1].mlp.gate.e_score_correction_bias)
        np.testing.assert_allclose(hf_logits(back), our_logits(pruned), atol=TOL, rtol=0)
