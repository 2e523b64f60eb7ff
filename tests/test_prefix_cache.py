"""Prefix caching: the allocator's cache maps, LRU eviction and refcounts (host only); admission that shares the
cached full blocks of a prompt and always computes its last token; outputs with a hit equal outputs without one
(greedy and seeded sampling, MSA selection active: tiny blocks of 8, top-3, prompts of 4-6 blocks), under eviction
pressure, while the first owner still runs, across generated-token blocks, and with data-sharded pools (a hit only
on the shard that holds the pages).

The engines share test_engine's geometry (8 rows, chunks of 16, 40 pages of 8 tokens), so its compiled step
programs are reused when both files run in one process.
"""

from __future__ import annotations

import numpy as np
import pytest

import m3jax
from m3jax.config import M3Config
from m3jax.scheduler import PageAllocator, Scheduler, block_key, root_key
from m3jax.testing import random_model

R = 8                                  # M3Config.tiny()'s MSA block = page size
ENGINE_KW = dict(max_batch_size=8, max_seq_len=64, num_pages=40, prefill_chunk=16, max_tokens_per_step=24,
                 row_buckets=(8,), len_buckets=(16,))
GREEDY = m3jax.SamplingParams(max_new_tokens=10, ignore_eos=True)
SEEDED = m3jax.SamplingParams(max_new_tokens=10, ignore_eos=True, temperature=0.9, top_k=50, seed=1234)


def toks(n, seed):
    return np.random.RandomState(seed).randint(0, 256, n).tolist()


