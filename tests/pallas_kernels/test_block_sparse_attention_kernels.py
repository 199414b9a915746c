"""Every backend (XLA path, GPU and TPU kernels in interpret mode) vs the dense reference.

Forward and dq/dk/dv over randomized shapes, block sizes, GQA ratios, dtypes,
masks (empty rows, fully dense, single block, top-k) and segment ids.
Tolerances: float32 max-abs error 2e-4 (inputs ~N(0, 1)); bfloat16 2e-2 of
the reference's largest magnitude (outputs) and 3e-2 (gradients).
"""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pallas_kernels.block_sparse_attention import gpu_config as gcfg
from pallas_kernels.block_sparse_attention import masks as masks_lib
from pallas_kernels.block_sparse_attention import ops, reference, topk

F32_TOL = 2e-4
BF16_OUT_TOL = 2e-2
BF16_GRAD_TOL = 3e-2
MASK_KINDS = ["causal", "sliding", "global_local", "strided", "chunked", "layout_random",
              "layout_dense", "layout_empty", "top_k"]


def _mask(kind, seq, bq, bk, heads, seed):
    rng = np.random.default_rng(seed)
    qb, kb = seq // bq, seq // bk
    if kind == "causal":
        return masks_lib.CausalMask()
    if kind == "sliding":
        return masks_lib.SlidingWindowMask(window=int(rng.integers(1, seq)))
    if kind == "global_local":
        return masks_lib.GlobalLocalMask(window=int(rng.integers(1, 20)),
                                         num_global=int(rng.integers(0, 5)),
                                         causal=bool(rng.integers(2)))
    if kind == "strided":
        return masks_lib.StridedMask(stride=int(rng.integers(2, 9)), local_window=int(rng.integers(1, 9)))
    if kind == "chunked":
        return masks_lib.ChunkedMask(chunk_size=int(rng.choice([8, 16, 24])), causal=bool(rng.integers(2)))
    if kind == "layout_random":
        layout = rng.random((int(rng.choice([1, heads])), qb, kb)) < 0.5
        layout[0, 0] = False  # guarantee an empty query block
        return masks_lib.BlockLayoutMask(layout)
    if kind == "layout_dense":
        return masks_lib.BlockLayoutMask(np.ones((1, qb, kb), bool))
    if kind == "layout_empty":  # a single listed block in the whole layout
        layout = np.zeros((1, qb, kb), bool)
        layout[0, qb - 1, 0] = True
        return masks_lib.BlockLayoutMask(layout)
    return topk.TopKBlockMask(top_k=int(rng.integers(1, 3)), causal=bool(rng.integers(2)))


def _check(backend, seed, batch, seq, bq, bk, head_dim, kv_heads, group, dtype, kind, use_seg,
           gpu_config=None):
    heads = kv_heads * group
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(keys[0], (batch, seq, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, seq, kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, seq, kv_heads, head_dim), dtype)
    do = jax.random.normal(keys[3], (batch, seq, heads, head_dim), dtype)
    mask = _mask(kind, seq, bq, bk, heads, seed)
    seg = None
    if use_seg:
        cuts = np.sort(np.random.default_rng(seed).integers(0, seq, size=(batch, 2)), axis=1)
        pos = np.arange(seq)
        seg = jnp.asarray((pos[None] >= cuts[:, :1]).astype(np.int32) + (pos[None] >= cuts[:, 1:]))

    def run(q, k, v):
        return ops.block_sparse_attention(q, k, v, mask, segment_ids=seg, block_q=bq, block_k=bk,
                                          backend=backend, interpret=True,
                                          gpu_config=gpu_config, dense_fast_path=False)

    def ref(q, k, v):
        f32 = lambda x: x.astype(jnp.float32)
        return reference.reference_attention(f32(q), f32(k), f32(v), mask, block_q=bq,
                                             block_k=bk, segment_ids=seg)

    def fwd_bwd(fn, do):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(do)

    out, grads = jax.jit(fwd_bwd, static_argnums=0)(run, do)
    ref_out, ref_grads = jax.jit(fwd_bwd, static_argnums=0)(ref, do.astype(jnp.float32))
    assert out.dtype == dtype and out.shape == q.shape
    for name, x, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
        x, r = np.asarray(x, np.float32), np.asarray(r, np.float32)
        assert x.shape == r.shape, name
        assert np.all(np.isfinite(x)), f"{name} has non-finite values"
        err = np.max(np.abs(x - r))
        if dtype == jnp.float32:
            assert err <= F32_TOL * max(1.0, np.max(np.abs(r))), (name, err)
        else:
            tol = BF16_OUT_TOL if name == "out" else BF16_GRAD_TOL
            assert err <= tol * max(1e-3, np.max(np.abs(r))), (name, err)


