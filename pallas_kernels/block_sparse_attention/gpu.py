"""Block-sparse flash attention for GPU (Pallas, Triton backend).

Each program owns one tile of rows: query rows for the forward and dq passes,
key rows for the dk/dv pass. It loops only over the blocks its mask block row
lists (kv blocks for forward/dq, query blocks for dk/dv), in steps of a
sub-tile. Program tiles and loop steps are tuned per pass and may be smaller
than the mask's blocks (see :mod:`gpu_config`); the mask decides what is
skipped, the tiles decide how the kept work is cut. Online softmax in the log2
domain with float32 accumulation; the log-sum-exp (base 2) is saved for the
backward.

The backward runs one of three ways (``GpuConfig.backward``; the tuner
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

Block lists arrive packed as ``[B', H', rows, W]`` int32: the count in column
0, the number of *full* blocks in column 1, then the block indices (``W`` a
power of two), so one small row block per program carries everything. Full
blocks (the token rule holds for every pair, see ``masks.full_first``) are
listed first and visited by a loop that skips the rule; the rest follow in a
second loop that applies it.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.block_sparse_attention.gpu_config import PassConfig, default_config

NEG = -1e30
BIG = 1e30
LOG2E = math.log2(math.e)
HEADER = 2  # packed list columns before the indices: count, full count
# keyword arguments every pass takes as jit-static
_STATIC = ("rule", "scale", "block_q", "block_k", "interpret", "config")


def pack_lists(idx: jax.Array, cnt: jax.Array, nfull: jax.Array | None = None,
               slots: jax.Array | None = None) -> jax.Array:
    """(indices ``[B', H', rows, n]``, counts and full counts ``[B', H', rows]``) -> packed
    ``[B', H', rows, W]``. Without ``nfull`` no block is taken as full. ``slots``
    (``[B', H', rows, n]``, see :func:`row_slots`) follow the indices."""
    n = idx.shape[-1]
    parts = [cnt[..., None], jnp.zeros_like(cnt)[..., None] if nfull is None else nfull[..., None],
             idx] + ([] if slots is None else [slots])
    packed = jnp.concatenate([x.astype(jnp.int32) for x in parts], axis=-1)
    width = int(pl.next_power_of_2(packed.shape[-1]))
    return jnp.pad(packed, [(0, 0)] * 3 + [(0, width - packed.shape[-1])])


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


def _list_spec(packed: jax.Array, tiles_per_block: int):
    """BlockSpec for the packed row of the mask block holding program ``r``'s tile;
    broadcasts over batch/heads where the list does."""
    nb, nh, _, width = packed.shape

    def index_map(r, b, h):
        return (b if nb > 1 else 0, h if nh > 1 else 0, r // tiles_per_block, 0)

    return pl.BlockSpec((None, None, None, width), index_map)


def _dot(a, b, *, trans_a=False, trans_b=False):
    """2-D matmul with optional transposes, float32 result."""
    prec = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)


def _visibility(rule, q_pos, k_pos, q_seg, k_seg):
    vis = None
    if rule is not None:
        vis = rule(q_pos[:, None], k_pos[None, :])
    if q_seg is not None:
        same = q_seg[:, None] == k_seg[None, :]
        vis = same if vis is None else vis & same
    return vis


def _step_start(list_ref, j, block: int, cols: int):
    """Row offset of loop step ``j``: sub-tile ``j % steps`` of listed block ``j // steps``."""
    steps = block // cols
    if steps == 1:
        return pl.multiple_of(list_ref[j + HEADER] * block, block)
    shift = steps.bit_length() - 1
    blk = list_ref[jax.lax.shift_right_logical(j, shift) + HEADER]
    return pl.multiple_of(blk * block + (j & (steps - 1)) * cols, cols)


def _list_loop(list_ref, block: int, cols: int, rule, body, init):
    """Run ``body(j, carry, rule)`` over every loop step of the listed blocks: the full
    blocks' steps with ``rule=None``, then the others' with the token rule."""
    steps = block // cols
    total = list_ref[0] * steps
    if rule is None:
        return jax.lax.fori_loop(0, total, functools.partial(body, rule=None), init)
    split = list_ref[1] * steps
    carry = jax.lax.fori_loop(0, split, functools.partial(body, rule=None), init)
    return jax.lax.fori_loop(split, total, functools.partial(body, rule=rule), carry)


