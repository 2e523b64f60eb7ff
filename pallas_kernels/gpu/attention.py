"""Paged MSA attention on NVIDIA GPUs (Triton-lowered Pallas): block-sparse and dense, prefill and decode.

sparse_attention: out[b,t,n] = softmax(q[b,t,n] . K_sel^T * scale) V_sel over the keys s <= q_pos[b,t] of the
    <= C blocks block_ids[b,t,n//G,:] (logical ids, -1 empty), each mapped to a physical page by page_table.
dense_attention:  the same over every visible key (the full-attention layers).

Schedule (sparse). One program per (token, KV group, split): its M dimension is the G query heads of the group
(padded to 16 on the GPU: triton's dot needs >= 16 rows), and it walks its share of the token's chosen pages
with an online softmax. The wrapper first compacts each (token, group) list (drops -1, out-of-range, future and
repeated ids; kept in slot order, without a sort), so the kernel loop has no branches and never touches a page
no key of which is visible. When the (token x group) grid cannot fill the chip (decode), the C chosen pages are
split over `num_splits` programs and the partial results are merged with their log-sum-exp (split-K). The same kernel
serves prefill chunks, decode and multi-token verification (any T). Chunks of >= KV_MAJOR_MIN_QUERIES tokens use
the KV-block-major schedule of kv_major.py instead (each chosen page loaded once for all tokens that chose it).

Schedule (dense). One program per (tile of TQ tokens, KV group, split): M = TQ tokens x G heads (<= 128 rows,
tokens outer), walking all pages up to the tile's last visible block, causal mask per row; split-K over the
context for decode. Tiles are launched longest-first (reverse token order) to shorten the causal tail.
Prompt chunks (dense_attention(contiguous_chunks=True)) instead run cuDNN over the chunk itself and this kernel
over the history only, merged by log-sum-exp (dense_attention_chunked): the paged kernel is a plain Triton
flash loop at about half of cuDNN's rate in long prefill.

Edges: keys past q_pos get -inf logits; V rows past the tile's largest q_pos are zeroed before the PV product,
so unwritten slots (NaN in the tests) never reach the output. A row with no visible key (q_pos = -1, or only
empty slots) outputs 0, like the reference.

Sizes: H, R and G are zero-padded to power-of-two triton tiles >= 16 (for G: extra query rows; for H and R: a
padded copy of the page pools, so only small test configs pay it; M3's 128 x 128 pages are used in place).
NotImplementedError for dtypes other than float32 / bfloat16 / float16. The result has q's dtype (f32
accumulation inside).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.gpu import _common as cm
from pallas_kernels.gpu._compat import compiler_params, cudnn_attention_with_lse, whole_array
from pallas_kernels.gpu.kv_major import sparse_attention_kv_major

f32 = jnp.float32
_ROWS_PER_TILE = 128       # dense: tokens x heads per program


def _attend_block(q, k, v, blk, row0, row_pos, max_pos, carry, *, block_size, scale, precision):
    """One online-softmax step over rows row0 .. row0 + W - 1 of logical block `blk`'s page.

    q [rows, H]; k, v [W, H]; row_pos i32[rows]. Page rows >= block_size (padding) and keys past a row's
    position are masked; V rows past max_pos (never written) are zeroed, as they may hold NaN.
    """
    m, l, acc = carry                                                      # [rows], [rows], [rows, H]
    width = k.shape[0]
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=f32)
    s = s * scale                                                          # [rows, W]
    r_row = row0 + lax.broadcasted_iota(jnp.int32, (1, width), 1)
    ok = (r_row < block_size) & (blk * block_size + r_row <= row_pos[:, None])
    s = jnp.where(ok, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp(m - m_safe)
    p = jnp.exp(s - m_safe[:, None])
    l = l * alpha + jnp.sum(p, axis=1)
    r_col = row0 + lax.broadcasted_iota(jnp.int32, (width, 1), 0)
    v = jnp.where((r_col < block_size) & (blk * block_size + r_col <= max_pos), v, jnp.zeros_like(v))
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=f32)
    return m_new, l, acc * alpha[:, None] + pv


def _init_carry(rows, head_dim):
    return (jnp.full((rows,), -jnp.inf, f32), jnp.zeros((rows,), f32), jnp.zeros((rows, head_dim), f32))


def _store(carry, o_ref, lse_ref):
    m, l, acc = carry
    l_safe = jnp.where(l > 0, l, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    if lse_ref is not None:
        lse_ref[...] = jnp.where(l > 0, m + jnp.log(l_safe), -jnp.inf)


def _attend_slots(q, pos, pt_ref, k_ref, v_ref, b, kh, block_of, first, last, *, chunk, block_size, scale,
                  precision):
    """Online softmax of one token's query rows q [Gp, H] at position `pos` over the chosen pages in slots
    [first, last) (block_of(slot): the slot's logical block id); each page is visited in R // chunk steps of
    `chunk` keys (smaller tiles: more programs per SM). Returns the (m, l, acc) carry."""
    rows, head_dim = q.shape
    row_pos = jnp.full((rows,), pos, jnp.int32)
    steps = k_ref.shape[2] // chunk

    def body(u, carry):
        blk = block_of(u // steps)
        page = pt_ref[b, blk]
        off = (u % steps) * chunk
        rows_kv = pl.ds(pl.multiple_of(off, chunk), chunk)
        return _attend_block(q, k_ref[kh, page, rows_kv, :], v_ref[kh, page, rows_kv, :], blk, off, row_pos,
                             pos, carry, block_size=block_size, scale=scale, precision=precision)

    return lax.fori_loop(first * steps, last * steps, body, _init_carry(rows, head_dim))


def _sparse_kernel(pt_ref, ids_ref, nvalid_ref, qpos_ref, q_ref, k_ref, v_ref, o_ref, *lse_ref,
                   num_tokens, per_split, scale, block_size, chunk, precision):
    # pt_ref i32[B, M]; ids_ref i32[B, T, K, C] compacted; nvalid_ref i32[B, T, K]; qpos_ref i32[B, T]
    # q_ref [Gp, H] (one token, one group); k_ref, v_ref [K, P, R, H]; o_ref [Gp, H]; lse_ref f32[Gp]
    i, kh, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    b, t = i // num_tokens, i % num_tokens
    start = split * per_split
    stop = jnp.minimum(start + per_split, nvalid_ref[b, t, kh])
    carry = _attend_slots(q_ref[...], qpos_ref[b, t], pt_ref, k_ref, v_ref, b, kh,
                          lambda c: ids_ref[b, t, kh, c], start, stop, chunk=chunk, block_size=block_size,
                          scale=scale, precision=precision)
    _store(carry, o_ref, lse_ref[0] if lse_ref else None)


def select_candidates(vals, ids, topk: int, width: int):
    """One row's top-`topk` of its indexer split candidates, in registers: vals f32[S, Cp], ids i32[S, Cp]
    (columns >= topk are padding) -> (i32[width] block ids best first, -1 past the valid ones; their count).

    topk rounds of (max, first position holding it, its id): S * Cp <= a few thousand values per row. Splits
    partition the blocks, so no id repeats; an empty candidate (-inf) is never taken. Ties: the lowest
    (split, column) position, i.e. arbitrary, as in indexer_topk."""
    s, w = vals.shape
    lin = lax.broadcasted_iota(jnp.int32, (s, w), 0) * w + lax.broadcasted_iota(jnp.int32, (s, w), 1)
    vals = jnp.where(lax.broadcasted_iota(jnp.int32, (s, w), 1) < topk, vals, -jnp.inf)
    slot = lax.broadcasted_iota(jnp.int32, (width,), 0)

    def body(c, carry):
        v, sel, n = carry
        mx = jnp.max(jnp.max(v, axis=1), axis=0)
        pick = jnp.min(jnp.min(jnp.where(v == mx, lin, s * w), axis=1), axis=0)
        hit = lin == pick
        blk = jnp.sum(jnp.sum(jnp.where(hit, ids, 0), axis=1), axis=0)
        ok = mx > -jnp.inf
        return jnp.where(hit, -jnp.inf, v), jnp.where((slot == c) & ok, blk, sel), n + ok.astype(jnp.int32)

    _, sel, n = lax.fori_loop(0, topk, body, (vals, jnp.full((width,), -1, jnp.int32), jnp.int32(0)))
    return sel, n


def _sparse_fused_kernel(pt_ref, qpos_ref, cv_ref, ci_ref, q_ref, k_ref, v_ref, o_ref, *rest,
                         num_tokens, topk, per_split, scale, block_size, chunk, precision):
    # As _sparse_kernel, but the (token, group)'s blocks come from its indexer split candidates, merged here:
    # cv_ref f32[S, Cp], ci_ref i32[S, Cp]; sel_ref i32[Cp] (out) the merged selection, written by every split
    # (the same values); lse_ref f32[Gp] only with several splits.
    lse_ref, sel_ref = rest if len(rest) == 2 else (None, rest[0])
    i, kh, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    b, t = i // num_tokens, i % num_tokens
    sel, nvalid = select_candidates(cv_ref[...], ci_ref[...], topk, sel_ref.shape[0])
    sel_ref[...] = sel
    slot = lax.broadcasted_iota(jnp.int32, sel.shape, 0)
    start = split * per_split
    stop = jnp.minimum(start + per_split, nvalid)
    carry = _attend_slots(q_ref[...], qpos_ref[b, t], pt_ref, k_ref, v_ref, b, kh,
                          lambda c: jnp.sum(jnp.where(slot == c, sel, 0)), start, stop, chunk=chunk,
                          block_size=block_size, scale=scale, precision=precision)
    _store(carry, o_ref, lse_ref)


def _dense_kernel(pt_ref, qpos_ref, q_ref, k_ref, v_ref, o_ref, *lse_ref,
                  num_tiles, per_split, num_blocks, scale, block_size, precision):
    # pt_ref i32[B, M]; qpos_ref i32[rows] (token of each row); q_ref [rows, H]; k_ref, v_ref [K, P, R, H]
    i, kh, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    b = i // num_tiles
    q = q_ref[...]
    row_pos = qpos_ref[...]
    rows, head_dim = q.shape
    max_pos = jnp.max(row_pos)
    end = jnp.minimum(jnp.where(max_pos >= 0, max_pos // block_size + 1, 0), num_blocks)
    start = split * per_split
    stop = jnp.minimum(start + per_split, end)

    def body(blk, carry):
        page = pt_ref[b, blk]
        return _attend_block(q, k_ref[kh, page], v_ref[kh, page], blk, 0, row_pos, max_pos, carry,
                             block_size=block_size, scale=scale, precision=precision)

    carry = lax.fori_loop(start, stop, body, _init_carry(rows, head_dim))
    _store(carry, o_ref, lse_ref[0] if lse_ref else None)


def combine_splits(o, lse):
    """Merge split-K partials: o f32[S, ..., H] (each normalised), lse f32[S, ...] -> f32[..., H]."""
    mx = jnp.max(lse, axis=0)
    w = jnp.exp(lse - jnp.where(jnp.isfinite(mx), mx, 0.0))                # -inf partials weigh 0
    den = jnp.sum(w, axis=0)
    return jnp.sum(w[..., None] * o, axis=0) / jnp.where(den > 0, den, 1.0)[..., None]


def num_splits(programs: int, units: int, min_units: int = 1) -> int:
    """Split-K factor: enough programs to fill the chip ~4 times over, each with >= min_units units."""
    want = cm.cdiv(4 * cm.NUM_SMS_HINT, max(programs, 1))
    return max(1, min(want, cm.cdiv(units, min_units)))


def _check(op, q, k_pages, v_pages, page_table, q_pos):
    """Static checks; returns (b, t, n, h, kh, r, g) and the padded tile sizes (hp, rp, gp)."""
    b, t, n, h = q.shape
    kh, _, r, hk = k_pages.shape
    shapes = {"q": q.shape, "k_pages": k_pages.shape, "v_pages": v_pages.shape,
              "page_table": page_table.shape, "q_pos": q_pos.shape}
    if v_pages.shape != k_pages.shape or hk != h or q_pos.shape != (b, t) or page_table.shape[0] != b:
        raise ValueError(f"gpu.{op}: inconsistent shapes {shapes}")
    if n % kh:
        raise ValueError(f"gpu.{op}: N must be a multiple of K {shapes}")
    cm.check_dtype(op, q, "q")
    cm.check_dtype(op, k_pages, "k_pages")
    g = n // kh
    return (b, t, n, h, kh, r, g), (cm.tile(h), cm.tile(r), cm.tile(g))


def _pad_pages(k_pages, v_pages, rp, hp):
    """Pad page rows / head dim up to triton tile sizes (a copy of the pools; never for M3's 128 x 128)."""
    _, _, r, h = k_pages.shape
    if (r, h) == (rp, hp):
        return k_pages, v_pages
    widths = ((0, 0), (0, 0), (0, rp - r), (0, hp - h))
    return jnp.pad(k_pages, widths), jnp.pad(v_pages, widths)


def compact_block_ids(block_ids, q_pos, block_size, num_blocks):
    """Per (token, group): the valid distinct ids first (in slot order), then -1; and their count.
    i32[B,T,K,Cp], i32[B,T,K].

    Valid = 0 <= id < num_blocks, the block starts at or before q_pos (has a visible key) and no earlier slot
    holds the same id. Cp is C rounded up to a power of two. No sort: with C = 16 slots, a [C, C] comparison
    (duplicates) and a [C, C] one-hot gather (rank of each kept slot) fuse into elementwise XLA passes, where
    two sorts of [B*T*K, C] were separate kernels (the fixed cost of short calls, and ~ms at 128K).
    """
    ids = block_ids.astype(jnp.int32)
    c = ids.shape[-1]
    ok = (ids >= 0) & (ids < num_blocks) & (ids <= q_pos[:, :, None, None] // block_size)
    ok &= (q_pos >= 0)[:, :, None, None]
    earlier = jnp.arange(c)[:, None] > jnp.arange(c)[None, :]             # [C (slot), C (earlier slot)]
    dup = jnp.any((ids[..., :, None] == ids[..., None, :]) & ok[..., None, :] & earlier, axis=-1)
    keep = ok & ~dup
    rank = jnp.cumsum(keep.astype(jnp.int32), axis=-1) - 1                 # position among the kept slots
    nvalid = jnp.sum(keep, axis=-1).astype(jnp.int32)
    cp = cm.next_pow2(c)
    onehot = keep[..., :, None] & (rank[..., :, None] == jnp.arange(cp))   # [..., C, Cp]
    out = jnp.sum(jnp.where(onehot, ids[..., :, None], 0), axis=-2)
    return jnp.where(jnp.arange(cp) < nvalid[..., None], out, -1).astype(jnp.int32), nvalid


SPARSE_TUNING = {"num_warps": 1, "num_stages": 2, "chunk": 32}        # measured: benchmarks/RESULTS.md
KV_MAJOR_TUNING = {"tokens_per_item": 8, "num_warps": 8, "num_stages": 2, "tile": True}
KV_MAJOR_MIN_QUERIES = 16384           # B*T at and above which the KV-block-major schedule is used
KV_MAJOR_MAX_PARTIAL_BYTES = 40 << 30  # ... unless its partial outputs would exceed this


def sparse_attention(q_btnh, k_pages, v_pages, page_table, q_pos, block_ids, *, scale=None, interpret=False):
    """Block-sparse paged attention (MSA main branch); see the module docstring and reference.sparse_attention.

    q_btnh [B, T, N, H]; k_pages, v_pages [K, P, R, H]; page_table i32[B, M]; q_pos i32[B, T] (-1 = padding);
    block_ids i32[B, T, K, C] (-1 = empty). Returns [B, T, N, H] in q's dtype.
    """
    return sparse_attention_tuned(q_btnh, k_pages, v_pages, page_table, q_pos, block_ids, scale=scale,
                                  interpret=interpret, schedule="auto", **SPARSE_TUNING)


def _use_kv_major(schedule, b, t, kh, c, gp, hp, dtype):
    if schedule != "auto":
        return schedule == "kv"
    partial_bytes = b * t * kh * cm.next_pow2(c) * gp * (hp * jnp.dtype(dtype).itemsize + 4)
    return b * t >= KV_MAJOR_MIN_QUERIES and partial_bytes <= KV_MAJOR_MAX_PARTIAL_BYTES


def _query_outer_outputs(splits, b, t, kh, gp, hp, dtype):
    """out_shape / out_specs of a query-outer sparse kernel on the grid (B * T, K, splits): the output in q's
    dtype, or with several splits each split's normalised partial in f32 and its log-sum-exp."""
    out_shape = [jax.ShapeDtypeStruct((splits, b, t, kh, gp, hp), dtype if splits == 1 else f32)]
    out_specs = [pl.BlockSpec((None, None, None, None, gp, hp), lambda i, k, s: (s, i // t, i % t, k, 0, 0))]
    if splits > 1:
        out_shape.append(jax.ShapeDtypeStruct((splits, b, t, kh, gp), f32))
        out_specs.append(pl.BlockSpec((None, None, None, None, gp), lambda i, k, s: (s, i // t, i % t, k, 0)))
    return out_shape, out_specs


def sparse_attention_tuned(q_btnh, k_pages, v_pages, page_table, q_pos, block_ids, *, scale, interpret,
                           num_warps, num_stages, chunk, schedule="auto", kv_major=None):
    """sparse_attention with an explicit schedule ("auto", "query": query-outer, "kv": KV-block-major) and
    Triton launch parameters (for the benchmark's sweep and the tests)."""
    (b, t, n, h, kh, r, g), (hp, rp, gp) = _check("sparse_attention", q_btnh, k_pages, v_pages, page_table, q_pos)
    if block_ids.shape[:3] != (b, t, kh):
        raise ValueError(f"gpu.sparse_attention: block_ids must be [B={b}, T={t}, K={kh}, C], got {block_ids.shape}")
    m = page_table.shape[1]
    scale = h ** -0.5 if scale is None else float(scale)
    ids, nvalid = compact_block_ids(block_ids, q_pos, r, m)
    c = block_ids.shape[-1]
    splits = num_splits(b * t * kh, c, min_units=2)
    per_split = cm.cdiv(c, splits)
    splits = cm.cdiv(c, per_split)
    q5 = jnp.pad(q_btnh.reshape(b, t, kh, g, h), ((0, 0),) * 3 + ((0, gp - g), (0, hp - h)))
    k_pages, v_pages = _pad_pages(k_pages, v_pages, rp, hp)
    if _use_kv_major(schedule, b, t, kh, c, gp, hp, q_btnh.dtype):
        o = sparse_attention_kv_major(q5, k_pages, v_pages, page_table, q_pos, ids, nvalid, block_size=r,
                                      scale=scale, interpret=interpret, **(kv_major or KV_MAJOR_TUNING))
        return o[:, :, :, :g, :h].reshape(b, t, n, h).astype(q_btnh.dtype)
    out_shape, out_specs = _query_outer_outputs(splits, b, t, kh, gp, hp, q_btnh.dtype)
    chunk = min(chunk, rp)
    kernel = functools.partial(_sparse_kernel, num_tokens=t, per_split=per_split, scale=scale, block_size=r,
                               chunk=chunk, precision=cm.dot_precision(q_btnh.dtype))
    outs = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(b * t, kh, splits),
        in_specs=[whole_array(), whole_array(), whole_array(), whole_array(),
                  pl.BlockSpec((None, None, None, gp, hp), lambda i, k, s: (i // t, i % t, k, 0, 0)),
                  whole_array(), whole_array()],
        out_specs=out_specs, interpret=interpret, name="msa_sparse_attention",
        compiler_params=compiler_params(num_warps=num_warps, num_stages=num_stages),
    )(page_table.astype(jnp.int32), ids, nvalid, q_pos.astype(jnp.int32), q5, k_pages, v_pages)
    o = outs[0][0] if splits == 1 else combine_splits(outs[0], outs[1])
    return o[:, :, :, :g, :h].reshape(b, t, n, h).astype(q_btnh.dtype)


def sparse_attention_from_candidates(q_btnh, k_pages, v_pages, page_table, q_pos, vals, ids, *, topk,
                                     index_heads, scale, interpret, num_warps, num_stages, chunk):
    """Sparse attention whose selection is merged inside the kernel from the indexer's split candidates
    (gpu.indexer.indexer_candidates: vals / ids [S, B, tokens * index_heads, Cp], S a power of two, tokens >= T):
    the query-outer schedule of sparse_attention, each program first taking its (token, group)'s top-`topk`
    candidates in registers. No merge_topk, no compaction: the candidates are distinct and visible.
    Returns ([B, T, N, H] in q's dtype, i32[B, T, K, topk] the selection, best first, -1 padded)."""
    (b, t, n, h, kh, r, g), (hp, rp, gp) = _check("sparse_attention", q_btnh, k_pages, v_pages, page_table, q_pos)
    s_splits, cp = vals.shape[0], vals.shape[-1]
    if not cm.is_pow2(s_splits) or vals.shape[1] != b or vals.shape[2] < t * index_heads or index_heads < kh:
        raise ValueError(f"gpu.sparse_attention_from_candidates: candidates {vals.shape} do not fit B={b}, T={t}, "
                         f"K={kh} with {index_heads} index heads per token and a power-of-two split count")
    scale = h ** -0.5 if scale is None else float(scale)
    splits = num_splits(b * t * kh, topk, min_units=2)
    per_split = cm.cdiv(topk, splits)
    splits = cm.cdiv(topk, per_split)
    q5 = jnp.pad(q_btnh.reshape(b, t, kh, g, h), ((0, 0),) * 3 + ((0, gp - g), (0, hp - h)))
    k_pages, v_pages = _pad_pages(k_pages, v_pages, rp, hp)
    out_shape, out_specs = _query_outer_outputs(splits, b, t, kh, gp, hp, q_btnh.dtype)
    out_shape.append(jax.ShapeDtypeStruct((b, t, kh, cp), jnp.int32))
    out_specs.append(pl.BlockSpec((None, None, None, cp), lambda i, k, s: (i // t, i % t, k, 0)))
    cand_spec = pl.BlockSpec((s_splits, None, None, cp), lambda i, k, s: (0, i // t, (i % t) * index_heads + k, 0))
    kernel = functools.partial(_sparse_fused_kernel, num_tokens=t, topk=topk, per_split=per_split, scale=scale,
                               block_size=r, chunk=min(chunk, rp), precision=cm.dot_precision(q_btnh.dtype))
    outs = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(b * t, kh, splits),
        in_specs=[whole_array(), whole_array(), cand_spec, cand_spec,
                  pl.BlockSpec((None, None, None, gp, hp), lambda i, k, s: (i // t, i % t, k, 0, 0)),
                  whole_array(), whole_array()],
        out_specs=out_specs, interpret=interpret, name="msa_sparse_attention_fused_topk",
        compiler_params=compiler_params(num_warps=num_warps, num_stages=num_stages),
    )(page_table.astype(jnp.int32), q_pos.astype(jnp.int32), vals, ids, q5, k_pages, v_pages)
    o = outs[0][0] if splits == 1 else combine_splits(outs[0], outs[1])
    return o[:, :, :, :g, :h].reshape(b, t, n, h).astype(q_btnh.dtype), outs[-1][..., :topk]


def dense_attention(q_btnh, k_pages, v_pages, page_table, q_pos, *, scale=None, interpret=False,
                    contiguous_chunks=False):
    """Causal GQA over the paged cache; see the module docstring and reference.dense_attention.

    Same layouts as sparse_attention without block_ids. Returns [B, T, N, H] in q's dtype.
    contiguous_chunks=True (prefill rows of at least CHUNK_MIN_QUERIES queries, bf16/f16): the caller promises that
    each request's valid rows are a prefix of consecutive positions p0, p0 + 1, ... followed by -1 padding (how the
    Engine lays out prompt chunks). Then the chunk attends to itself through cuDNN's flash attention and to its
    history (keys < p0) through the paged kernel, merged by log-sum-exp: see dense_attention_chunked. Otherwise
    (decode, float32, the flag unset) the paged kernel alone runs.
    """
    if dense_schedule(q_btnh.shape[1], q_btnh.dtype, contiguous_chunks) == DENSE_CHUNK_AND_HISTORY:
        return dense_attention_chunked(q_btnh, k_pages, v_pages, page_table, q_pos, scale=scale,
                                       interpret=interpret)
    return _dense_paged(q_btnh, k_pages, v_pages, page_table, q_pos, scale=scale, interpret=interpret)[0]


DENSE_PAGED = "paged"                                  # the paged flash kernel alone (_dense_paged)
DENSE_CHUNK_AND_HISTORY = "cudnn-chunk+paged-history"  # dense_attention_chunked
# Rows shorter than this run the paged kernel even with the promise. Measured on one H200 (benchmarks/RESULTS.md,
# "Dense layer on Engine prefill rows", M3 geometry, bf16): rows of 64 queries take 0.136 ms on the chunk path
# vs 0.087 ms paged without history and the same time (0.99-1.00x) after 32K / 128K of history; rows of 512
# queries take 0.186 vs 0.669 ms without history (3.6x) and again the same time with history, where the paged
# history part dominates. Nothing between 64 and 512 was measured.
CHUNK_MIN_QUERIES = 512


def dense_schedule(num_queries: int, dtype, contiguous_chunks: bool) -> str:
    """The computation dense_attention runs for T = num_queries queries per row of this dtype: the one place
    that decides it (dense_attention calls it; dispatch.dense_attention_path reports it). The chunk path needs
    the caller's contiguous_chunks promise, rows of at least CHUNK_MIN_QUERIES queries (shorter rows, decode
    included, are no faster through cuDNN: see the constant) and bf16/f16 (cuDNN's flash attention takes no
    float32): otherwise the paged kernel alone."""
    chunk = (contiguous_chunks and num_queries >= CHUNK_MIN_QUERIES
             and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16))
    return DENSE_CHUNK_AND_HISTORY if chunk else DENSE_PAGED


def _dense_paged(q_btnh, k_pages, v_pages, page_table, q_pos, *, scale, interpret, with_lse=False):
    """The paged dense kernel: ([B, T, N, H] in q's dtype, or f32 with_lse; f32[B, T, N] log-sum-exp or None).

    with_lse: rows with no visible key get output 0 and log-sum-exp -inf (for merging with other partials).
    """
    (b, t, n, h, kh, r, g), (hp, rp, gp) = _check("dense_attention", q_btnh, k_pages, v_pages, page_table, q_pos)
    m = page_table.shape[1]
    scale = h ** -0.5 if scale is None else float(scale)
    tq = max(1, min(_ROWS_PER_TILE // gp, cm.next_pow2(t)))
    num_tiles = cm.cdiv(t, tq)
    tp, rows = num_tiles * tq, tq * gp
    q5 = jnp.pad(q_btnh.reshape(b, t, kh, g, h), ((0, 0), (0, tp - t), (0, 0), (0, gp - g), (0, hp - h)))
    q_rows = q5.transpose(0, 2, 1, 3, 4).reshape(b, kh, tp * gp, hp)       # rows: token-major, then head
    k_pages, v_pages = _pad_pages(k_pages, v_pages, rp, hp)
    pos = jnp.pad(q_pos.astype(jnp.int32), ((0, 0), (0, tp - t)), constant_values=-1)
    pos_rows = jnp.repeat(pos, gp, axis=1)                                 # [B, Tp * Gp]
    splits = num_splits(b * num_tiles * kh, m, min_units=4)
    per_split = cm.cdiv(m, splits)
    splits = cm.cdiv(m, per_split)
    o_dtype = q_btnh.dtype if splits == 1 and not with_lse else f32
    nt = num_tiles

    def tile(i):                                                           # longest (last) tiles first
        return nt - 1 - i % nt

    out_shape = [jax.ShapeDtypeStruct((splits, b, kh, tp * gp, hp), o_dtype)]
    out_specs = [pl.BlockSpec((None, None, None, rows, hp), lambda i, k, s: (s, i // nt, k, tile(i), 0))]
    if splits > 1 or with_lse:
        out_shape.append(jax.ShapeDtypeStruct((splits, b, kh, tp * gp), f32))
        out_specs.append(pl.BlockSpec((None, None, None, rows), lambda i, k, s: (s, i // nt, k, tile(i))))
    kernel = functools.partial(_dense_kernel, num_tiles=nt, per_split=per_split, num_blocks=m, scale=scale,
                               block_size=r, precision=cm.dot_precision(q_btnh.dtype))
    outs = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(b * nt, kh, splits),
        in_specs=[whole_array(),
                  pl.BlockSpec((None, rows), lambda i, k, s: (i // nt, tile(i))),
                  pl.BlockSpec((None, None, rows, hp), lambda i, k, s: (i // nt, k, tile(i), 0)),
                  whole_array(), whole_array()],
        out_specs=out_specs, interpret=interpret, name="msa_dense_attention",
        compiler_params=compiler_params(
            num_warps=4 if rows <= 64 else 8,
            num_stages=cm.pipeline_stages(2, per_stage=2 * rp * hp * jnp.dtype(k_pages.dtype).itemsize,
                                          fixed=rows * hp * jnp.dtype(q_rows.dtype).itemsize)),
    )(page_table.astype(jnp.int32), pos_rows, q_rows, k_pages, v_pages)
    if splits == 1:
        o, lse = outs[0][0], (outs[1][0] if with_lse else None)
    else:
        o, lse = combine_splits(outs[0], outs[1]), (_combine_lse(outs[1]) if with_lse else None)
    o = o.reshape(b, kh, tp, gp, hp)[:, :, :t, :g, :h].transpose(0, 2, 1, 3, 4).reshape(b, t, n, h)
    if with_lse:
        lse = lse.reshape(b, kh, tp, gp)[:, :, :t, :g].transpose(0, 2, 1, 3).reshape(b, t, n)
        return o, lse
    return o.astype(q_btnh.dtype), None


def _combine_lse(lse):
    """f32[S, ...] split log-sum-exps -> their total, -inf where every split is empty."""
    mx = jnp.max(lse, axis=0)
    safe = jnp.where(jnp.isfinite(mx), mx, 0.0)
    tot = jnp.sum(jnp.exp(lse - safe), axis=0)
    return jnp.where(tot > 0, safe + jnp.log(jnp.where(tot > 0, tot, 1.0)), -jnp.inf)


def _chunk_attention_jnp(q_btnh, k_btkh, v_btkh, n_valid, scale):
    """Stand-in for cuDNN in interpret mode (CPU tests): causal attention of the chunk to itself over its first
    n_valid[b] rows, f32 HIGHEST. Returns (f32[B, T, N, H], f32[B, T, N] log-sum-exp); rows >= n_valid: junk."""
    b, t, n, h = q_btnh.shape
    kh = k_btkh.shape[2]
    q = q_btnh.astype(f32).reshape(b, t, kh, n // kh, h)
    s = jnp.einsum("btkgh,bskh->btkgs", q, k_btkh.astype(f32), precision=lax.Precision.HIGHEST) * scale
    j = jnp.arange(t)
    ok = (j[None, :] <= j[:, None])[None] & (j < n_valid[:, None])[:, None, :]      # [B, T, S]
    s = jnp.where(ok[:, :, None, None, :], s, -jnp.inf)
    mx = jnp.max(s, axis=-1, keepdims=True)
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    p = jnp.exp(s - mx)
    den = jnp.sum(p, axis=-1)
    o = jnp.einsum("btkgs,bskh->btkgh", p, v_btkh.astype(f32), precision=lax.Precision.HIGHEST)
    o = o / jnp.where(den > 0, den, 1.0)[..., None]
    lse = jnp.where(den > 0, mx[..., 0] + jnp.log(jnp.where(den > 0, den, 1.0)), -jnp.inf)
    return o.reshape(b, t, n, h), lse.reshape(b, t, n)


def dense_attention_chunked(q_btnh, k_pages, v_pages, page_table, q_pos, *, scale=None, interpret=False):
    """dense_attention for prefill chunks of consecutive positions: cuDNN over the chunk + paged history.

    Request b's valid rows must be positions p0[b], p0[b] + 1, ... (a prefix of the T rows; the rest q_pos =
    -1). Its keys are the history s < p0[b] (any length, in the page pool) and the chunk itself. The chunk's
    own K/V rows are gathered from the pool into [B, T, K, H] and attended causally by cuDNN's flash attention
    (padding-causal mask, its log-sum-exp returned); the history by the paged kernel with every valid row's
    position set to p0 - 1 (all history visible, no chunk key); the two are merged by log-sum-exp. When no
    request has history (a prompt's first chunk) the paged kernel is skipped (lax.cond). A request whose rows
    break the promise gets NaN outputs (never a silently wrong answer). In interpret mode (CPU tests) a jnp
    stand-in with cuDNN's contract replaces the cuDNN call.
    """
    (b, t, n, h, kh, r, g), _ = _check("dense_attention", q_btnh, k_pages, v_pages, page_table, q_pos)
    m = page_table.shape[1]
    scale = h ** -0.5 if scale is None else float(scale)
    pos = q_pos.astype(jnp.int32)
    valid = pos >= 0
    n_valid = jnp.sum(valid, axis=1).astype(jnp.int32)                    # [B]
    j = jnp.arange(t, dtype=jnp.int32)
    p0 = jnp.where(n_valid > 0, pos[:, 0], 0)
    in_chunk = j[None, :] < n_valid[:, None]                              # [B, T]
    promise = jnp.all(jnp.where(in_chunk, pos == p0[:, None] + j, ~valid), axis=1)
    # The chunk's own keys: positions p0 + j, j < n_valid (rows past n_valid are zeroed: NaN-safe).
    kpos = p0[:, None] + j
    page = jnp.take_along_axis(page_table.astype(jnp.int32), jnp.clip(kpos // r, 0, m - 1), axis=1)
    row = kpos % r

    def gather(pages):                                                    # [K, P, R, H] -> [B, T, K, H]
        x = pages[:, page, row].transpose(1, 2, 0, 3)
        return jnp.where(in_chunk[:, :, None, None], x, jnp.zeros_like(x))

    kc, vc = gather(k_pages), gather(v_pages)
    if interpret:
        o_c, lse_c = _chunk_attention_jnp(q_btnh, kc, vc, n_valid, scale)
    else:   # natural-log LSE of the scaled logits, as jax.nn.dot_product_attention(return_residual=True) defines
        o_c, lse_c = cudnn_attention_with_lse(q_btnh, kc, vc, n_valid, scale=scale)
    hist_pos = jnp.where(valid & (p0[:, None] > 0), p0[:, None] - 1, -1)

    def with_history(o_c):
        o_h, lse_h = _dense_paged(q_btnh, k_pages, v_pages, page_table, hist_pos, scale=scale,
                                  interpret=interpret, with_lse=True)
        lse = jnp.where(in_chunk[:, :, None], lse_c, -jnp.inf)
        o_c = jnp.where(in_chunk[:, :, None, None], o_c.astype(f32), 0.0)
        return combine_splits(jnp.stack([o_c, o_h]), jnp.stack([lse, lse_h])).astype(q_btnh.dtype)

    def without_history(o_c):                   # a prompt's first chunk: cuDNN's output is the answer
        return o_c.astype(q_btnh.dtype)

    o = lax.cond(jnp.any(hist_pos >= 0), with_history, without_history, o_c)
    o = jnp.where(valid[:, :, None, None], o, jnp.zeros_like(o))
    return jnp.where(promise[:, None, None, None], o, jnp.full_like(o, jnp.nan))

