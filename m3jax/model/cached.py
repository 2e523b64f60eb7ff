"""The cached forward of M3ForCausalLM: prefill chunks and batched decode over the paged KV + index-K cache.

One step runs one or more *groups*, each a rectangle of queries `[B, T]` (a decode group is `[B, 1]`; a prefill
group holds chunks of prompts, right-padded). Per layer and group: norm -> project (q, k, v, iq, ik) -> write
the new k/v/ik rows into their pages -> attend through `pallas_kernels.dispatch` with the cache pages -> output
projection; then the feed-forward block runs once over the tokens of all groups together.

Semantics are exactly those of the no-cache forward (M3_SPEC.md §3.6): a token at absolute position p writes
its keys to page `page_table[b, p // R]`, row `p % R`, then scores the whole index-K history (every earlier
block, its own block forced) and attends to its chosen blocks, causal inside its own block. Padding queries
(q_pos = -1) write to the sink page 0 and produce 0 attention output. So chunked prefill (any chunk sizes),
one-shot prefill and decode give the logits of `model(input_ids)`.

The cache stores each stack's layers folded into the page axis (m3jax/cache.py): layer l reads the pool
through `page_table + l * P`, so the pool stays in the scan carry and is updated in place.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from m3jax.cache import KVCache, StackCache
from m3jax.model.attention import PagedKV


class StepGroup(NamedTuple):
    """One rectangle of queries of a step (right-padded; requests never share a row)."""

    tokens: jax.Array       # i32[B, T] token ids; padding entries may hold any valid id
    q_pos: jax.Array        # i32[B, T] absolute positions; -1 marks padding
    page_table: jax.Array   # i32[B, M] physical page of each logical block (sink 0 past the request's end)


def _run_stack(stack, stack_cache: StackCache, hs, groups, ropes, num_pages: int, impl,
               unroll: bool = False, layer_states=None):
    """All layers of one LayerStack over every group; returns (hs, updated StackCache).

    unroll: a Python loop over the layers (static weight slices) instead of `stack.scan`; compile time grows
    with the layer count, but no per-iteration dynamic slice of the stacked weights is needed.
    layer_states: with unroll, one nnx.State per layer (unstacked arrays, see `split_layer_states`) to use
    instead of slicing the stacked weights inside the step (on GPU those slices are copies, every step).
    """

    def body(layer, carry, l):
        hs, k_pool, v_pool, ik_pool = carry
        offset = l * num_pages
        new_hs = []
        for h, g, (cos, sin) in zip(hs, groups, ropes):
            p = layer.attn.project(layer.input_norm(h), cos, sin)
            o, kv = layer.attn.attend_cached(p, PagedKV(k_pool, v_pool, g.page_table, ik_pool), g.q_pos, offset,
                                             impl=impl)
            k_pool, v_pool, ik_pool = kv.k_pages, kv.v_pages, kv.ik_pages
            new_hs.append(h + layer.attn.output(o))
        # Feed-forward over the tokens of all groups at once: [1, sum(B*T), D].
        d = new_hs[0].shape[-1]
        flat = jnp.concatenate([h.reshape(1, -1, d) for h in new_hs], axis=1)
        flat = layer.ffn_block(flat)
        out, start = [], 0
        for h in new_hs:
            n = h.shape[0] * h.shape[1]
            out.append(flat[:, start:start + n].reshape(h.shape))
            start += n
        return (out, k_pool, v_pool, ik_pool), None

    carry = (list(hs), stack_cache.k_pages, stack_cache.v_pages, stack_cache.ik_pages)
    if unroll:
        graphdef, state = nnx.split(stack.layers)
        for l in range(stack.num_layers):
            st = layer_states[l] if layer_states is not None else jax.tree.map(lambda x: x[l], state)
            layer = nnx.merge(graphdef, st)
            carry, _ = body(layer, carry, l)
        hs, k, v, ik = carry
    else:
        (hs, k, v, ik), _ = stack.scan(body, carry, jnp.arange(stack.num_layers, dtype=jnp.int32))
    return hs, StackCache(k, v, ik)


def forward_cached(model, cache: KVCache, groups: Sequence[StepGroup],
                   logits_at: Sequence[jax.Array] | None = None, *, unroll_layers: bool = False,
                   layer_states=None):
    """Run one cached step. Returns (logits per group, updated cache).

    logits_at: per group i32[B], the query index t whose logits are wanted (f32[B, V] per group); None gives
    the logits of every query, f32[B, T, V] per group. Rows that are all padding return garbage logits.
    The caller donates `cache` to the jitted step that calls this; the update is functional.
    unroll_layers: run the layers of each stack as a Python loop instead of a scan (see _run_stack).
    layer_states: with unroll_layers, `split_layer_states(model)`: per-layer weights, one list per stack.
    """
    if not groups:
        raise ValueError("forward_cached needs at least one group")
    if len(cache.stacks) != len(model.stacks):
        raise ValueError(f"cache has {len(cache.stacks)} stacks, the model {len(model.stacks)}")
    impl = model.attn_impl
    ropes = [model.rope(jnp.maximum(g.q_pos, 0)) for g in groups]
    hs = [model.embed(g.tokens) for g in groups]
    new_stacks = []
    for i, (stack, sc) in enumerate(zip(model.stacks, cache.stacks)):
        ls = None if layer_states is None else layer_states[i]
        hs, sc = _run_stack(stack, sc, hs, groups, ropes, cache.num_pages, impl, unroll_layers, ls)
        new_stacks.append(sc)
    new_cache = KVCache(new_stacks, cache.num_pages, cache.page_size, cache.num_shards)
    if logits_at is None:
        return [model.logits(h) for h in hs], new_cache
    out = []
    for h, idx in zip(hs, logits_at):
        sel = jnp.take_along_axis(h, idx[:, None, None].astype(jnp.int32), axis=1)   # [B, 1, D]
        out.append(model.logits(sel)[:, 0])
    return out, new_cache


def split_layer_states(model) -> list[list]:
    """Per-layer copies of every stack's weights (device arrays, one nnx.State per layer), made once.

    Costs a second copy of the stacked weights while the model keeps its own; pays off on GPU, where slicing
    a layer out of a stacked weight inside the step is a copy of that weight at every step.
    """
    out = []
    for stack in model.stacks:
        _, state = nnx.split(stack.layers)
        out.append([jax.tree.map(lambda x: x[l], state) for l in range(stack.num_layers)])
    return out
