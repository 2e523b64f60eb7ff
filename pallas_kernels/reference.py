"""Float32 jnp references for the MSA kernels: the oracle every kernel is tested against.

Layouts (axis letters as in STYLE.md: B batch, T query tokens, N query heads, K KV heads = index heads,
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

Semantics follow M3_SPEC.md §3 and transformers' `MiniMaxM3VLIndexer`: per query token and per KV group,
index scores <iq, ik> (no scale: ranking-invariant), causal mask per key, max-pool per block, the query's own
`local_blocks` blocks forced, top-C by raw score (no exp), -1 where fewer blocks are visible. Main branch:
exact softmax over the keys of the chosen blocks that are causally visible.

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
    ik = gather_sequence(index_keys(ik_pages, ik_scale), page_table)       # [B, S, I]
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
