"""Random paged MSA inputs shared by every kernel suite (reference, GPU interpret, TPU interpret).

A case is a ragged batch: request b has `kv_lens[b]` keys in the cache and its last `q_lens[b]` tokens are the
queries (positions kv_len - q_len .. kv_len - 1; padding query rows have q_pos = -1). Pages are scattered
over a shuffled pool; page 0 is the sink and never belongs to a request. Unused pages and the unused tail of
each request's last page are filled with NaN (`unused_fill`) so that any stray read poisons the output.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class PagedCase:
    q_btnh: jnp.ndarray        # [B, T, N, H]
    iq_btki: jnp.ndarray       # [B, T, K, I]
    k_pages: jnp.ndarray       # [K, P, R, H]
    v_pages: jnp.ndarray       # [K, P, R, H]
    ik_pages: jnp.ndarray      # [P, R, I]
    page_table: jnp.ndarray    # i32[B, M]
    q_pos: jnp.ndarray         # i32[B, T], -1 = padding row
    kv_lens: np.ndarray        # [B]
    q_lens: np.ndarray         # [B]

    @property
    def valid(self) -> np.ndarray:
        """bool[B, T]: rows that are real queries."""
        return np.asarray(self.q_pos) >= 0


def random_paged_case(kv_lens, q_lens, *, num_heads=8, num_kv_heads=2, head_dim=32, index_dim=32,
                      block_size=16, dtype=jnp.float32, seed=0, unused_fill=np.nan, extra_pages=3,
                      max_blocks=None) -> PagedCase:
    rng = np.random.default_rng(seed)
    kv_lens = np.asarray(kv_lens, np.int64)
    q_lens = np.asarray(q_lens, np.int64)
    if np.any(q_lens > kv_lens) or np.any(q_lens < 1):
        raise ValueError(f"need 1 <= q_len <= kv_len, got q_lens={q_lens}, kv_lens={kv_lens}")
    b = len(kv_lens)
    r = block_size
    blocks = [-(-int(n) // r) for n in kv_lens]
    m = max(blocks) if max_blocks is None else max_blocks
    num_pages = 1 + sum(blocks) + extra_pages
    perm = rng.permutation(np.arange(1, num_pages))
    table = np.zeros((b, m), np.int32)
    used = np.zeros((num_pages, r), bool)
    at = 0
    for i, nb in enumerate(blocks):
        table[i, :nb] = perm[at:at + nb]
        at += nb
        for s in range(int(kv_lens[i])):
            used[table[i, s // r], s % r] = True
    t = int(q_lens.max())
    q_pos = np.full((b, t), -1, np.int32)
    for i in range(b):
        q_pos[i, : q_lens[i]] = np.arange(kv_lens[i] - q_lens[i], kv_lens[i])

    def pool(shape_tail, heads_first):
        x = rng.standard_normal((num_kv_heads,) * heads_first + (num_pages, r) + shape_tail).astype(np.float32)
        mask = used[None, :, :, None] if heads_first else used[:, :, None]
        return jnp.asarray(np.where(mask, x, unused_fill), dtype)

    q = rng.standard_normal((b, t, num_heads, head_dim)).astype(np.float32)
    iq = rng.standard_normal((b, t, num_kv_heads, index_dim)).astype(np.float32)
    return PagedCase(
        q_btnh=jnp.asarray(q, dtype), iq_btki=jnp.asarray(iq, dtype),
        k_pages=pool((head_dim,), 1), v_pages=pool((head_dim,), 1), ik_pages=pool((index_dim,), 0),
        page_table=jnp.asarray(table), q_pos=jnp.asarray(q_pos), kv_lens=kv_lens, q_lens=q_lens)
