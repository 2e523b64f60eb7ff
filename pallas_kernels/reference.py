"""Float32 jnp references for the MSA kernels: the oracle every kernel is tested against.

Layouts (the project's axis letters: B batch, T query tokens, N query heads, K KV heads = index heads,
G query heads per KV head, H head dim, I index dim, P physical pages, R rows per page = MSA block size,
C chosen blocks, M logical blocks per request):

  q_btnh        [B, T, N, H]   queries of this step (post norm + RoPE); query head n uses KV head n // G.
  k/v_pages     [K, P, R, H]   head-major paged KV pool; one page holds one MSA block of R keys.
  ik_pages      [P, R, I]      paged index-K pool (the single shared index-k head, post norm + RoPE).
  page_table    i32[B, M]      physical page of logical block m of request b (key position s lives in page
                               page_table[b, s // R], row s % R). Entries past the request's last block may
                               hold any in-range page id (0, the sink, by convention): they are never visible.
  q_pos         i32[B, T]      absolute position of each query; key s is visible to the query iff s <= q_pos.
                               q_pos = -1 marks a padding row: it selects nothing and its output is 0.
  block_ids     i32[B, T, K, C] logical block ids chosen per (query, KV group); -1 marks an empty slot.

Semantics follow transformers' `MiniMaxM3VLIndexer` (transformers/models/minimax_m3_vl/modeling_minimax_m3_vl.py):
per query token and per KV group, index scores <iq, ik> (no scale: ranking-invariant), causal mask per key,
max-pool per block, the query's own `local_blocks` blocks forced, top-C by raw score (no exp), -1 where fewer
blocks are visible. Main branch: exact softmax over the keys of the chosen blocks that are causally visible.

These functions materialise [B, T, K, M*R] score / logit tensors: they are for tests and small inputs, not
for long contexts (that is what the kernels are for).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

f32 = jnp.float32


def gather_sequence(pages, page_table):
    """[..., P, R, X] pool -> [B, ..., M*R, X]: each request's pages in logical order."""
    g = jnp.take(pages, page_table, axis=-3)             # [..., B, M, R, X]
    g = jnp.moveaxis(g, -4, 0)                           # [B, ..., M, R, X]
    return g.reshape(*g.shape[:-3], g.shape[-3] * g.shape[-2], g.shape[-1])


def visible_keys(q_pos, num_keys):
    """bool[B, T, S]: key s is visible to query (b, t)."""
    return jnp.arange(num_keys)[None, None, :] <= q_pos[:, :, None]


def index_keys(ik_pages, ik_scale=None):
    """The index-K pool in float32: as stored, or e4m3 codes times their per-token scale f32[P, R]."""
    ik = ik_pages.astype(f32)
    return ik if ik_scale is None else ik * ik_scale.astype(f32)[..., None]


def block_scores(iq_btki, ik_pages, page_table, q_pos, ik_scale=None):
    """f32[B, T, K, M]: max over each block's visible keys of <iq, ik>; -inf for blocks with none visible."""
    # gather, then convert: the pool holds every layer's pages (and every request's), a step reads a few
    ik = index_keys(gather_sequence(ik_pages, page_table),
                    None if ik_scale is None else gather_sequence(ik_scale[..., None], page_table)[..., 0])  # [B, S, I]
    s = jnp.einsum("btki,bsi->btks", iq_btki.astype(f32), ik, precision="highest")
    vis = visible_keys(q_pos, ik.shape[1])                                 # [B, T, S]
    s = jnp.where(vis[:, :, None, :], s, -jnp.inf)
    b, t, k, _ = s.shape
    r = ik_pages.shape[1]
    return s.reshape(b, t, k, page_table.shape[1], r).max(-1)


