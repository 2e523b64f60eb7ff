"""The float32 references against naive per-token loops written from transformers' `MiniMaxM3VLIndexer`
(the oracle's oracle)."""

from __future__ import annotations

import numpy as np
import pytest

from pallas_kernels import reference
from tests.kernels.cases import random_paged_case


def naive_select(case, topk, local_blocks):
    iq, ik, table, q_pos = map(np.asarray, (case.iq_btki, case.ik_pages, case.page_table, case.q_pos))
    r = ik.shape[1]
    b, t, k, _ = iq.shape
    out = np.full((b, t, k, topk), -1, np.int64)
    for bi in range(b):
        for ti in range(t):
            p = q_pos[bi, ti]
            if p < 0:
                continue
            own = p // r
            keys = np.stack([ik[table[bi, s // r], s % r] for s in range(p + 1)])      # visible keys only
            for g in range(k):
                scores = keys @ iq[bi, ti, g]
                blocks = {blk: scores[blk * r: (blk + 1) * r].max() for blk in range(own + 1)}
                forced = sorted({max(own - i, 0) for i in range(local_blocks)})
                rest = sorted((blk for blk in blocks if blk not in forced), key=lambda x: (-blocks[x], x))
                chosen = (forced + rest)[:topk]
                out[bi, ti, g, :len(chosen)] = chosen
    return out


def naive_attention(case, block_ids):
    q, kp, vp, table, q_pos = map(np.asarray, (case.q_btnh, case.k_pages, case.v_pages, case.page_table, case.q_pos))
    b, t, n, h = q.shape
    kh, r = kp.shape[0], kp.shape[2]
    out = np.zeros((b, t, n, h))
    for bi in range(b):
        for ti in range(t):
            p = q_pos[bi, ti]
            if p < 0:
                continue
            for head in range(n):
                g = head // (n // kh)
                keys = [s for s in range(p + 1) if block_ids is None or s // r in set(block_ids[bi, ti, g])]
                kk = np.stack([kp[g, table[bi, s // r], s % r] for s in keys]).astype(np.float64)
                vv = np.stack([vp[g, table[bi, s // r], s % r] for s in keys]).astype(np.float64)
                logits = kk @ q[bi, ti, head] / np.sqrt(h)
                w = np.exp(logits - logits.max())
                out[bi, ti, head] = (w / w.sum()) @ vv
    return out


CASES = [
    # kv_lens, q_lens, block_size, topk, local_blocks
    ([37], [37], 8, 3, 1),                 # prefill, not a multiple of the block
    ([64, 9], [64, 9], 16, 2, 1),          # exact multiple; second request has a single block
    ([130, 5, 77], [1, 1, 1], 16, 4, 1),   # ragged decode batch, fewer blocks than top-k for two requests
    ([100, 40], [7, 3], 8, 4, 2),          # chunk of a longer request, two local blocks
    ([1], [1], 8, 3, 1),                   # a single token
]


@pytest.mark.parametrize("kv_lens,q_lens,block,topk,local", CASES)
def test_indexer_topk_matches_naive(kv_lens, q_lens, block, topk, local):
    case = random_paged_case(kv_lens, q_lens, block_size=block, seed=sum(kv_lens))
    got = np.asarray(reference.indexer_topk(case.iq_btki, case.ik_pages, case.page_table, case.q_pos,
                                            topk=topk, local_blocks=local))
    want = naive_select(case, topk, local)
    np.testing.assert_array_equal(np.sort(got, -1), np.sort(want, -1))
    valid = got >= 0
    assert (valid[..., :-1] | ~valid[..., 1:]).all(), "-1 slots must be right-padded"
    assert (got[~case.valid] == -1).all()


@pytest.mark.parametrize("kv_lens,q_lens,block,topk,local", CASES)
def test_attention_matches_naive(kv_lens, q_lens, block, topk, local):
    case = random_paged_case(kv_lens, q_lens, block_size=block, seed=1 + sum(kv_lens))
    ids = reference.indexer_topk(case.iq_btki, case.ik_pages, case.page_table, case.q_pos, topk=topk,
                                 local_blocks=local)
    sparse = np.asarray(reference.sparse_attention(case.q_btnh, case.k_pages, case.v_pages, case.page_table,
                                                   case.q_pos, ids))
    dense = np.asarray(reference.dense_attention(case.q_btnh, case.k_pages, case.v_pages, case.page_table,
                                                 case.q_pos))
    np.testing.assert_allclose(sparse, naive_attention(case, np.asarray(ids)), atol=2e-5)
    np.testing.assert_allclose(dense, naive_attention(case, None), atol=2e-5)
    assert not np.isnan(sparse).any() and (sparse[~case.valid] == 0).all()


def test_selection_is_sparse_for_long_prompts():
    case = random_paged_case([200], [200], block_size=8, seed=3)
    ids = np.asarray(reference.indexer_topk(case.iq_btki, case.ik_pages, case.page_table, case.q_pos, topk=3))
    own = np.asarray(case.q_pos)[0] // 8
    assert (ids[0, :, :, 0] == own[:, None]).all(), "the local block ranks first"
    assert ((ids[0] >= 0).sum(-1) == np.minimum(own + 1, 3)[:, None]).all()
    assert (ids[0] <= own[:, None, None]).all(), "no future block is ever selected"