def keys_of(tokens):
    out, parent = [], root_key()
    for m in range(len(tokens) // R):
        parent = block_key(parent, tokens[m * R:(m + 1) * R])
        out.append(parent)
    return out


# ---------------------------------------------------------------------------------------------- host only
def test_allocator_cache_refcounts_and_lru_eviction():
    a = PageAllocator(7)                                   # pages 1..6
    p = a.allocate("x", 3)
    ks = keys_of(toks(3 * R, 0))
    assert all(a.register(pg, k) for pg, k in zip(p, ks))
    assert not a.register(p[0], ks[0]) and not a.register(a.allocate("y", 1)[0], ks[1])   # held once, first wins
    assert a.lookup(ks) == p and a.lookup(keys_of(toks(3 * R, 1))) == [] and a.lookup([ks[0], b"?", ks[2]]) == p[:1]
    a.share("z", p[:2])
    assert [a.refcount(q) for q in p] == [2, 2, 1]
    a.release("x")
    a.release("y")                                         # its uncached page goes first in line
    assert a.num_free == 4 and a.num_cached == 3 and a.lookup(ks) == p
    a.release("z")
    assert a.num_free == 6 and a.num_cached == 3
    a.check()
    # Free pages go out uncached first (4, 5, 6), then cached ones least recently released first: z released
    # p[1] then p[0] (a prefix's later blocks first), after x released p[2].
    assert a.allocate("w", 3) == [4, 5, 6] and a.num_evicted == 0
    assert a.allocate("w", 1) == [p[2]] and a.num_evicted == 1 and a.lookup(ks) == p[:2]
    a.share("v", a.lookup(ks))                             # a cached free page is revived by sharing
    assert a.num_free == 0 and [a.refcount(q) for q in p[:2]] == [1, 1]
    assert not a.can_allocate(1) and a.can_allocate(0, p[:2])
    with pytest.raises(ValueError, match="not held and not cached"):
        PageAllocator(3).share("u", [1])
    a.check()
    a.release("v")
    assert a.reset_cache() == 2 and a.num_cached == 0 and a.lookup(ks) == []
    a.check()


def test_admission_shares_full_blocks_and_computes_the_last_token():
    s = Scheduler(vocab_size=300, eos_ids=[299], max_batch_size=4, max_seq_len=64, page_size=R, num_pages=40,
                  max_tokens_per_step=64, prefill_chunk=64)
    sp = m3jax.SamplingParams(max_new_tokens=2)
    p = toks(5 * R, 1)                                      # exactly 5 full blocks
    first = s.add(p, sp)
    b = s.schedule()
    assert b.prefill[0].start == 0 and len(b.prefill[0].tokens) == 5 * R
    s.complete(b, [(7, None)])
    pages = s.allocators[0].pages(first)
    assert s.allocators[0].lookup(keys_of(p)) == pages[:5]                  # all 5 computed blocks registered
    # Same prompt: only 4 blocks shared (the 5th holds the last prompt token, which must be computed).
    again = s.add(p, sp)
    longer = s.add(p + [9] * (R + 3), sp)                   # 5 shared, 1 full + 1 partial block computed
    other = s.add([(p[0] + 1) % 256] + p[1:], sp)                         # differs in block 0: no hit at all
    b = s.schedule()
    rows = {r.request_id: r for r in b.rows}
    assert (rows[again].start, rows[again].tokens) == (4 * R, tuple(p[4 * R:]))
    assert rows[again].pages[:4] == tuple(pages[:4]) and pages[4] not in rows[again].pages
    assert rows[longer].start == 5 * R and rows[longer].pages[:5] == tuple(pages[:5])
    assert rows[other].start == 0 and not set(rows[other].pages) & set(pages)
    assert [s.allocators[0].refcount(q) for q in pages[:5]] == [3, 3, 3, 3, 2]
    s.complete(b, [None if r.sample is False else (8, None) for r in b.rows])
    while s.has_work():
        b = s.schedule()
        s.complete(b, [(8, None) if r.sample else None for r in b.rows])
    assert [s.results[i].num_cached_tokens for i in (first, again, longer, other)] == [0, 4 * R, 5 * R, 0]
    s.allocators[0].check()
    off = Scheduler(vocab_size=300, eos_ids=[299], max_batch_size=4, max_seq_len=64, page_size=R, num_pages=40,
                    max_tokens_per_step=64, prefill_chunk=64, enable_prefix_caching=False)
    for _ in range(2):
        off.add(p, sp)
        while off.has_work():
            b = off.schedule()
            assert all(r.start == 0 for r in b.prefill)
            off.complete(b, [(8, None) if r.sample else None for r in b.rows])
    assert off.allocators[0].num_cached == 0 and {r.num_cached_tokens for r in off.results.values()} == {0}


# ---------------------------------------------------------------------------------------------- engine
@pytest.fixture(scope="module")
def model():
    return random_model(M3Config.tiny(), seed=0)


@pytest.fixture(scope="module")
def reference(model):
    """Outputs of an engine without prefix caching, one request at a time (no hit possible)."""
    eng = m3jax.Engine(model, enable_prefix_caching=False, **ENGINE_KW)
    memo = {}

    def run(prompt, params):
        key = (tuple(prompt), params)
        if key not in memo:
            memo[key] = m3jax.generate(eng, [prompt], params)[0].token_ids
        assert eng.allocator.num_cached == 0
        return memo[key]

    return run


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_outputs_with_a_hit_equal_outputs_without(model, reference, params):
    base = toks(4 * R + 3, 2)                                        # 4 full blocks + 3
    tails = [toks(n, 10 + n) for n in (5, 13, 1)]
    prompts = [base + t for t in tails]                              # 40, 48, 36 tokens: 4-6 blocks, sparse
    eng = m3jax.Engine(model, **ENGINE_KW)
    first = m3jax.generate(eng, [prompts[0]], params)[0]
    assert first.num_cached_tokens == 0 and first.token_ids == reference(prompts[0], params)
    rest = m3jax.generate(eng, prompts, params)                      # all three hit the 4 shared blocks
    assert [r.num_cached_tokens for r in rest] == [4 * R] * 3
    assert [r.token_ids for r in rest] == [reference(p, params) for p in prompts]
    assert eng.allocator.num_free == eng.allocator.capacity and eng.allocator.num_cached > 0
    eng.allocator.check()


def test_hit_while_the_owner_runs_and_on_generated_blocks(model, reference):
    eng = m3jax.Engine(model, **ENGINE_KW)
    p = toks(3 * R + 2, 3)
    a = eng.add_request(p, GREEDY)
    for _ in range(4):                                               # a's prompt is computed, it decodes
        eng.step()
    b = eng.add_request(p, GREEDY)
    eng.step()
    shared = eng.allocator.pages(a)[:3]
    assert eng.allocator.pages(b)[:3] == shared and {eng.allocator.refcount(q) for q in shared} == {2}
    res = eng.run()
    assert res[b].num_cached_tokens == 3 * R and res[a].token_ids == res[b].token_ids == reference(p, GREEDY)
    # The next turn's prompt holds the first turn's output: the blocks filled during decode are cached too.
    turn2 = p + res[a].token_ids + toks(6, 4)                        # 42 tokens
    out = m3jax.generate(eng, [turn2], GREEDY)[0]
    assert out.num_cached_tokens == 4 * R and out.token_ids == reference(turn2, GREEDY)


def test_eviction_under_page_pressure_keeps_outputs_exact(model, reference):
    """12 pages (11 usable), requests need 5-8: every admission evicts; a re-sent prompt still equals its
    reference whether its blocks survived or not."""
    eng = m3jax.Engine(model, **{**ENGINE_KW, "num_pages": 12})
    ps = [toks(n, 20 + i) for i, n in enumerate((30, 45, 27, 38))]
    for p in ps + ps[::-1]:
        r = m3jax.generate(eng, [p], GREEDY)[0]
        assert r.token_ids == reference(p, GREEDY)
        eng.allocator.check()
    assert eng.allocator.num_evicted > 0
    hit = m3jax.generate(eng, [ps[0]], GREEDY)[0]                    # the most recent one is still cached
    assert hit.num_cached_tokens > 0 and hit.token_ids == reference(ps[0], GREEDY)
    assert eng.reset_prefix_cache() > 0
    assert m3jax.generate(eng, [ps[0]], GREEDY)[0].num_cached_tokens == 0


@pytest.mark.slow
@pytest.mark.multi_device
def test_data_shards_hit_only_where_the_pages_are(model, reference):
    """2x1 mesh, one row per data shard: the second copy of a prompt finds shard 0 (which holds its blocks)
    busy, runs on shard 1 and computes everything; both equal the reference."""
    from m3jax.params import shard_model
    from m3jax.sharding import make_mesh
    import jax
    mesh = make_mesh(2, 1, devices=jax.devices()[:2])
    eng = m3jax.Engine(shard_model(model, mesh), mesh=mesh,
                       **{**ENGINE_KW, "max_batch_size": 2, "row_buckets": (2,)})
    pa, pb = toks(5 * R + 1, 5), toks(3 * R + 4, 6)
    first = m3jax.generate(eng, [pa, pb], GREEDY)                     # pa on shard 0, pb on shard 1
    assert eng.allocators[0].lookup(keys_of(pa)) and not eng.allocators[1].lookup(keys_of(pa))
    again = m3jax.generate(eng, [pa, pa], GREEDY)
    assert [r.num_cached_tokens for r in again] == [5 * R, 0]
    want = reference(pa, GREEDY)
    assert first[0].token_ids == want and [r.token_ids for r in again] == [want, want]
    assert first[1].token_ids == reference(pb, GREEDY)
    for a in eng.allocators:
        a.check()
        assert a.num_free == a.capacity
