"""Backward passes of the GPU block-sparse attention (Pallas, Triton backend).

Three ways to get (dq, dk, dv), picked by ``GpuConfig.backward`` (the tuner
measures them):

- split: a dq pass over query rows plus a dk/dv pass over key rows, each
  recomputing the probabilities (9 block matmuls per kept block pair, forward
  included);
- fused: the dk/dv pass also adds each step's dq contribution into a float32
  dq with atomic adds (7 matmuls, at the price of atomics);
- cached: the dk/dv pass stores each kept pair's dS tile (bf16 for bf16
  inputs: the very values the dq matmul takes), then a dq pass sums
  ``dS @ k`` over them (7 matmuls, one tile of memory per kept pair; over
  ``ds_cache_max_bytes`` it runs split).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.block_sparse_attention import gpu_common as common


def row_slots(kv_idx, kv_cnt, q_idx):
    """For each column-list entry (key block ``c`` listing query block ``i``) the
    position of ``c`` in ``i``'s row list: where the cached backward keeps that
    pair's dS tile. ``[B', H', key blocks, n]`` int32; padding entries get junk."""
    width = kv_idx.shape[-1]
    pos = jnp.arange(width, dtype=jnp.int32)
    slot = jnp.where(pos < kv_cnt[..., None], pos, width)  # padding repeats a listed block
    lead = kv_idx.shape[:2]
    b, h, r = jnp.meshgrid(*(jnp.arange(x) for x in kv_idx.shape[:3]), indexing="ij")
    table = jnp.full((*lead, kv_idx.shape[2], q_idx.shape[2]), width, jnp.int32)
    table = table.at[b[..., None], h[..., None], r[..., None], kv_idx].min(slot)  # [.., i, c]
    return jnp.take_along_axis(jnp.swapaxes(table, -1, -2), q_idx, axis=-1)


