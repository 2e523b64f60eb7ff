"""The cached forward of M3ForCausalLM: prefill chunks and batched decode over the paged KV + index-K cache.

One step runs one or more *groups*, each a rectangle of queries `[B, T]` (a decode group is `[B, 1]`; a prefill
group holds chunks of prompts, right-padded). Each layer is `DecoderLayer.forward`, the same body as the no-cache
forward, with `CachedKeys` as its key source: per group, write the new k/v/ik rows into their pages, then attend
through `pallas_kernels.dispatch` over the cache pages; the feed-forward block runs once over all groups' tokens.

Semantics are exactly those of the no-cache forward (the MSA algorithm of the project's shared M3 spec, §3.6): a
token at absolute position p writes its keys to page `page_table[b, p // R]`, row `p % R`, then scores the whole
index-K history (every earlier block, its own block forced) and attends to its chosen blocks, causal inside its
own block. Padding queries (q_pos = -1) write to the sink page 0 and produce 0 attention output. So chunked
prefill (any chunk sizes), one-shot prefill and decode give the logits of `model(input_ids)`.

The cache stores each stack's layers folded into the page axis (m3jax/cache.py, `layer_offset`), so the pools
stay in the carry of the layer loop and are updated in place.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from m3jax.cache import KVCache, StackCache, layer_offset
from m3jax.model.attention import Attention, PagedKV, Projections
from m3jax.model.moe import MoE


class StepGroup(NamedTuple):
    """One rectangle of queries of a step (right-padded; requests never share a row).

    Contract: each row holds consecutive positions p0, p0 + 1, ... of one request, then -1 padding (a row of
    padding only is allowed). The full-attention layers rely on it (Attention.attend_cached passes it to
    dense_attention as contiguous_chunks=True: on GPU a bf16 row of 512+ queries sends its chunk to cuDNN); a
    row that breaks it gets NaN on that path, which the runner reports as non-finite logits, never a silently
    wrong answer.
    """

    tokens: jax.Array       # i32[B, T] token ids; padding entries may hold any valid id
    q_pos: jax.Array        # i32[B, T] absolute positions; -1 marks padding
    page_table: jax.Array   # i32[B, M] physical page of each logical block (sink 0 past the request's end)


class CachedKeys:
    """Key source of one layer of a stack: the stack's pools (all its layers folded into the page axis), this
    layer's page offset in them, and the groups of the step. Each group first writes its keys, so a later group
    (and the group itself, causally) reads them."""

    def __init__(self, pools: StackCache, groups: Sequence[StepGroup], offset):
        self.pools, self.groups, self.offset = pools, groups, offset

    def attend(self, attn: Attention, group: int, p: Projections):
        g = self.groups[group]
        pools = self.pools
        kv = PagedKV(pools.k_pages, pools.v_pages, g.page_table, pools.ik_pages, pools.ik_scale)
        o, kv = attn.attend_cached(p, kv, g.q_pos, self.offset)
        pools = StackCache(kv.k_pages, kv.v_pages, kv.ik_pages, kv.ik_scale)
        return o, CachedKeys(pools, self.groups, self.offset), None


def dense_attention_paths(model, queries_per_row: dict[str, int]) -> dict[str, str]:
    """{group name: the computation the full-attention layers run for rows of that many queries}, as the cached
    step runs them (Attention.dense_path), e.g. {"decode": "gpu:paged", "prefill":
    "gpu:cudnn-chunk+paged-history"}; {} for a model without full-attention layers. Every full-attention layer
    shares the model's kernel choice and dtype, so the first one answers for all."""
    for stack in model.stacks:
        attn = stack.layers.attn
        if not attn.sparse:
            return {name: attn.dense_path(t, model.dtype) for name, t in queries_per_row.items()}
    return {}