def _fwd_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, list_ref, o_ref, lse_ref, *,
                rule, scale, rows, cols, block_k):
    q = q_ref[...]  # [rows, d]
    d = q.shape[-1]
    q_pos = pl.program_id(0) * rows + jnp.arange(rows)
    q_seg = None if qseg_ref is None else qseg_ref[...]

    def body(j, carry, rule):
        acc, m, l = carry
        start = _step_start(list_ref, j, block_k, cols)
        kblk = k_ref[pl.ds(start, cols), :]
        vblk = v_ref[pl.ds(start, cols), :]
        s = _dot(q, kblk, trans_b=True) * (scale * LOG2E)  # [rows, cols], log2 domain
        k_seg = None if kseg_ref is None else kseg_ref[pl.ds(start, cols)]
        vis = _visibility(rule, q_pos, start + jnp.arange(cols), q_seg, k_seg)
        if vis is not None:
            s = jnp.where(vis, s, NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        corr = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l = corr * l + jnp.sum(p, axis=-1)
        acc = corr[:, None] * acc + _dot(p.astype(vblk.dtype), vblk)
        return acc, m_new, l

    init = (jnp.zeros((rows, d), jnp.float32), jnp.full((rows,), NEG, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    acc, m, l = _list_loop(list_ref, block_k, cols, rule, body, init)
    # Rows whose max is still NEG saw no key: garbage from all-masked tiles is
    # wiped by the correction factor as soon as a real logit arrives.
    ok = m > 0.5 * NEG
    l_safe = jnp.where(ok, l, 1.0)
    o_ref[...] = jnp.where(ok[:, None], acc / l_safe[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(ok, m + jnp.log2(l_safe), BIG)


def _row_spec(rows, d, head_map):
    """``[rows, d]`` tile of a ``[b, seq, heads, d]`` array at program row ``r``."""
    return pl.BlockSpec((None, rows, None, d), lambda r, b, h: (b, r, head_map(h), 0))


def _full_spec(seq, d, head_map):
    """Whole sequence of one head of a ``[b, seq, heads, d]`` array."""
    return pl.BlockSpec((None, seq, None, d), lambda r, b, h: (b, 0, head_map(h), 0))


def _seg_specs(seg, rows, seq):
    if seg is None:
        return [None, None]
    return [pl.BlockSpec((None, rows), lambda r, b, h: (b, r)),
            pl.BlockSpec((None, seq), lambda r, b, h: (b, 0))]


def _vec_spec(rows):
    return pl.BlockSpec((None, None, rows), lambda r, b, h: (b, h, r))


def _params(pc: PassConfig):
    return plgpu.CompilerParams(num_warps=pc.num_warps, num_stages=pc.num_stages)


def _query_row_call(q, k, seg, kv_lists, pc: PassConfig, block_q: int):
    """Grid and leading in_specs of a pass whose programs own query rows (forward, dq):
    the q tile, the whole k and v of the head's kv group, segment ids, and the
    packed kv-block list of the tile's mask row. Returns (grid, in_specs, q_spec, packed)."""
    b, sq, h, d = q.shape
    sk, g = k.shape[1], h // k.shape[2]
    packed = pack_lists(*kv_lists)
    q_spec = _row_spec(pc.rows, d, lambda h: h)
    kv_spec = _full_spec(sk, d, lambda h: h // g)
    in_specs = [q_spec, kv_spec, kv_spec, *_seg_specs(seg, pc.rows, sk),
                _list_spec(packed, block_q // pc.rows)]
    return (sq // pc.rows, b, h), in_specs, q_spec, packed


def _or_default(config, q):
    """``config``, or the tuned default for q's head dim and sequence length."""
    return default_config(q.shape[-1], q.shape[1]) if config is None else config


def _resolve(config, q, block_rows, block_cols, name):
    return getattr(_or_default(config, q), name).fit(block_rows, block_cols)


@functools.partial(jax.jit, static_argnames=_STATIC)
def fwd(q, k, v, seg, kv_idx, kv_cnt, kv_nfull=None, *, rule, scale, block_q, block_k,
        interpret=False, config=None):
    """o ``[b, sq, h, d]`` and lse ``[b, h, sq]`` (float32, base-2 log-sum-exp).

    ``kv_nfull``: per list row, how many leading listed blocks are full (no rule
    needed); ``None`` applies the rule everywhere."""
    b, sq, h, _ = q.shape
    pc = _resolve(config, q, block_q, block_k, "fwd")
    grid, in_specs, q_spec, packed = _query_row_call(q, k, seg, (kv_idx, kv_cnt, kv_nfull), pc,
                                                     block_q)
    kernel = functools.partial(_fwd_kernel, rule=rule, scale=scale, rows=pc.rows, cols=pc.cols,
                               block_k=block_k)
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=[q_spec, _vec_spec(pc.rows)],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, sq), jnp.float32)],
        compiler_params=_params(pc),
        interpret=interpret,
        name="bsa_fwd",
    )(q, k, v, seg, seg, packed)


def _dq_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, list_ref, do_ref, lse_ref, delta_ref,
               dq_ref, *, rule, scale, rows, cols, block_k):
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]
    q_pos = pl.program_id(0) * rows + jnp.arange(rows)
    q_seg = None if qseg_ref is None else qseg_ref[...]

    def body(j, dq, rule):
        start = _step_start(list_ref, j, block_k, cols)
        kblk = k_ref[pl.ds(start, cols), :]
        vblk = v_ref[pl.ds(start, cols), :]
        s = _dot(q, kblk, trans_b=True) * (scale * LOG2E)
        k_seg = None if kseg_ref is None else kseg_ref[pl.ds(start, cols)]
        vis = _visibility(rule, q_pos, start + jnp.arange(cols), q_seg, k_seg)
        if vis is not None:
            s = jnp.where(vis, s, NEG)
        p = jnp.exp2(s - lse[:, None])
        dp = _dot(do, vblk, trans_b=True)
        ds = p * (dp - delta[:, None])
        return dq + _dot(ds.astype(kblk.dtype), kblk)

    dq = _list_loop(list_ref, block_k, cols, rule, body, jnp.zeros(q.shape, jnp.float32))
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
        start = _step_start(list_ref, j, block_q, cols)
        q = q_ref[pl.ds(start, cols), :]
        do = do_ref[pl.ds(start, cols), :]
        lse = lse_ref[pl.ds(start, cols)]
        delta = delta_ref[pl.ds(start, cols)]
        s = _dot(q, kblk, trans_b=True) * (scale * LOG2E)
        q_seg = None if qseg_ref is None else qseg_ref[pl.ds(start, cols)]
        vis = _visibility(rule, start + jnp.arange(cols), k_pos, q_seg, k_seg)
        if vis is not None:
            s = jnp.where(vis, s, NEG)
        p = jnp.exp2(s - lse[:, None])  # [cols, rows]
        dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
        dp = _dot(do, vblk, trans_b=True)
        ds = (p * (dp - delta[:, None])).astype(q.dtype)
        dk = dk + _dot(ds, q, trans_a=True)
        if mode == "fused":
            plgpu.atomic_add(dq_ref, (pl.ds(start, cols), slice(None)),
                             _dot(ds, kblk) * scale)
        elif mode == "cached":  # tile (query block i, slot) rows, this program's key columns
            entry = j // (block_q // cols)
            i = start // block_q
            slot = list_ref[slot_col + entry]
            row0 = (i * (row_width - 1) + slot) * block_q + start
            ds_ref[pl.ds(row0, cols), pl.ds(key_col, rows)] = ds
        return dk, dv

    zeros = jnp.zeros(kblk.shape, jnp.float32)
    dk, dv = _list_loop(list_ref, block_q, cols, rule, body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


@functools.partial(jax.jit, static_argnames=_STATIC)
def dq_pass(q, k, v, seg, do, lse, delta, kv_idx, kv_cnt, kv_nfull=None, *, rule, scale,
            block_q, block_k, interpret=False, config=None):
    """dq ``[b, sq, h, d]``; ``delta`` is ``sum(o * do, -1)`` as ``[b, h, sq]`` float32."""
    pc = _resolve(config, q, block_q, block_k, "dq")
    grid, in_specs, q_spec, packed = _query_row_call(q, k, seg, (kv_idx, kv_cnt, kv_nfull), pc,
                                                     block_q)
    kernel = functools.partial(_dq_kernel, rule=rule, scale=scale, rows=pc.rows, cols=pc.cols,
                               block_k=block_k)
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[*in_specs, q_spec, _vec_spec(pc.rows), _vec_spec(pc.rows)],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(pc),
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
    pc = _resolve(config, q, block_k, block_q, "bwd" if mode == "fused" else "dkv")
    q_idx, q_cnt, q_nfull = q_lists
    slots = None if mode != "cached" else row_slots(*row_lists, q_idx)
    packed = pack_lists(q_idx, q_cnt, q_nfull, slots)
    k_spec = _row_spec(pc.rows, d, lambda h: h // g)
    q_full = _full_spec(sq, d, lambda h: h)
    vec_full = pl.BlockSpec((None, None, sq), lambda r, b, h: (b, h, 0))
    out_dtype = jnp.float32 if g > 1 else k.dtype
    dkv_spec = _row_spec(pc.rows, d, lambda h: h)
    in_specs = [k_spec, k_spec, q_full, *_seg_specs(seg, pc.rows, sq),
                _list_spec(packed, block_k // pc.rows), q_full, vec_full, vec_full]
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
                               slot_col=HEADER + q_idx.shape[-1], row_width=row_width)
    dk, dv, *extra = pl.pallas_call(
        kernel,
        grid=(sk // pc.rows, b, h),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=_params(pc),
        interpret=interpret,
        name={"split": "bsa_dkv", "fused": "bsa_bwd", "cached": "bsa_dkv_store"}[mode],
    )(*args)
    if g > 1:
        dk = dk.reshape(b, sk, kvh, g, d).sum(3).astype(k.dtype)
        dv = dv.reshape(b, sk, kvh, g, d).sum(3).astype(v.dtype)
    if mode == "fused":
        return dk, dv, extra[0].astype(q.dtype)
    return (dk, dv, *extra)


@functools.partial(jax.jit, static_argnames=_STATIC)
def dkv_pass(q, k, v, seg, do, lse, delta, q_idx, q_cnt, q_nfull=None, *, rule, scale, block_q,
             block_k, interpret=False, config=None):
    """(dk, dv) ``[b, sk, kv_heads, d]``, summed over each GQA group."""
    return _key_row_call(q, k, v, seg, do, lse, delta, (q_idx, q_cnt, q_nfull), rule=rule,
                         scale=scale, block_q=block_q, block_k=block_k, interpret=interpret,
                         config=config, mode="split")


@functools.partial(jax.jit, static_argnames=_STATIC)
def fused_bwd_pass(q, k, v, seg, do, lse, delta, q_idx, q_cnt, q_nfull=None, *, rule, scale,
                   block_q, block_k, interpret=False, config=None):
    """(dq, dk, dv) from one key-row pass; dq is accumulated with float32 atomic adds."""
    dk, dv, dq = _key_row_call(q, k, v, seg, do, lse, delta, (q_idx, q_cnt, q_nfull), rule=rule,
                               scale=scale, block_q=block_q, block_k=block_k,
                               interpret=interpret, config=config, mode="fused")
    return dq, dk, dv


@functools.partial(jax.jit, static_argnames=_STATIC)
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
        start = _step_start(list_ref, j, block_k, cols)
        entry = j // (block_k // cols)
        ds = ds_ref[pl.ds(base + entry * block_q, rows), pl.ds(start % block_k, cols)]
        return dq + _dot(ds, k_ref[pl.ds(start, cols), :])

    dq = _list_loop(list_ref, block_k, cols, None, body,
                    jnp.zeros((rows, k_ref.shape[-1]), jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


@functools.partial(jax.jit, static_argnames=_STATIC)
def dq_cached_pass(q, k, ds_store, kv_idx, kv_cnt, kv_nfull=None, *, rule, scale, block_q,
                   block_k, interpret=False, config=None):
    """dq ``[b, sq, h, d]`` as the sum of ``dS @ k`` over the stored tiles."""
    del rule, kv_nfull  # the stored tiles are already masked
    b, sq, h, d = q.shape
    pc = _resolve(config, q, block_q, block_k, "dq_cached")
    grid, in_specs, q_spec, packed = _query_row_call(q, k, None, (kv_idx, kv_cnt, None), pc,
                                                     block_q)
    ds_spec = pl.BlockSpec((None, None) + ds_store.shape[2:], lambda r, b, h: (b, h, 0, 0))
    kernel = functools.partial(_dq_cached_kernel, scale=scale, rows=pc.rows, cols=pc.cols,
                               block_q=block_q, block_k=block_k, row_width=kv_idx.shape[-1])
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[in_specs[1], in_specs[-1], ds_spec],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(pc),
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


@functools.partial(jax.jit, static_argnames=_STATIC)
def bwd(q, k, v, seg, o, lse, do, kv_idx, kv_cnt, q_idx, q_cnt, kv_nfull=None, q_nfull=None, *,
        rule, scale, block_q, block_k, interpret=False, config=None):
    """(dq, dk, dv)."""
    kw = dict(rule=rule, scale=scale, block_q=block_q, block_k=block_k, interpret=interpret,
              config=config)
    delta = delta_of(o, do)
    cfg = _or_default(config, q)
    if cfg.backward == "fused":
        return fused_bwd_pass(q, k, v, seg, do, lse, delta, q_idx, q_cnt, q_nfull, **kw)
    if (cfg.backward == "cached"
            and ds_store_bytes(q, kv_idx, block_q, block_k) <= cfg.ds_cache_max_bytes):
        dk, dv, store = dkv_store_pass(q, k, v, seg, do, lse, delta, kv_idx, kv_cnt, q_idx,
                                       q_cnt, q_nfull, **kw)
        return dq_cached_pass(q, k, store, kv_idx, kv_cnt, **kw), dk, dv
    dq = dq_pass(q, k, v, seg, do, lse, delta, kv_idx, kv_cnt, kv_nfull, **kw)
    dk, dv = dkv_pass(q, k, v, seg, do, lse, delta, q_idx, q_cnt, q_nfull, **kw)
    return dq, dk, dv
