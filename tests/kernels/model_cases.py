"""Model-level helpers shared by the GPU and TPU kernel suites: the same model with another attention
implementation, and greedy decoding through the cached forward."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def with_impl(model, impl):
    graphdef, state = nnx.split(model)
    m = nnx.merge(graphdef, state)
    m.attn_impl = impl
    return m


def greedy_cached(model, impl, prompts, new_tokens, num_pages=24):
    """Greedy decoding through forward_cached: one ragged prefill group, then [B, 1] decode steps (jitted)."""
    from m3jax.cache import PageAllocator, init_cache, page_table_row
    from m3jax.model.cached import StepGroup, forward_cached

    graphdef, state = nnx.split(with_impl(model, impl))

    @functools.partial(jax.jit, donate_argnums=1)
    def step(state, cache, tokens, q_pos, table, at):
        logits, cache = forward_cached(nnx.merge(graphdef, state), cache, [StepGroup(tokens, q_pos, table)], [at])
        return jnp.argmax(logits[0], axis=-1).astype(jnp.int32), cache

    r = model.config.msa.block_size
    width = 8
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
