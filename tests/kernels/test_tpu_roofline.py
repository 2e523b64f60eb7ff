"""The paper cost model behind benchmarks/TPU_PLAN.md: spot checks against hand arithmetic."""

from pallas_kernels.tpu import roofline


def test_sparse_decode_reads_topk_pages_of_k_and_v():
    cost = roofline.sparse_decode(1 << 20)
    kv = 4 * 16 * 128 * 128 * 2 * 2                          # K heads x 16 pages x [128, 128] bf16 x (K, V)
    assert kv <= cost.bytes <= kv + 64 * 1024
    assert cost.flops == cost.useful_flops == 4 * 4 * 16 * 16 * 128 * 128
    assert roofline.sparse_decode(8192).bytes == cost.bytes   # independent of context past 16 blocks


def test_indexer_decode_streams_the_whole_index_cache():
    cost = roofline.indexer_decode(131072)
    assert 131072 * 128 * 2 <= cost.bytes <= 131072 * 128 * 2 + 4096
    assert cost.bound(roofline.CHIPS[0]) == "mem"


def test_table_has_every_kernel_context_and_chip():
    text = roofline.table()
    assert text.count("\n") == 1 + len(roofline.KERNELS) * len(roofline.CONTEXTS)
    assert all(c.name in text.splitlines()[0] for c in roofline.CHIPS)
