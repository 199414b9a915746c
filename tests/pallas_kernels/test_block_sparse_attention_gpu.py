"""Compiled (non-interpret) GPU kernel vs the dense reference at realistic shapes.

Run on a CUDA machine with SPARSEJAX_TEST_GPU=1 (otherwise skipped).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse_attention import gpu_config as gcfg
from pallas_kernels.block_sparse_attention import masks as masks_lib
from pallas_kernels.block_sparse_attention import ops, reference

# bf16 inputs, float32 accumulation; errors are relative to the largest reference value.
BF16_REL_TOL = 2e-2


def _rel_err(x, ref):
    x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
    assert np.all(np.isfinite(x)), "non-finite values in kernel output"
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-6))


def _random_layout(heads, nb, density, seed):
    rng = np.random.default_rng(seed)
    layout = rng.random((heads, nb, nb)) < density
    layout[:, np.arange(nb), np.arange(nb)] = True
    layout[0, 1] = False  # one query block with no key at all
    return layout


CASES = [
    # (seq, block, head_dim, heads, kv_heads, mask, use_segments)
    (1024, 64, 64, 4, 2, "causal", True),
    (2048, 128, 128, 4, 4, "sliding", False),
    (1024, 128, 128, 4, 1, "layout", False),
    (2048, 64, 128, 2, 2, "strided", True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("backward", gcfg.BACKWARDS)
@pytest.mark.parametrize("seq,block,head_dim,heads,kv_heads,mask_kind,use_segments", CASES)
def test_compiled_gpu_kernel_matches_reference(seq, block, head_dim, heads, kv_heads, mask_kind,
                                               use_segments, backward):
    keys = jax.random.split(jax.random.PRNGKey(seq + block + head_dim), 4)
    q = jax.random.normal(keys[0], (1, seq, heads, head_dim), jnp.bfloat16)
    k = jax.random.normal(keys[1], (1, seq, kv_heads, head_dim), jnp.bfloat16)
    v = jax.random.normal(keys[2], (1, seq, kv_heads, head_dim), jnp.bfloat16)
    do = jax.random.normal(keys[3], (1, seq, heads, head_dim), jnp.bfloat16)
    mask = {
        "causal": masks_lib.CausalMask(),
        "sliding": masks_lib.SlidingWindowMask(window=300),
        "layout": masks_lib.BlockLayoutMask(_random_layout(heads, seq // block, 0.3, seq)),
        "strided": masks_lib.StridedMask(stride=97, local_window=100),
    }[mask_kind]
    seg = None
    if use_segments:
        seg = jnp.asarray((np.arange(seq) >= seq // 3).astype(np.int32)
                          + (np.arange(seq) >= seq // 2))[None]

    config = dataclasses.replace(gcfg.default_config(head_dim), backward=backward)

    def kernel(q, k, v):
        return ops.block_sparse_attention(q, k, v, mask, segment_ids=seg, block_q=block,
                                          block_k=block, backend="gpu", dense_fast_path=False,
                                          gpu_config=config)

    def ref(q, k, v):
        f32 = lambda x: x.astype(jnp.float32)
        return reference.reference_attention(f32(q), f32(k), f32(v), mask, block_q=block,
                                             block_k=block, segment_ids=seg)

    out, vjp = jax.vjp(jax.jit(kernel), q, k, v)
    ref_out, ref_vjp = jax.vjp(ref, q, k, v)
    assert out.dtype == jnp.bfloat16
    assert _rel_err(out, ref_out) < BF16_REL_TOL
    for name, g, rg in zip(("dq", "dk", "dv"), vjp(do), ref_vjp(do.astype(jnp.float32))):
        assert g.shape == rg.shape, name
        assert _rel_err(g, rg) < BF16_REL_TOL, name


@pytest.mark.gpu
@pytest.mark.parametrize("mask", [masks_lib.CausalMask(),
                                  masks_lib.BlockLayoutMask(np.ones((1, 8, 8), bool))],
                         ids=["causal", "dense_layout"])
def test_dense_fast_path_matches_kernel(mask):
    keys = jax.random.split(jax.random.PRNGKey(7), 3)
    q, k, v = (jax.random.normal(kk, (1, 1024, 4, 64), jnp.bfloat16) for kk in keys)

    def attn(q, k, v, fast):
        return ops.block_sparse_attention(q, k, v, mask, block_q=128, block_k=128, backend="gpu",
                                          dense_fast_path=fast)

    fast_text = jax.jit(lambda q, k, v: attn(q, k, v, True)).lower(q, k, v).as_text()
    assert "xla.gpu.triton" not in fast_text  # cuDNN ran, not the kernel
    assert _rel_err(attn(q, k, v, True), attn(q, k, v, False)) < BF16_REL_TOL
