"""Sampling: top-k / top-p filtering, the sampled distribution, per-request seeds independent of the batch,
logprobs of chosen tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import m3jax
from m3jax.config import M3Config
from m3jax.sampling import SamplingBatch, SamplingParams, filter_logits, sample
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
    tokens, _ = sample(logits, batch, all_greedy=False, want_logprobs=False)
    freq = np.bincount(np.asarray(tokens), minlength=3) / n
    want = p ** 2 / np.sum(p ** 2)                      # temperature 0.5 squares the probabilities
    np.testing.assert_allclose(freq, want, atol=0.03)


def test_row_result_independent_of_batch():
    rs = np.random.RandomState(0)
    logits = jnp.asarray(rs.randn(4, 50), jnp.float32)
    full = SamplingBatch(jnp.asarray([0.9, 0.0, 1.3, 0.7]), jnp.asarray([0, 0, 5, 0], jnp.int32),
                         jnp.asarray([1.0, 1.0, 0.9, 0.8]), jnp.asarray([1, 2, 3, 4], jnp.uint32),
                         jnp.asarray([0, 5, 2, 9], jnp.int32))
    all_rows, _ = sample(logits, full, all_greedy=False, want_logprobs=False)
    one = jax.tree.map(lambda x: x[2:3], full)
    row, _ = sample(logits[2:3], one, all_greedy=False, want_logprobs=False)
    assert int(row[0]) == int(all_rows[2])
    assert int(all_rows[1]) == int(jnp.argmax(logits[1]))     # temperature 0 row is greedy


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
