"""MSA's two branches in one call on NVIDIA GPUs: the index branch selects, the main branch attends.

msa(...) = (sparse_attention(q, ..., indexer_topk(iq, ...)), the selection), as reference.msa. Two schedules
join the branches:
  "two-step"    indexer_topk (its kernel, then merge_topk: the splits' candidates through lax.top_k), then
                sparse_attention (compact_block_ids, then the query-outer or KV-block-major kernel). Measured on
                an H200 (benchmarks/RESULTS.md, issue 13); the default.
  "fused-topk"  the indexer kernel's split candidates go straight to the attention kernel, whose programs
                each merge their (token, group)'s candidates in registers
                (attention.sparse_attention_from_candidates): no merge_topk, no lax.top_k, no compaction: two
                kernels and the split combine, where the two-step decode runs about eight launches. For
                decode-sized steps, where small launches dominate (batch 1 at 8K the MSA layer took 49.6 us in one
                jit against cuDNN's 20.6 us, benchmarks/RESULTS.md); a prefill chunk keeps the two-step schedule
                (its KV-block-major kernel needs the compacted selection).
"fused-topk" has not run on a GPU yet: `benchmarks/kernels.py --issue13` times both schedules in one jit per
decode case, and the default changes only on that measurement.
"""

from __future__ import annotations

from pallas_kernels.gpu.attention import SPARSE_TUNING, sparse_attention, sparse_attention_from_candidates
from pallas_kernels.gpu.indexer import INDEXER_TUNING, indexer_candidates, indexer_topk

SCHEDULES = ("two-step", "fused-topk")
DEFAULT_SCHEDULE = "two-step"
FUSED_MAX_QUERIES = 16          # tokens per request at or below which "fused-topk" applies (decode, MTP checks)


def msa(q_btnh, k_pages, v_pages, page_table, q_pos, iq_btki, ik_pages, *, topk: int, local_blocks: int = 1,
        ik_scale=None, scale=None, interpret: bool = False):
    """MSA on the paged cache; see reference.msa. Returns ([B, T, N, H] in q's dtype, i32[B, T, K, topk])."""
    return msa_tuned(q_btnh, k_pages, v_pages, page_table, q_pos, iq_btki, ik_pages, topk=topk,
                     local_blocks=local_blocks, ik_scale=ik_scale, scale=scale, interpret=interpret,
                     schedule=DEFAULT_SCHEDULE)


def schedule_for(num_queries: int, schedule: str = DEFAULT_SCHEDULE) -> str:
    """The schedule msa_tuned runs for rows of num_queries tokens when asked for `schedule`."""
    if schedule not in SCHEDULES:
        raise ValueError(f"gpu.msa: schedule must be one of {SCHEDULES}, got {schedule!r}")
    return schedule if num_queries <= FUSED_MAX_QUERIES else "two-step"


def msa_tuned(q_btnh, k_pages, v_pages, page_table, q_pos, iq_btki, ik_pages, *, topk, local_blocks=1,
              ik_scale=None, scale=None, interpret=False, schedule=DEFAULT_SCHEDULE):
    """msa with an explicit schedule (benchmarks and tests); rows of more than FUSED_MAX_QUERIES tokens always run
    "two-step"."""
    if schedule_for(q_btnh.shape[1], schedule) == "two-step":
        ids = indexer_topk(iq_btki, ik_pages, page_table, q_pos, topk=topk, local_blocks=local_blocks,
                           ik_scale=ik_scale, interpret=interpret)
        return sparse_attention(q_btnh, k_pages, v_pages, page_table, q_pos, ids, scale=scale,
                                interpret=interpret), ids
    if iq_btki.shape[:3] != (q_btnh.shape[0], q_btnh.shape[1], k_pages.shape[0]):
        raise ValueError(f"gpu.msa: iq must be [B, T, K, I] with q's B, T and the pools' K; got iq "
                         f"{iq_btki.shape}, q {q_btnh.shape}, k_pages {k_pages.shape}")
    cand = indexer_candidates(iq_btki, ik_pages, page_table, q_pos, topk=topk, local_blocks=local_blocks,
                              interpret=interpret, ik_scale=ik_scale, pow2_splits=True, **INDEXER_TUNING)
    return sparse_attention_from_candidates(q_btnh, k_pages, v_pages, page_table, q_pos, cand.vals, cand.ids,
                                            topk=topk, index_heads=cand.heads, scale=scale, interpret=interpret,
                                            **SPARSE_TUNING)

