"""MXFP4 expert weights (published gpt-oss checkpoints) are dequantized on import, exactly as
transformers' own `integrations.mxfp4.convert_moe_packed_tensors` does (skipped without
transformers and torch); a tiny random gpt-oss model whose experts are stored as MXFP4 blocks
and scales imports with the logits transformers gives when it loads that checkpoint itself
(`Mxfp4Config(dequantize=True)`)."""
import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

pytestmark = pytest.mark.hf  # needs the [hf] extra (CI's --hf-only run)
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from transformers.integrations.mxfp4 import convert_moe_packed_tensors  # noqa: E402

from sparsejax import cli  # noqa: E402
from sparsejax.interop.mxfp4 import dequantize  # noqa: E402

TOL = 1e-4
CONFIG = dict(vocab_size=300, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2,
              sliding_window=5, layer_types=["sliding_attention", "full_attention"])
TOKENS = np.random.default_rng(0).integers(0, 300, (2, 16))


def random_mxfp4(rng, shape):
    """MXFP4 blocks [*shape, 16] (every nibble) and scales [*shape] (2^-6 .. 2^1)."""
    return (rng.integers(0, 256, (*shape, 16)).astype(np.uint8),
            rng.integers(121, 129, shape).astype(np.uint8))


def test_dequantize_equals_transformers():
    blocks, scales = random_mxfp4(np.random.default_rng(0), (3, 10, 4))
    want = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                      dtype=torch.float32).numpy()
    got = dequantize(blocks, scales)
    assert got.shape == want.shape == (3, 4 * 32, 10)
    np.testing.assert_array_equal(got, want)


def test_mxfp4_checkpoint_imports_with_transformers_logits(tmp_path, hf_random_model, imported):
    src, w = tmp_path / "hf", str(tmp_path / "w")
    hf_random_model(transformers.GptOssConfig, transformers.GptOssForCausalLM, str(src), CONFIG)
    tensors = load_file(str(src / "model.safetensors"))
    rng = np.random.default_rng(1)
    e, d, f = 4, 32, 32
    for i in range(2):
        for name, rows, cols in (("gate_up_proj", 2 * f, d), ("down_proj", d, f)):
            key = f"model.layers.{i}.mlp.experts.{name}"
            del tensors[key]
            tensors[key + "_blocks"], tensors[key + "_scales"] = random_mxfp4(
                rng, (e, rows, cols // 32))
    save_file(tensors, str(src / "model.safetensors"))
    cfg = json.load(open(src / "config.json"))
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
        "lm_head"]}
    json.dump(cfg, open(src / "config.json", "w"))
    assert cli.main(["import-hf", f"--src={src}", f"--workdir={w}"]) == 0

    # transformers loads the same checkpoint, dequantizing it itself
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(src), quantization_config=transformers.Mxfp4Config(dequantize=True),
        dtype=torch.float32).eval()
    with torch.no_grad():
        want = model(torch.from_numpy(TOKENS)).logits.numpy()
    ours_model, params, _ = imported(w)
    got = np.asarray(ours_model.apply({"params": params}, TOKENS))
    assert np.abs(got - want).max() <= TOL, np.abs(got - want).max()
    up = model.model.layers[1].mlp.experts.gate_up_proj.detach().numpy()
    np.testing.assert_array_equal(params["layer_1"]["moe"]["experts"]["wi_up"], up[..., 1::2])
    np.testing.assert_array_equal(params["layer_0"]["moe"]["experts"]["wo"],
                                  model.model.layers[0].mlp.experts.down_proj.detach().numpy())