def _dq_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, list_ref, do_ref, lse_ref, delta_ref,
               dq_ref, *, rule, scale, rows, cols, block_k):
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]
    q_pos = pl.program_id(0) * rows + jnp.arange(rows)
    q_seg = None if qseg_ref is None else qseg_ref[...]

    def body(j, dq, rule):
        start = common.step_start(list_ref, j, block_k, cols)
        kblk = k_ref[pl.ds(start, cols), :]
        vblk = v_ref[pl.ds(start, cols), :]
        s = common.dot(q, kblk, trans_b=True) * (scale * common.LOG2E)
        k_seg = None if kseg_ref is None else kseg_ref[pl.ds(start, cols)]
        vis = common.visibility(rule, q_pos, start + jnp.arange(cols), q_seg, k_seg)
        if vis is not None:
            s = jnp.where(vis, s, common.NEG)
        p = jnp.exp2(s - lse[:, None])
        dp = common.dot(do, vblk, trans_b=True)
        ds = p * (dp - delta[:, None])
        return dq + common.dot(ds.astype(kblk.dtype), kblk)

    dq = common.list_loop(list_ref, block_k, cols, rule, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(k_ref, v_ref, q_ref, kseg_ref, qseg_ref, list_ref, do_ref, lse_ref, delta_ref,
                *refs, rule, scale, rows, cols, block_q, block_k, mode, slot_col, row_width):
    """dk, dv of one key tile. ``mode`` "fused" also adds each step's dq rows
    (scaled) into the float32 dq ref, which arrives zeroed and aliased; "cached"
    stores each step's dS tile where the pair's row-list slot (list column
    ``slot_col + entry``) says, for row lists ``row_width`` blocks wide."""
    if mode == "fused":
        _, dk_ref, dv_ref, dq_ref = refs
    elif mode == "cached":
        dk_ref, dv_ref, ds_ref = refs
    else:
        dk_ref, dv_ref = refs
    kblk = k_ref[...]
    vblk = v_ref[...]
    k_pos = pl.program_id(0) * rows + jnp.arange(rows)
    key_col = pl.program_id(0) * rows % block_k  # this tile's columns in its mask block
    k_seg = None if kseg_ref is None else kseg_ref[...]

    def body(j, carry, rule):
        dk, dv = carry
        start = common.step_start(list_ref, j, block_q, cols)
        q = q_ref[pl.ds(start, cols), :]
        do = do_ref[pl.ds(start, cols), :]
        lse = lse_ref[pl.ds(start, cols)]
        delta = delta_ref[pl.ds(start, cols)]
        s = common.dot(q, kblk, trans_b=True) * (scale * common.LOG2E)
        q_seg = None if qseg_ref is None else qseg_ref[pl.ds(start, cols)]
        vis = common.visibility(rule, start + jnp.arange(cols), k_pos, q_seg, k_seg)
        if vis is not None:
            s = jnp.where(vis, s, common.NEG)
        p = jnp.exp2(s - lse[:, None])  # [cols, rows]
        dv = dv + common.dot(p.astype(do.dtype), do, trans_a=True)
        dp = common.dot(do, vblk, trans_b=True)
        ds = (p * (dp - delta[:, None])).astype(q.dtype)
        dk = dk + common.dot(ds, q, trans_a=True)
        if mode == "fused":
            plgpu.atomic_add(dq_ref, (pl.ds(start, cols), slice(None)),
                             common.dot(ds, kblk) * scale)
        elif mode == "cached":  # tile (query block i, slot) rows, this program's key columns
            entry = j // (block_q // cols)
            i = start // block_q
            slot = list_ref[slot_col + entry]
            row0 = (i * (row_width - 1) + slot) * block_q + start
            ds_ref[pl.ds(row0, cols), pl.ds(key_col, rows)] = ds
        return dk, dv

    zeros = jnp.zeros(kblk.shape, jnp.float32)
    dk, dv = common.list_loop(list_ref, block_q, cols, rule, body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


@functools.partial(jax.jit, static_argnames=common.STATIC)
def dq_pass(q, k, v, seg, do, lse, delta, kv_idx, kv_cnt, kv_nfull=None, *, rule, scale,
            block_q, block_k, interpret=False, config=None):
    """dq ``[b, sq, h, d]``; ``delta`` is ``sum(o * do, -1)`` as ``[b, h, sq]`` float32."""
    pc = common.resolve(config, q, block_q, block_k, "dq")
    grid, in_specs, q_spec, packed = common.query_row_call(q, k, seg, (kv_idx, kv_cnt, kv_nfull),
                                                           pc, block_q)
    kernel = functools.partial(_dq_kernel, rule=rule, scale=scale, rows=pc.rows, cols=pc.cols,
                               block_k=block_k)
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[*in_specs, q_spec, common.vec_spec(pc.rows), common.vec_spec(pc.rows)],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=common.params(pc),
        interpret=interpret,
        name="bsa_dq",
    )(q, k, v, seg, seg, packed, do, lse, delta)


def _key_row_call(q, k, v, seg, do, lse, delta, q_lists, *, rule, scale, block_q, block_k,
                  interpret, config, mode, row_lists=None):
    """The dk/dv pass (programs own key rows). ``mode``: "split" returns (dk, dv);
    "fused" also returns the atomically summed dq; "cached" also returns the dS
    store (tiles addressed by the ``row_lists`` (kv_idx, kv_cnt) slots) for
    :func:`dq_cached_pass`. dk/dv are summed over each GQA group."""
    b, sq, h, d = q.shape
    sk, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    pc = common.resolve(config, q, block_k, block_q, "bwd" if mode == "fused" else "dkv")
    q_idx, q_cnt, q_nfull = q_lists
    slots = None if mode != "cached" else row_slots(*row_lists, q_idx)
    packed = common.pack_lists(q_idx, q_cnt, q_nfull, slots)
    k_spec = common.row_spec(pc.rows, d, lambda h: h // g)
    q_full = common.full_spec(sq, d, lambda h: h)
    vec_full = pl.BlockSpec((None, None, sq), lambda r, b, h: (b, h, 0))
    out_dtype = jnp.float32 if g > 1 else k.dtype
    dkv_spec = common.row_spec(pc.rows, d, lambda h: h)
    in_specs = [k_spec, k_spec, q_full, *common.seg_specs(seg, pc.rows, sq),
                common.list_spec(packed, block_k // pc.rows), q_full, vec_full, vec_full]
    args = [k, v, q, seg, seg, packed, do, lse, delta]
    out_specs = [dkv_spec, dkv_spec]
    out_shape = [jax.ShapeDtypeStruct((b, sk, h, d), out_dtype)] * 2
    aliases = {}
    if mode == "fused":  # dq starts as zeros that the output aliases, then takes atomic adds
        aliases = {sum(a is not None for a in args): 2}  # None segment ids take no slot
        in_specs.append(q_full)
        args.append(jnp.zeros(q.shape, jnp.float32))
        out_specs.append(q_full)
        out_shape.append(jax.ShapeDtypeStruct(q.shape, jnp.float32))
    row_width = 0
    if mode == "cached":
        row_width = row_lists[0].shape[-1]
        ds_rows = (sq // block_q) * row_width * block_q
        out_specs.append(pl.BlockSpec((None, None, ds_rows, block_k), lambda r, b, h: (b, h, 0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((b, h, ds_rows, block_k), q.dtype))
    kernel = functools.partial(_dkv_kernel, rule=rule, scale=scale, rows=pc.rows, cols=pc.cols,
                               block_q=block_q, block_k=block_k, mode=mode,
                               slot_col=common.HEADER + q_idx.shape[-1], row_width=row_width)
    dk, dv, *extra = pl.pallas_call(
        kernel,
        grid=(sk // pc.rows, b, h),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=common.params(pc),
        interpret=interpret,
        name={"split": "bsa_dkv", "fused": "bsa_bwd", "cached": "bsa_dkv_store"}[mode],
    )(*args)
    if g > 1:
        dk = dk.reshape(b, sk, kvh, g, d).sum(3).astype(k.dtype)
        dv = dv.reshape(b, sk, kvh, g, d).sum(3).astype(v.dtype)
    if mode == "fused":
        return dk, dv, extra[0].astype(q.dtype)
    return (dk, dv, *extra)


@functools.partial(jax.jit, static_argnames=common.STATIC)
def dkv_pass(q, k, v, seg, do, lse, delta, q_idx, q_cnt, q_nfull=None, *, rule, scale, block_q,
             block_k, interpret=False, config=None):
    """(dk, dv) ``[b, sk, kv_heads, d]``, summed over each GQA group."""
    return _key_row_call(q, k, v, seg, do, lse, delta, (q_idx, q_cnt, q_nfull), rule=rule,
                         scale=scale, block_q=block_q, block_k=block_k, interpret=interpret,
                         config=config, mode="split")


@functools.partial(jax.jit, static_argnames=common.STATIC)
def fused_bwd_pass(q, k, v, seg, do, lse, delta, q_idx, q_cnt, q_nfull=None, *, rule, scale,
                   block_q, block_k, interpret=False, config=None):
    """(dq, dk, dv) from one key-row pass; dq is accumulated with float32 atomic adds."""
    dk, dv, dq = _key_row_call(q, k, v, seg, do, lse, delta, (q_idx, q_cnt, q_nfull), rule=rule,
                               scale=scale, block_q=block_q, block_k=block_k,
                               interpret=interpret, config=config, mode="fused")
    return dq, dk, dv


@functools.partial(jax.jit, static_argnames=common.STATIC)
def dkv_store_pass(q, k, v, seg, do, lse, delta, kv_idx, kv_cnt, q_idx, q_cnt, q_nfull=None, *,
                   rule, scale, block_q, block_k, interpret=False, config=None):
    """(dk, dv, dS store ``[b, h, q_blocks * width * block_q, block_k]``): the dk/dv
    pass that also keeps every kept pair's dS tile for :func:`dq_cached_pass`."""
    return _key_row_call(q, k, v, seg, do, lse, delta, (q_idx, q_cnt, q_nfull), rule=rule,
                         scale=scale, block_q=block_q, block_k=block_k, interpret=interpret,
                         config=config, mode="cached", row_lists=(kv_idx, kv_cnt))


def _dq_cached_kernel(k_ref, list_ref, ds_ref, dq_ref, *, scale, rows, cols, block_q, block_k,
                      row_width):
    r0 = pl.program_id(0) * rows
    i = r0 // block_q
    base = i * (row_width - 1) * block_q + r0  # store row of (block i, slot 0, this tile)

    def body(j, dq, rule):
        del rule
        start = common.step_start(list_ref, j, block_k, cols)
        entry = j // (block_k // cols)
        ds = ds_ref[pl.ds(base + entry * block_q, rows), pl.ds(start % block_k, cols)]
        return dq + common.dot(ds, k_ref[pl.ds(start, cols), :])

    dq = common.list_loop(list_ref, block_k, cols, None, body,
                    jnp.zeros((rows, k_ref.shape[-1]), jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


@functools.partial(jax.jit, static_argnames=common.STATIC)
def dq_cached_pass(q, k, ds_store, kv_idx, kv_cnt, kv_nfull=None, *, rule, scale, block_q,
                   block_k, interpret=False, config=None):
    """dq ``[b, sq, h, d]`` as the sum of ``dS @ k`` over the stored tiles."""
    del rule, kv_nfull  # the stored tiles are already masked
    b, sq, h, d = q.shape
    pc = common.resolve(config, q, block_q, block_k, "dq_cached")
    grid, in_specs, q_spec, packed = common.query_row_call(q, k, None, (kv_idx, kv_cnt, None),
                                                           pc, block_q)
    ds_spec = pl.BlockSpec((None, None) + ds_store.shape[2:], lambda r, b, h: (b, h, 0, 0))
    kernel = functools.partial(_dq_cached_kernel, scale=scale, rows=pc.rows, cols=pc.cols,
                               block_q=block_q, block_k=block_k, row_width=kv_idx.shape[-1])
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[in_specs[1], in_specs[-1], ds_spec],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=common.params(pc),
        interpret=interpret,
        name="bsa_dq_cached",
    )(k, packed, ds_store)


def ds_store_bytes(q, kv_idx, block_q: int, block_k: int) -> int:
    """Bytes of the cached backward's dS store for ``q`` and row lists ``kv_idx``."""
    b, sq, h, _ = q.shape
    return b * h * (sq // block_q) * kv_idx.shape[-1] * block_q * block_k * q.dtype.itemsize


def delta_of(o, do):
    """``sum(o * do, -1)`` as ``[b, h, sq]`` float32: the softmax-backward row term."""
    prod = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [b, sq, h]
    return jnp.swapaxes(prod, 1, 2)
