"""MSA index branch on TPU (Mosaic): block selection by streaming the paged index-K cache.

ids[b, t, k, :] = the topk logical blocks with the largest max_{s in block, s <= q_pos} <iq[b,t,k], ik[s]>,
the query's own `local_blocks` blocks forced first, ties to the lower id, -1 where fewer blocks are visible.
Same semantics as reference.indexer_topk (no 1/sqrt(I) scale: ranking-invariant).

Schedule (why it looks like this):
  * grid (B, T_tiles). One program owns one request and a tile of tq query tokens; its rows are the
    tq x K index heads (row r = token r // K, head r % K). The index-K head is shared by all K groups, so
    one streamed page [R, I] feeds all tq*K rows in one MXU matmul: intensity ~ rows flop per byte.
  * The pages are streamed in logical order 0 .. (last position in the tile) // R with manual DMAs
    (`make_async_copy`, PAGE_DMA_SLOTS buffers, prefetching ahead: _stream.py); the page table and the
    per-tile page count are scalar-prefetched into SMEM. Decode and prefill chunks are the same kernel
    (decode: one token of one request, padded to 8 rows).
  * Per page: scores [rows, R] (f32 accumulate), key-level causal mask before pooling, max over the R lanes
    -> one block score per row, written into lane (m % 128) of a [rows, M_pad] f32 VMEM scratch (a
    read-modify-write of one aligned 128-lane tile: lane-dense, no dynamic single-lane store).
  * After the stream, the forced blocks are set to +inf and top-k is `topk` rounds of (row max, lowest lane
    holding it, knock it out) over the scratch: exact, deterministic ties, O(topk * M) VPU work per row,
    small next to the O(M * R * I) MXU work of the scores.

Limits: I % 128 == 0 (lane dim of iq/ik tiles, MXU contraction), R a multiple of the ik dtype's sublane
tile, rows * M_pad * 4 bytes <= INDEXER_SCORES_VMEM_BYTES (tq shrinks to fit; 8 rows at M = 262144 blocks).
A padding row (q_pos = -1) gets all -1; pages past the tile's last position are never read.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.tpu import _compat, tiling
from pallas_kernels.tpu._stream import stream_pages


def _stream_block_scores(b, n, table_ref, iq_ref, rowpos, ik_hbm, ikbuf, sems, scores_ref, page_rows,
                         scale_hbm=None, sbuf=None):
    """Fill scores_ref[:, m] = max over visible keys of block m of <iq_row, ik_key>, for m < n.

    FP8 index-K (scale_hbm f32[P, 1, R]): the e4m3 page is upcast to iq's dtype in VMEM and each key's score
    column is multiplied by its token's scale (streamed with the page, second DMA semaphore row)."""
    def copies(m, slot):
        page = table_ref[b, m]
        cps = (_compat.make_async_copy(ik_hbm.at[page], ikbuf.at[slot], sems.at[0, slot]),)
        if scale_hbm is not None:
            cps += (_compat.make_async_copy(scale_hbm.at[page], sbuf.at[slot], sems.at[1, slot]),)
        return cps

    def compute(m, slot):
        s = jax.lax.dot_general(iq_ref[...], ikbuf[slot].astype(iq_ref.dtype), (((1,), (1,)), ((), ())),
                                precision=tiling.dot_precision(iq_ref.dtype),
                                preferred_element_type=jnp.float32)                 # [rows, R]
        if scale_hbm is not None:
            s = s * sbuf[slot]                                                       # [1, R] per key
        key = m * page_rows + jax.lax.broadcasted_iota(jnp.int32, (1, page_rows), 1)
        s = jnp.where(key <= rowpos, s, -jnp.inf)                                    # causal per key
        best = jnp.max(s, axis=1, keepdims=True)                                     # [rows, 1]
        # lax.div/rem (m >= 0): jnp's floor division needs a sign op Mosaic lowers only with a TPU present.
        col = pl.multiple_of(jax.lax.div(m, tiling.LANES) * tiling.LANES, tiling.LANES)
        lane = jax.lax.broadcasted_iota(jnp.int32, (1, tiling.LANES), 1)
        tile = scores_ref[:, pl.ds(col, tiling.LANES)]
        scores_ref[:, pl.ds(col, tiling.LANES)] = jnp.where(lane == jax.lax.rem(m, tiling.LANES), best, tile)

    stream_pages(n, ikbuf.shape[0], copies, compute)


