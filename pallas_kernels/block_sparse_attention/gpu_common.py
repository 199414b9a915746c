"""Pieces shared by the GPU block-sparse attention passes (Pallas, Triton backend).

Block lists arrive packed as ``[B', H', rows, W]`` int32: the count in column
0, the number of *full* blocks in column 1, then the block indices (``W`` a
power of two), so one small row block per program carries everything. Full
blocks (the token rule holds for every pair, see ``masks.full_first``) are
listed first and visited by a loop that skips the rule; the rest follow in a
second loop that applies it. Also here: the BlockSpecs of the row-owning
programs, the masked matmul helpers, and the lookup of each pass's tiles.
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
STATIC = ("rule", "scale", "block_q", "block_k", "interpret", "config")


def pack_lists(idx: jax.Array, cnt: jax.Array, nfull: jax.Array | None = None,
               slots: jax.Array | None = None) -> jax.Array:
    """(indices ``[B', H', rows, n]``, counts and full counts ``[B', H', rows]``) -> packed
    ``[B', H', rows, W]``. Without ``nfull`` no block is taken as full. ``slots``
    (``[B', H', rows, n]``, see :func:`gpu_backward.row_slots`) follow the indices."""
    parts = [cnt[..., None], jnp.zeros_like(cnt)[..., None] if nfull is None else nfull[..., None],
             idx] + ([] if slots is None else [slots])
    packed = jnp.concatenate([x.astype(jnp.int32) for x in parts], axis=-1)
    width = int(pl.next_power_of_2(packed.shape[-1]))
    return jnp.pad(packed, [(0, 0)] * 3 + [(0, width - packed.shape[-1])])


def list_spec(packed: jax.Array, tiles_per_block: int):
    """BlockSpec for the packed row of the mask block holding program ``r``'s tile;
    broadcasts over batch/heads where the list does."""
    nb, nh, _, width = packed.shape

    def index_map(r, b, h):
        return (b if nb > 1 else 0, h if nh > 1 else 0, r // tiles_per_block, 0)

    return pl.BlockSpec((None, None, None, width), index_map)


def dot(a, b, *, trans_a=False, trans_b=False):
    """2-D matmul with optional transposes, float32 result."""
    prec = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)


def visibility(rule, q_pos, k_pos, q_seg, k_seg):
    vis = None
    if rule is not None:
        vis = rule(q_pos[:, None], k_pos[None, :])
    if q_seg is not None:
        same = q_seg[:, None] == k_seg[None, :]
        vis = same if vis is None else vis & same
    return vis


def step_start(list_ref, j, block: int, cols: int):
    """Row offset of loop step ``j``: sub-tile ``j % steps`` of listed block ``j // steps``."""
    steps = block // cols
    if steps == 1:
        return pl.multiple_of(list_ref[j + HEADER] * block, block)
    shift = steps.bit_length() - 1
    blk = list_ref[jax.lax.shift_right_logical(j, shift) + HEADER]
    return pl.multiple_of(blk * block + (j & (steps - 1)) * cols, cols)


def list_loop(list_ref, block: int, cols: int, rule, body, init):
    """Run ``body(j, carry, rule)`` over every loop step of the listed blocks: the full
    blocks' steps with ``rule=None``, then the others' with the token rule."""
    steps = block // cols
    total = list_ref[0] * steps
    if rule is None:
        return jax.lax.fori_loop(0, total, functools.partial(body, rule=None), init)
    split = list_ref[1] * steps
    carry = jax.lax.fori_loop(0, split, functools.partial(body, rule=None), init)
    return jax.lax.fori_loop(split, total, functools.partial(body, rule=rule), carry)


def row_spec(rows, d, head_map):
    """``[rows, d]`` tile of a ``[b, seq, heads, d]`` array at program row ``r``."""
    return pl.BlockSpec((None, rows, None, d), lambda r, b, h: (b, r, head_map(h), 0))


def full_spec(seq, d, head_map):
    """Whole sequence of one head of a ``[b, seq, heads, d]`` array."""
    return pl.BlockSpec((None, seq, None, d), lambda r, b, h: (b, 0, head_map(h), 0))


def seg_specs(seg, rows, seq):
    if seg is None:
        return [None, None]
    return [pl.BlockSpec((None, rows), lambda r, b, h: (b, r)),
            pl.BlockSpec((None, seq), lambda r, b, h: (b, 0))]


def vec_spec(rows):
    return pl.BlockSpec((None, None, rows), lambda r, b, h: (b, h, r))


def params(pc: PassConfig):
    return plgpu.CompilerParams(num_warps=pc.num_warps, num_stages=pc.num_stages)


def query_row_call(q, k, seg, kv_lists, pc: PassConfig, block_q: int):
    """Grid and leading in_specs of a pass whose programs own query rows (forward, dq):
    the q tile, the whole k and v of the head's kv group, segment ids, and the
    packed kv-block list of the tile's mask row. Returns (grid, in_specs, q_spec, packed)."""
    b, sq, h, d = q.shape
    sk, g = k.shape[1], h // k.shape[2]
    packed = pack_lists(*kv_lists)
    q_spec = row_spec(pc.rows, d, lambda h: h)
    kv_spec = full_spec(sk, d, lambda h: h // g)
    in_specs = [q_spec, kv_spec, kv_spec, *seg_specs(seg, pc.rows, sk),
                list_spec(packed, block_q // pc.rows)]
    return (sq // pc.rows, b, h), in_specs, q_spec, packed


def or_default(config, q):
    """``config``, or the tuned default for q's head dim and sequence length."""
    return default_config(q.shape[-1], q.shape[1]) if config is None else config


def resolve(config, q, block_rows, block_cols, name):
    return getattr(or_default(config, q), name).fit(block_rows, block_cols)
