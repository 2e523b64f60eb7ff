"""The tiny model through the `tpu` dispatch path (TPU interpreter) gives the reference path's logits/tokens.

The config uses shapes the TPU kernels accept (head_dim = index_dim = 128, blocks of 16) and top-2 blocks,
so prompts of a few blocks are really sparse. The cached path (m3jax.model.cached.forward_cached: prefill
into the paged cache, then decode steps) is checked with greedy decoding; m3jax.Engine is exercised when
it exists.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import m3jax
from m3jax.testing import random_model


@pytest.fixture
def tpu_calls(monkeypatch):
    """Counts the traces of each pallas_kernels.tpu op (dispatch looks them up at call time)."""
    import pallas_kernels.tpu as tpu_ops
    calls = {}
    for op in ("indexer_topk", "sparse_attention", "dense_attention"):
        fn = getattr(tpu_ops, op)

        def counted(*a, _fn=fn, _op=op, **kw):
            calls[_op] = calls.get(_op, 0) + 1
            return _fn(*a, **kw)
        monkeypatch.setattr(tpu_ops, op, counted)
    return calls


@pytest.fixture(scope="module")
def model():
    cfg = m3jax.M3Config.tiny(head_dim=128, index_dim=128, block_size=16, topk_blocks=2)
    return random_model(cfg, seed=0)


def _with_impl(model, impl):
    graphdef, state = nnx.split(model)
    m = nnx.merge(graphdef, state)
    m.attn_impl = impl
    return m


def test_forward_tpu_interpret_matches_reference(model, tpu_calls):
    ids = jnp.asarray(np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 53)), jnp.int32)
    want = _with_impl(model, "reference")(ids)
    got = _with_impl(model, "tpu-interpret")(ids)
    assert set(tpu_calls) == {"indexer_topk", "sparse_attention", "dense_attention"}
    assert not np.isnan(np.asarray(got)).any()
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(got.argmax(-1)), np.asarray(want.argmax(-1)))


def _greedy_cached(model, impl, prompts, new_tokens):
    """Greedy decoding through forward_cached: one ragged prefill group, then [B, 1] decode steps (jitted)."""
    from m3jax.cache import PageAllocator, init_cache, page_table_row
    from m3jax.model.cached import StepGroup, forward_cached

    graphdef, state = nnx.split(_with_impl(model, impl))

    @functools.partial(jax.jit, donate_argnums=1)
    def step(state, cache, tokens, q_pos, table, at):
        logits, cache = forward_cached(nnx.merge(graphdef, state), cache, [StepGroup(tokens, q_pos, table)], [at])
        return jnp.argmax(logits[0], axis=-1).astype(jnp.int32), cache

    r = model.config.msa.block_size
    num_pages, width = 16, 8
    alloc = PageAllocator(num_pages)
    for i, p in enumerate(prompts):
        alloc.ensure(i, len(p) + new_tokens, r)
    table = jnp.asarray([page_table_row(alloc.pages(i), width) for i in range(len(prompts))], jnp.int32)
    t = max(map(len, prompts))
    tokens = np.zeros((len(prompts), t), np.int32)
    q_pos = np.full((len(prompts), t), -1, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)], q_pos[i, :len(p)] = p, np.arange(len(p))
    lens = np.array([len(p) for p in prompts])
    nxt, cache = step(state, init_cache(model, num_pages), jnp.asarray(tokens), jnp.asarray(q_pos), table,
                      jnp.asarray(lens - 1, jnp.int32))
    out = [np.asarray(nxt)]
    for _ in range(new_tokens - 1):
        nxt, cache = step(state, cache, nxt[:, None], jnp.asarray(lens[:, None], jnp.int32), table,
                          jnp.zeros(len(prompts), jnp.int32))
        lens = lens + 1
        out.append(np.asarray(nxt))
    return np.stack(out, axis=1)


def test_cached_greedy_tpu_interpret_matches_reference(model, tpu_calls):
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(0, 256, 21)), list(rng.integers(0, 256, 35))]   # ragged, partial pages
    want = _greedy_cached(model, "reference", prompts, 4)
    got = _greedy_cached(model, "tpu-interpret", prompts, 4)
    assert set(tpu_calls) == {"indexer_topk", "sparse_attention", "dense_attention"}
    np.testing.assert_array_equal(got, want)
    # And the cached tokens are the no-cache forward's greedy continuation.
    seq = jnp.asarray([prompts[1] + list(want[1, :-1])], jnp.int32)
    full = _with_impl(model, "reference")(seq)
    np.testing.assert_array_equal(np.asarray(full.argmax(-1))[0, len(prompts[1]) - 1:], want[1])


@pytest.mark.skipif(not hasattr(m3jax, "Engine"), reason="m3jax.Engine not built yet")
def test_engine_greedy_tpu_interpret_matches_reference(model, tpu_calls):
    prompts = [[5, 9, 200, 31] * 6, [7, 8, 9]]
    params = m3jax.SamplingParams(max_new_tokens=3, temperature=0.0)
    outs = {}
    for impl in ("reference", "tpu-interpret"):
        engine = m3jax.Engine(_with_impl(model, impl), max_batch_size=2, max_seq_len=64)
        outs[impl] = [r.token_ids for r in m3jax.generate(engine, prompts, params)]
    assert outs["tpu-interpret"] == outs["reference"]
    assert set(tpu_calls) == {"indexer_topk", "sparse_attention", "dense_attention"}
