"""The tiny model through the `gpu` dispatch path gives the reference path's logits and greedy tokens.

On CPU the GPU kernels run in the Pallas interpreter (`gpu-interpret`); on a GPU backend compiled (`gpu`). The
default tiny config (pages of 8 rows, head dim 16) exercises the kernels' padding to triton tiles; top-2 blocks
make prompts of a few blocks really sparse. The cached path (prefill into the paged cache, then decode steps)
is checked with greedy decoding through m3jax.model.cached.forward_cached.
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

IMPL = "gpu-interpret" if jax.default_backend() == "cpu" else "gpu"


@pytest.fixture(scope="module")
def model():
    return random_model(m3jax.M3Config.tiny(topk_blocks=2), seed=0)


def _with_impl(model, impl):
    graphdef, state = nnx.split(model)
    m = nnx.merge(graphdef, state)
    m.attn_impl = impl
    return m


def test_forward_gpu_matches_reference(model):
    ids = jnp.asarray(np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 37)), jnp.int32)
    with jax.default_matmul_precision("highest"):          # GPU: no tf32 in the model's own f32 matmuls
        want = _with_impl(model, "reference")(ids)
        got = _with_impl(model, IMPL)(ids)
    assert not np.isnan(np.asarray(got)).any()
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-4)
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
    num_pages, width = 24, 8
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


def test_cached_greedy_gpu_matches_reference(model):
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(0, 256, 21)), list(rng.integers(0, 256, 35))]   # ragged, partial pages
    with jax.default_matmul_precision("highest"):
        want = _greedy_cached(model, "reference", prompts, 3)
        got = _greedy_cached(model, IMPL, prompts, 3)
    np.testing.assert_array_equal(got, want)