def _cases(seqs, blocks, max_batch, max_kv_heads, kinds=MASK_KINDS):
    @st.composite
    def case(draw):
        seq = draw(st.sampled_from(seqs))
        bq = draw(st.sampled_from([b for b in blocks if seq % b == 0]))
        bk = draw(st.sampled_from([b for b in blocks if seq % b == 0]))
        return dict(
            seed=draw(st.integers(0, 2**16)), batch=draw(st.integers(1, max_batch)), seq=seq,
            bq=bq, bk=bk, head_dim=draw(st.sampled_from([16, 32])),
            kv_heads=draw(st.integers(1, max_kv_heads)), group=draw(st.sampled_from([1, 2])),
            dtype=draw(st.sampled_from([jnp.float32, jnp.bfloat16])),
            kind=draw(st.sampled_from(kinds)), use_seg=draw(st.booleans()))
    return case()


_SETTINGS = dict(deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(max_examples=25, **_SETTINGS)
@given(_cases([16, 32, 48, 64], [8, 16, 32], max_batch=2, max_kv_heads=2))
def test_xla_path_matches_reference(case):
    _check("xla", **case)


def test_xla_path_buckets_causal_rows():
    """Causal rows of 1..8 blocks run in several buckets (each padded to its own longest
    list), and still match the reference with GQA, packed segments and a batch of 2."""
    from pallas_kernels.block_sparse_attention import xla
    plan = xla.plan_rows(masks_lib.CausalMask().block_layout(64, 64, 8, 8).sum(-1))
    assert 1 < len(plan) <= xla.MAX_BUCKETS
    _check("xla", seed=5, batch=2, seq=64, bq=8, bk=8, head_dim=16, kv_heads=1, group=2,
           dtype=jnp.float32, kind="causal", use_seg=True)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 40), st.integers(0, 2**16), st.booleans())
def test_plan_rows_covers_every_row_once_and_bounds_padding(heads, q_blocks, seed, uniform):
    from pallas_kernels.block_sparse_attention import xla
    rng = np.random.default_rng(seed)
    counts = (np.full((1, heads, q_blocks), rng.integers(0, 9)) if uniform
              else rng.integers(0, 9, size=(1, heads, q_blocks)))
    plan = xla.plan_rows(counts)
    rows = np.concatenate([r for r, _, _ in plan])
    assert sorted(rows.tolist()) == list(range(q_blocks))
    assert 1 <= len(plan) <= xla.MAX_BUCKETS
    longest = counts.max(axis=(0, 1))
    for r, n, full in plan:
        assert n >= max(1, longest[list(r)].max())
        assert full == bool(np.all(counts[..., list(r)] == n))
    padded = sum(len(r) * n for r, n, _ in plan)
    if uniform:
        assert len(plan) == 1 and plan[0][2] == (counts.max() > 0)
    elif len(plan) < xla.MAX_BUCKETS:  # fewer buckets only once the padding is small
        assert padded <= xla.SLACK * max(1, longest.sum())


@pytest.mark.parametrize("backend", ["xla", "gpu", "tpu"], ids=["xla", "triton", "mosaic"])
def test_topk_lists_hold_picks_and_every_diagonal_tile(backend):
    """block_k < block_q: the diagonal spans two kv tiles, so a row lists top_k + 2 blocks."""
    _check(backend, seed=2, batch=1, seq=64, bq=32, bk=16, head_dim=16, kv_heads=2, group=1,
           dtype=jnp.float32, kind="top_k", use_seg=False)


@settings(max_examples=8, **_SETTINGS)
@given(_cases([32, 64], [16, 32], max_batch=2, max_kv_heads=2), st.sampled_from(gcfg.BACKWARDS))
def test_gpu_kernel_interpret_matches_reference(case, backward):
    """The tuned default tiles (clipped to the blocks), each backward."""
    config = dataclasses.replace(gcfg.default_config(case["head_dim"]), backward=backward)
    _check("gpu", **case, gpu_config=config)


