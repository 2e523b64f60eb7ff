"""Views of contiguous per-sequence tensors as the paged layout the MSA ops take (see reference.py)."""

from __future__ import annotations

import jax.numpy as jnp


def num_blocks(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def kv_pages_from_sequence(x_bskh, block_size: int):
    """[B, S, K, H] -> ([K, B*M, R, H] pages, i32[B, M] page table), M = ceil(S / R); the tail is zero-padded."""
    b, s, k, h = x_bskh.shape
    m = num_blocks(s, block_size)
    x = jnp.pad(x_bskh, ((0, 0), (0, m * block_size - s), (0, 0), (0, 0)))
    pages = x.reshape(b, m, block_size, k, h).transpose(3, 0, 1, 2, 4).reshape(k, b * m, block_size, h)
    return pages, page_table_for_sequences(b, m)


def index_pages_from_sequence(x_bsi, block_size: int):
    """[B, S, I] -> ([B*M, R, I] pages, i32[B, M] page table)."""
    b, s, i = x_bsi.shape
    m = num_blocks(s, block_size)
    x = jnp.pad(x_bsi, ((0, 0), (0, m * block_size - s), (0, 0)))
    return x.reshape(b * m, block_size, i), page_table_for_sequences(b, m)


def page_table_for_sequences(batch: int, blocks: int):
    return jnp.arange(batch * blocks, dtype=jnp.int32).reshape(batch, blocks)


E4M3_MAX = 448.0            # largest finite float8_e4m3fn


def quantize_index_k(ik, eps: float = 1e-12):
    """Index keys [..., I] -> (float8_e4m3fn [..., I], f32 scale [...]): one scale per token, amax / 448.

    The FP8 index-K cache layout the indexer takes (ik_pages [P, R, I] e4m3 with ik_scale f32[P, R]); a key is
    recovered as codes * scale. A scale per token (not per page) keeps a token's quantisation independent of
    the tokens written after it into the same page.
    """
    x = ik.astype(jnp.float32)
    scale = jnp.maximum(jnp.max(jnp.abs(x), axis=-1), eps) / E4M3_MAX
    return (x / scale[..., None]).astype(jnp.float8_e4m3fn), scale
