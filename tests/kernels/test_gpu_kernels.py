"""GPU (Pallas/Triton) MSA kernels against the float32 references.

On CPU the kernels run in the Pallas interpreter (interpret=True); on a GPU backend the same tests run the
compiled kernels. Shapes are tiny (block 16-32, head dim 32) to keep CPU time small; every case has NaN in the
unused page slots so a stray read fails. Selections are compared as sets per (token, group) on rows whose
reference block scores have no near-tie at the top-k boundary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pallas_kernels import dispatch, gpu, layout, reference
from tests.kernels.cases import random_paged_case

INTERPRET = jax.default_backend() == "cpu"
IMPL = "gpu-interpret" if INTERPRET else "gpu"
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 1e-2}
DTYPES = [jnp.float32, jnp.bfloat16]


def rel_l2(got, want, valid):
    got = np.asarray(jnp.asarray(got, jnp.float32))[valid]
    want = np.asarray(want, np.float32)[valid]
    assert not np.isnan(got).any(), "NaN in kernel output"
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def case(kv_lens, q_lens, *, dtype=jnp.float32, block_size=16, seed=0, heads=(8, 2), dims=(32, 32)):
    return random_paged_case(kv_lens, q_lens, num_heads=heads[0], num_kv_heads=heads[1], head_dim=dims[0],
                             index_dim=dims[1], block_size=block_size, dtype=dtype, seed=seed)


def tie_free_rows(c, topk, local_blocks, margin=1e-3, ik_pages=None, ik_scale=None):
    """bool[B, T, K]: rows whose top-k set is unambiguous (gap at the boundary > margin, relative)."""
    ik_pages = c.ik_pages if ik_pages is None else ik_pages
    bs = np.asarray(reference.block_scores(c.iq_btki, ik_pages, c.page_table, c.q_pos, ik_scale))  # [B,T,K,M]
    r = c.ik_pages.shape[1]
    own = np.asarray(c.q_pos)[:, :, None, None] // r
    blk = np.arange(bs.shape[-1])
    bs = np.where((blk <= own) & (blk > own - local_blocks), np.inf, bs)
    s = -np.sort(-bs, axis=-1)
    if s.shape[-1] <= topk:
        return np.ones(s.shape[:3], bool)
    a, b = s[..., topk - 1], s[..., topk]
    with np.errstate(invalid="ignore"):
        gap = np.abs(a - b) > margin * np.maximum(1.0, np.abs(b))
    return ~(np.isfinite(a) & np.isfinite(b)) | gap


def check_selection(c, topk, local_blocks=1, ik_pages=None, ik_scale=None):
    ik_pages = c.ik_pages if ik_pages is None else ik_pages
    got = dispatch.indexer_topk(c.iq_btki, ik_pages, c.page_table, c.q_pos, topk=topk, local_blocks=local_blocks,
                                ik_scale=ik_scale, impl=IMPL)
    want = reference.indexer_topk(c.iq_btki, ik_pages, c.page_table, c.q_pos, topk=topk, local_blocks=local_blocks,
                                  ik_scale=ik_scale)
    return assert_same_selection(c, got, want, topk, local_blocks, ik_pages, ik_scale)


def assert_same_selection(c, got, want, topk, local_blocks, ik_pages, ik_scale):
    """got == want as sets on the tie-free valid rows (at least half of them); padding rows all -1; -1 only
    right-padded, never a repeated block. Returns want (numpy)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == np.int32
    ok = tie_free_rows(c, topk, local_blocks, ik_pages=ik_pages, ik_scale=ik_scale) & c.valid[:, :, None]
    assert ok.sum() >= 0.5 * c.valid.sum() * ok.shape[-1]
    np.testing.assert_array_equal(np.sort(got, -1)[ok], np.sort(want, -1)[ok])
    assert (got[~c.valid] == -1).all()
    for row in got.reshape(-1, topk):
        v = row[row >= 0]
        assert len(set(v.tolist())) == len(v) and (row[len(v):] == -1).all()
    return want


def check_sparse(c, block_ids, dtype):
    args = (c.q_btnh, c.k_pages, c.v_pages, c.page_table, c.q_pos, block_ids)
    got = dispatch.sparse_attention(*args, impl=IMPL)
    want = reference.sparse_attention(*args)
    assert got.shape == c.q_btnh.shape
    assert rel_l2(got, want, c.valid) <= TOL[dtype]
    assert (np.asarray(jnp.asarray(got, jnp.float32))[~c.valid] == 0).all()


