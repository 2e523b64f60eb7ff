"""Paged cache: the page allocator's accounting (refcounted sharing included), cache layout, and the cached forward
against the no-cache one (chunked prefill with several chunk sizes and both layer loops == one-shot prefill ==
model(input_ids), ragged rows in one group, padding writes confined to the sink page)."""

from __future__ import annotations

import functools

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
def _jit_step(graphdef, state, layer_states, cache, groups):
    return forward_cached(nnx.merge(graphdef, state), cache, groups, layer_states=layer_states)


def _step(model, cache, groups, layer_loop="scan"):
    """layer_loop: "scan" (over the stacked weights) or "split" (a Python loop over per-layer copies)."""
    graphdef, state = nnx.split(model)
    layer_states = [s.layer_states() for s in model.stacks] if layer_loop == "split" else None
    return _jit_step(graphdef, state, layer_states, cache, groups)


def _prefill(model, ids_list, chunk, layer_loop="scan"):
    """All logits of each row when its prompt is fed in chunks of `chunk` tokens, rows side by side."""
    alloc = PageAllocator(NUM_PAGES)
    table = np.zeros((len(ids_list), M), np.int32)
    for b, ids in enumerate(ids_list):
        pages = alloc.ensure(b, len(ids), R)
        table[b, :len(pages)] = pages
    cache = cache_lib.init_cache(model, NUM_PAGES)
    longest = max(len(x) for x in ids_list)
    out = [[] for _ in ids_list]
    for s in range(0, longest, chunk):
        tokens = np.zeros((len(ids_list), chunk), np.int32)
        q_pos = np.full((len(ids_list), chunk), -1, np.int32)
        for b, ids in enumerate(ids_list):
            piece = ids[s:s + chunk]
            tokens[b, :len(piece)] = piece
            q_pos[b, :len(piece)] = np.arange(s, s + len(piece))
        (logits,), cache = _step(model, cache, (StepGroup(tokens, q_pos, table),), layer_loop)
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
    for chunk, loop in ((48, "scan"), (16, "scan"), (5, "scan"), (16, "split")):
        got, _, _ = _prefill(model, ids, chunk, loop)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5, err_msg=f"chunk={chunk} layer_loop={loop}")


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
