"""TPU (Mosaic) MSA kernels against the float32 references: in the TPU interpreter (`pltpu.InterpretParams()`)
on CPU/GPU hosts, compiled on a TPU host.

Shapes: the TPU kernels need H and I multiples of 128 (lane width) and R a multiple of the sublane tile
(16 covers f32 and bf16), so every case uses H = I = 128, R = 16 and short contexts to keep the interpreter
fast. Unused pages and page tails hold NaN (tests/kernels/cases.py): any stray read fails the NaN check.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dispatch, reference, tpu
from tests.kernels.cases import random_paged_case

R, H, I = 16, 128, 128
# On a TPU the same suite runs the compiled kernels; anywhere else, the TPU interpreter.
INTERPRET = jax.default_backend() != "tpu"
IMPL = "tpu-interpret" if INTERPRET else "tpu"
REL_L2 = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}

# (kv_lens, q_lens): ragged batches mixing prefill chunks and decode rows; contexts not multiple of R,
# exact multiples, single tokens, fewer visible blocks than topk, padding rows (q_len < max q_len).
CASES = {
    "decode_ragged": ([37, 5, 64, 100], [1, 1, 1, 1]),
    "prefill_one": ([45], [45]),
    "mixed_chunks": ([70, 16, 9], [7, 16, 1]),
    "short_and_long": ([1, 83], [1, 20]),
}


def _case(name, dtype, **kw):
    kv, ql = CASES[name]
    seed = sum(kv) + 7 * sum(ql)
    return random_paged_case(kv, ql, num_heads=kw.pop("num_heads", 4), num_kv_heads=2, head_dim=H,
                             index_dim=I, block_size=R, dtype=dtype, seed=seed, **kw)


def _rel_l2(got, want):
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def _check_output(got, want, case, dtype):
    got = np.asarray(got, np.float32)
    want = np.asarray(want, np.float32)
    assert not np.isnan(got).any(), "NaN in kernel output"
    valid = case.valid
    assert _rel_l2(got[valid], want[valid]) <= REL_L2[dtype]
    if dtype == jnp.float32:
        np.testing.assert_allclose(got[valid], want[valid], rtol=1e-5, atol=1e-5)
    assert np.all(got[~valid] == 0), "padding rows must be 0"


def _as_sets(ids):
    """Selections per (b, t, k) as sorted rows (-1 last): the order of equal-rank entries is not semantic."""
    a = np.asarray(ids)
    return np.sort(np.where(a < 0, np.iinfo(np.int32).max, a), axis=-1)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name,topk,local", [("decode_ragged", 3, 1), ("prefill_one", 2, 1),
                                             ("mixed_chunks", 4, 2), ("short_and_long", 8, 1)])
def test_indexer_topk_matches_reference(name, topk, local, dtype):
    c = _case(name, dtype)
    got = tpu.indexer_topk(c.iq_btki, c.ik_pages, c.page_table, c.q_pos, topk=topk, local_blocks=local,
                           interpret=INTERPRET)
    want = reference.indexer_topk(c.iq_btki, c.ik_pages, c.page_table, c.q_pos, topk=topk, local_blocks=local)
    assert got.shape == want.shape and got.dtype == jnp.int32
    np.testing.assert_array_equal(_as_sets(got), _as_sets(want))
    # Forced blocks come first and -1 only pads the right end, as in the reference.
    np.testing.assert_array_equal(np.asarray(got)[..., 0], np.asarray(want)[..., 0])
    assert np.all(np.asarray(got)[~c.valid] == -1)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_indexer_fp8_index_k_matches_reference(dtype):
    """FP8 index-K (e4m3 codes, f32 scale per token; R = 32, the e4m3 sublane tile): the same selections as the
    reference on the same codes and scales; ragged decode rows, a chunk, fewer visible blocks than topk."""
    from pallas_kernels import layout
    c = random_paged_case([70, 33, 200, 5], [7, 1, 1, 1], num_heads=4, num_kv_heads=2, head_dim=H, index_dim=I,
                          block_size=32, dtype=dtype, seed=61)
    codes, scale = layout.quantize_index_k(c.ik_pages)
    got = tpu.indexer_topk(c.iq_btki, codes, c.page_table, c.q_pos, topk=4, ik_scale=scale, interpret=INTERPRET)
    want = reference.indexer_topk(c.iq_btki, codes, c.page_table, c.q_pos, topk=4, ik_scale=scale)
    np.testing.assert_array_equal(_as_sets(got), _as_sets(want))
    assert np.all(np.asarray(got)[~c.valid] == -1)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name,topk", [("decode_ragged", 3), ("prefill_one", 2), ("mixed_chunks", 4),
                                       ("short_and_long", 8)])
def test_sparse_attention_matches_reference(name, topk, dtype):
    c = _case(name, dtype, num_heads=8 if name == "mixed_chunks" else 4)
    ids = reference.indexer_topk(c.iq_btki, c.ik_pages, c.page_table, c.q_pos, topk=topk)
    got = tpu.sparse_attention(c.q_btnh, c.k_pages, c.v_pages, c.page_table, c.q_pos, ids, interpret=INTERPRET)
    want = reference.sparse_attention(c.q_btnh, c.k_pages, c.v_pages, c.page_table, c.q_pos, ids)
    assert got.shape == want.shape
    _check_output(got, want, c, dtype)


def test_sparse_attention_empty_slots_and_unordered_ids():
    """-1 anywhere in a row, ids in any order, duplicates, ids past the row's block (never visible)."""
    c = _case("mixed_chunks", jnp.float32)
    rng = np.random.default_rng(3)
    ids = np.asarray(reference.indexer_topk(c.iq_btki, c.ik_pages, c.page_table, c.q_pos, topk=4))
    ids = rng.permuted(ids, axis=-1)
    ids[rng.random(ids.shape) < 0.3] = -1
    ids[0, 0, 0, :2] = ids[0, 0, 0, 2]                  # duplicate entry
    ids[0, 1, 1, 0] = c.page_table.shape[1] - 1         # a future block: masked by causality
    ids = jnp.asarray(ids)
    got = tpu.sparse_attention(c.q_btnh, c.k_pages, c.v_pages, c.page_table, c.q_pos, ids, interpret=INTERPRET)
    want = reference.sparse_attention(c.q_btnh, c.k_pages, c.v_pages, c.page_table, c.q_pos, ids)
    _check_output(got, want, c, jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", ["decode_ragged", "mixed_chunks"])
def test_dense_attention_matches_reference(name, dtype):
    c = _case(name, dtype)
    got = tpu.dense_attention(c.q_btnh, c.k_pages, c.v_pages, c.page_table, c.q_pos, interpret=INTERPRET)
    want = reference.dense_attention(c.q_btnh, c.k_pages, c.v_pages, c.page_table, c.q_pos)
    _check_output(got, want, c, dtype)


def test_dispatch_tpu_interpret_under_jit_with_scale():
    c = _case("short_and_long", jnp.bfloat16)

    @jax.jit
    def step(c_q, c_iq, k, v, ik, table, pos):
        ids = dispatch.indexer_topk(c_iq, ik, table, pos, topk=3, impl=IMPL)
        return ids, dispatch.sparse_attention(c_q, k, v, table, pos, ids, scale=0.05, impl=IMPL)

    ids, got = step(c.q_btnh, c.iq_btki, c.k_pages, c.v_pages, c.ik_pages, c.page_table, c.q_pos)
    want_ids = reference.indexer_topk(c.iq_btki, c.ik_pages, c.page_table, c.q_pos, topk=3)
    np.testing.assert_array_equal(_as_sets(ids), _as_sets(want_ids))
    want = reference.sparse_attention(c.q_btnh, c.k_pages, c.v_pages, c.page_table, c.q_pos, ids, scale=0.05)
    _check_output(got, want, c, jnp.bfloat16)


def test_unsupported_shapes_raise_not_implemented():
    small = random_paged_case([20], [2], head_dim=32, index_dim=32, block_size=16)
    with pytest.raises(NotImplementedError, match="H=32|head_dim H=32"):
        tpu.dense_attention(small.q_btnh, small.k_pages, small.v_pages, small.page_table, small.q_pos)
    with pytest.raises(NotImplementedError, match="index_dim I=32"):
        tpu.indexer_topk(small.iq_btki, small.ik_pages, small.page_table, small.q_pos, topk=2)
    bf8 = random_paged_case([20], [2], head_dim=H, index_dim=I, block_size=8, dtype=jnp.bfloat16)
    with pytest.raises(NotImplementedError, match="R=8"):
        tpu.sparse_attention(bf8.q_btnh, bf8.k_pages, bf8.v_pages, bf8.page_table, bf8.q_pos,
                             jnp.zeros((1, 2, 2, 2), jnp.int32))
    with pytest.raises(dispatch.NoImplementationError):
        dispatch.dense_attention(small.q_btnh, small.k_pages, small.v_pages, small.page_table, small.q_pos,
                                 impl=IMPL)


def test_bad_arguments_raise_value_error():
    c = _case("short_and_long", jnp.float32)
    with pytest.raises(ValueError, match="block_ids"):
        tpu.sparse_attention(c.q_btnh, c.k_pages, c.v_pages, c.page_table, c.q_pos,
                             jnp.zeros((2, 20, 3, 4), jnp.int32))
    with pytest.raises(ValueError, match="q_pos"):
        tpu.dense_attention(c.q_btnh, c.k_pages, c.v_pages, c.page_table, c.q_pos[:, :3])
    with pytest.raises(ValueError, match="topk"):
        tpu.indexer_topk(c.iq_btki, c.ik_pages, c.page_table, c.q_pos, topk=0)


@pytest.mark.parametrize("name", ["prefill_one", "mixed_chunks"])
def test_many_query_tiles(name, monkeypatch):
    """Small row tiles: many programs per request, each with its own page union and page count."""
    from pallas_kernels.tpu import tiling
    monkeypatch.setattr(tiling, "ATTENTION_TARGET_ROWS", 8)
    monkeypatch.setattr(tiling, "INDEXER_TARGET_ROWS", 8)
    c = _case(name, jnp.float32)
    ids = tpu.indexer_topk(c.iq_btki, c.ik_pages, c.page_table, c.q_pos, topk=2, interpret=INTERPRET)
    want_ids = reference.indexer_topk(c.iq_btki, c.ik_pages, c.page_table, c.q_pos, topk=2)
    np.testing.assert_array_equal(_as_sets(ids), _as_sets(want_ids))
    got = tpu.sparse_attention(c.q_btnh, c.k_pages, c.v_pages, c.page_table, c.q_pos, want_ids, interpret=INTERPRET)
    _check_output(got, reference.sparse_attention(c.q_btnh, c.k_pages, c.v_pages, c.page_table, c.q_pos,
                                                  want_ids), c, jnp.float32)
    got = tpu.dense_attention(c.q_btnh, c.k_pages, c.v_pages, c.page_table, c.q_pos, interpret=INTERPRET)
    _check_output(got, reference.dense_attention(c.q_btnh, c.k_pages, c.v_pages, c.page_table, c.q_pos),
                  c, jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_kernels_lower_to_mosaic_at_m3_shapes(dtype):
    """Pallas -> Mosaic lowering for a TPU target, from this CPU host, at M3's shapes (R = H = I = 128,
    G = 16, top-16). This is the lowering only (Mosaic's own layout passes and codegen run in libtpu,
    which needs a TPU); it catches ops that Mosaic has no rule for."""
    from jax import export
    b, t, n, k, m, c, p = 2, 8, 64, 4, 16, 16, 40
    sds = jax.ShapeDtypeStruct
    q, kv = sds((b, t, n, 128), dtype), sds((k, p, 128, 128), dtype)
    iq, ik = sds((b, t, k, 128), dtype), sds((p, 128, 128), dtype)
    table, pos, ids = sds((b, m), jnp.int32), sds((b, t), jnp.int32), sds((b, t, k, c), jnp.int32)
    for fn, args in ((lambda *a: tpu.indexer_topk(*a, topk=c), (iq, ik, table, pos)),
                     (tpu.sparse_attention, (q, kv, kv, table, pos, ids)),
                     (tpu.dense_attention, (q, kv, kv, table, pos))):
        text = export.export(jax.jit(fn), platforms=["tpu"])(*args).mlir_module()
        assert "tpu_custom_call" in text


def test_mixed_dtypes_compute_in_the_wider_one():
    """f32 queries over a bf16 cache (and f32 iq over bf16 index-K): computed in f32, output in q's dtype."""
    c = _case("decode_ragged", jnp.bfloat16)
    q, iq = c.q_btnh.astype(jnp.float32), c.iq_btki.astype(jnp.float32)
    ids = tpu.indexer_topk(iq, c.ik_pages, c.page_table, c.q_pos, topk=3, interpret=INTERPRET)
    np.testing.assert_array_equal(
        _as_sets(ids), _as_sets(reference.indexer_topk(iq, c.ik_pages, c.page_table, c.q_pos, topk=3)))
    got = tpu.sparse_attention(q, c.k_pages, c.v_pages, c.page_table, c.q_pos, ids, interpret=INTERPRET)
    assert got.dtype == jnp.float32
    _check_output(got, reference.sparse_attention(q, c.k_pages, c.v_pages, c.page_table, c.q_pos, ids), c,
                  jnp.float32)


@pytest.mark.parametrize("slots", [2, 3])
def test_page_stream_depths(slots, monkeypatch):
    """The page stream with 2 (double buffer) and 3 buffers (the default is 4) gives the same results."""
    from pallas_kernels.tpu import tiling
    monkeypatch.setattr(tiling, "PAGE_DMA_SLOTS", slots)
    c = _case("short_and_long", jnp.float32)
    ids = tpu.indexer_topk(c.iq_btki, c.ik_pages, c.page_table, c.q_pos, topk=3, interpret=INTERPRET)
    want_ids = reference.indexer_topk(c.iq_btki, c.ik_pages, c.page_table, c.q_pos, topk=3)
    np.testing.assert_array_equal(_as_sets(ids), _as_sets(want_ids))
    got = tpu.dense_attention(c.q_btnh, c.k_pages, c.v_pages, c.page_table, c.q_pos, interpret=INTERPRET)
    _check_output(got, reference.dense_attention(c.q_btnh, c.k_pages, c.v_pages, c.page_table, c.q_pos),
                  c, jnp.float32)


def test_sparse_attention_positions_beyond_2_pow_20():
    """int32 positions and block ids past 2^21 tokens: the case shifted by SHIFT blocks (page table entries below
    SHIFT map to the NaN sink page 0, never selected) gives the unshifted reference's output."""
    c = _case("mixed_chunks", jnp.bfloat16, num_heads=4)
    ids = np.asarray(reference.indexer_topk(c.iq_btki, c.ik_pages, c.page_table, c.q_pos, topk=3))
    want = reference.sparse_attention(c.q_btnh, c.k_pages, c.v_pages, c.page_table, c.q_pos, jnp.asarray(ids))
    shift = (1 << 21) // R
    b = c.page_table.shape[0]
    table = jnp.concatenate([jnp.zeros((b, shift), jnp.int32), c.page_table], axis=1)
    pos = jnp.where(c.q_pos >= 0, c.q_pos + shift * R, -1)
    got = tpu.sparse_attention(c.q_btnh, c.k_pages.at[:, 0].set(jnp.nan), c.v_pages.at[:, 0].set(jnp.nan), table,
                               pos, jnp.asarray(np.where(ids >= 0, ids + shift, -1)), interpret=INTERPRET)
    _check_output(got, want, c, jnp.bfloat16)
