"""Paged cache: the page allocator's accounting (refcounted sharing included), cache layout, and the cached forward
against the no-cache one (chunked prefill with several chunk sizes and both layer loops == one-shot prefill ==
model(input_ids), ragged rows in one group, padding writes confined to the sink page)."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m3jax import cache as cache_lib
from m3jax.cache import OutOfPages
from m3jax.config import M3Config
from m3jax.model.cached import StepGroup, forward_cached
from m3jax.scheduler import PageAllocator
from m3jax.testing import random_model

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
R = 8             # tiny config page size (= MSA block)
M = 8             # page-table width: 64 tokens
NUM_PAGES = 24


@pytest.fixture(scope="module")
def model():
    return random_model(M3Config.tiny(), seed=0)


def test_allocator_alloc_free_and_out_of_pages():
    a = PageAllocator(6)                          # pages 1..5; 0 is the sink
    assert a.capacity == 5 and a.num_free == 5
    got = a.allocate("x", 2)
    assert got == [1, 2] and a.pages("x") == [1, 2]
    assert a.ensure("y", 17, R) == [3, 4, 5]      # 17 tokens -> 3 pages
    assert a.ensure("y", 24, R) == []             # already enough
    with pytest.raises(OutOfPages):
        a.allocate("z", 1)
    assert a.num_free == 0 and a.pages("z") == []  # a failed allocation changes nothing
    a.check()
    assert a.release("x") == 2 and a.num_free == 2
    with pytest.raises(KeyError):
        a.release("x")                            # double free is an error, not a silent corruption
    assert sorted(a.allocate("z", 2)) == [1, 2]
    a.release("y"), a.release("z")
    a.check()
    assert a.num_free == a.capacity and cache_lib.SINK_PAGE not in a._free
    with pytest.raises(ValueError):
        PageAllocator(1)


def test_allocator_shared_pages_are_freed_by_their_last_owner():
    """The prefix-cache seam: a page shared by two owners returns to the pool only when both released it."""
    a = PageAllocator(6)
    prefix = a.allocate("first", 2)
    a.share("second", prefix)
    a.allocate("second", 1)
    assert a.pages("second") == prefix + [3] and [a.refcount(p) for p in prefix] == [2, 2]
    a.check()
    assert a.release("first") == 2 and a.num_free == 2          # still held by "second"
    assert [a.refcount(p) for p in prefix] == [1, 1]
    a.check()
    assert a.release("second") == 3 and a.num_free == a.capacity
    a.check()
    with pytest.raises(ValueError, match="not held"):
        a.share("third", [1])                                   # only held pages can be shared


def test_cache_layout_and_memory_sizing(model):
    cfg = model.config
    c = cache_lib.init_cache(model, NUM_PAGES)
    kinds = [s.ik_pages is not None for s in c.stacks]
    assert kinds == [False, True]                 # dense stack (1 layer), MSA stack (2 layers)
    assert c.stacks[1].k_pages.shape == (cfg.num_key_value_heads, 2 * NUM_PAGES, R, cfg.head_dim)
    assert c.stacks[1].ik_pages.shape == (2 * NUM_PAGES, R, cfg.msa.index_dim)
    assert c.layer_k(2).shape == (cfg.num_key_value_heads, NUM_PAGES, R, cfg.head_dim)
    per_page = cache_lib.bytes_per_page(cfg, jnp.float32)
    assert per_page == 4 * (2 * 2 * R * 16 * 3 + 2 * R * 16)
    # CPU reports no memory statistics: the requested maximum is used.
    assert cache_lib.num_pages_for_memory(cfg, jnp.float32, max_pages=77) == 77
    # On a mesh a device holds half the KV heads (model=2) of its data shard's pool; index-K is whole.
    assert cache_lib.bytes_per_page(cfg, jnp.float32, data=4, model=2) == 4 * (2 * 1 * R * 16 * 3 + 2 * R * 16)


class _FakeDevice:
    def __init__(self, limit, used):
        self.stats = dict(bytes_limit=limit, bytes_in_use=used)

    def memory_stats(self):
        return self.stats


def test_num_pages_for_memory_uses_the_device_share(model):
    cfg = model.config
    per_page = cache_lib.bytes_per_page(cfg, jnp.bfloat16)
    dev = _FakeDevice(limit=1000 * per_page + 123, used=200 * per_page)
    assert cache_lib.num_pages_for_memory(cfg, jnp.bfloat16, max_pages=10**6, device=dev) == 400
    assert cache_lib.num_pages_for_memory(cfg, jnp.bfloat16, max_pages=99, device=dev) == 99

    class Mesh:                          # the least free device of the mesh sets the size
        shape = {"data": 2, "model": 2}
        devices = np.array([dev, _FakeDevice(limit=1000 * per_page, used=600 * per_page)])
    share = cache_lib.bytes_per_page(cfg, jnp.bfloat16, data=2, model=2)
    assert share < per_page
    assert cache_lib.num_pages_for_memory(cfg, jnp.bfloat16, max_pages=10**6, mesh=Mesh) == 200 * per_page // share
    with pytest.raises(cache_lib.OutOfPages, match="at least 2"):
        cache_lib.num_pages_for_memory(cfg, jnp.bfloat16, max_pages=10, device=_FakeDevice(per_page, 0))


@functools.partial(jax.jit, static_argnums=0)
def _jit_step(graphdef, state, cache, groups):
    return forward_cached(nnx.merge(graphdef, state), cache, groups)


def _step(model, cache, groups):
    graphdef, state = nnx.split(model)
    return _jit_step(graphdef, state, cache, groups)


def _prefill(model, ids_list, chunk, fp8_index_k=False):
    """All logits of each row when its prompt is fed in chunks of `chunk` tokens, rows side by side."""
    alloc = PageAllocator(NUM_PAGES)
    table = np.zeros((len(ids_list), M), np.int32)
    for b, ids in enumerate(ids_list):
        pages = alloc.ensure(b, len(ids), R)
        table[b, :len(pages)] = pages
    cache = cache_lib.init_cache(model, NUM_PAGES, fp8_index_k=fp8_index_k)
    longest = max(len(x) for x in ids_list)
    out = [[] for _ in ids_list]
    for s in range(0, longest, chunk):
        tokens = np.zeros((len(ids_list), chunk), np.int32)
        q_pos = np.full((len(ids_list), chunk), -1, np.int32)
        for b, ids in enumerate(ids_list):
            piece = ids[s:s + chunk]
            tokens[b, :len(piece)] = piece
            q_pos[b, :len(piece)] = np.arange(s, s + len(piece))
        (logits,), cache = _step(model, cache, (StepGroup(tokens, q_pos, table),))
        logits = np.asarray(logits)
        for b, ids in enumerate(ids_list):
            n = max(0, min(chunk, len(ids) - s))
            out[b].append(logits[b, :n])
    return [np.concatenate(o) for o in out], cache, alloc


def test_chunked_prefill_matches_one_shot_and_no_cache(model):
    rs = np.random.RandomState(0)
    ids = [rs.randint(0, 256, 45).tolist(), rs.randint(0, 256, 19).tolist()]   # 6 and 3 blocks, top-3: sparse
    fwd = jax.jit(lambda x: model(x))
    want = [np.asarray(fwd(jnp.asarray([x], jnp.int32)))[0] for x in ids]
    for chunk in (48, 16, 5):
        got, _, _ = _prefill(model, ids, chunk)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5, err_msg=f"chunk={chunk}")


def test_padding_writes_only_touch_the_sink(model):
    rs = np.random.RandomState(1)
    ids = [rs.randint(0, 256, 13).tolist(), rs.randint(0, 256, 3).tolist()]
    _, cache, alloc = _prefill(model, ids, 16)
    owned = set(alloc.pages(0)) | set(alloc.pages(1))
    for layer in range(3):
        k = np.asarray(cache.layer_k(layer))                  # [K, P, R, H]
        touched = {p for p in range(NUM_PAGES) if np.any(k[:, p] != 0)}
        assert touched <= owned | {cache_lib.SINK_PAGE}, (layer, touched, owned)
        # Rows past each request's last token stay unwritten.
        assert np.all(k[:, alloc.pages(1)[0], 3:] == 0)


def test_fp8_index_k_cache_layout_and_page_bytes(model):
    """fp8_index_k: index-K pools float8_e4m3fn [L*P, R, I] beside float32 scale pools [L*P, R] (MSA stacks only);
    a page costs 1 byte per index element + 4 per token there, and the memory sizing uses that."""
    cfg = model.config
    c = cache_lib.init_cache(model, NUM_PAGES, fp8_index_k=True)
    assert c.fp8_index_k and not cache_lib.init_cache(model, NUM_PAGES).fp8_index_k
    dense, msa = c.stacks
    assert dense.ik_pages is None and dense.ik_scale is None
    assert msa.ik_pages.dtype == jnp.float8_e4m3fn and msa.ik_pages.shape == (2 * NUM_PAGES, R, cfg.msa.index_dim)
    assert msa.ik_scale.dtype == jnp.float32 and msa.ik_scale.shape == (2 * NUM_PAGES, R)
    assert msa.k_pages.dtype == model.dtype
    kv = 2 * 2 * R * 16 * 3                              # K and V: 2 heads x R x 16, 3 layers
    assert cache_lib.bytes_per_page(cfg, jnp.bfloat16) == 2 * kv + 2 * (2 * R * 16)
    assert cache_lib.bytes_per_page(cfg, jnp.bfloat16, fp8_index_k=True) == 2 * kv + 2 * (R * 16 + 4 * R)
    per_page = cache_lib.bytes_per_page(cfg, jnp.bfloat16, fp8_index_k=True)
    dev = _FakeDevice(limit=1000 * per_page, used=0)
    assert cache_lib.num_pages_for_memory(cfg, jnp.bfloat16, max_pages=10**6, device=dev, fp8_index_k=True) == 500


def test_fp8_index_k_cache_holds_the_quantised_keys(model):
    """The cached forward writes e4m3 codes and a scale per token: for the first MSA layer (whose inputs do not
    depend on the index-K format) codes * scale are the float32 cache's index keys to e4m3 precision (half an
    ulp of the token's largest element), rows never written stay 0, and K/V pages are unchanged."""
    rs = np.random.RandomState(2)
    ids = [rs.randint(0, 256, 29).tolist(), rs.randint(0, 256, 12).tolist()]
    _, cache, _ = _prefill(model, ids, 16)
    _, cache8, _ = _prefill(model, ids, 16, fp8_index_k=True)
    want = np.asarray(cache.stacks[1].ik_pages[:NUM_PAGES], np.float32)          # first MSA layer, [P, R, I]
    codes = np.asarray(cache8.stacks[1].ik_pages[:NUM_PAGES].astype(jnp.float32))
    scale = np.asarray(cache8.stacks[1].ik_scale[:NUM_PAGES])
    got = codes * scale[..., None]
    amax = np.abs(want).max(-1, keepdims=True)
    assert (np.abs(got - want) <= amax * 2.0 ** -4 + 1e-30).all()
    written = amax[1:, :, 0] > 0                                                  # page 0: the padding sink
    assert written.sum() == 29 + 12
    assert (scale[1:][~written] == 0).all() and (codes[1:][~written] == 0).all()
    np.testing.assert_array_equal(np.asarray(cache8.stacks[0].k_pages), np.asarray(cache.stacks[0].k_pages))


