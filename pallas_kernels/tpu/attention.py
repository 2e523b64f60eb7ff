"""Paged attention on TPU (Mosaic): MSA block-sparse attention and dense causal GQA, one kernel.

out[b, t, n] = softmax_s(q[b, t, n] . k[s, n // G] * scale) v[s, n // G] over the keys s that the query may
see: s <= q_pos[b, t] and, for the sparse op, s // R in block_ids[b, t, n // G, :]. The dense op is the same
kernel with every causally visible page of the request visited.

Schedule (why it looks like this):
  * grid (B, K, T_tiles). One program owns one request b, one KV head k and a tile of tq query tokens; its
    rows are the tq x G query heads that share KV head k (row r = token r // G, head k*G + r % G), so every
    K/V page fetched feeds tq*G rows of the MXU (arithmetic intensity ~ rows flop per byte of K/V).
  * The pages a tile visits are its *union* of selected blocks, computed outside the kernel (sorted, no
    duplicates, only blocks some real row of the tile can see), delivered per program as an SMEM row; the
    number of pages per program and the page table are scalar-prefetched into SMEM. The loop over pages
    has a data-dependent trip count, so it is a `fori_loop` over manual DMAs (`make_async_copy` HBM ->
    VMEM, PAGE_DMA_SLOTS buffers for K and for V, prefetching ahead: _stream.py) rather than a grid axis:
    a grid axis would have to be sized for the worst tile and would pay ~0.35 us per skipped step.
  * Per page: logits [rows, R] on the MXU (f32 accumulate), mask = row selected this block AND key position
    <= row position (causal inside the local page, partial last page), online softmax in f32 scratch
    (m, l, acc), then p (cast to the KV dtype) @ V on the MXU.
  * Rows of a tile that did not select a page get an all -inf logit row for it: exact, but those MXU flops
    are spent anyway. Sparse prefill therefore costs union/C of the ideal flops (see TPU_PLAN.md).

Edges: a -1 slot, a block past the row's position or an id >= M is never visited for that row; a row with
q_pos = -1 (padding) or no visible key returns 0; V rows past the tile's last visible key are zeroed before
the PV matmul (unwritten page tails may hold NaN and 0 * NaN = NaN).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.tpu import _compat, tiling
from pallas_kernels.tpu._stream import stream_pages

_BIG = jnp.iinfo(jnp.int32).max


def _page_copies(k_hbm, v_hbm, kbuf, vbuf, sems, kv_head, page, slot):
    """The two DMA descriptors (K and V page -> VMEM slot); built identically for start() and wait()."""
    ck = _compat.make_async_copy(k_hbm.at[kv_head, page], kbuf.at[slot], sems.at[0, slot])
    cv = _compat.make_async_copy(v_hbm.at[kv_head, page], vbuf.at[slot], sems.at[1, slot])
    return ck, cv


def _online_softmax_step(q, k, v, keep, m_ref, l_ref, acc_ref, scale):
    """One page of flash attention: q [rows, H], k/v [R, H], keep bool[rows, R]; updates m, l, acc in place."""
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=tiling.dot_precision(q.dtype),
                            preferred_element_type=jnp.float32) * scale
    s = jnp.where(keep, s, -jnp.inf)                                   # [rows, R]
    m_prev = m_ref[...]                                                # [rows, 1]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)                  # rows with nothing seen yet
    p = jnp.exp(s - m_safe)                                            # masked -> exp(-inf) = 0
    alpha = jnp.exp(m_prev - m_safe)
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             precision=tiling.dot_precision(v.dtype),
                             preferred_element_type=jnp.float32)      # [rows, H]
    acc_ref[...] = alpha * acc_ref[...] + pv
    m_ref[...] = m_new


def _attention_kernel(*refs, scale: float, page_rows: int, sparse: bool):
    """Body of one (request b, KV head k, query tile t) program; see the module docstring."""
    if sparse:
        (table_ref,     # i32[B, M]    SMEM (scalar prefetch): physical page of logical block m of request b
         count_ref,     # i32[B, K, NT] SMEM (scalar prefetch): pages this program visits
         last_ref,      # i32[B, NT]   SMEM (scalar prefetch): last query position in the tile (-1: none)
         blocks_ref,    # i32[U]       SMEM: logical ids to visit, ascending; first count entries valid
         q_ref,         # [rows, H]    VMEM: queries, row = token * G + head-in-group
         rowpos_ref,    # i32[rows, 1] VMEM: absolute position of the row's token, -1 padding
         rowsel_ref,    # i32[rows, C] VMEM: the row's selected logical blocks, -1 empty
         k_hbm, v_hbm,  # [K, P, R, H] HBM (pl.ANY): page pools, read by manual DMA only
         o_ref,         # [rows, H]    VMEM: output
         kbuf, vbuf,    # [S, R, H]    VMEM: S-slot page buffers (S = tiling.PAGE_DMA_SLOTS)
         sems,          # DMA semaphores [2 (K, V), S]
         m_ref, l_ref,  # f32[rows, 1] running max / denominator
         acc_ref) = refs  # f32[rows, H] running numerator
    else:
        (table_ref, count_ref, last_ref, q_ref, rowpos_ref, k_hbm, v_hbm, o_ref, kbuf, vbuf, sems,
         m_ref, l_ref, acc_ref) = refs
        blocks_ref = rowsel_ref = None
    b, kv_head, t = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    n = count_ref[b, kv_head, t]
    rowpos = rowpos_ref[...]                                           # i32[rows, 1]
    last_visible = last_ref[b, t]                                      # keys past this are never seen
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def logical(u):
        return blocks_ref[u] if sparse else u

    def copies(u, slot):
        return _page_copies(k_hbm, v_hbm, kbuf, vbuf, sems, kv_head, table_ref[b, logical(u)], slot)

    def compute(u, slot):
        blk = logical(u)
        key_lane = blk * page_rows + jax.lax.broadcasted_iota(jnp.int32, (1, page_rows), 1)   # [1, R]
        keep = key_lane <= rowpos                                                              # [rows, R]
        if sparse:
            # f32 lane reduction (the best-supported Mosaic reduce): 1 where the row chose this block.
            hit = jnp.max(jnp.where(rowsel_ref[...] == blk, 1.0, 0.0), axis=1, keepdims=True)  # [rows, 1]
            keep = jnp.logical_and(keep, hit > 0.0)
        key_row = blk * page_rows + jax.lax.broadcasted_iota(jnp.int32, (page_rows, 1), 0)    # [R, 1]
        v = vbuf[slot].astype(q_ref.dtype)                             # no-op unless q is the wider dtype
        v = jnp.where(key_row <= last_visible, v, jnp.zeros_like(v))   # unwritten tails may be NaN
        k = kbuf[slot].astype(q_ref.dtype)
        _online_softmax_step(q_ref[...], k, v, keep, m_ref, l_ref, acc_ref, scale)

    stream_pages(n, kbuf.shape[0], copies, compute)
    l = l_ref[...]
    o_ref[...] = jnp.where(l > 0, acc_ref[...] / jnp.where(l > 0, l, 1.0), 0.0).astype(o_ref.dtype)


def _check(op, q_btnh, k_pages, v_pages, page_table, q_pos, block_ids=None):
    shapes = dict(q=q_btnh.shape, k_pages=k_pages.shape, v_pages=v_pages.shape, page_table=page_table.shape,
                  q_pos=q_pos.shape, block_ids=None if block_ids is None else block_ids.shape)
    b, t, n, h = q_btnh.shape
    kh, _, r, h2 = k_pages.shape
    if v_pages.shape != k_pages.shape or h2 != h or n % kh:
        raise ValueError(f"{op}: need q [B,T,N,H], k/v pages [K,P,R,H] with N % K == 0; got {shapes}")
    if page_table.shape[0] != b or q_pos.shape != (b, t):
        raise ValueError(f"{op}: need page_table [B,M], q_pos [B,T]; got {shapes}")
    if block_ids is not None and block_ids.shape[:3] != (b, t, kh):
        raise ValueError(f"{op}: need block_ids [B,T,K,C]; got {shapes}")
    for name, x in (("q", q_btnh), ("k_pages", k_pages), ("v_pages", v_pages)):
        tiling.check_dtype(f"{op}: {name}", x)
    if k_pages.dtype != v_pages.dtype:
        raise NotImplementedError(f"{op}: k_pages {k_pages.dtype} and v_pages {v_pages.dtype} must match")
    tiling.check_lanes(op, "head_dim H", h, shapes)
    tiling.check_page_rows(op, r, k_pages.dtype, shapes)


def _rows_from_tokens(x_bt, g):
    """[B, T, ...] per-token values -> [B, T*G, ...] per row (row = token * G + head-in-group)."""
    return jnp.repeat(x_bt, g, axis=1)


def _sparse_visit_lists(block_ids, q_pos, num_blocks, page_rows, tq):
    """Per (b, k, tile): the union of blocks its real rows may see, ascending, as ([B,K,NT,U] ids, [B,K,NT]).

    A slot counts only if 0 <= id < M and id <= q_pos // R of its row (a padding row contributes nothing).
    U = min(tq * C, M) bounds the union; entries past the count are 0 and never read.
    """
    b, tp, kh, c = block_ids.shape
    nt = tp // tq
    ok = (block_ids >= 0) & (block_ids < num_blocks) & (block_ids <= (q_pos // page_rows)[:, :, None, None])
    ok &= (q_pos >= 0)[:, :, None, None]
    ids = jnp.where(ok, block_ids, _BIG)
    ids = ids.reshape(b, nt, tq, kh, c).transpose(0, 3, 1, 2, 4).reshape(b, kh, nt, tq * c)
    ids = jnp.sort(ids, axis=-1)
    dup = jnp.concatenate([jnp.zeros_like(ids[..., :1], bool), ids[..., 1:] == ids[..., :-1]], axis=-1)
    ids = jnp.sort(jnp.where(dup, _BIG, ids), axis=-1)[..., :min(tq * c, num_blocks)]
    count = jnp.sum(ids < _BIG, axis=-1).astype(jnp.int32)
    return jnp.where(ids < _BIG, ids, 0).astype(jnp.int32), count


def _last_positions(q_pos, tq):
    """i32[B, NT]: the last (largest) query position of each tile, -1 for an all-padding tile."""
    b, tp = q_pos.shape
    return jnp.max(q_pos.reshape(b, tp // tq, tq), axis=-1).astype(jnp.int32)


def _dense_visit_counts(last, page_rows, kh, num_blocks):
    """Dense: a tile visits logical blocks 0 .. (last position in the tile) // R (at most M); none if all
    padding."""
    count = jnp.where(last >= 0, jnp.minimum(last // page_rows + 1, num_blocks), 0).astype(jnp.int32)
    return jnp.broadcast_to(count[:, None, :], (last.shape[0], kh, last.shape[1]))


def paged_attention(q_btnh, k_pages, v_pages, page_table, q_pos, block_ids, *, scale, interpret, op):
    """Shared wrapper: relayout to rows, build the visit lists, run the kernel, relayout back."""
    _check(op, q_btnh, k_pages, v_pages, page_table, q_pos, block_ids)
    sparse = block_ids is not None
    b, t, n, h = q_btnh.shape
    kh, _, r, _ = k_pages.shape
    g = n // kh
    m = page_table.shape[1]
    scale = h ** -0.5 if scale is None else float(scale)
    tq = tiling.row_tile(t, g, tiling.ATTENTION_TARGET_ROWS)
    tp = tiling.round_up(t, tq)
    nt, rows = tp // tq, tq * g
    pad = tp - t
    q_pos = jnp.pad(q_pos.astype(jnp.int32), ((0, 0), (0, pad)), constant_values=-1)
    q = jnp.pad(q_btnh, ((0, 0), (0, pad), (0, 0), (0, 0)))
    q = q.astype(jnp.promote_types(q.dtype, k_pages.dtype))                 # mixed dtypes: the wider one
    q_rows = q.reshape(b, tp, kh, g, h).transpose(0, 2, 1, 3, 4).reshape(b, kh, tp * g, h)
    rowpos = _rows_from_tokens(q_pos, g)[..., None]                           # i32[B, Tp*G, 1]
    table = page_table.astype(jnp.int32)
    last = _last_positions(q_pos, tq)

    q_spec = pl.BlockSpec((None, None, rows, h), lambda bi, ki, ti, *_: (bi, ki, ti, 0))
    pos_spec = pl.BlockSpec((None, rows, 1), lambda bi, ki, ti, *_: (bi, ti, 0))
    hbm_spec = pl.BlockSpec(memory_space=_compat.ANY)
    if sparse:
        c = block_ids.shape[-1]
        bids = jnp.pad(block_ids.astype(jnp.int32), ((0, 0), (0, pad), (0, 0), (0, 0)), constant_values=-1)
        visit, count = _sparse_visit_lists(bids, q_pos, m, r, tq)
        u = visit.shape[-1]
        rowsel = jnp.repeat(bids.transpose(0, 2, 1, 3), g, axis=2)             # i32[B, K, Tp*G, C]
        in_specs = [pl.BlockSpec((None, None, None, u), lambda bi, ki, ti, *_: (bi, ki, ti, 0),
                                 memory_space=_compat.SMEM),
                    q_spec, pos_spec,
                    pl.BlockSpec((None, None, rows, c), lambda bi, ki, ti, *_: (bi, ki, ti, 0)),
                    hbm_spec, hbm_spec]
        args = (visit, q_rows, rowpos, rowsel, k_pages, v_pages)
    else:
        count = _dense_visit_counts(last, r, kh, m)
        in_specs = [q_spec, pos_spec, hbm_spec, hbm_spec]
        args = (q_rows, rowpos, k_pages, v_pages)

    kv_bytes = jnp.dtype(k_pages.dtype).itemsize
    slots = tiling.PAGE_DMA_SLOTS
    vmem = (2 * slots * r * h * kv_bytes                  # K/V page buffers
            + 2 * 2 * rows * h * q_rows.dtype.itemsize    # q and o blocks, pipelined (x2)
            + 2 * 2 * r * h * 4                           # upcast K/V page values (mixed dtypes only)
            + rows * (h + 2 * tiling.LANES) * 4           # acc, m, l (lane-padded)
            + 4 * rows * tiling.LANES * 4)                # rowpos / rowsel blocks (lane-padded)
    grid_spec = _compat.PrefetchScalarGridSpec(
        num_scalar_prefetch=3, grid=(b, kh, nt), in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, rows, h), lambda bi, ki, ti, *_: (bi, ki, ti, 0)),
        scratch_shapes=[_compat.VMEM((slots, r, h), k_pages.dtype),
                        _compat.VMEM((slots, r, h), v_pages.dtype), _compat.DMA((2, slots)),
                        _compat.VMEM((rows, 1), jnp.float32), _compat.VMEM((rows, 1), jnp.float32),
                        _compat.VMEM((rows, h), jnp.float32)])
    kernel = functools.partial(_attention_kernel, scale=scale, page_rows=r, sparse=sparse)
    o_rows = pl.pallas_call(
        kernel, grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((b, kh, tp * g, h), q_btnh.dtype),
        compiler_params=_compat.compiler_params(3, min(tiling.VMEM_CAP_BYTES, 2 * vmem + 4 * 2**20)),
        interpret=_compat.interpret_arg(interpret),
        name=f"m3_{op}",
    )(table, count, last, *args)
    o = o_rows.reshape(b, kh, tp, g, h).transpose(0, 2, 1, 3, 4).reshape(b, tp, n, h)
    return o[:, :t]
