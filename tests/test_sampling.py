"""Sampling: top-k / top-p filtering, the sampled distribution, per-request seeds independent of the batch,
logprobs of chosen tokens and the top alternatives (the raw log_softmax of the logits)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import m3jax
from m3jax.config import M3Config
from m3jax.sampling import MAX_TOP_LOGPROBS, SamplingBatch, SamplingParams, filter_logits, sample
from m3jax.testing import random_model

from tests.test_engine import ENGINE_KW, MAX_LEN, prompts


def test_filter_top_k_and_top_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.25, 0.15, 0.1], [0.1, 0.2, 0.3, 0.4]], jnp.float32))
    t = jnp.ones((2,))
    got = np.isfinite(np.asarray(filter_logits(logits, t, jnp.asarray([2, 0]), jnp.asarray([1.0, 1.0]))))
    assert got.tolist() == [[True, True, False, False], [True, True, True, True]]
    # top_p 0.7: keep the smallest prefix whose mass reaches 0.7 (0.5 + 0.25).
    got = np.isfinite(np.asarray(filter_logits(logits, t, jnp.asarray([0, 0]), jnp.asarray([0.7, 0.65]))))
    assert got.tolist() == [[True, True, False, False], [False, False, True, True]]
    # a tiny top_p still keeps the best token
    got = np.isfinite(np.asarray(filter_logits(logits, t, jnp.asarray([0, 0]), jnp.asarray([1e-6, 1e-6]))))
    assert got.sum(-1).tolist() == [1, 1]


def test_sampled_frequencies_follow_temperature_softmax():
    p = np.asarray([0.6, 0.3, 0.1], np.float32)
    n = 4000
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(p)), (n, 3))
    batch = SamplingBatch(jnp.full((n,), 0.5), jnp.zeros((n,), jnp.int32), jnp.ones((n,)),
                          jnp.arange(n, dtype=jnp.uint32), jnp.zeros((n,), jnp.int32))
    tokens = sample(logits, batch, all_greedy=False, want_logprobs=False).tokens
    freq = np.bincount(np.asarray(tokens), minlength=3) / n
    want = p ** 2 / np.sum(p ** 2)                      # temperature 0.5 squares the probabilities
    np.testing.assert_allclose(freq, want, atol=0.03)


def test_row_result_independent_of_batch():
    rs = np.random.RandomState(0)
    logits = jnp.asarray(rs.randn(4, 50), jnp.float32)
    full = SamplingBatch(jnp.asarray([0.9, 0.0, 1.3, 0.7]), jnp.asarray([0, 0, 5, 0], jnp.int32),
                         jnp.asarray([1.0, 1.0, 0.9, 0.8]), jnp.asarray([1, 2, 3, 4], jnp.uint32),
                         jnp.asarray([0, 5, 2, 9], jnp.int32))
    all_rows = sample(logits, full, all_greedy=False, want_logprobs=False).tokens
    one = jax.tree.map(lambda x: x[2:3], full)
    row = sample(logits[2:3], one, all_greedy=False, want_logprobs=False).tokens
    assert int(row[0]) == int(all_rows[2])
    assert int(all_rows[1]) == int(jnp.argmax(logits[1]))     # temperature 0 row is greedy


def test_top_logprobs_are_the_raw_log_softmax_top_n():
    """Top alternatives: the MAX_TOP_LOGPROBS best of log_softmax(logits) (not of the temperature-scaled or
    filtered logits), best first; the chosen token's logprob is its entry there; sampled rows too."""
    rs = np.random.RandomState(1)
    logits = jnp.asarray(rs.randn(3, 50) * 3, jnp.float32)
    batch = SamplingBatch(jnp.asarray([0.0, 0.7, 1.5]), jnp.asarray([0, 3, 0], jnp.int32),
                          jnp.asarray([1.0, 1.0, 0.5]), jnp.asarray([1, 2, 3], jnp.uint32), jnp.zeros((3,), jnp.int32))
    out = sample(logits, batch, all_greedy=False, want_logprobs=True, want_top=True)
    lp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    order = np.argsort(-lp, axis=-1, kind="stable")[:, :MAX_TOP_LOGPROBS]
    np.testing.assert_array_equal(np.asarray(out.top_ids), order)
    np.testing.assert_allclose(np.asarray(out.top_logprobs), np.take_along_axis(lp, order, -1), rtol=1e-6)
    tokens = np.asarray(out.tokens)
    np.testing.assert_allclose(np.asarray(out.logprobs), lp[np.arange(3), tokens], rtol=1e-6)
    assert tokens[0] == order[0, 0] and float(out.top_logprobs[0, 0]) == float(out.logprobs[0])     # greedy row
    assert out.top_ids.shape == (3, MAX_TOP_LOGPROBS)
    small = sample(logits[:, :7], batch, all_greedy=True, want_logprobs=True, want_top=True)   # vocab < 20
    assert small.top_ids.shape == (3, 7)
    plain = sample(logits, batch, all_greedy=False, want_logprobs=True)
    assert plain.top_ids is None and plain.top_logprobs is None
    for bad, match in ((dict(logprobs=True, top_logprobs=MAX_TOP_LOGPROBS + 1), r"an integer in \[0, 20\]"),
                       (dict(logprobs=True, top_logprobs=True), r"an integer in \[0, 20\]"),
                       (dict(top_logprobs=3), r"0 unless logprobs=True")):
        with pytest.raises(ValueError, match=rf"^request r: sampling\.top_logprobs must be {match}"):
            SamplingParams(**bad).check("r")