def _select_topk(scores, rowpos, page_rows, local_blocks, topk):
    """i32[rows, topk]: forced blocks (+inf) then the best scores; lowest id on ties; -1 for -inf."""
    rows, m_pad = scores.shape
    blk = jax.lax.broadcasted_iota(jnp.int32, (rows, m_pad), 1)
    blk_f = blk.astype(jnp.float32)            # ids < 2**24 are exact; lane reductions are done in f32
    own = jnp.where(rowpos >= 0, jax.lax.div(jnp.maximum(rowpos, 0), page_rows), -1 - local_blocks)  # [rows, 1]
    forced = (blk <= own) & (blk > own - local_blocks)
    scores = jnp.where(forced, jnp.inf, scores)
    out_lane = jax.lax.broadcasted_iota(jnp.int32, (rows, topk), 1)
    out = jnp.full((rows, topk), -1, jnp.int32)
    for j in range(topk):
        best = jnp.max(scores, axis=1, keepdims=True)                                # [rows, 1]
        idx = jnp.min(jnp.where(scores == best, blk_f, float(m_pad)), axis=1, keepdims=True)  # lowest on ties
        idx = idx.astype(jnp.int32)
        out = jnp.where(out_lane == j, jnp.where(best == -jnp.inf, -1, idx), out)
        scores = jnp.where(blk == idx, -jnp.inf, scores)
    return out


def _indexer_kernel(table_ref,    # i32[B, M]   SMEM (scalar prefetch): page table
                    count_ref,    # i32[B, NT]  SMEM (scalar prefetch): pages to stream for this tile
                    iq_ref,       # [rows, I]   VMEM: index queries, row = token * K + index head
                    rowpos_ref,   # i32[rows, 1] VMEM: absolute position of the row's token, -1 padding
                    ik_hbm,       # [P, R, I]   HBM (pl.ANY): index-K page pool, manual DMA only
                    *refs,        # FP8: scale_hbm f32[P, 1, R] (HBM) after ik_hbm, sbuf f32[S, 1, R] at the end
                    page_rows: int, local_blocks: int, topk: int, fp8: bool):
    # refs: out_ref i32[rows, topk] VMEM (selected ids); ikbuf [S, R, I] VMEM page buffers (S =
    # tiling.PAGE_DMA_SLOTS); sems DMA semaphores [2, S]; scores_ref f32[rows, M_pad] VMEM block scores
    if fp8:
        scale_hbm, out_ref, ikbuf, sems, scores_ref, sbuf = refs
    else:
        (out_ref, ikbuf, sems, scores_ref), scale_hbm, sbuf = refs, None, None
    b, t = pl.program_id(0), pl.program_id(1)
    n = count_ref[b, t]
    rowpos = rowpos_ref[...]
    scores_ref[...] = jnp.full(scores_ref.shape, -jnp.inf, jnp.float32)
    _stream_block_scores(b, n, table_ref, iq_ref, rowpos, ik_hbm, ikbuf, sems, scores_ref, page_rows,
                         scale_hbm, sbuf)
    out_ref[...] = _select_topk(scores_ref[...], rowpos, page_rows, local_blocks, topk)


def _check(iq_btki, ik_pages, page_table, q_pos, topk, local_blocks, ik_scale=None):
    shapes = dict(iq=iq_btki.shape, ik_pages=ik_pages.shape, page_table=page_table.shape, q_pos=q_pos.shape)
    fp8 = ik_pages.dtype == jnp.float8_e4m3fn
    if fp8 != (ik_scale is not None):
        raise ValueError(f"indexer_topk: ik_scale f32[P, R] must be given exactly when ik_pages is float8_e4m3fn "
                         f"(ik_pages.dtype={ik_pages.dtype}); shapes {shapes}")
    if fp8 and ik_scale.shape != ik_pages.shape[:2]:
        raise ValueError(f"indexer_topk: ik_scale must be [P, R] = {ik_pages.shape[:2]}, got {ik_scale.shape}")
    b, t, _, i = iq_btki.shape
    if ik_pages.ndim != 3 or ik_pages.shape[-1] != i or page_table.shape[0] != b or q_pos.shape != (b, t):
        raise ValueError(f"indexer_topk: need iq [B,T,K,I], ik_pages [P,R,I], page_table [B,M], q_pos [B,T]; "
                         f"got {shapes}")
    if not (isinstance(topk, int) and topk >= 1 and isinstance(local_blocks, int) and local_blocks >= 0):
        raise ValueError(f"indexer_topk: need int topk >= 1 and local_blocks >= 0, got {topk=}, {local_blocks=}")
    tiling.check_dtype("indexer_topk: iq", iq_btki)
    tiling.check_dtype("indexer_topk: ik_pages", ik_pages,
                       (jnp.float8_e4m3fn,) if fp8 else (jnp.float32, jnp.bfloat16))
    tiling.check_lanes("indexer_topk", "index_dim I", i, shapes)
    tiling.check_page_rows("indexer_topk", ik_pages.shape[1], ik_pages.dtype, shapes)


