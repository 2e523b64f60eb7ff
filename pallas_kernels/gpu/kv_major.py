"""KV-block-major block-sparse attention for long prefill chunks (the MSA paper's schedule), Triton Pallas.

Same math as attention.sparse_attention. The query-outer kernel reads each chosen page once per (token, group):
at 128K that is ~550 GB of page reads through L2 for 8.8 TFLOP, and it runs at the L2 limit. Here the
selection is inverted instead: per (request, group), the (token, slot) entries are sorted by block id, cut into
work items of up to `tokens_per_item` (TQ) tokens that chose the same block, and one program per item loads that
K/V page once and attends every token of the item to it: by default as one [TQ x 16 heads, H] query tile
gathered row by row (M = 16 TQ; rows of absent tokens are masked at the store), or (tile=False) one token
after the other with the page kept on chip. Each (token, slot) gets a partial softmax (normalised output + log-sum-
exp) written to [B, T, K, C, Gp, H]; XLA merges the <= C partials per token. The partials cost 2 x 34 GB of
traffic at 128K in bf16, which is why this schedule is used only for chunks of many tokens.

Work list (built with XLA, static sizes): entries e = t * Cp + c of the compacted selection; `order` sorts them
by block id (stable); item w of (b, k) covers sorted entries [start, start + count) of one block. There are at
most ceil(T * Cp / TQ) + min(M, T * Cp) items; the unused ones have count 0 and do nothing but read one page.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.gpu import _common as cm
from pallas_kernels.gpu._compat import compiler_params, masked_store, whole_array

f32 = jnp.float32


def _work_item_page(pt_ref, maxpos_ref, blk_ref, start_ref, count_ref, k_ref, v_ref, *, num_kv_heads, block_size):
    """This program's work item: (b, kh, block, first sorted entry, entry count, K page [Rp, H], V page).

    V rows past the block or past the request's last position are zeroed: unwritten page tails may hold NaN.
    """
    w, bk = pl.program_id(0), pl.program_id(1)
    b, kh = bk // num_kv_heads, bk % num_kv_heads
    blk = blk_ref[b, kh, w]
    page = pt_ref[b, blk]
    k = k_ref[kh, page]                                                    # [Rp, H]
    v = v_ref[kh, page]
    r_col = lax.broadcasted_iota(jnp.int32, (k.shape[0], 1), 0)
    v = jnp.where((r_col < block_size) & (blk * block_size + r_col <= maxpos_ref[b]), v, jnp.zeros_like(v))
    return b, kh, blk, start_ref[b, kh, w], count_ref[b, kh, w], k, v


def _kv_major_kernel(pt_ref, maxpos_ref, qpos_ref, order_ref, blk_ref, start_ref, count_ref, q_ref, k_ref, v_ref,
                     o_ref, lse_ref, *, num_kv_heads, slots, block_size, scale, precision):
    # pt_ref i32[B, M]; maxpos_ref i32[B]; qpos_ref i32[B, T]; order_ref i32[B, K, T*Cp] (entry t*Cp + c);
    # blk_ref / start_ref / count_ref i32[B, K, W] (work items); q_ref [B, T, K, Gp, H]; k/v_ref [K, P, Rp, H]
    # o_ref [B, T, K, Cp, Gp, H] partial outputs; lse_ref f32[B, T, K, Cp, Gp]
    b, kh, blk, start, count, k, v = _work_item_page(pt_ref, maxpos_ref, blk_ref, start_ref, count_ref, k_ref,
                                                     v_ref, num_kv_heads=num_kv_heads, block_size=block_size)
    rp = k.shape[0]
    r_row = lax.broadcasted_iota(jnp.int32, (1, rp), 1)

    def body(i, carry):
        e = order_ref[b, kh, start + i]
        t, c = e // slots, e % slots
        pos = qpos_ref[b, t]
        q = q_ref[b, t, kh]                                                # [Gp, H]
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=f32)
        s = jnp.where((r_row < block_size) & (blk * block_size + r_row <= pos), s * scale, -jnp.inf)
        mx = jnp.max(s, axis=1)                                            # finite: the block starts <= pos
        p = jnp.exp(s - mx[:, None])
        l = jnp.sum(p, axis=1)
        o = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                            preferred_element_type=f32)
        o_ref[b, t, kh, c] = (o / l[:, None]).astype(o_ref.dtype)
        lse_ref[b, t, kh, c] = mx + jnp.log(l)
        return carry

    lax.fori_loop(0, count, body, 0)


def _kv_major_tile_kernel(pt_ref, maxpos_ref, qpos_ref, tok_ref, slot_ref, blk_ref, start_ref, count_ref, q_ref,
                          k_ref, v_ref, o_ref, lse_ref, *, num_tokens, num_kv_heads, slots, row_slots, heads,
                          tokens_per_item, block_size, scale, precision):
    # As _kv_major_kernel, but the item's tokens are one [TQ * Gp, H] tile gathered row by row (M = 16 x TQ).
    # tok_ref / slot_ref i32[B, K, T*Cp]: token and slot of each sorted entry. q_ref [B*T*K*Gp, H] (flat rows);
    # o_ref [B*T*K*Cp*Gp, H], lse_ref f32[B*T*K*Cp*Gp] (flat rows); rows of absent tokens are masked out.
    b, kh, blk, start, count, k, v = _work_item_page(pt_ref, maxpos_ref, blk_ref, start_ref, count_ref, k_ref,
                                                     v_ref, num_kv_heads=num_kv_heads, block_size=block_size)
    rp = k.shape[0]
    row = lax.broadcasted_iota(jnp.int32, (tokens_per_item * heads,), 0)
    item, head = row // heads, row % heads
    present = item < count
    entry = start + jnp.minimum(item, jnp.maximum(count - 1, 0))
    tok = tok_ref[b, kh, entry]                                            # [rows] gathers
    slot = slot_ref[b, kh, entry]
    pos = qpos_ref[b, tok]
    hp = q_ref.shape[1]
    rows_h = (row.shape[0], hp)                                            # full index arrays: the interpreter
    col = jnp.broadcast_to(lax.broadcasted_iota(jnp.int32, (1, hp), 1), rows_h)   # takes no array/slice mix
    q_row = ((b * num_tokens + tok) * num_kv_heads + kh) * heads + head
    q = q_ref[jnp.broadcast_to(q_row[:, None], rows_h), col]               # [rows, H]
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=f32)
    r_row = lax.broadcasted_iota(jnp.int32, (1, rp), 1)
    s = jnp.where((r_row < block_size) & (blk * block_size + r_row <= pos[:, None]), s * scale, -jnp.inf)
    mx = jnp.max(s, axis=1)
    p = jnp.exp(s - mx[:, None])
    l = jnp.sum(p, axis=1)
    o = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                        preferred_element_type=f32)
    slot = jnp.where(present, slot, slots)          # absent rows: slot `slots` (a trash slot in interpret mode,
    out_row = (((b * num_tokens + tok) * num_kv_heads + kh) * row_slots + slot) * heads + head  # masked on GPU)
    masked_store(o_ref.at[jnp.broadcast_to(out_row[:, None], rows_h), col], (o / l[:, None]).astype(o_ref.dtype),
                 jnp.broadcast_to(present[:, None], rows_h))
    masked_store(lse_ref.at[out_row], mx + jnp.log(l), present)


def work_items(ids, tokens_per_item, num_blocks):
    """Invert the compacted selection ids i32[B, T, K, Cp] (-1 empty) into work items per (b, k).

    Returns order i32[B, K, T*Cp] (entries sorted by block) and blk, start, count i32[B, K, W].
    """
    b, t, kh, cp = ids.shape
    keys = jnp.where(ids >= 0, ids, num_blocks).transpose(0, 2, 1, 3).reshape(b, kh, t * cp)
    order = jnp.argsort(keys, axis=-1, stable=True).astype(jnp.int32)
    sorted_keys = jnp.take_along_axis(keys, order, axis=-1)
    edges = jnp.arange(num_blocks + 1, dtype=jnp.int32)
    first = jax.vmap(jax.vmap(lambda s: jnp.searchsorted(s, edges, side="left")))(sorted_keys)   # [B, K, M+1]
    first = first.astype(jnp.int32)
    counts = first[..., 1:] - first[..., :-1]                              # [B, K, M]
    items = -(-counts // tokens_per_item)
    item_end = jnp.cumsum(items, axis=-1)                                  # inclusive
    num_w = -(-(t * cp) // tokens_per_item) + min(num_blocks, t * cp)     # <= one partial item per used block
    wid = jnp.arange(num_w, dtype=jnp.int32)
    blk = jax.vmap(jax.vmap(lambda e: jnp.searchsorted(e, wid, side="right")))(item_end).astype(jnp.int32)
    valid = blk < num_blocks
    blk = jnp.minimum(blk, num_blocks - 1)
    j = wid - (jnp.take_along_axis(item_end, blk, axis=-1) - jnp.take_along_axis(items, blk, axis=-1))
    start = jnp.take_along_axis(first[..., :-1], blk, axis=-1) + j * tokens_per_item
    count = jnp.clip(jnp.take_along_axis(counts, blk, axis=-1) - j * tokens_per_item, 0, tokens_per_item)
    count = jnp.where(valid, count, 0).astype(jnp.int32)
    return order, jnp.where(valid, blk, 0), jnp.where(valid, start, 0).astype(jnp.int32), count


def merge_partials(o, lse, nvalid):
    """o [B, T, K, Cp, Gp, H], lse f32[B, T, K, Cp, Gp]; slots >= nvalid[b, t, k] were never written."""
    cp = lse.shape[3]
    ok = (jnp.arange(cp) < nvalid[..., None])[..., None]                  # [B, T, K, Cp, 1]
    lse = jnp.where(ok, lse, -jnp.inf)
    mx = jnp.max(lse, axis=3, keepdims=True)
    wgt = jnp.exp(lse - jnp.where(jnp.isfinite(mx), mx, 0.0))             # [B, T, K, Cp, Gp]
    den = jnp.sum(wgt, axis=3)
    num = jnp.sum(jnp.where(ok[..., None], wgt[..., None] * o.astype(f32), 0.0), axis=3)
    return num / jnp.where(den > 0, den, 1.0)[..., None]                   # [B, T, K, Gp, H]


def sparse_attention_kv_major(q5, k_pages, v_pages, page_table, q_pos, ids, nvalid, *, block_size, scale,
                              interpret, tokens_per_item=8, num_warps=4, num_stages=2, tile=True):
    """q5 [B, T, K, Gp, Hp] (padded), pages [K, P, Rp, Hp] (padded), ids/nvalid from compact_block_ids.

    tile=True: one gathered [TQ * Gp, H] tile per work item; False: a loop over the item's tokens.
    Returns f32[B, T, K, Gp, Hp]; rows with no valid block are 0.
    """
    b, t, kh, gp, hp = q5.shape
    cp = ids.shape[-1]
    m = page_table.shape[1]
    order, blk, start, count = work_items(ids, tokens_per_item, m)
    num_w = blk.shape[-1]
    maxpos = jnp.max(q_pos, axis=1).astype(jnp.int32)
    part_dtype = f32 if q5.dtype == f32 else q5.dtype
    common = dict(num_kv_heads=kh, slots=cp, block_size=block_size, scale=scale,
                  precision=cm.dot_precision(q5.dtype))
    # The interpreter stores masked-off rows too (their old value, scattered with the others): give them a
    # slot of their own there. On the GPU masked rows are not written and no extra slot is allocated.
    row_slots = cp + 1 if interpret else cp
    if tile:
        kernel = functools.partial(_kv_major_tile_kernel, num_tokens=t, heads=gp, tokens_per_item=tokens_per_item,
                                   row_slots=row_slots, **common)
        args = (order // cp, order % cp, blk, start, count, q5.reshape(b * t * kh * gp, hp))
        out_shape = [jax.ShapeDtypeStruct((b * t * kh * row_slots * gp, hp), part_dtype),
                     jax.ShapeDtypeStruct((b * t * kh * row_slots * gp,), f32)]
    else:
        row_slots = cp
        kernel = functools.partial(_kv_major_kernel, **common)
        args = (order, blk, start, count, q5)
        out_shape = [jax.ShapeDtypeStruct((b, t, kh, cp, gp, hp), part_dtype),
                     jax.ShapeDtypeStruct((b, t, kh, cp, gp), f32)]
    o, lse = pl.pallas_call(
        kernel, grid=(num_w, b * kh), out_shape=out_shape,
        in_specs=[whole_array()] * (5 + len(args)), out_specs=[whole_array(), whole_array()],
        interpret=interpret, name="msa_sparse_attention_kv_major",
        compiler_params=compiler_params(
            num_warps=num_warps,
            num_stages=cm.pipeline_stages(num_stages, per_stage=2 * k_pages.shape[2] * hp * k_pages.dtype.itemsize,
                                          fixed=tokens_per_item * gp * hp * q5.dtype.itemsize)),
    )(page_table.astype(jnp.int32), maxpos, q_pos.astype(jnp.int32), *args, k_pages, v_pages)
    o = o.reshape(b, t, kh, row_slots, gp, hp)[:, :, :, :cp]
    lse = lse.reshape(b, t, kh, row_slots, gp)[:, :, :, :cp]
    return merge_partials(o, lse, nvalid)