def msa_paths(model, queries_per_row: dict[str, int]) -> dict[str, str]:
    """{group name: the computation the MSA layers run for rows of that many queries} (Attention.msa_path), e.g.
    {"decode": "gpu:two-step", "prefill": "gpu:two-step"}; {} for a model without MSA layers. Every MSA layer
    shares the model's kernel choice, so the first one answers for all."""
    for stack in model.stacks:
        attn = stack.layers.attn
        if attn.sparse:
            return {name: attn.msa_path(t) for name, t in queries_per_row.items()}
    return {}


def stacked_matmul_paths(model, rows_per_group: dict[str, int]) -> dict[str, str]:
    """{group name: what the stacked matmuls (attention projections, dense MLP, shared expert) run for steps of
    that many rows}: one path ("gpu": the kernels read each layer's weights in place; "xla": the layer's slice,
    then XLA's matmul; see m3jax.model.layers.stacked_matmul), or "path: weights; ..." when they differ."""
    out = {}
    for group, rows in rows_per_group.items():
        by_path: dict[str, list[str]] = {}
        for stack in model.stacks:
            layers = stack.layers
            mlp = layers.ffn.shared if isinstance(layers.ffn, MoE) else layers.ffn
            found = {**{f"attn.{k}": v for k, v in layers.attn.matmul_paths(rows).items()},
                     **{f"mlp.{k}": v for k, v in mlp.matmul_paths(rows).items()}}
            for name, path in found.items():
                if name not in by_path.get(path, []):
                    by_path.setdefault(path, []).append(name)
        out[group] = (next(iter(by_path)) if len(by_path) == 1
                      else "; ".join(f"{p}: {', '.join(names)}" for p, names in sorted(by_path.items())))
    return out


def _run_stack(stack, pools: StackCache, hs, groups, ropes, num_pages: int):
    """All layers of one LayerStack over every group (`stack.scan`: the matmul weights read in place from their
    stacks, by layer index); returns (hs, updated StackCache)."""

    def body(layer, index, carry, _):
        hs, pools = carry
        hs, keys, _ = layer.forward(hs, ropes, CachedKeys(pools, groups, layer_offset(index, num_pages)), index)
        return (hs, keys.pools), None

    carry = (list(hs), pools)
    carry, _ = stack.scan(body, carry)
    return carry


def forward_cached(model, cache: KVCache, groups: Sequence[StepGroup],
                   logits_at: Sequence[jax.Array] | None = None, *, input_embeds=None):
    """Run one cached step. Returns (logits per group, updated cache).

    logits_at: per group i32[B], the query index t whose logits are wanted (f32[B, V] per group); None gives
    the logits of every query, f32[B, T, V] per group. Rows that are all padding return garbage logits.
    The caller donates `cache` to the jitted step that calls this; the update is functional.
    input_embeds: None, or per group None or (mask bool[B, T], values [B, T, D]): the input embedding of each
    masked token is `values` instead of its token's row (image / video features at their placeholders).
    """
    if not groups:
        raise ValueError("forward_cached needs at least one group")
    if len(cache.stacks) != len(model.stacks):
        raise ValueError(f"cache has {len(cache.stacks)} stacks, the model {len(model.stacks)}")
    ropes = [model.rope(jnp.maximum(g.q_pos, 0)) for g in groups]
    hs = [model.embed(g.tokens) for g in groups]
    if input_embeds is not None:
        hs = [h if e is None else jnp.where(e[0][..., None], e[1].astype(h.dtype), h) for h, e in zip(hs, input_embeds)]
    new_stacks = []
    for i, (stack, sc) in enumerate(zip(model.stacks, cache.stacks)):
        hs, sc = _run_stack(stack, sc, hs, groups, ropes, cache.num_pages)
        new_stacks.append(sc)
    new_cache = KVCache(new_stacks, cache.num_pages, cache.page_size, cache.num_shards)
    if logits_at is None:
        return [model.logits(h) for h in hs], new_cache
    out = []
    for h, idx in zip(hs, logits_at):
        sel = jnp.take_along_axis(h, idx[:, None, None].astype(jnp.int32), axis=1)   # [B, 1, D]
        out.append(model.logits(sel)[:, 0])
    return out, new_cache
