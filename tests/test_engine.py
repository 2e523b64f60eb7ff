"""Engine: greedy equals repeated no-cache forwards, batch invariance, queueing on out-of-pages, stop rules,
streaming, page accounting, no recompilation in steady decode, and bad input rejected before any work
(top_logprobs: tests/test_sampling.py, and on a mesh here).

Tiny config: blocks of 8 and top-3 selection, so prompts of 20-45 tokens cross several block boundaries
and select a strict subset of their blocks. Every engine here shares one geometry (and thus one set of
compiled step programs): 8 rows, chunks of 16, 40 pages of 8 tokens (5 full-length requests at once).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import m3jax
from m3jax.config import M3Config
from m3jax.params import shard_model
from m3jax.runner import trace_count
from m3jax.testing import random_model
from m3jax.tokenizer import M3Tokenizer, write_byte_level_tokenizer

MAX_LEN = 64
ENGINE_KW = dict(max_batch_size=8, max_seq_len=MAX_LEN, num_pages=40, prefill_chunk=16, max_tokens_per_step=24,
                 row_buckets=(8,), prefill_row_len=8)


@pytest.fixture(scope="module")
def model():
    return random_model(M3Config.tiny(), seed=0)


@pytest.fixture(scope="module")
def no_cache_greedy(model):
    """Greedy decoding by a full no-cache forward per token (right-padded to MAX_LEN: one compilation)."""
    fwd = jax.jit(lambda ids: model(ids))

    def run(prompt, n):
        seq = list(prompt)
        for _ in range(n):
            ids = np.zeros((1, MAX_LEN), np.int32)
            ids[0, :len(seq)] = seq
            seq.append(int(np.asarray(fwd(ids))[0, len(seq) - 1].argmax()))
        return seq[len(prompt):]

    return run


def prompts(lengths, seed=0):
    rs = np.random.RandomState(seed)
    return [rs.randint(0, 256, n).tolist() for n in lengths]


def engine(model, **kw):
    return m3jax.Engine(model, **{**ENGINE_KW, **kw})


GREEDY = m3jax.SamplingParams(max_new_tokens=10, ignore_eos=True)


def test_greedy_matches_no_cache_forward(model, no_cache_greedy):
    ps = prompts([45, 29, 3, 17])          # 6, 4, 1, 3 blocks: chunked over several steps, sparse selection
    eng = engine(model)
    out = m3jax.generate(eng, ps, GREEDY)
    for p, r in zip(ps, out):
        assert r.token_ids == no_cache_greedy(p, 10)
        assert r.finish_reason == "length" and r.prompt_token_ids == p
    assert eng.allocator.num_free == eng.allocator.capacity
    eng.allocator.check()


def test_batch_invariance_and_queueing(model, no_cache_greedy):
    """8 requests of mixed lengths join at different steps; 40 pages hold only 5 at once, so some queue."""
    ps = prompts([9, 40, 22, 3, 33, 16, 27, 45], seed=1)
    params = [m3jax.SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (12, 8, 20, 5, 10, 16, 9, 14)]
    alone = [m3jax.generate(engine(model), [p], s)[0].token_ids for p, s in zip(ps[:2], params[:2])]
    eng = engine(model)
    ids, queued_seen = [], False
    for i, (p, s) in enumerate(zip(ps, params)):
        ids.append(eng.add_request(p, s))
        for _ in range(i % 3):                         # requests join at different steps
            eng.step()
        queued_seen |= eng.num_waiting > 0 and eng.num_running < eng.max_batch_size
    results = eng.run()
    assert queued_seen, "the page pool never forced a request to wait"
    assert [results[i].token_ids for i in ids[:2]] == alone
    for i, p, s in zip(ids, ps, params):
        assert results[i].token_ids == no_cache_greedy(p, s.max_new_tokens)
    assert eng.allocator.num_free == eng.allocator.capacity and not eng.allocator.owners()
    eng.allocator.check()


def test_no_recompilation_in_steady_decode(model):
    eng = engine(model)
    m3jax.generate(eng, prompts([12, 30]), m3jax.SamplingParams(max_new_tokens=3, ignore_eos=True))  # warm up
    for p in prompts([20, 7, 33], seed=2):
        eng.add_request(p, m3jax.SamplingParams(max_new_tokens=20, ignore_eos=True))
    counts = []
    while eng.has_work():
        eng.step()
        counts.append(trace_count())
    assert len(set(counts)) == 1, f"the step recompiled during decode: trace counts {counts}"


def test_stop_rules(model, no_cache_greedy):
    p = prompts([26], seed=3)[0]
    ref = no_cache_greedy(p, 10)
    eng = engine(model)
    by_id = m3jax.generate(eng, [p], m3jax.SamplingParams(max_new_tokens=10, stop_token_ids=(ref[3],)))[0]
    cut = ref.index(ref[3]) + 1
    assert by_id.token_ids == ref[:cut] and by_id.finish_reason == "stop"
    eos_engine = engine(model)
    eos_engine.eos_ids = frozenset({ref[2]})         # as if the config's eos_token_id were ref[2]
    by_eos = m3jax.generate(eos_engine, [p], m3jax.SamplingParams(max_new_tokens=10))[0]
    assert by_eos.token_ids == ref[:ref.index(ref[2]) + 1] and by_eos.finish_reason == "stop"
    by_len = m3jax.generate(eng, [p], m3jax.SamplingParams(max_new_tokens=1))[0]
    assert by_len.token_ids == ref[:1] and by_len.finish_reason == "length"
    # max_seq_len ends a request too: 60-token prompt + 10 wanted, room for 4.
    long_p = prompts([60], seed=4)[0]
    r = m3jax.generate(eng, [long_p], GREEDY)[0]
    assert len(r.token_ids) == MAX_LEN - 60 and r.finish_reason == "length"


def test_stop_strings_text_and_streaming(model, no_cache_greedy, tmp_path):
    write_byte_level_tokenizer(str(tmp_path / "tokenizer.json"))
    tok = M3Tokenizer.from_pretrained(str(tmp_path))
    text = "The quick brown fox jumps"
    p = tok.encode(text)
    ref = no_cache_greedy(p, 10)
    byte_ids = [t for t in ref if t < 256]
    assert byte_ids, "the random model produced no byte tokens; pick another prompt"
    eng = engine(model, tokenizer=tok)
    streamed, seen = [], []
    full = m3jax.generate(eng, [text], GREEDY, on_token=lambda i, t: streamed.append((i, t)))[0]
    assert full.token_ids == ref and streamed == [(0, t) for t in ref]
    assert full.text == tok.decode(ref)
    stop = tok.decode([byte_ids[0]])
    r = m3jax.generate(eng, [text], m3jax.SamplingParams(max_new_tokens=10, stop=(stop,), ignore_eos=True))[0]
    k = ref.index(byte_ids[0]) + 1
    assert r.finish_reason == "stop" and r.token_ids == ref[:k] and stop not in r.text
    assert list(eng.stream(text, GREEDY, request_id="s")) == ref
    seen = eng.pop_result("s")
    assert seen.token_ids == ref
    assert eng.allocator.num_free == eng.allocator.capacity


@pytest.mark.parametrize("prompt, params, field", [
    ([], None, "prompt is empty"),
    (list(range(MAX_LEN + 1)), None, "max_seq_len"),
    ([1, 2, 384], None, "outside the vocab"),
    ([1, -1], None, "outside the vocab"),
    ([1, 2], m3jax.SamplingParams(temperature=-0.5), "sampling.temperature"),
    ([1, 2], m3jax.SamplingParams(top_p=0.0), "sampling.top_p"),
    ([1, 2], m3jax.SamplingParams(top_p=1.5), "sampling.top_p"),
    ([1, 2], m3jax.SamplingParams(max_new_tokens=0), "sampling.max_new_tokens"),
    ([1, 2], m3jax.SamplingParams(top_k=-1), "sampling.top_k"),
    ("hello", None, "no tokenizer"),
])
def test_bad_input_names_request_and_field(model, prompt, params, field):
    eng = engine(model)
    good = [[1, 2, 3], [4, 5]]
    before = trace_count()
    with pytest.raises(ValueError, match=rf"request 2: .*{field}"):
        m3jax.generate(eng, good + [prompt], [m3jax.SamplingParams()] * 2 + [params or m3jax.SamplingParams()])
    assert not eng.has_work() and eng.num_steps == 0 and trace_count() == before   # nothing ran
    with pytest.raises(ValueError, match=rf"request r7: .*{field}"):
        eng.add_request(prompt, params, request_id="r7")
    assert not eng.has_work()


def test_request_too_large_for_the_pool_is_rejected(model):
    eng = engine(model, num_pages=4)            # 3 usable pages = 24 tokens
    with pytest.raises(ValueError, match=r"request 0: needs 4 pages"):
        m3jax.generate(eng, [[1] * 20], m3jax.SamplingParams(max_new_tokens=8))


@pytest.mark.slow
def test_generate_main_cli(tmp_path, capsys):
    from m3jax.cli import generate_main
    from m3jax.testing import make_tiny_checkpoint
    path = make_tiny_checkpoint(str(tmp_path / "tiny"), seed=0)
    common = ["--model", path, "--dtype", "float32", "--max-seq-len", "64", "--max-batch-size", "2"]
    assert generate_main(common + ["--prompt", "Hello", "--prompt", "Hi there", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- [") == 2 and "(length, 4 tokens)" in out
    assert generate_main(common + ["--prompt", "x", "--top-p", "2"]) == 2
    assert "request 0: sampling.top_p" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.multi_device
def test_engine_on_a_mesh(model, no_cache_greedy):
    """A real 2x4 mesh (8 forced host devices): rows and pools split over "data", heads over "model" (KV heads
    replicated 2 -> 4), attention in shard_map; greedy tokens equal the single-device no-cache forward's."""
    from m3jax.sharding import make_mesh
    mesh = make_mesh(2, 4)
    eng = engine(model=shard_model(model, mesh), mesh=mesh)
    pool = eng.cache.stacks[1].k_pages
    assert pool.sharding.mesh.shape == mesh.shape and eng.data_shards == 2
    assert pool.addressable_shards[0].data.shape == (1, pool.shape[1] // 2) + pool.shape[2:]
    ps = prompts([19, 33, 7], seed=6)
    top = m3jax.SamplingParams(**{**GREEDY.__dict__, "logprobs": True, "top_logprobs": 3})
    out = m3jax.generate(eng, ps, [GREEDY, GREEDY, top])
    assert [r.token_ids for r in out] == [no_cache_greedy(p, 10) for p in ps]
    assert [t[0].token_id for t in out[2].top_logprobs] == out[2].token_ids     # top-k of the vocab-split logits
    np.testing.assert_array_equal([t[0].logprob for t in out[2].top_logprobs], out[2].logprobs)
    assert {len(a.owners()) for a in eng.allocators} == {0} and all(a.num_free == a.capacity for a in eng.allocators)


def test_cancel_frees_pages_and_the_engine_goes_on(model, no_cache_greedy):
    eng = engine(model)
    keep = eng.add_request(prompts([21], seed=7)[0], GREEDY)
    drop = eng.add_request(prompts([30], seed=8)[0], GREEDY, request_id="drop")
    eng.step()
    assert set(eng.allocator.owners()) == {keep, "drop"}
    assert eng.cancel(drop) and not eng.cancel(drop) and not eng.cancel("never")
    assert eng.allocator.owners() == [keep]
    results = eng.run()
    assert list(results) == [keep] and results[keep].token_ids == no_cache_greedy(prompts([21], seed=7)[0], 10)
    assert eng.allocator.num_free == eng.allocator.capacity
    eng.add_request([1, 2, 3], GREEDY, request_id="drop")        # a cancelled id is free again


def test_a_raising_callback_fails_only_its_request(model, no_cache_greedy):
    eng = engine(model)
    p = prompts([12, 25], seed=9)

    def boom(rid, token):
        raise RuntimeError("callback bug")

    bad = eng.add_request(p[0], GREEDY, on_token=boom)
    good = eng.add_request(p[1], GREEDY)
    results = eng.run()
    assert results[bad].finish_reason == "error" and "callback bug" in results[bad].error
    assert results[good].token_ids == no_cache_greedy(p[1], 10)
    assert eng.allocator.num_free == eng.allocator.capacity and not eng.has_work()


def test_a_failing_step_leaves_the_engine_usable(model, no_cache_greedy):
    eng = engine(model)
    real = eng.runner.execute

    def broken(batch):
        raise RuntimeError("device fault")

    eng.runner.execute = broken
    with pytest.raises(RuntimeError, match="device fault"):
        m3jax.generate(eng, prompts([10, 20], seed=10), GREEDY)
    assert not eng.has_work() and eng.allocator.num_free == eng.allocator.capacity
    eng.runner.execute = real
    p = prompts([15], seed=11)[0]
    assert m3jax.generate(eng, [p], GREEDY)[0].token_ids == no_cache_greedy(p, 10)


def test_scheduler_rows_budget_and_shards_host_only():
    """The scheduler alone (no device): prompt chunks share each data shard's prefill budget (whole rows of
    prefill_row_len tokens) oldest first, requests go to the least-loaded data shard, a row samples exactly when
    it completes its request's pending tokens."""
    from m3jax.scheduler import Scheduler
    s = Scheduler(vocab_size=300, eos_ids=[299], max_batch_size=4, max_seq_len=64, page_size=8, num_pages=40,
                  data_shards=2, max_tokens_per_step=28, prefill_chunk=16, prefill_row_len=4)
    assert (s.prefill_row_len, s.prefill_rows_per_shard) == (4, 3)           # (28 - 4) / 2 = 12 tokens a shard
    sp = m3jax.SamplingParams(max_new_tokens=4)
    a, b, c = s.add(list(range(1, 31)), sp), s.add(list(range(1, 11)), sp), s.add(list(range(1, 7)), sp)
    rows = lambda batch: [(r.request_id, len(r.tokens), r.start, r.shard, r.sample) for r in batch.rows]  # noqa
    first = s.schedule()
    # a: shard 0's 12 tokens; b: 10 tokens = 3 rows of 4, all of shard 1's rows, so c (also shard 1) waits.
    assert first.decode == () and rows(first) == [(a, 12, 0, 0, False), (b, 10, 0, 1, True)]
    assert first.prefill[0].pages == (1, 2, 3, 4, 5) and first.prefill[1].pages == (1, 2)   # 34 and 14 tokens
    out = s.complete(first, [None, (7, None)])
    assert [(o.request_id, o.new_token_ids, o.finished) for o in out] == [(b, [7], False)]
    second = s.schedule()
    assert rows(second) == [(b, 1, 10, 1, True), (a, 12, 12, 0, False), (c, 6, 0, 1, True)]
    out = s.complete(second, [(299, None), None, (5, None)])             # b samples eos: finished
    assert [(o.request_id, o.new_token_ids, o.finished) for o in out] == [(b, [299], True), (c, [5], False)]
    assert s.results[b].finish_reason == "stop" and s.allocators[1].pages(c) == [3, 4]
    third = s.schedule()
    assert rows(third) == [(c, 1, 6, 1, True), (a, 6, 24, 0, True)]

def test_non_finite_logits_fail_only_their_request(model, no_cache_greedy):
    """NaN embedding rows for two token ids: a prompt holding one fails during its prefill, a request that
    generates the other fails at the decode step that embeds it (its earlier tokens kept); the rest of the batch
    is exact, nothing is sampled from NaN logits, and the engine goes on over the pages they held."""
    from flax import nnx
    ps = prompts([12, 30, 20, 25], seed=20)
    refs = [no_cache_greedy(p, 10) for p in ps]
    in_prompt = 300                                 # outside the prompts' ids
    others = ps[0] + refs[0] + ps[2] + refs[2] + ps[3]
    # request 3's k-th generated token, the first that no clean sequence holds
    k = next(k for k in range(1, 10) if refs[3][k] not in others + refs[3][:k] + [in_prompt])
    generated = refs[3][k]
    assert in_prompt not in others + refs[3][:k], "pick other seeds"
    bad = nnx.clone(model)
    bad.embed_vd[...] = bad.embed_vd[...].at[np.array([in_prompt, generated])].set(np.nan)
    eng = engine(bad)
    poisoned = ps[1][:20] + [in_prompt] + ps[1][21:]           # in its second prompt chunk
    res = m3jax.generate(eng, [ps[0], poisoned, ps[2], ps[3]], GREEDY)
    assert [r.finish_reason for r in res] == ["length", "error", "length", "error"], [r.error for r in res]
    assert "request 1:" in res[1].error and "non-finite logits" in res[1].error and res[1].token_ids == []
    assert f"position {25 + k}" in res[3].error and "request 3:" in res[3].error
    assert res[3].token_ids == refs[3][:k + 1]
    assert res[0].token_ids == refs[0] and res[2].token_ids == refs[2]
    assert not eng.has_work() and eng.allocator.num_free == eng.allocator.capacity
    p = prompts([40], seed=21)[0]
    assert m3jax.generate(eng, [p], GREEDY)[0].token_ids == no_cache_greedy(p, 10)
