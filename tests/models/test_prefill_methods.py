"""Prefill methods in the model (`attention_kernel.prefill_method`, models/sparse_attention.py):
at full budget every method gives the dense model's logits, on a sequence that is not a whole
number of blocks and with GQA; below it the method changes the logits, and the prompt pass of
`sample` (KV cache) gives the same logits as a forward pass with the method, while the decode
steps after it stay dense; `sparsejax eval` takes the method by gin; unsupported models are
refused in one line."""
import json

import flax.linen as nn
import gin
import jax
import numpy as np
import pytest

from sparsejax import cli
from sparsejax.infer.cache import init_cache
from sparsejax.models.transformer import ModelConfig, Transformer

BASE = dict(vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8,
            mlp_dim=48, max_seq_len=256, scale_embeddings=False)
SEQ = 200  # not a multiple of the 16-token blocks: padded inside the layer
FULL = {"xattention": "{'kind': 'xattention', 'threshold': 1.0, 'stride': 4, 'block_size': 16}",
        "flexprefill": "{'kind': 'flexprefill', 'min_budget': 13, 'block_size': 16}",
        "minference": "{'kind': 'minference', 'vertical_size': 256, 'slash_size': 256, "
                      "'block_size': 16}"}
SPARSE = {"xattention": "{'kind': 'xattention', 'threshold': 0.3, 'stride': 4, 'block_size': 16}",
          "flexprefill": "{'kind': 'flexprefill', 'gamma': 0.3, 'tau': 0.2, 'max_budget': 2, "
                         "'block_size': 16}",
          "minference": "{'kind': 'minference', 'vertical_size': 8, 'slash_size': 8, "
                        "'keep_global': 4, 'keep_local': 4, 'block_size': 16}"}


def model_and_params(**over):
    model = Transformer(ModelConfig(**{**BASE, **over}))
    v = nn.meta.unbox(model.init(jax.random.key(0), np.zeros((1, 16), np.int32)))
    rng = np.random.default_rng(1)
    return model, jax.tree.map(lambda p: (rng.standard_normal(p.shape) * 0.5).astype(np.float32),
                               v["params"])


def tokens(batch=2, seq=SEQ):
    toks = np.random.default_rng(2).integers(0, 64, (batch, seq)).astype(np.int32)
    pos = np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq))
    return toks, pos, np.ones_like(toks)


def use(spec):
    gin.clear_config()
    if spec is not None:
        gin.parse_config(f"attention_kernel.prefill_method = {spec}")


def forward(model, params, spec):
    use(spec)
    return np.asarray(jax.jit(lambda p, *a: model.apply({"params": p}, *a))(params, *tokens()))


def prompt_pass(model, params, spec):
    """Logits of the prompt pass into a fresh KV cache, and the cache."""
    use(spec)
    toks, pos, seg = tokens()
    cache = init_cache(model.config, toks.shape[0], toks.shape[1] + 2)
    logits, mut = jax.jit(lambda c: model.apply({"params": params, "cache": c}, toks, pos, seg,
                                                decode=True, mutable=["cache"]))(cache)
    return np.asarray(logits), mut["cache"]


def decode_step(model, params, spec, cache):
    use(spec)
    tok = np.array([[5], [7]], np.int32)
    pos = np.full((2, 1), SEQ, np.int32)
    logits, _ = jax.jit(lambda c: model.apply({"params": params, "cache": c}, tok, pos,
                                              np.ones_like(tok), decode=True,
                                              mutable=["cache"]))(cache)
    return np.asarray(logits)


@pytest.mark.parametrize("method", sorted(FULL))
def test_full_budget_equals_dense_and_a_small_one_does_not(method):
    model, params = model_and_params()
    dense = forward(model, params, None)
    np.testing.assert_allclose(forward(model, params, FULL[method]), dense, atol=2e-5, rtol=1e-5)
    sparse = forward(model, params, SPARSE[method])
    assert np.abs(sparse - dense).max() > 1e-3
    # the first block sees only its sink/local tiles either way: identical
    np.testing.assert_allclose(sparse[:, :16], dense[:, :16], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["xattention", "minference"])
def test_prompt_pass_of_sample_uses_the_method_and_decode_stays_dense(method):
    model, params = model_and_params()
    logits, cache = prompt_pass(model, params, SPARSE[method])
    np.testing.assert_allclose(logits, forward(model, params, SPARSE[method]),
                               atol=2e-5, rtol=1e-5)
    assert np.abs(logits - prompt_pass(model, params, None)[0]).max() > 1e-3
    # a decode step attends densely over whatever the cache holds
    np.testing.assert_array_equal(decode_step(model, params, SPARSE[method], cache),
                                  decode_step(model, params, None, cache))
    full, _ = prompt_pass(model, params, FULL[method])
    np.testing.assert_allclose(full, prompt_pass(model, params, None)[0], atol=2e-5, rtol=1e-5)


def test_unsupported_models_are_refused():
    def init(spec, **over):
        use(spec)
        Transformer(ModelConfig(**{**BASE, **over})).init(jax.random.key(0),
                                                          np.zeros((1, 16), np.int32))

    with pytest.raises(ValueError, match="does not support ModelConfig.attention_sinks=True"):
        init(SPARSE["xattention"], attention_sinks=True)
    with pytest.raises(ValueError, match="not supported with multi-head latent attention"):
        init(SPARSE["xattention"], kv_lora_rank=8, qk_rope_head_dim=4, v_head_dim=8,
             num_kv_heads=4)
    with pytest.raises(ValueError, match="kind must be a prefill method"):
        init("{'kind': 'sliding_window', 'window': 32}")


def test_eval_takes_the_method_by_gin(make_source, tmp_path, capsys):
    w = make_source(tmp_path / "w")

    def loss(*extra):
        capsys.readouterr()
        assert cli.main(["eval", f"--workdir={w}", "--quiet", *extra]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval_loss"]

    dense = loss()
    full = loss("--gin.attention_kernel.prefill_method={'kind': 'xattention', "
                "'threshold': 1.0, 'stride': 4, 'block_size': 16}")
    sparse = loss("--gin.attention_kernel.prefill_method={'kind': 'xattention', "
                  "'threshold': 0.2, 'stride': 4, 'block_size': 16}")
    assert full == pytest.approx(dense, rel=1e-5)
    assert abs(sparse - dense) > 1e-4
    capsys.readouterr()
    rc = cli.main(["eval", f"--workdir={w}", "--quiet",
                   "--gin.attention_kernel.prefill_method={'kind': 'xattention', "
                   "'threshold': 2.0}"])
    err = capsys.readouterr().err
    assert rc != 0 and "threshold=2.0 must be a number in (0, 1]" in err and err.count("\n") == 1


def test_per_layer_patterns_are_refused_on_scanned_layers():
    use("{'kind': 'minference', 'layer_patterns': ('a_shape', 'vertical_slash'), "
        "'block_size': 16}")
    model = Transformer(ModelConfig(**{**BASE, "scan_layers": True}))
    tokens = np.zeros((1, 16), np.int32)
    variables = model.init(jax.random.key(0), tokens)  # initialized unscanned, then stacked
    with pytest.raises(ValueError, match="layer_patterns .* needs ModelConfig.scan_layers=False"):
        model.apply(variables, tokens)