SUBTILE_CASES = [
    # (bq, bk, fwd, dq, dkv/bwd tiles as (rows, cols), dtype, mask kind, segments)
    (64, 32, (32, 16), (16, 32), (16, 32), jnp.bfloat16, "causal", True),
    (32, 64, (16, 32), (32, 16), (32, 16), jnp.float32, "layout_random", False),
]


@pytest.mark.parametrize("backward", gcfg.BACKWARDS)
@pytest.mark.parametrize("bq,bk,fwd,dq,dkv,dtype,kind,use_seg", SUBTILE_CASES)
def test_gpu_kernel_interpret_subtiles_match_reference(bq, bk, fwd, dq, dkv, dtype, kind,
                                                       use_seg, backward):
    """Program tiles and loop steps smaller than the mask blocks, in every pass; the
    backward split (dq pass + dk/dv pass), fused (dq added atomically) or cached
    (dq from the dS tiles the dk/dv pass stored, whose tiles differ from dq's)."""
    tiles = {"fwd": fwd, "dq": dq, "dkv": dkv, "bwd": dkv, "dq_cached": dq}
    config = gcfg.GpuConfig(**{name: gcfg.PassConfig(rows=r, cols=c, num_warps=4, num_stages=2)
                              for name, (r, c) in tiles.items()}, backward=backward)
    _check("gpu", seed=bq + bk, batch=1, seq=128, bq=bq, bk=bk, head_dim=16, kv_heads=1,
           group=2, dtype=dtype, kind=kind, use_seg=use_seg, gpu_config=config)


@pytest.mark.parametrize("backward", gcfg.BACKWARDS)
def test_gpu_backward_batch_gqa_default_tiles(backward):
    """Every backward gives the reference's gradients through the tuned default's
    tiles (clipped to 16-blocks), batch 2 and GQA 2:1."""
    config = dataclasses.replace(gcfg.default_config(16), backward=backward)
    _check("gpu", seed=11, batch=2, seq=64, bq=16, bk=16, head_dim=16, kv_heads=2, group=2,
           dtype=jnp.float32, kind="global_local", use_seg=True, gpu_config=config)


def test_gpu_config_bad_input():
    q = jnp.zeros((1, 32, 2, 16))
    mask = masks_lib.CausalMask()
    bad = gcfg.GpuConfig(dq=gcfg.PassConfig(rows=24))
    with pytest.raises(ValueError, match="gpu_config.dq.rows: 24"):
        ops.block_sparse_attention(q, q, q, mask, backend="gpu", interpret=True, gpu_config=bad)
    with pytest.raises(ValueError, match="gpu_config"):
        ops.block_sparse_attention(q, q, q, mask, backend="gpu", interpret=True,
                                   gpu_config={"fwd": 1})
    with pytest.raises(ValueError, match="gpu_config.backward: 'atomic'"):
        ops.block_sparse_attention(q, q, q, mask, backend="gpu", interpret=True,
                                   gpu_config=gcfg.GpuConfig(backward="atomic"))
    with pytest.raises(ValueError, match="gpu_config.ds_cache_max_bytes: -1"):
        ops.block_sparse_attention(q, q, q, mask, backend="gpu", interpret=True,
                                   gpu_config=gcfg.GpuConfig(ds_cache_max_bytes=-1))


def test_gpu_tuning_file_covers_every_head_dim():
    for d in (16, 64, 100, 128, 256):
        cfg = gcfg.default_config(d)
        assert all(isinstance(getattr(cfg, p), gcfg.PassConfig) for p in gcfg.PASSES)
    entries = json.loads(gcfg.TUNING_FILE.read_text())["entries"]
    entry = next(e for e in entries if e["max_head_dim"] >= 128)
    assert gcfg.default_config(128) == gcfg.GpuConfig(
        **{p: gcfg.PassConfig(**entry[p]) for p in gcfg.PASSES},
        backward=entry["backward"])


@settings(max_examples=3, **_SETTINGS)
@given(_cases([32], [16], max_batch=1, max_kv_heads=1))
def test_tpu_kernel_interpret_matches_reference(case):
    _check("tpu", **case)