def test_fp8_index_k_selection_reads_the_scales(model):
    """The model's index branch passes the scale pool to the indexer: its selection over an FP8 pool is the
    reference indexer's on codes * scale, not on the raw codes."""
    from m3jax.model.attention import PagedKV, Projections
    from pallas_kernels import layout, reference
    attn = model.stacks[1].layers.attn
    cfg = model.config
    ks = jax.random.split(jax.random.key(5), 3)
    ik = jax.random.normal(ks[0], (NUM_PAGES, R, cfg.msa.index_dim)) * jnp.exp(
        2 * jax.random.normal(ks[1], (NUM_PAGES, R, 1)))                           # per-token scales differ
    codes, scale = layout.quantize_index_k(ik)
    iq = jax.random.normal(ks[2], (1, 4, cfg.num_key_value_heads, cfg.msa.index_dim))
    table = jnp.arange(1, M + 1, dtype=jnp.int32)[None]
    pos = jnp.asarray([[60, 61, 62, 63]], jnp.int32)
    kv = PagedKV(None, None, table, codes, scale)
    got = attn.select_blocks(Projections(None, None, None, iq, None), kv, pos)
    kw = dict(topk=cfg.msa.topk_blocks, local_blocks=cfg.msa.local_blocks)
    want = reference.indexer_topk(iq, codes, table, pos, ik_scale=scale, **kw)
    raw = reference.indexer_topk(iq, codes.astype(jnp.float32), table, pos, **kw)
    np.testing.assert_array_equal(np.sort(np.asarray(got), -1), np.sort(np.asarray(want), -1))
    assert (np.sort(np.asarray(raw), -1) != np.sort(np.asarray(want), -1)).any()     # the scales matter here


