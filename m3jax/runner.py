"""The device side of generation: the model's state, the paged cache, and one jitted program per step shape.

`Runner.execute(batch)` takes the rows the scheduler chose (m3jax.scheduler.Batch: per row the tokens to compute,
their first position, the request's page table, its data shard and sampling parameters), lays them out as step
inputs, runs the cached forward (m3jax.model.cached.forward_cached) that writes the new keys into the donated
cache, and samples the next token of every row that asks for one. It is the seam for anything that wants to run
rows without the scheduler (benchmarks/generate.py fills the cache and times decode steps this way).

Layout: the decode rows form one group [B, 1] and the prefill rows one group [B, T]; rows are laid out shard by
shard ([D, rows per shard]) so that every data shard computes only its requests, over its own pages. Shapes are
bucketed (rows and chunk lengths to powers of two, capped by max_batch_size / prefill_chunk), so a steady stream
of decode steps reuses one compiled program per batch bucket. The layout is private to this module: a flat
ragged token batch (one program per token budget) can replace it without touching the scheduler or the engine,
and the shapes the current layout can produce are row_buckets x len_buckets (decode, prefill or both), which a
warmup can compile up front.

Layer loop (`layer_loop`): "scan" runs each LayerStack's layers as a `lax.scan` over the stacked weights; "split"
keeps one copy of each layer's weights (made once, 2x weight memory while the runner lives) and loops over them in
Python, so that no step slices a layer out of the stacked weights. Measured on one H200 (benchmarks/RESULTS.md,
"Generation", scaled M3 with 64 experts, 32K context): split decodes faster (batch 1: 16.3 -> 13.5 ms per step,
batch 32: 13.3 -> 11.6 ms) and prefills at the same speed (80.4K vs 82.2K tokens/s), an unrolled loop over the
stacked weights helped only at batch 1 and compiled 2.6x longer (78 s vs 30 s). The default is "scan" on every
backend: split's second copy of the weights does not fit for the released model on any card we have, and on
CPU and TPU nothing was measured that favours it. "split" stays for measuring (benchmarks/generate.py
--layer-loop split).
"""

from __future__ import annotations

import collections
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from m3jax import cache as cache_lib
from m3jax.distributed import to_host
from m3jax.model.cached import StepGroup, forward_cached
from m3jax.sampling import SamplingBatch, SamplingParams, sample
from m3jax.scheduler import Batch, Row
from m3jax.sharding import DATA

LAYER_LOOPS = ("scan", "split")
_TRACES = collections.Counter()      # step-program shape -> number of times it was traced (= compiled)


def trace_count() -> int:
    """How many times a jitted step program has been traced (each trace is one compilation)."""
    return sum(_TRACES.values())


def default_layer_loop(backend: str) -> str:
    """The layer loop of a backend (see the module docstring for the measurements behind it)."""
    del backend              # the same choice everywhere until a measurement says otherwise
    return "scan"


def _step_impl(graphdef, state, layer_states, cache, groups, logits_at, input_embeds=None):
    _TRACES[tuple(tuple(g.tokens.shape) for g in groups) + (input_embeds is not None,)] += 1
    model = nnx.merge(graphdef, state)
    logits, cache = forward_cached(model, cache, groups, logits_at, layer_states=layer_states,
                                   input_embeds=input_embeds)
    return jnp.concatenate(logits, axis=0), cache


_step_donating = jax.jit(_step_impl, static_argnums=0, donate_argnums=3)
_step_plain = jax.jit(_step_impl, static_argnums=0)


def buckets(limit: int, start: int = 1) -> list[int]:
    """Powers of two from `start` below `limit`, then `limit`."""
    out, b = [], start
    while b < limit:
        out.append(b)
        b *= 2
    return out + [limit]


def _bucket(n: int, sizes: list[int]) -> int:
    for b in sizes:
        if n <= b:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {sizes[-1]}")


def _check_buckets(name, given, limit, default) -> list[int]:
    if given is None:
        return default
    b = sorted(set(int(x) for x in given))
    if not b or b[0] < 1 or b[-1] != limit:
        raise ValueError(f"Engine: {name} must be positive sizes ending at {limit}, got {list(given)}")
    return b


class EmbedOverride(NamedTuple):
    """Input embeddings that replace token embeddings in one request's prompt (image / video features):
    the token at absolute position positions[k] enters the model as values[k]."""

    positions: np.ndarray      # int[n], ascending
    values: np.ndarray         # [n, hidden] in the model dtype