@pytest.mark.parametrize("backward", gcfg.BACKWARDS)
def test_gpu_kernel_traced_topk_lists(backward):
    """Causal top-k: traced block lists, reordered full tiles first inside the trace."""
    config = dataclasses.replace(gcfg.default_config(16), backward=backward)
    for seed in (0, 2):  # _mask draws causal from the seed: 0 causal, 2 not
        _check("gpu", seed=seed, batch=2, seq=64, bq=16, bk=16, head_dim=16, kv_heads=1,
               group=2, dtype=jnp.float32, kind="top_k", use_seg=False, gpu_config=config)


@pytest.mark.parametrize("backend", ["gpu", "tpu"], ids=["triton", "mosaic"])
def test_kernels_gqa_segments_empty_rows(backend):
    """Fixed hard case per kernel: GQA 2:1, packed segments, an empty query block, bf16."""
    _check(backend, seed=3, batch=1, seq=32, bq=16, bk=16, head_dim=16, kv_heads=1, group=2,
           dtype=jnp.bfloat16, kind="layout_random", use_seg=True)


def test_gpu_pads_odd_head_dim():
    """head_dim 24 is padded to 32 for Triton inside the op; results still match."""
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(kk, (1, 32, 2, 24)) for kk in keys)
    mask = masks_lib.CausalMask()
    f = lambda q, k, v: ops.block_sparse_attention(q, k, v, mask, block_q=16, block_k=16,
                                                   backend="gpu", interpret=True).sum()
    r = lambda q, k, v: reference.reference_attention(q, k, v, mask, block_q=16, block_k=16).sum()
    np.testing.assert_allclose(f(q, k, v), r(q, k, v), rtol=1e-4, atol=F32_TOL)
    for g, rg in zip(jax.grad(f, (0, 1, 2))(q, k, v), jax.grad(r, (0, 1, 2))(q, k, v)):
        assert g.shape == rg.shape == (1, 32, 2, 24)
        np.testing.assert_allclose(g, rg, atol=F32_TOL)


@pytest.mark.parametrize("backend,backward", [("gpu", "split"), ("gpu", "fused"),
                                              ("gpu", "cached"), ("tpu", "split")],
                         ids=["triton_split_bwd", "triton_fused_bwd", "triton_cached_bwd",
                              "mosaic"])
def test_kernels_lower_for_their_platform(kernel_calls, backend, backward):
    """Forward and backward kernels pass the real Triton / Mosaic lowering (see conftest)."""
    q = jnp.zeros((1, 256, 4, 128), jnp.bfloat16)
    kv = jnp.zeros((1, 256, 2, 128), jnp.bfloat16)
    seg = jnp.zeros((1, 256), jnp.int32)
    config = dataclasses.replace(gcfg.default_config(128), backward=backward)

    def loss(q, k, v):
        out = ops.block_sparse_attention(q, k, v, masks_lib.CausalMask(), segment_ids=seg,
                                         backend=backend, gpu_config=config)
        return out.astype(jnp.float32).sum()

    platform = "cuda" if backend == "gpu" else "tpu"
    # forward + (dq, dk/dv), forward + fused backward, or forward + (dk/dv store, cached dq)
    assert kernel_calls(platform, jax.value_and_grad(loss, (0, 1, 2)), q, kv, kv) == (
        2 if backward == "fused" else 3)


@pytest.mark.parametrize("kind", ["causal", "sliding", "global_local"])
def test_tpu_kernel_full_tiles_skip_the_rule(kind):
    """Rule masks over several blocks: full tiles (listed first, no rule) and partial
    tiles (rule applied) in one list, with packed segments on top."""
    _check("tpu", seed=5, batch=1, seq=64, bq=16, bk=16, head_dim=16, kv_heads=1, group=1,
           dtype=jnp.float32, kind=kind, use_seg=True)