def test_fp8_index_k_engine_selection_agreement_and_generation():
    """Engine(fp8_index_k=True) generates through the FP8 cache, and its selections agree with the bf16 pool's
    at the rate benchmarks/fp8_index_k.py measures on fresh random inputs of the tiny geometry (CPU, reference
    indexer: 93% identical top-3 sets and 97-98% attention-mass recall over 4 seeds; asserted with margin here
    over 2). A prompt of at most top-k blocks selects all of them, so there the tokens must be equal."""
    import sys
    sys.path.insert(0, BENCH)
    import fp8_index_k
    sel = fp8_index_k.selection(fp8_index_k.SMALL, (256,), queries=16, seeds=2)[0]
    assert sel["same_sets"] >= 0.8 and sel["mass_recall_mean"] >= 0.95, sel
    import m3jax
    model = random_model(M3Config.tiny(), seed=1)
    prompt = [list(np.random.RandomState(3).randint(0, 256, 2 * R))]              # 2 blocks + 4 new tokens
    sp = m3jax.SamplingParams(max_new_tokens=4, temperature=0.0)
    kw = dict(max_batch_size=1, max_seq_len=32, compile_cache=False, progress=False)
    engine = m3jax.Engine(model, max_batch_size=1, max_seq_len=32, compile_cache=False, fp8_index_k=True)
    assert engine.fp8_index_k
    got = m3jax.generate(engine, prompt, sp, progress=False)[0].token_ids
    kw.pop("progress")
    want = m3jax.generate(model, prompt, sp, progress=False, **kw)[0].token_ids
    assert got == want and len(got) == 4
    with pytest.raises(ValueError, match="fp8_index_k"):
        m3jax.Engine(model, max_batch_size=1, max_seq_len=32, compile_cache=False, fp8_index_k="yes")


