"""Model-level helpers shared by the GPU and TPU kernel suites: the same model with another kernel choice (attention
and MoE alike, `m3jax.params.with_impl`), and greedy decoding through the cached forward."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def with_impl(model, impl):
    """The same weights with kernel choice `impl`; checks that every Attention and MoE module took it."""
    from m3jax.model import Attention, MoE
    from m3jax.params import with_impl as remade

    m = remade(model, impl)
    kinds = [type(mod) for _, mod in nnx.iter_graph(m) if isinstance(mod, (Attention, MoE))]
    assert Attention in kinds and MoE in kinds, kinds
    assert all(mod.impl == impl for _, mod in nnx.iter_graph(m) if isinstance(mod, (Attention, MoE)))
    return m


def page_table_row(pages, max_blocks):
    """A request's page-table row: its pages, then the sink (page 0) up to max_blocks."""
    assert len(pages) <= max_blocks
    return list(pages) + [0] * (max_blocks - len(pages))


def greedy_cached(model, impl, prompts, new_tokens, num_pages=24):
    """Greedy decoding through forward_cached: one ragged prefill group, then [B, 1] decode steps (jitted)."""
    from m3jax.cache import init_cache
    from m3jax.model.cached import StepGroup, forward_cached
    from m3jax.scheduler import PageAllocator

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