def indexer_topk(iq_btki, ik_pages, page_table, q_pos, *, topk: int, local_blocks: int = 1, ik_scale=None,
                 interpret: bool = False):
    """MSA block selection on TPU: i32[B, T, K, topk] logical block ids, best first, -1 right-padded.

    iq_btki [B, T, K, I] f32|bf16 (one index query per KV group), ik_pages [P, R, I] f32|bf16 (the shared
    index-K head, paged), page_table i32[B, M], q_pos i32[B, T] (-1 = padding row -> all -1).
    Semantics, schedule and limits: module docstring. Mixed dtypes are computed in the wider one.
    FP8 index-K: ik_pages float8_e4m3fn with ik_scale f32[P, R] (layout.quantize_index_k; R a multiple of
    32), computed in iq's dtype.
    """
    _check(iq_btki, ik_pages, page_table, q_pos, topk, local_blocks, ik_scale)
    fp8 = ik_scale is not None
    b, t, kh, i = iq_btki.shape
    _, r, _ = ik_pages.shape
    m = page_table.shape[1]
    m_pad = tiling.round_up(max(m, 1), tiling.LANES)
    max_rows = tiling.INDEXER_SCORES_VMEM_BYTES // (m_pad * 4)
    tq = tiling.row_tile(t, kh, min(tiling.INDEXER_TARGET_ROWS, max_rows))
    rows = tq * kh
    if rows * m_pad * 4 > tiling.INDEXER_SCORES_VMEM_BYTES:
        raise NotImplementedError(f"indexer_topk: M={m} blocks need {rows * m_pad * 4} B of score scratch for "
                                  f"{rows} rows, over {tiling.INDEXER_SCORES_VMEM_BYTES}")
    tp = tiling.round_up(t, tq)
    nt = tp // tq
    q_pos = jnp.pad(q_pos.astype(jnp.int32), ((0, 0), (0, tp - t)), constant_values=-1)
    iq = jnp.pad(iq_btki, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
    if not fp8:
        iq = iq.astype(jnp.promote_types(iq.dtype, ik_pages.dtype))
    iq_rows = iq.reshape(b, tp * kh, i)                                              # row = token * K + k
    rowpos = jnp.repeat(q_pos, kh, axis=1)[..., None]                                # i32[B, Tp*K, 1]
    last = jnp.max(q_pos.reshape(b, nt, tq), axis=-1)
    count = jnp.where(last >= 0, jnp.minimum(last // r + 1, m), 0).astype(jnp.int32)  # [B, NT]

    itemsize = jnp.dtype(iq.dtype).itemsize
    slots = tiling.PAGE_DMA_SLOTS
    vmem = (slots * r * i * itemsize + 2 * rows * i * itemsize + rows * m_pad * 4 * 3
            + 2 * rows * tiling.LANES * 4 * 2 + slots * 8 * max(r, tiling.LANES) * 4)
    grid_spec = _compat.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(b, nt),
        in_specs=[pl.BlockSpec((None, rows, i), lambda bi, ti, *_: (bi, ti, 0)),
                  pl.BlockSpec((None, rows, 1), lambda bi, ti, *_: (bi, ti, 0)),
                  pl.BlockSpec(memory_space=_compat.ANY)] + [pl.BlockSpec(memory_space=_compat.ANY)] * fp8,
        out_specs=pl.BlockSpec((None, rows, topk), lambda bi, ti, *_: (bi, ti, 0)),
        scratch_shapes=[_compat.VMEM((slots, r, i), ik_pages.dtype), _compat.DMA((2, slots)),
                        _compat.VMEM((rows, m_pad), jnp.float32)]
                       + [_compat.VMEM((slots, 1, r), jnp.float32)] * fp8)
    kernel = functools.partial(_indexer_kernel, page_rows=r, local_blocks=local_blocks, topk=topk, fp8=fp8)
    scale_args = (ik_scale.astype(jnp.float32).reshape(-1, 1, r),) if fp8 else ()
    out = pl.pallas_call(
        kernel, grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((b, tp * kh, topk), jnp.int32),
        compiler_params=_compat.compiler_params(2, min(tiling.VMEM_CAP_BYTES, vmem + 4 * 2**20)),
        interpret=_compat.interpret_arg(interpret),
        name="m3_indexer_topk",
    )(page_table.astype(jnp.int32), count, iq_rows, rowpos, ik_pages, *scale_args)
    return out.reshape(b, tp, kh, topk)[:, :t]
