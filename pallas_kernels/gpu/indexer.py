"""MSA indexer top-k on NVIDIA GPUs (Triton-lowered Pallas), streaming: no [tokens, context] score matrix.

indexer_topk: sel[b,t,k] = top-C logical blocks m by max_{s in block m, s <= q_pos[b,t]} <iq[b,t,k], ik[s]>, with
    the query's own block (and the local_blocks - 1 before it) forced in as +inf, -1 where fewer are visible.

Schedule. One program per (tile of TQ tokens of one request, split of the context). Its M dimension is
TQ tokens x K index heads (row = token * K + head: iq's natural layout, 128 rows on the GPU for prefill). It
walks the request's index-K pages of its split, one page per step: a [rows, R] score tile (one dot), a causal
mask, a max over the page (block score) and an insertion into a running top-C held in registers (replace the
current minimum if the new score is larger; no exp, no sort). The pages are read once per tile; scores never
leave the chip. Splits (split-K over the context) each keep their own top-C; the wrapper merges the S*C
candidates with one small lax.top_k (which also orders them best first). Decode (T = 1) uses tiles padded to
16 rows and many splits, so a batch of long contexts is streamed by hundreds of programs. Tiles launch
longest-first (reverse token order) to shorten the causal tail in prefill.

Ties between equal block scores are broken arbitrarily (the reference takes the lower block id); selections
match the reference exactly on inputs without ties.

Sizes: I and R are zero-padded to power-of-two triton tiles >= 16 (a padded copy of the index-K pool, for small
test configs only), K to a power of two. NotImplementedError for local_blocks > topk and for dtypes other than
float32 / bfloat16 / float16.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.gpu import _common as cm
from pallas_kernels.gpu._compat import compiler_params, whole_array

f32 = jnp.float32


def _block_score(iq, ik, blk, row_pos, *, block_size, local_blocks, precision, key_scale=None):
    """f32[rows]: max visible score of block `blk`; +inf where the block is forced (own / local).

    key_scale f32[R] (FP8 index-K): key s's score is <iq, ik_e4m3[s]> * scale[s] (scale > 0 per token)."""
    s = lax.dot_general(iq, ik, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=f32)
    if key_scale is not None:
        s = s * key_scale[None, :]
    r_row = lax.broadcasted_iota(jnp.int32, (1, ik.shape[0]), 1)           # page row (>= block_size: padding)
    ok = (r_row < block_size) & (blk * block_size + r_row <= row_pos[:, None])
    s = jnp.where(ok, s, -jnp.inf)                                         # [rows, Rp]
    score = jnp.max(s, axis=1)
    own = jnp.where(row_pos >= 0, row_pos // block_size, -1)
    forced = (blk <= own) & (blk > own - local_blocks)
    return jnp.where(forced, jnp.inf, score)


def _insert(vals, ids, score, blk):
    """Running top-C: where score beats the row's smallest kept value, it replaces that entry."""
    width = vals.shape[1]
    smallest = jnp.min(vals, axis=1)                                       # [rows]
    col = lax.broadcasted_iota(jnp.int32, vals.shape, 1)
    where_smallest = jnp.min(jnp.where(vals == smallest[:, None], col, width), axis=1)
    hit = (col == where_smallest[:, None]) & (score > smallest)[:, None]
    return jnp.where(hit, score[:, None], vals), jnp.where(hit, blk, ids)


def _indexer_kernel(pt_ref, qpos_ref, iq_ref, ik_ref, *refs,
                    num_tiles, per_split, num_blocks, topk, block_size, local_blocks, precision):
    # pt_ref i32[B, M]; qpos_ref i32[rows] (position of each row's token); iq_ref [rows, I]; ik_ref [P, R, I]
    # [scale_ref f32[P, R]: FP8 index-K only]; vals_ref f32[rows, Cp], ids_ref i32[rows, Cp]: this split's
    # top-C (columns >= topk are padding)
    scale_ref, vals_ref, ids_ref = refs if len(refs) == 3 else (None, *refs)
    i, split = pl.program_id(0), pl.program_id(1)
    b = i // num_tiles
    iq = iq_ref[...]
    row_pos = qpos_ref[...]
    max_pos = jnp.max(row_pos)
    end = jnp.minimum(jnp.where(max_pos >= 0, max_pos // block_size + 1, 0), num_blocks)
    start = split * per_split
    stop = jnp.minimum(start + per_split, end)
    shape = vals_ref.shape
    col = lax.broadcasted_iota(jnp.int32, shape, 1)
    vals0 = jnp.where(col < topk, -jnp.inf, jnp.inf).astype(f32)           # padding columns are never replaced
    ids0 = jnp.full(shape, -1, jnp.int32)

    def body(blk, carry):
        page = pt_ref[b, blk]
        ik = ik_ref[page]
        scale = None
        if scale_ref is not None:          # e4m3 keys: upcast in registers, per-key scale on the score column
            ik, scale = ik.astype(iq.dtype), scale_ref[page]
        score = _block_score(iq, ik, blk, row_pos, block_size=block_size, local_blocks=local_blocks,
                             precision=precision, key_scale=scale)
        return _insert(*carry, score, blk)

    vals, ids = lax.fori_loop(start, stop, body, (vals0, ids0))
    vals_ref[...] = vals
    ids_ref[...] = ids


def merge_topk(vals, ids, topk):
    """f32/i32[S, ..., Cp] split candidates -> i32[..., topk] best first, -1 where the value is -inf."""
    s = vals.shape[0]
    vals = jnp.moveaxis(vals[..., :topk], 0, -2).reshape(*vals.shape[1:-1], s * topk)
    ids = jnp.moveaxis(ids[..., :topk], 0, -2).reshape(*ids.shape[1:-1], s * topk)
    best, where = lax.top_k(vals, topk)
    sel = jnp.take_along_axis(ids, where, axis=-1)
    return jnp.where(best == -jnp.inf, -1, sel).astype(jnp.int32)


def _check(iq_btki, ik_pages, page_table, q_pos, topk, local_blocks, ik_scale=None):
    op = "indexer_topk"
    b, t, kh, dim = iq_btki.shape
    p, r, dim_k = ik_pages.shape
    shapes = {"iq": iq_btki.shape, "ik_pages": ik_pages.shape, "page_table": page_table.shape,
              "q_pos": q_pos.shape, "topk": topk, "local_blocks": local_blocks}
    if dim_k != dim or q_pos.shape != (b, t) or page_table.shape[0] != b:
        raise ValueError(f"gpu.{op}: inconsistent shapes {shapes}")
    fp8 = ik_pages.dtype == jnp.float8_e4m3fn
    if fp8 != (ik_scale is not None):
        raise ValueError(f"gpu.{op}: ik_scale f32[P, R] must be given exactly when ik_pages is float8_e4m3fn "
                         f"(ik_pages.dtype={ik_pages.dtype}, ik_scale={'given' if ik_scale is not None else None})")
    if fp8:
        if ik_scale.shape != (p, r):
            raise ValueError(f"gpu.{op}: ik_scale must be [P={p}, R={r}], got {ik_scale.shape}")
        cm.check_dtype(op, iq_btki, "iq")
        return b, t, kh, dim, r
    if topk < 1:
        raise ValueError(f"gpu.{op}: topk must be >= 1, got {topk}")
    cm.require(0 <= local_blocks <= topk, op, "need 0 <= local_blocks <= topk", shapes)
    cm.check_dtype(op, iq_btki, "iq")
    cm.check_dtype(op, ik_pages, "ik_pages")
    return b, t, kh, dim, r


INDEXER_TUNING = {"rows": 128, "num_warps": 4, "num_stages": 2}      # measured: benchmarks/RESULTS.md


def indexer_topk(iq_btki, ik_pages, page_table, q_pos, *, topk: int, local_blocks: int = 1, ik_scale=None,
                 interpret=False):
    """MSA block selection; see the module docstring and reference.indexer_topk.

    iq_btki [B, T, K, I]; ik_pages [P, R, I]; page_table i32[B, M]; q_pos i32[B, T] (-1 = padding row).
    FP8 index-K: ik_pages float8_e4m3fn with ik_scale f32[P, R] (key = ik_pages * ik_scale per token;
    layout.quantize_index_k): half the bytes a decode step streams; pages are upcast to iq's dtype on chip.
    Returns i32[B, T, K, topk]: logical block ids, best first, -1 right-padded.
    """
    return indexer_topk_tuned(iq_btki, ik_pages, page_table, q_pos, topk=topk, local_blocks=local_blocks,
                              ik_scale=ik_scale, interpret=interpret, **INDEXER_TUNING)


def indexer_topk_tuned(iq_btki, ik_pages, page_table, q_pos, *, topk, local_blocks, interpret,
                       rows, num_warps, num_stages, ik_scale=None):
    """indexer_topk with an explicit prefill tile height and Triton launch parameters (benchmark sweep)."""
    b, t, kh = iq_btki.shape[:3]
    cand = indexer_candidates(iq_btki, ik_pages, page_table, q_pos, topk=topk, local_blocks=local_blocks,
                              interpret=interpret, rows=rows, num_warps=num_warps, num_stages=num_stages,
                              ik_scale=ik_scale)
    sel = merge_topk(cand.vals, cand.ids, topk)                            # [B, Tp * Kp, topk]
    return sel.reshape(b, cand.tokens, cand.heads, topk)[:, :t, :kh]


@dataclasses.dataclass(frozen=True)
class Candidates:
    """Each context split's top-C blocks, not merged: row = token * heads + index head (tokens and heads padded).

    vals f32[S, B, tokens * heads, Cp] block scores (+inf forced, -inf empty; columns >= topk are padding and
    hold +inf), ids i32[...] their logical block ids (-1 empty). Splits partition the blocks, so a block is a
    candidate of at most one split and every candidate is causally visible to its row's token."""
    vals: jax.Array
    ids: jax.Array
    tokens: int
    heads: int


def indexer_candidates(iq_btki, ik_pages, page_table, q_pos, *, topk, local_blocks, interpret, rows, num_warps,
                       num_stages, ik_scale=None, pow2_splits=False) -> Candidates:
    """The indexer kernel without the final merge (indexer_topk = merge_topk of these). pow2_splits: a power-of-
    two number of splits (Triton blocks are powers of two: a kernel that loads a row's candidates of every split
    at once needs it); the extra splits cover no block and hold only empty candidates."""
    b, t, kh, dim, r = _check(iq_btki, ik_pages, page_table, q_pos, topk, local_blocks, ik_scale)
    m = page_table.shape[1]
    kp, ip, rp = cm.next_pow2(kh), cm.tile(dim), cm.tile(r)
    tq = max(1, min(rows // kp, cm.next_pow2(t)), cm.cdiv(cm.MIN_TILE, kp))
    nt = cm.cdiv(t, tq)
    tp, rows, cp = nt * tq, tq * kp, cm.next_pow2(topk)
    iq_rows = jnp.pad(iq_btki, ((0, 0), (0, tp - t), (0, kp - kh), (0, ip - dim))).reshape(b, tp * kp, ip)
    if (rp, ip) != (r, dim):                                               # a copy; never for M3's 128 x 128
        ik_pages = jnp.pad(ik_pages, ((0, 0), (0, rp - r), (0, ip - dim)))
        if ik_scale is not None:
            ik_scale = jnp.pad(ik_scale, ((0, 0), (0, rp - r)))
    scale_args = () if ik_scale is None else (ik_scale.astype(f32),)
    pos = jnp.pad(q_pos.astype(jnp.int32), ((0, 0), (0, tp - t)), constant_values=-1)
    pos_rows = jnp.repeat(pos, kp, axis=1)                                 # [B, Tp * Kp]; padded heads ignored
    splits = num_splits_for(b * nt, m)
    per_split = cm.cdiv(m, splits)
    splits = cm.next_pow2(cm.cdiv(m, per_split)) if pow2_splits else cm.cdiv(m, per_split)

    def tile(i):                                                           # longest (last) tiles first
        return nt - 1 - i % nt

    spec = pl.BlockSpec((None, None, rows, cp), lambda i, s: (s, i // nt, tile(i), 0))
    kernel = functools.partial(_indexer_kernel, num_tiles=nt, per_split=per_split, num_blocks=m, topk=topk,
                               block_size=r, local_blocks=local_blocks,
                               precision=cm.dot_precision(iq_btki.dtype))
    vals, ids = pl.pallas_call(
        kernel, grid=(b * nt, splits),
        out_shape=[jax.ShapeDtypeStruct((splits, b, tp * kp, cp), f32),
                   jax.ShapeDtypeStruct((splits, b, tp * kp, cp), jnp.int32)],
        in_specs=[whole_array(),
                  pl.BlockSpec((None, rows), lambda i, s: (i // nt, tile(i))),
                  pl.BlockSpec((None, rows, ip), lambda i, s: (i // nt, tile(i), 0)),
                  whole_array()] + [whole_array()] * len(scale_args),
        out_specs=[spec, spec], interpret=interpret, name="msa_indexer_topk",
        compiler_params=compiler_params(num_warps=num_warps if rows > 64 else 4, num_stages=num_stages),
    )(page_table.astype(jnp.int32), pos_rows, iq_rows, ik_pages, *scale_args)
    return Candidates(vals, ids, tp, kp)


def num_splits_for(programs: int, num_blocks: int) -> int:
    """Split the context so that ~4 programs per SM run, each streaming >= 8 pages."""
    want = cm.cdiv(4 * cm.NUM_SMS_HINT, max(programs, 1))
    return max(1, min(want, cm.cdiv(num_blocks, 8)))