def check_dense(c, dtype):
    args = (c.q_btnh, c.k_pages, c.v_pages, c.page_table, c.q_pos)
    got = dispatch.dense_attention(*args, impl=IMPL)
    assert rel_l2(got, reference.dense_attention(*args), c.valid) <= TOL[dtype]


# (kv_lens, q_lens): decode (ragged, partial and exact pages, 1 token), prefill, chunked prefill, mixed,
# multi-token verification.
SHAPES = [
    ([1, 16, 37, 200], [1, 1, 1, 1]),
    ([96], [96]),
    ([150, 33], [37, 33]),
    ([64, 250, 17], [3, 4, 17]),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("kv_lens,q_lens", SHAPES)
def test_msa_layer_matches_reference(kv_lens, q_lens, dtype):
    """Selection, then sparse attention over it, then dense attention, on the same ragged case."""
    c = case(kv_lens, q_lens, dtype=dtype, seed=sum(kv_lens))
    sel = check_selection(c, topk=4)
    check_sparse(c, jnp.asarray(sel), dtype)
    check_dense(c, dtype)


@pytest.mark.parametrize("topk,local_blocks", [(8, 1), (3, 2), (5, 0)])
def test_indexer_topk_options(topk, local_blocks):
    """More slots than visible blocks (-1 padding), wider local window, no forced block."""
    c = case([130, 40], [50, 2], block_size=16, seed=topk)
    check_selection(c, topk=topk, local_blocks=local_blocks)


def test_block_size_32_and_group_of_16():
    """M3-like grouping: 16 query heads per KV head, 4 KV heads, larger pages."""
    c = case([300, 65], [9, 1], block_size=32, heads=(64, 4), dims=(32, 32), dtype=jnp.bfloat16, seed=3)
    sel = check_selection(c, topk=4)
    check_sparse(c, jnp.asarray(sel), jnp.bfloat16)
    check_dense(c, jnp.bfloat16)


def test_sparse_attention_messy_block_ids():
    """-1 slots, repeated ids, future blocks and ids past the page table are all ignored like the reference."""
    c = case([100, 47], [20, 5], seed=11)
    rng = np.random.default_rng(0)
    ids = rng.integers(-1, 9, size=(2, 20, 2, 6)).astype(np.int32)      # M = 7: ids 7, 8 are out of range
    ids[..., 0] = ids[..., 1]                                            # duplicates
    check_sparse(c, jnp.asarray(ids), jnp.float32)


@pytest.mark.gpu_long
@settings(max_examples=4, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_ragged_batches(data):
    b = data.draw(st.integers(1, 3))
    kv = data.draw(st.lists(st.integers(1, 160), min_size=b, max_size=b))
    q = [data.draw(st.integers(1, min(n, 24))) for n in kv]
    dtype = data.draw(st.sampled_from(DTYPES))
    c = case(kv, q, dtype=dtype, seed=data.draw(st.integers(0, 10 ** 6)))
    sel = check_selection(c, topk=data.draw(st.integers(1, 6)))
    check_sparse(c, jnp.asarray(sel), dtype)


def test_odd_sizes_are_padded():
    """Pages of 8 rows, head dim 24, index dim 12, 3 KV heads of 2: padded to triton tiles, same results."""
    c = case([45, 9], [13, 2], block_size=8, heads=(6, 3), dims=(24, 12), seed=5)
    sel = check_selection(c, topk=3)
    check_sparse(c, jnp.asarray(sel), jnp.float32)
    check_dense(c, jnp.float32)


def test_refuses_unsupported_inputs():
    c = case([20], [2])
    with pytest.raises(NotImplementedError, match="local_blocks"):
        gpu.indexer_topk(c.iq_btki, c.ik_pages, c.page_table, c.q_pos, topk=2, local_blocks=3, interpret=INTERPRET)
    with pytest.raises(NotImplementedError, match="dtype"):
        gpu.dense_attention(c.q_btnh.astype(jnp.int32), c.k_pages.astype(jnp.int32), c.v_pages, c.page_table,
                            c.q_pos, interpret=INTERPRET)
    with pytest.raises(ValueError, match="block_ids"):
        gpu.sparse_attention(c.q_btnh, c.k_pages, c.v_pages, c.page_table, c.q_pos,
                             jnp.zeros((1, 2, 3, 4), jnp.int32), interpret=INTERPRET)


@pytest.mark.parametrize("dtype,tile", [(jnp.float32, True), (jnp.bfloat16, True), (jnp.bfloat16, False)],
                         ids=["f32-tile", "bf16-tile", "bf16-loop"])
def test_kv_major_schedule_matches_reference(dtype, tile):
    """The KV-block-major prefill schedule (chosen automatically for long chunks), forced on a small case."""
    from pallas_kernels.gpu.attention import sparse_attention_tuned
    c = case([150, 33, 64], [150, 20, 3], dtype=dtype, seed=21)
    sel = np.array(reference.indexer_topk(c.iq_btki, c.ik_pages, c.page_table, c.q_pos, topk=4))
    sel[0, 40, 1, 2] = -1                                                # an empty slot mid-list
    args = (c.q_btnh, c.k_pages, c.v_pages, c.page_table, c.q_pos, jnp.asarray(sel))
    got = sparse_attention_tuned(*args, scale=None, interpret=INTERPRET, num_warps=1, num_stages=2, chunk=32,
                                 schedule="kv", kv_major=dict(tokens_per_item=4, num_warps=4, num_stages=2, tile=tile))
    assert rel_l2(got, reference.sparse_attention(*args), c.valid) <= TOL[dtype]
    assert (np.asarray(jnp.asarray(got, jnp.float32))[~c.valid] == 0).all()


def test_pipeline_stages_fit_shared_memory():
    """float32 128 x 128 pages: two stages of K + V plus a 128-row query tile would need 327,680 bytes."""
    from pallas_kernels.gpu import _common as cm
    f32_page, bf16_page = 128 * 128 * 4, 128 * 128 * 2
    assert cm.pipeline_stages(2, per_stage=2 * f32_page, fixed=f32_page) == 1
    assert cm.pipeline_stages(2, per_stage=2 * bf16_page, fixed=bf16_page) == 2
    assert cm.pipeline_stages(3, per_stage=10**9, fixed=0) == 1


@pytest.mark.gpu_long
@pytest.mark.skipif(INTERPRET, reason="M3-sized pages: compiled on a GPU only (shared-memory budget)")
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_m3_page_size_fits_shared_memory(dtype):
    """Blocks of 128 keys at head_dim 128, as in M3: float32 tiles must fit Hopper's 227 KiB of shared memory."""
    from pallas_kernels.gpu.attention import sparse_attention_tuned
    c = case([700, 260], [300, 1], dtype=dtype, block_size=128, seed=5, heads=(4, 1), dims=(128, 128))
    check_dense(c, dtype)
    sel = check_selection(c, topk=4)
    check_sparse(c, jnp.asarray(sel), dtype)
    args = (c.q_btnh, c.k_pages, c.v_pages, c.page_table, c.q_pos, jnp.asarray(sel))
    got = sparse_attention_tuned(*args, scale=None, interpret=False, num_warps=4, num_stages=2, chunk=128,
                                 schedule="kv", kv_major=dict(tokens_per_item=4, num_warps=4, num_stages=2, tile=True))
    assert rel_l2(got, reference.sparse_attention(*args), c.valid) <= TOL[dtype]


def test_dense_contiguous_chunks_match_reference(short_chunk_rows):
    """Prefill chunks through cuDNN (the jnp stand-in in interpret mode) + paged history, merged by LSE: chunks
    with history, first chunks, a 1-row chunk, partial last pages, padding rows; NaN where the promise breaks."""
    for kv, ql, seed in (([150, 33, 64, 1], [37, 33, 3, 1], 31), ([40, 17], [40, 17], 32)):
        c = case(kv, ql, dtype=jnp.bfloat16, seed=seed, heads=(8, 2))
        args = (c.q_btnh, c.k_pages, c.v_pages, c.page_table, c.q_pos)
        got = dispatch.dense_attention(*args, impl=IMPL, contiguous_chunks=True)
        assert rel_l2(got, reference.dense_attention(*args), c.valid) <= TOL[jnp.bfloat16]
        assert (np.asarray(jnp.asarray(got, jnp.float32))[~c.valid] == 0).all()
    pos = np.array(c.q_pos)
    pos[0, [3, 4]] = pos[0, [4, 3]]                                     # request 0: rows out of order
    got = np.asarray(jnp.asarray(dispatch.dense_attention(*args[:4], jnp.asarray(pos), impl=IMPL,
                                                          contiguous_chunks=True), jnp.float32))
    assert np.isnan(got[0]).all() and not np.isnan(got[1]).any()


def test_sparse_attention_positions_beyond_2_pow_20():
    """int32 positions and block ids past 2^21 tokens: the same case shifted by OFFSET positions (a page table
    whose first OFFSET / R entries map to the NaN sink page 0) gives the same output, both schedules."""
    from pallas_kernels.gpu.attention import sparse_attention_tuned
    c = case([150, 40], [20, 1], seed=41, dtype=jnp.bfloat16)
    r = c.k_pages.shape[2]
    sel = np.array(reference.indexer_topk(c.iq_btki, c.ik_pages, c.page_table, c.q_pos, topk=4))
    sel[0, 5, 0, 1] = -1
    want = reference.sparse_attention(c.q_btnh, c.k_pages, c.v_pages, c.page_table, c.q_pos, jnp.asarray(sel))
    shift = (1 << 21) // r                                                  # blocks
    k_pages = c.k_pages.at[:, 0].set(jnp.nan)
    v_pages = c.v_pages.at[:, 0].set(jnp.nan)
    table = jnp.concatenate([jnp.zeros((2, shift), jnp.int32), c.page_table], axis=1)
    pos = jnp.where(c.q_pos >= 0, c.q_pos + shift * r, -1)
    ids = jnp.asarray(np.where(sel >= 0, sel + shift, -1))
    for schedule in ("query", "kv"):
        got = sparse_attention_tuned(c.q_btnh, k_pages, v_pages, table, pos, ids, scale=None, interpret=INTERPRET,
                                     num_warps=1, num_stages=2, chunk=32, schedule=schedule,
                                     kv_major=dict(tokens_per_item=4, num_warps=4, num_stages=2, tile=True))
        assert rel_l2(got, want, c.valid) <= TOL[jnp.bfloat16], schedule


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_indexer_fp8_index_k_matches_reference(dtype):
    """FP8 index-K cache (e4m3 codes + a float32 scale per token): decode rows, a prefill chunk, fewer visible
    blocks than top-k, partial last pages; the kernel against the reference on the same codes and scales."""
    c = case([150, 40, 77, 9], [20, 1, 1, 1], seed=51, dtype=dtype)
    codes, scale = layout.quantize_index_k(c.ik_pages)
    assert codes.dtype == jnp.float8_e4m3fn and scale.shape == c.ik_pages.shape[:2]
    check_selection(c, topk=6, ik_pages=codes, ik_scale=scale)
    with pytest.raises(ValueError, match="ik_scale"):
        gpu.indexer_topk(c.iq_btki, codes, c.page_table, c.q_pos, topk=2, interpret=INTERPRET)


def test_quantize_index_k_round_trip():
    x = jax.random.normal(jax.random.key(0), (5, 16, 128), jnp.float32) * jnp.arange(1, 6)[:, None, None]
    codes, scale = layout.quantize_index_k(x)
    back = reference.index_keys(codes, scale)
    err = jnp.abs(back - x) / jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    assert float(jnp.max(err)) <= 2 ** -4            # e4m3: 3 mantissa bits, half an ulp at the top binade
    assert (jnp.max(jnp.abs(codes.astype(jnp.float32)), axis=-1) == layout.E4M3_MAX).all()


@pytest.mark.skipif(INTERPRET, reason="cuDNN: compiled on a GPU only")
def test_cudnn_chunk_attention_and_lse():
    """The cuDNN call behind dense_attention(contiguous_chunks=True): output and natural-log log-sum-exp equal
    the float32 stand-in on the first n_valid rows (GQA 16:1, ragged n_valid)."""
    from pallas_kernels.gpu._compat import cudnn_attention_with_lse
    from pallas_kernels.gpu.attention import _chunk_attention_jnp
    ks = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(ks[0], (2, 256, 32, 128), jnp.bfloat16)
    k = jax.random.normal(ks[1], (2, 256, 2, 128), jnp.bfloat16)
    v = jax.random.normal(ks[2], (2, 256, 2, 128), jnp.bfloat16)
    n_valid = jnp.array([256, 77], jnp.int32)
    o, lse = cudnn_attention_with_lse(q, k, v, n_valid, scale=0.088)
    o_ref, lse_ref = _chunk_attention_jnp(q, k, v, n_valid, 0.088)
    rows = np.arange(256)[None, :] < np.asarray(n_valid)[:, None]
    assert rel_l2(o, o_ref, rows) <= 1e-2
    err = np.abs(np.asarray(lse) - np.asarray(lse_ref))[rows]
    assert err.max() <= 1e-2, (err.max(), np.asarray(lse)[0, :2, :2], np.asarray(lse_ref)[0, :2, :2])


def test_indexer_positions_beyond_2_pow_20():
    """Decode rows at positions past 2^20: the page table's first SHIFT blocks map to the sink page (index keys 0,
    score 0); queries and keys are made positive so every real block outranks the sink. Same selection as the
    unshifted case, shifted by SHIFT blocks (sink blocks fill the slots the short request has no block for)."""
    c = case([150, 40], [1, 1], seed=71)
    iq, ik = jnp.abs(c.iq_btki), jnp.abs(c.ik_pages)
    want = np.asarray(reference.indexer_topk(iq, ik, c.page_table, c.q_pos, topk=4))
    r = ik.shape[1]
    shift = (1 << 20) // r + 3
    table = jnp.concatenate([jnp.zeros((2, shift), jnp.int32), c.page_table], axis=1)
    pos = jnp.where(c.q_pos >= 0, c.q_pos + shift * r, -1)
    got = np.asarray(dispatch.indexer_topk(iq, ik.at[0].set(0.0), table, pos, topk=4, impl=IMPL))
    want = np.where(want >= 0, want + shift, 0)                           # request 1 has 3 blocks: + sink block 0
    np.testing.assert_array_equal(np.sort(got, -1), np.sort(want, -1))


def test_dense_attention_positions_beyond_2_pow_20():
    """Decode rows and a chunk at positions past 2^20: the first SHIFT blocks map to the sink page with K = V = 0,
    i.e. SHIFT * R extra keys of logit 0 and value 0, so out = out_unshifted * Z / (Z + SHIFT * R), Z = the sum
    of exp(logits) over the real keys (computed here in float64)."""
    c = case([150, 40], [3, 1], seed=72)
    args = (c.q_btnh, c.k_pages, c.v_pages, c.page_table, c.q_pos)
    base = np.asarray(reference.dense_attention(*args), np.float64)
    r, kh = c.k_pages.shape[2], c.k_pages.shape[0]
    k_seq = np.asarray(reference.gather_sequence(c.k_pages, c.page_table), np.float64)   # [B, K, S, H]
    q = np.asarray(c.q_btnh, np.float64)
    b, t, n, h = q.shape
    logits = np.einsum("btkgh,bksh->btkgs", q.reshape(b, t, kh, n // kh, h), np.nan_to_num(k_seq)) * h ** -0.5
    vis = np.arange(k_seq.shape[2])[None, None, :] <= np.asarray(c.q_pos)[:, :, None]
    z = np.where(vis[:, :, None, None, :], np.exp(logits), 0.0).sum(-1).reshape(b, t, n)
    shift = (1 << 20) // r + 3
    want = base * (z / (z + shift * r))[..., None]
    table = jnp.concatenate([jnp.zeros((b, shift), jnp.int32), c.page_table], axis=1)
    pos = jnp.where(c.q_pos >= 0, c.q_pos + shift * r, -1)
    got = dispatch.dense_attention(c.q_btnh, c.k_pages.at[:, 0].set(0.0), c.v_pages.at[:, 0].set(0.0), table, pos,
                                   impl=IMPL)
    assert rel_l2(got, want, c.valid) <= 1e-4


def check_msa(c, dtype, topk, schedule, local_blocks=1, ik_pages=None, ik_scale=None):
    """gpu.msa_tuned(schedule=...) against reference.msa: the selection (assert_same_selection), and the output
    within the dtype's tolerance of exact attention over the kernel's selection."""
    from pallas_kernels.gpu.msa import msa_tuned
    ik_pages = c.ik_pages if ik_pages is None else ik_pages
    args = (c.q_btnh, c.k_pages, c.v_pages, c.page_table, c.q_pos, c.iq_btki, ik_pages)
    kw = dict(topk=topk, local_blocks=local_blocks, ik_scale=ik_scale)
    o, ids = msa_tuned(*args, **kw, scale=None, interpret=INTERPRET, schedule=schedule)
    assert o.shape == c.q_btnh.shape
    assert_same_selection(c, ids, reference.msa(*args, **kw)[1], topk, local_blocks, ik_pages, ik_scale)
    # the output: exact attention over the kernel's own selection (equal to the reference's on tie-free rows)
    want_o = reference.sparse_attention(*args[:5], ids)
    assert rel_l2(o, want_o, c.valid) <= TOL[dtype]
    assert (np.asarray(jnp.asarray(o, jnp.float32))[~c.valid] == 0).all()


@pytest.mark.parametrize("kv_lens,q_lens,topk,local_blocks,dtype", [
    ([150, 40, 77, 9], [1, 1, 1, 1], 4, 1, jnp.float32),     # decode rows; request 3 sees 1 block (< topk)
    ([150, 40, 77, 9], [1, 1, 1, 1], 4, 1, jnp.bfloat16),
    ([300, 33], [1, 1], 8, 2, jnp.float32),                  # candidates of several splits; two forced blocks
    ([90, 45], [12, 5], 3, 1, jnp.bfloat16),                 # a short chunk (verification-sized), padding rows
], ids=["decode-f32", "decode-bf16", "splits-local2", "chunk-bf16"])
def test_msa_fused_topk_matches_reference(kv_lens, q_lens, topk, local_blocks, dtype):
    """The fused-topk schedule (the attention kernel merges the indexer's split candidates itself) gives the
    reference's selection and attention; pages shuffled over the pool, unused slots NaN."""
    c = case(kv_lens, q_lens, dtype=dtype, seed=sum(kv_lens) + topk)
    check_msa(c, dtype, topk, "fused-topk", local_blocks)


def test_msa_two_step_and_fp8_index_k():
    """The two-step schedule (the default) and the fused one with an FP8 index-K cache (e4m3 codes + a float32
    scale per token) both match reference.msa on the same codes and scales."""
    c = case([150, 40, 77, 9], [1, 1, 1, 1], dtype=jnp.bfloat16, seed=61)
    check_msa(c, jnp.bfloat16, 4, "two-step")
    codes, scale = layout.quantize_index_k(c.ik_pages)
    check_msa(c, jnp.bfloat16, 4, "fused-topk", ik_pages=codes, ik_scale=scale)


def test_msa_fused_topk_positions_beyond_2_pow_20():
    """Decode rows past 2^20: the first SHIFT blocks map to the sink page (index keys 0: score 0 below the
    positive real scores; K = V = NaN, never attended). Same selection and output as the unshifted case."""
    from pallas_kernels.gpu.msa import msa_tuned
    c = case([150, 40], [1, 1], seed=73)
    iq, ik = jnp.abs(c.iq_btki), jnp.abs(c.ik_pages)
    args = (c.q_btnh, c.k_pages, c.v_pages, c.page_table, c.q_pos, iq, ik)
    want_o, want_ids = reference.msa(*args, topk=3)
    r = ik.shape[1]
    shift = (1 << 20) // r + 3
    table = jnp.concatenate([jnp.zeros((2, shift), jnp.int32), c.page_table], axis=1)
    pos = jnp.where(c.q_pos >= 0, c.q_pos + shift * r, -1)
    o, ids = msa_tuned(c.q_btnh, c.k_pages.at[:, 0].set(jnp.nan), c.v_pages.at[:, 0].set(jnp.nan), table, pos, iq,
                       ik.at[0].set(0.0), topk=3, interpret=INTERPRET, schedule="fused-topk")
    want = np.where(np.asarray(want_ids) >= 0, np.asarray(want_ids) + shift, -1)
    np.testing.assert_array_equal(np.sort(np.asarray(ids), -1), np.sort(want, -1))
    assert rel_l2(o, want_o, c.valid) <= TOL[jnp.float32]


def test_select_candidates_takes_the_best_distinct_blocks():
    """The in-register merge: best first over every split (forced +inf first), padding columns (>= topk, +inf)
    and empty (-inf) candidates never taken, -1 past the valid picks, and their count."""
    from pallas_kernels.gpu.attention import select_candidates
    inf = jnp.inf
    vals = jnp.asarray([[5.0, -inf, inf, inf], [inf, 2.0, inf, inf], [3.0, 7.0, inf, inf], [-inf, -inf, inf, inf]],
                       jnp.float32)
    ids = jnp.asarray([[10, -1, -1, -1], [4, 11, -1, -1], [12, 13, -1, -1], [-1, -1, -1, -1]], jnp.int32)
    pick = jax.jit(select_candidates, static_argnums=(2, 3))
    sel, n = pick(vals, ids, 2, 4)                                     # top-2 of the candidates 5, inf, 2, 3, 7
    assert int(n) == 2 and np.asarray(sel).tolist() == [4, 13, -1, -1]
    vals = jnp.asarray([[-inf, -inf, inf, inf], [3.0, -inf, inf, inf]], jnp.float32)
    ids = jnp.asarray([[-1, -1, -1, -1], [9, -1, -1, -1]], jnp.int32)
    sel, n = pick(vals, ids, 2, 2)                                     # one candidate for two slots
    assert int(n) == 1 and np.asarray(sel).tolist() == [9, -1]
