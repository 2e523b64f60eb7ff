"""Pallas Mosaic-TPU kernels for MSA: same signatures as pallas_kernels/reference.py plus `interpret`.

`interpret=True` runs the kernels in the TPU interpreter (`pltpu.InterpretParams()`: checks DMAs,
semaphores and out-of-bounds reads) on any backend; that is how they are tested on CPU.
"""

from __future__ import annotations

from pallas_kernels.tpu.attention import paged_attention as _paged_attention
from pallas_kernels.tpu.indexer import indexer_topk

__all__ = ["indexer_topk", "sparse_attention", "dense_attention", "msa"]


def sparse_attention(q_btnh, k_pages, v_pages, page_table, q_pos, block_ids, *, scale: float | None = None,
                     interpret: bool = False):
    """MSA main branch on TPU: softmax attention of each query over the visible keys of its chosen blocks.

    q_btnh [B, T, N, H] f32|bf16, k/v_pages [K, P, R, H] (same dtype), page_table i32[B, M], q_pos i32[B, T]
    (-1 = padding row -> output 0), block_ids i32[B, T, K, C] logical ids (-1 empty). Returns [B, T, N, H]
    in q's dtype (f32 accumulation; q and pages of different dtypes are computed in the wider one).
    Raises NotImplementedError unless H % 128 == 0 and R is a multiple of
    the KV dtype's sublane tile (8 f32, 16 bf16). Kernel and schedule: pallas_kernels/tpu/attention.py.
    """
    return _paged_attention(q_btnh, k_pages, v_pages, page_table, q_pos, block_ids, scale=scale,
                            interpret=interpret, op="sparse_attention")


def dense_attention(q_btnh, k_pages, v_pages, page_table, q_pos, *, scale: float | None = None,
                    interpret: bool = False, contiguous_chunks: bool = False):
    """Causal GQA over the paged cache on TPU (full-attention layers): the sparse kernel visiting every
    causally visible page of the request. Layouts, dtypes and limits as sparse_attention. contiguous_chunks
    (a promise about q_pos that lets the GPU run cuDNN over the chunk) changes nothing here."""
    del contiguous_chunks
    return _paged_attention(q_btnh, k_pages, v_pages, page_table, q_pos, None, scale=scale,
                            interpret=interpret, op="dense_attention")


def msa(q_btnh, k_pages, v_pages, page_table, q_pos, iq_btki, ik_pages, *, topk: int, local_blocks: int = 1,
        ik_scale=None, scale: float | None = None, interpret: bool = False):
    """MSA on TPU, both branches (reference.msa): indexer_topk, then sparse_attention over its selection. The two
    kernels stay separate calls: the GPU joins them to save small launches at decode (gpu/msa.py), which XLA's
    TPU runtime does not pay per op in the same way (benchmarks/TPU_PLAN.md)."""
    ids = indexer_topk(iq_btki, ik_pages, page_table, q_pos, topk=topk, local_blocks=local_blocks,
                       ik_scale=ik_scale, interpret=interpret)
    return sparse_attention(q_btnh, k_pages, v_pages, page_table, q_pos, ids, scale=scale,
                            interpret=interpret), ids