@pytest.fixture(scope="module")
def model():
    return random_model(M3Config.tiny(), seed=0)


def test_seeded_sampling_reproducible_regardless_of_batch(model):
    ps = prompts([23, 11, 37], seed=5)
    hot = SamplingParams(max_new_tokens=8, temperature=1.0, top_k=40, top_p=0.95, seed=1234, ignore_eos=True,
                         logprobs=True)
    other = SamplingParams(max_new_tokens=5, temperature=0.7, seed=99, ignore_eos=True)
    alone = m3jax.generate(m3jax.Engine(model, **ENGINE_KW), [ps[0]], hot)[0]
    mixed = m3jax.generate(m3jax.Engine(model, **ENGINE_KW), [ps[1], ps[0], ps[2]], [other, hot, other])
    assert mixed[1].token_ids == alone.token_ids
    np.testing.assert_allclose(mixed[1].logprobs, alone.logprobs, rtol=1e-5, atol=1e-5)
    reseeded = m3jax.generate(m3jax.Engine(model, **ENGINE_KW), [ps[0]],
                              SamplingParams(**{**hot.__dict__, "seed": 4321}))[0]
    assert reseeded.token_ids != alone.token_ids
    # logprobs are those of the no-cache model's distribution at each chosen token
    seq = ps[0] + alone.token_ids
    ids = np.zeros((1, MAX_LEN), np.int32)
    ids[0, :len(seq)] = seq
    lp = np.asarray(jax.nn.log_softmax(model(jnp.asarray(ids))[0], -1))
    want = [lp[len(ps[0]) - 1 + i, t] for i, t in enumerate(alone.token_ids)]
    np.testing.assert_allclose(alone.logprobs, want, rtol=1e-4, atol=1e-4)


def test_engine_top_logprobs_equal_the_no_cache_log_softmax(model):
    """Greedy with top_logprobs = 5 through the engine: at every position the best alternative is the chosen
    token with its logprob, and all five equal a jnp log_softmax of the no-cache model's logits; a request in the
    same batch that does not ask gets none, and requests asking for different n get their own n."""
    ps = prompts([19, 7], seed=8)
    top5 = SamplingParams(max_new_tokens=6, ignore_eos=True, logprobs=True, top_logprobs=5)
    results = m3jax.generate(m3jax.Engine(model, **ENGINE_KW), [ps[0], ps[1], ps[0]],
                             [top5, SamplingParams(max_new_tokens=3, ignore_eos=True),
                              SamplingParams(**{**top5.__dict__, "top_logprobs": 2})])
    r = results[0]
    assert results[1].top_logprobs is None and results[1].logprobs is None
    assert len(r.top_logprobs) == len(r.token_ids) == 6 and all(len(t) == 5 for t in r.top_logprobs)
    assert results[2].token_ids == r.token_ids and [t[:2] for t in r.top_logprobs] == results[2].top_logprobs
    assert [t[0].token_id for t in r.top_logprobs] == r.token_ids
    np.testing.assert_array_equal([t[0].logprob for t in r.top_logprobs], r.logprobs)
    seq = ps[0] + r.token_ids
    ids = np.zeros((1, MAX_LEN), np.int32)
    ids[0, :len(seq)] = seq
    lp = np.asarray(jax.nn.log_softmax(model(jnp.asarray(ids))[0], -1))
    for i, top in enumerate(r.top_logprobs):
        row = lp[len(ps[0]) - 1 + i]
        want = np.argsort(-row, kind="stable")[:5]
        assert [t.token_id for t in top] == want.tolist()
        np.testing.assert_allclose([t.logprob for t in top], row[want], rtol=1e-4, atol=1e-4)