def indexer_topk(iq_btki, ik_pages, page_table, q_pos, *, topk: int, local_blocks: int = 1, ik_scale=None):
    """MSA block selection: i32[B, T, K, topk] logical block ids, best first, -1 right-padded.

    FP8 index-K cache: ik_pages float8_e4m3fn [P, R, I] and ik_scale f32[P, R] (layout.quantize_index_k); the
    keys are ik_pages * ik_scale. Without ik_scale the pool is used as stored.

    The query's own block q_pos // R and the `local_blocks - 1` blocks before it are forced in (score +inf),
    the rest are ranked by raw block maxima; ties go to the lower block id. A padding row (q_pos < 0) gets
    all -1.
    """
    bs = block_scores(iq_btki, ik_pages, page_table, q_pos, ik_scale)     # [B, T, K, M]
    m = bs.shape[-1]
    r = ik_pages.shape[1]
    blk = jnp.arange(m)
    own = (q_pos // r)[:, :, None, None]                                   # [B, T, 1, 1]
    forced = (blk <= own) & (blk > own - local_blocks) & (q_pos >= 0)[:, :, None, None]
    bs = jnp.where(forced, jnp.inf, bs)
    if m < topk:
        bs = jnp.pad(bs, ((0, 0), (0, 0), (0, 0), (0, topk - m)), constant_values=-jnp.inf)
    vals, ids = jax.lax.top_k(bs, topk)
    return jnp.where(vals == -jnp.inf, -1, ids).astype(jnp.int32)


def _attend(q_btnh, k_pages, v_pages, page_table, keep_btks, scale):
    """Softmax attention of every query over the keys where keep is true; rows with none give 0."""
    b, t, n, h = q_btnh.shape
    kh = k_pages.shape[0]
    k = gather_sequence(k_pages, page_table).astype(f32)                  # [B, K, S, H]
    v = gather_sequence(v_pages, page_table).astype(f32)
    # Slots no query may see (past the sequence, unwritten page tails) can hold anything, NaN included.
    seen = keep_btks.any(axis=(1, 2))                                      # [B, S]
    v = jnp.where(seen[:, None, :, None], v, 0.0)
    q = q_btnh.astype(f32).reshape(b, t, kh, n // kh, h)                   # [B, T, K, G, H]
    logits = jnp.einsum("btkgh,bksh->btkgs", q, k, precision="highest") * scale
    logits = jnp.where(keep_btks[:, :, :, None, :], logits, -jnp.inf)
    mx = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.exp(logits - jnp.where(jnp.isfinite(mx), mx, 0.0))
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    o = jnp.einsum("btkgs,bksh->btkgh", p, v, precision="highest")
    return o.reshape(b, t, n, h)


def sparse_attention(q_btnh, k_pages, v_pages, page_table, q_pos, block_ids, *, scale: float | None = None):
    """MSA main branch: f32[B, T, N, H] = softmax(q K^T * scale) V over the chosen, visible keys.

    Query head n attends with KV head n // G to the keys of blocks block_ids[b, t, n // G, :] (-1 ignored) that
    satisfy s <= q_pos[b, t]: causal inside the local block, partial last page masked.
    """
    h = q_btnh.shape[-1]
    scale = h ** -0.5 if scale is None else scale
    m = page_table.shape[1]
    r = k_pages.shape[2]
    chosen = (block_ids[..., None] == jnp.arange(m)).any(-2)              # [B, T, K, M]
    keep = jnp.repeat(chosen, r, axis=-1)                                 # [B, T, K, S]
    keep &= visible_keys(q_pos, m * r)[:, :, None, :]
    return _attend(q_btnh, k_pages, v_pages, page_table, keep, scale)


def msa(q_btnh, k_pages, v_pages, page_table, q_pos, iq_btki, ik_pages, *, topk: int, local_blocks: int = 1,
        ik_scale=None, scale: float | None = None):
    """MSA, both branches: the index branch selects (indexer_topk over iq / ik_pages, FP8 index-K with ik_scale),
    the main branch attends to the selection (sparse_attention). Returns (f32[B, T, N, H], the selection
    i32[B, T, K, topk], best first, -1 padded). Kernels may join the two steps (gpu.msa); the result is this."""
    ids = indexer_topk(iq_btki, ik_pages, page_table, q_pos, topk=topk, local_blocks=local_blocks, ik_scale=ik_scale)
    return sparse_attention(q_btnh, k_pages, v_pages, page_table, q_pos, ids, scale=scale), ids


def dense_attention(q_btnh, k_pages, v_pages, page_table, q_pos, *, scale: float | None = None,
                    contiguous_chunks: bool = False):
    """Causal GQA over the paged cache (full-attention layers): every visible key, f32[B, T, N, H].

    contiguous_chunks: the caller's promise that each request's valid rows are consecutive positions followed
    by padding (kernels may use it for speed); the result is the same, so the reference ignores it."""
    del contiguous_chunks
    h = q_btnh.shape[-1]
    scale = h ** -0.5 if scale is None else scale
    kh = k_pages.shape[0]
    vis = visible_keys(q_pos, page_table.shape[1] * k_pages.shape[2])     # [B, T, S]
    keep = jnp.broadcast_to(vis[:, :, None, :], (*vis.shape[:2], kh, vis.shape[-1]))
    return _attend(q_btnh, k_pages, v_pages, page_table, keep, scale)


def grouped_matmul(lhs_md, rhs_gdn, group_sizes):
    """MoE grouped matmul: rows group_sizes[:g].sum() .. + group_sizes[g] of lhs times rhs[g], float32 [M, N].

    lhs_md [M, D] rows sorted by group; rhs_gdn [G, D, N]; group_sizes i32[G]. Rows past sum(group_sizes) are
    not part of any group: their output is unspecified (callers mask them).
    """
    return jax.lax.ragged_dot(lhs_md, rhs_gdn, group_sizes, preferred_element_type=f32,
                              precision=jax.lax.Precision.HIGHEST)


# ------------------------------------------------------------------------------------------------------ MoE
MXFP8_BLOCK = 32
_TINY = 2.0 ** -126


def dequantize_mxfp8(w, scale, dtype=f32):
    """MXFP8 weights -> `dtype`: W = e4m3 * 2**(scale - 127), w e4m3 [..., I, O], scale uint8 [..., ceil(I/32), O]
    (E8M0: one exponent per 32 consecutive inputs, the input axis second to last).

    Semantics, the same on every backend: the product is computed exactly in float32 (an e4m3 value has 4
    significant bits and the scale is a power of two; exponent byte 0 is 2**-127 as OCP MX defines it), then
    results below float32's normal range (|W| < 2**-126) are flushed to zero and byte 255 gives NaN for its whole
    block. Why flush: XLA's CPU backend flushes float32 subnormals in every arithmetic op and its GPU backend
    keeps them, so "exact subnormals" cannot be computed the same way on both (issue 20); a weight below
    1.2e-38 never occurs in a released checkpoint. The result then rounds once to `dtype` (exact for bf16 and
    float32: the flush threshold is their common smallest normal).
    """
    i, blocks = w.shape[-2], scale.shape[-2]
    wf = w.astype(f32)
    if blocks * MXFP8_BLOCK != i:
        wf = jnp.pad(wf, [(0, 0)] * (w.ndim - 2) + [(0, blocks * MXFP8_BLOCK - i), (0, 0)])
    e = scale.astype(jnp.int32) - 127
    half = jnp.right_shift(e, 1)                       # two normal powers of two: 2**-127 is itself subnormal
    pow2 = lambda k: jax.lax.bitcast_convert_type(jnp.left_shift(k + 127, 23), f32)
    y = (wf.reshape(*w.shape[:-2], blocks, MXFP8_BLOCK, w.shape[-1]) * pow2(half)[..., :, None, :]
         * pow2(e - half)[..., :, None, :])
    y = jnp.where(jnp.abs(y) < _TINY, 0.0, y)
    y = jnp.where((scale == 255)[..., :, None, :], jnp.nan, y)
    return y.reshape(*w.shape[:-2], blocks * MXFP8_BLOCK, w.shape[-1])[..., :i, :].astype(dtype)


def swiglu_oai(gate, up, alpha: float, limit: float):
    """SwiGLU-OAI, non-interleaved (transformers' `MiniMaxM3VLDenseMLP`):
    min(g, limit) * sigmoid(alpha g) * (clip(u, +-limit) + 1)."""
    g = jnp.minimum(gate, limit)
    u = jnp.clip(up, -limit, limit)
    return g * jax.nn.sigmoid(alpha * g) * (u + 1.0)


def moe(x_td, ids_tk, combine_tk, gate_edf, up_edf, down_efd, gate_scale_ebf=None, up_scale_ebf=None,
        down_scale_ebd=None, *, alpha: float, limit: float, layer=None):
    """Routed experts of an MoE layer: out[t] = sum_j combine[t, j] * expert_{ids[t, j]}(x[t]), float32 [T, D].

    expert_e(x) = swiglu_oai(x @ gate[e], x @ up[e]) @ down[e], with the activation rounded to x's dtype before
    the down projection (as the model stores it) and float32 accumulation everywhere else.

    x_td        [T, D] f32 | bf16          rows (tokens) of this layer.
    ids_tk      i32[T, k]                  chosen experts; an id outside [0, E) is "not here" (expert
                                           parallelism: another device holds it) and contributes 0.
    combine_tk  f32[T, k]                  combine weights.
    gate_edf, up_edf [E, D, F]; down_efd [E, F, D]: x's dtype, or float8_e4m3fn with the three uint8 E8M0
        exponent arrays gate_scale_ebf, up_scale_ebf [E, D/32, F] and down_scale_ebd [E, F/32, D] (MXFP8,
        dequantised by dequantize_mxfp8 to x's dtype).
    layer       None, or an int32 scalar: every weight then has a leading layer axis [L, E, ...] and layer
                `layer` is used (the kernels read it in place; this reference slices it).

    Rows are sorted by expert and run as ragged_dots at highest precision. With MXFP8 weights and fewer slots
    (T*k) than experts, only the routed experts are gathered and dequantised.
    """
    weights = [w for w in (gate_edf, up_edf, down_efd, gate_scale_ebf, up_scale_ebf, down_scale_ebd)
               if w is not None]
    if layer is not None:
        weights = [jax.lax.dynamic_index_in_dim(w, layer, 0, keepdims=False) for w in weights]
    fp8 = len(weights) == 6
    t, k = ids_tk.shape
    e = weights[0].shape[0]
    here = (ids_tk >= 0) & (ids_tk < e)
    if fp8 and t * k < e:                  # decode: dequantise only the (at most T*k) routed experts
        rows = jnp.bincount(jnp.where(here, ids_tk, e).reshape(-1), length=e + 1)[:e]
        used = jnp.nonzero(rows, size=t * k, fill_value=e)[0]            # ascending: the sums are unchanged
        slot_of = jnp.full((e + 1,), t * k, jnp.int32).at[used].set(jnp.arange(t * k, dtype=jnp.int32))
        ids_tk = jnp.where(here, slot_of[jnp.clip(ids_tk, 0, e - 1)], t * k)
        weights = [jnp.take(w, jnp.minimum(used, e - 1), axis=0) for w in weights]
        e = t * k
    if fp8:
        weights = [dequantize_mxfp8(w, s, x_td.dtype) for w, s in zip(weights[:3], weights[3:])]
    gate, up, down = weights
    flat = jnp.where(here, ids_tk, e).reshape(-1)                          # e = not here, sorted last
    order = jnp.argsort(flat, stable=True)
    token = order // k
    xs = x_td[token]
    sizes = jnp.bincount(flat, length=e + 1)[:e].astype(jnp.int32)
    g = grouped_matmul(xs, gate, sizes)
    u = grouped_matmul(xs, up, sizes)
    h = swiglu_oai(g, u, alpha, limit).astype(x_td.dtype)
    y = grouped_matmul(h, down, sizes)                                     # rows past sum(sizes): unused
    keep = here.reshape(-1)[order]
    y = jnp.where(keep[:, None], y * combine_tk.reshape(-1)[order][:, None].astype(f32), 0.0)
    return jnp.zeros((t, x_td.shape[1]), f32).at[token].add(y)


def linear(x_mk, w_lkn, *, layer):
    """x @ w[layer], float32 [M, N]: one layer's matmul with a stacked weight w [L, K, N] (x [M, K]).

    The layer stacks of the model hold each weight of a layer kind as one [L, ...] array; the kernels
    (gpu/linear.py, tpu/linear.py) read layer `layer` (an int32 scalar, possibly traced) where it lies instead
    of slicing it out first. This reference slices and multiplies at HIGHEST precision in float32."""
    w = jax.lax.dynamic_index_in_dim(w_lkn, jnp.asarray(layer, jnp.int32), axis=0, keepdims=False)
    return jnp.dot(x_mk.astype(f32), w.astype(f32), precision="highest")