@pytest.mark.slow
@pytest.mark.multi_device
def test_fp8_index_k_cache_on_a_mesh_matches_one_device():
    """On a 2x4 mesh the FP8 index-K and scale pools are split over "data" with the page pools (each shard owns its
    rows' pages and their scales) and the Engine's greedy tokens are the one-device FP8 Engine's."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    import m3jax
    from m3jax import sharding
    from m3jax.params import shard_model
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (forced host) devices")
    model = random_model(M3Config.tiny(num_attention_heads=8, num_key_value_heads=2, num_index_heads=2), seed=5)
    prompts = [list(np.random.default_rng(i).integers(0, 256, n)) for i, n in enumerate([37, 70, 5, 21])]
    sp = m3jax.SamplingParams(max_new_tokens=5, temperature=0.0)
    kw = dict(max_batch_size=4, max_seq_len=128, compile_cache=False, fp8_index_k=True)
    want = [r.token_ids for r in m3jax.generate(m3jax.Engine(model, **kw), prompts, sp, progress=False)]
    mesh = sharding.make_mesh(data=2, model=4)
    engine = m3jax.Engine(shard_model(model, mesh), mesh=mesh, **kw)
    got = [r.token_ids for r in m3jax.generate(engine, prompts, sp, progress=False)]
    assert got == want
    msa = engine.cache.stacks[1]
    assert msa.ik_pages.dtype == jnp.float8_e4m3fn
    for pool, rank in ((msa.ik_pages, 3), (msa.ik_scale, 2)):
        assert pool.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), rank)


def test_fp8_index_k_prefix_cache_hit_changes_nothing():
    """A prefix-cache hit shares a page's index-K codes and their scales together (same page id): with the FP8
    cache, a request whose first blocks were cached generates what it generates with prefix caching off."""
    import m3jax
    model = random_model(M3Config.tiny(), seed=0)
    kw = dict(max_batch_size=2, max_seq_len=64, num_pages=24, prefill_chunk=16, max_tokens_per_step=18,
              row_buckets=(2,), prefill_row_len=8, compile_cache=False, fp8_index_k=True)
    rs = np.random.RandomState(7)
    shared = rs.randint(0, 256, 4 * R).tolist()                                  # 4 full blocks
    first, second = shared + rs.randint(0, 256, 5).tolist(), shared + rs.randint(0, 256, 9).tolist()
    sp = m3jax.SamplingParams(max_new_tokens=6, ignore_eos=True)
    engine = m3jax.Engine(model, **kw)
    m3jax.generate(engine, [first], sp, progress=False)
    hit = m3jax.generate(engine, [second], sp, progress=False)[0]
    assert hit.num_cached_tokens == 4 * R
    cold = m3jax.generate(m3jax.Engine(model, enable_prefix_caching=False, **kw), [second], sp, progress=False)[0]
    assert hit.token_ids == cold.token_ids