def test_gpu_cached_backward_falls_back_to_split_past_its_memory_cap():
    """The dS store costs one tile per listed pair; past ``ds_cache_max_bytes`` the
    split passes run instead (read off the kernels in the CUDA lowering)."""
    from pallas_kernels.block_sparse_attention import gpu_backward
    q = jnp.zeros((2, 256, 2, 64), jnp.bfloat16)
    mask = masks_lib.CausalMask()
    kv_idx = ops._lists(mask, masks_lib.layout_for(mask, q, q, 64, 64), 256, 256, 64, 64)[0]
    store = gpu_backward.ds_store_bytes(q, kv_idx, 64, 64)
    assert store == 2 * 2 * 4 * 4 * 64 * 64 * 2  # batch, heads, q blocks, row width, tile, bf16

    def kernels(cap):
        cfg = dataclasses.replace(gcfg.default_config(64), backward="cached",
                                  ds_cache_max_bytes=cap)
        loss = lambda q: ops.block_sparse_attention(
            q, q, q, mask, block_q=64, block_k=64, backend="gpu", dense_fast_path=False,
            gpu_config=cfg).astype(jnp.float32).sum()
        text = jax.jit(jax.grad(loss)).trace(q).lower(lowering_platforms=("cuda",)).as_text()
        return {n for n in ("bsa_dkv_store", "bsa_dq_cached") if n in text}

    assert kernels(store) == {"bsa_dkv_store", "bsa_dq_cached"}
    assert kernels(store - 1) == set()


def test_dense_equivalent_only_for_plain_dense_or_causal():
    """The dense fast path's test: dense without a rule, or the causal rule with every
    block it touches listed; block-level causal layouts and other rules are not."""
    seq, blk = 256, 64
    layout = lambda m: masks_lib.layout_for(m, jnp.zeros((1, seq, 1, 16)),
                                            jnp.zeros((1, seq, 1, 16)), blk, blk)
    eq = lambda m, s=seq: ops.dense_equivalent(m, layout(m), s, s, blk, blk)
    tril = np.tril(np.ones((4, 4), bool))
    assert eq(masks_lib.CausalMask())
    assert eq(masks_lib.BlockLayoutMask(np.ones((1, 4, 4), bool)))
    assert not eq(masks_lib.BlockLayoutMask(tril))  # block-causal: the diagonal tiles are full
    assert not eq(masks_lib.SlidingWindowMask(window=64))
    assert not eq(masks_lib.ChunkedMask(chunk_size=64, causal=True))
    random = np.random.default_rng(0).random((1, 4, 4)) < 0.5
    assert not eq(masks_lib.BlockLayoutMask(random))
    top_k = topk.TopKBlockMask(top_k=2, causal=True)
    assert not ops.dense_equivalent(top_k, jnp.ones((1, 4, 4), bool), seq, seq, blk, blk)
    assert not ops.dense_equivalent(masks_lib.CausalMask(), tril[None], seq, 2 * seq, blk, blk)


def test_xla_dense_fast_path_runs_dense_layouts_as_dense_attention(monkeypatch):
    """On the XLA path a fully listed layout without a rule runs as jax.nn's dense
    attention (same result); causal stays block-sparse, which is faster there."""
    calls = []
    real = jax.nn.dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("implementation"))
        return real(*args, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    q, k, v = (jax.random.normal(kk, (2, 64, 2, 16)) for kk in jax.random.split(
        jax.random.PRNGKey(0), 3))
    dense = masks_lib.BlockLayoutMask(np.ones((1, 4, 4), bool))
    for mask, fast in ((dense, True), (masks_lib.CausalMask(), False)):
        calls.clear()
        out = ops.block_sparse_attention(q, k, v, mask, block_q=16, block_k=16, backend="xla")
        ref = reference.reference_attention(q, k, v, mask, block_q=16, block_k=16)
        np.testing.assert_allclose(out, ref, atol=F32_TOL)
        assert calls == (["xla"] if fast else [])
    seg = jnp.zeros((2, 64), jnp.int32)
    calls.clear()
    ops.block_sparse_attention(q, k, v, dense, segment_ids=seg, block_q=16, block_k=16,
                               backend="xla")
    assert calls == []  # segment ids: block-sparse path


def test_dense_fast_path_falls_back_to_the_kernel_when_cudnn_refuses(kernel_calls, monkeypatch):
    """A causal mask goes to cuDNN; if cuDNN refuses the shape at trace time (or is
    missing), the Triton kernels run instead of the call failing."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(kwargs.get("implementation"))
        raise NotImplementedError("head dim not supported")

    monkeypatch.setattr(ops.jax.nn, "dot_product_attention", refuse)
    q = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
    loss = lambda q: ops.block_sparse_attention(q, q, q, masks_lib.CausalMask(),
                                                backend="gpu").astype(jnp.float32).sum()
    assert kernel_calls("cuda", jax.value_and_grad(loss), q) == 3  # forward, dq, dk/dv
    assert calls and set(calls) == {"cudnn"}