class Runner:
    """Model state + cache + the jitted step (see the module docstring).

    model: an M3ForCausalLM, already placed on `mesh` (its kernel choice is read once, from the model). num_pages:
    pages per layer in each data shard's pool. max_batch_size / max_seq_len / prefill_chunk bound the shapes.
    row_buckets / len_buckets: the padded batch sizes (all shards' rows) / prefill chunk lengths to compile for.
    layer_loop: "scan" | "split" | None (the backend's choice, `default_layer_loop`).
    """

    def __init__(self, model, *, num_pages: int, max_batch_size: int, max_seq_len: int, prefill_chunk: int,
                 mesh=None, row_buckets: Sequence[int] | None = None, len_buckets: Sequence[int] | None = None,
                 layer_loop: str | None = None):
        self.model = model
        self.mesh = mesh
        self.data_shards = 1 if mesh is None else mesh.shape[DATA]
        self.max_blocks = cache_lib.max_blocks(max_seq_len, model.config.msa.block_size)
        self.cache = cache_lib.init_cache(model, num_pages, mesh=mesh)
        backend = jax.default_backend()
        self.layer_loop = default_layer_loop(backend) if layer_loop is None else layer_loop
        if self.layer_loop not in LAYER_LOOPS:
            raise ValueError(f"Engine: layer_loop must be one of {LAYER_LOOPS} or None, got {layer_loop!r}")
        self._graphdef, self._state = nnx.split(model)
        self._layer_states = ([s.layer_states() for s in model.stacks] if self.layer_loop == "split" else None)
        # CPU ignores donation (and warns); elsewhere the cache is updated in place.
        self._step_fn = _step_plain if backend == "cpu" else _step_donating
        self._rows_sharding = None if mesh is None else NamedSharding(mesh, P(DATA))
        total = _check_buckets("row_buckets", row_buckets, max_batch_size, buckets(max_batch_size))
        self.row_buckets = sorted({-(-b // self.data_shards) for b in total})     # rows per data shard
        self.len_buckets = _check_buckets("len_buckets", len_buckets, prefill_chunk,
                                          buckets(prefill_chunk, min(16, prefill_chunk)))
        self.num_steps = 0

    def _group(self, rows: Sequence[Row], t_bucket: int):
        """(StepGroup, logits index per row, the Row at each batch position or None for padding)."""
        per_shard = [[r for r in rows if r.shard == d] for d in range(self.data_shards)]
        b = _bucket(max(map(len, per_shard)), self.row_buckets)
        layout: list[Row | None] = [None] * (b * self.data_shards)
        for d, shard_rows in enumerate(per_shard):
            layout[d * b:d * b + len(shard_rows)] = shard_rows
        tokens = np.zeros((len(layout), t_bucket), np.int32)
        q_pos = np.full((len(layout), t_bucket), -1, np.int32)
        table = np.zeros((len(layout), self.max_blocks), np.int32)
        last = np.zeros((len(layout),), np.int32)
        for i, r in enumerate(layout):
            if r is None:
                continue
            n = len(r.tokens)
            tokens[i, :n] = r.tokens
            q_pos[i, :n] = np.arange(r.start, r.start + n)
            table[i, :len(r.pages)] = r.pages
            last[i] = n - 1
        group = StepGroup(tokens, q_pos, table)
        if self._rows_sharding is not None:
            group, last = jax.device_put((group, last), self._rows_sharding)
        return group, last, layout

    def _embeds(self, layout: Sequence[Row | None], t_bucket: int, overrides: Mapping[Any, EmbedOverride]):
        """(mask [B, T], values [B, T, D]) of a group whose rows' tokens meet an override, else None."""
        mask, values = None, None
        for i, r in enumerate(layout):
            o = None if r is None else overrides.get(r.request_id)
            if o is None:
                continue
            lo, hi = np.searchsorted(o.positions, [r.start, r.start + len(r.tokens)])
            if lo == hi:
                continue
            if mask is None:
                mask = np.zeros((len(layout), t_bucket), bool)
                values = np.zeros((len(layout), t_bucket, o.values.shape[-1]), np.dtype(self.model.dtype))
            mask[i, o.positions[lo:hi] - r.start] = True
            values[i, o.positions[lo:hi] - r.start] = o.values[lo:hi]
        if mask is None:
            return None
        if self._rows_sharding is not None:
            return jax.device_put((mask, values), self._rows_sharding)
        return mask, values

    def execute(self, batch: Batch, overrides: Mapping[Any, EmbedOverride] | None = None
                ) -> list[tuple[int, float | None] | None]:
        """Compute the batch's rows; returns, per row of batch.rows, (sampled token, its logprob or None) for rows
        with `sample`, else None. overrides: request id -> input embeddings replacing some of its prompt
        tokens' (image features at their placeholders); a step whose rows meet one compiles its own program."""
        groups, logits_at, layout, embeds = [], [], [], []
        for rows, t_bucket in ((batch.decode, 1),
                               (batch.prefill, _bucket(max((len(r.tokens) for r in batch.prefill), default=1),
                                                       self.len_buckets))):
            if not rows:
                continue
            g, last, lay = self._group(rows, t_bucket)
            groups.append(g)
            logits_at.append(last)
            layout.extend(lay)
            embeds.append(self._embeds(lay, t_bucket, overrides) if overrides else None)
        if not groups:
            return []
        embeds = tuple(embeds) if any(e is not None for e in embeds) else None
        logits, self.cache = self._step_fn(self._graphdef, self._state, self._layer_states, self.cache,
                                           tuple(groups), tuple(logits_at), embeds)
        self.num_steps += 1
        out: dict[int, tuple[int, float | None]] = {}
        want = [i for i, r in enumerate(layout) if r is not None and r.sample]
        if want:
            params = [r.params if r is not None else SamplingParams() for r in layout]
            seeds = [r.seed if r is not None else 0 for r in layout]
            counters = [r.num_generated if r is not None else 0 for r in layout]
            sb = SamplingBatch.from_params(params, seeds, counters, len(layout))
            chosen = [layout[i] for i in want]
            tokens, lps = sample(logits, sb, all_greedy=all(r.params.temperature == 0 for r in chosen),
                                 want_logprobs=any(r.params.logprobs for r in chosen))
            tokens = to_host(tokens)                   # multi-host: gathered from every process's devices
            lps = None if lps is None else to_host(lps)
            for i in want:
                out[id(layout[i])] = (int(tokens[i]), None if lps is None else float(lps[i]))
        return [out.get(id(r)) for r in batch.rows]
