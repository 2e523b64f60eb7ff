"""The device side of generation: the model's state, the paged cache, and a small fixed set of jitted step programs.

`Runner.execute(batch)` takes the rows the scheduler chose (m3jax.scheduler.Batch: per row the tokens to compute,
their first position, the request's page table, its data shard and sampling parameters), lays them out as step
inputs, runs the cached forward (m3jax.model.cached.forward_cached) that writes the new keys into the donated
cache, checks that every row's logits are finite, and samples the next token of every row that asks for one. It is
the seam for anything that wants to run rows without the scheduler (benchmarks/generate.py fills the cache and
times decode steps this way).

Step layout: two fixed rectangles, laid out shard by shard ([D, rows per shard]) so that every data shard computes
only its requests, over its own pages:
  - the decode group [rows, 1]: one token per decoding request, rows padded to a decode bucket
    (`row_buckets`, default {min(8, max_batch_size), max_batch_size});
  - the prefill group [prefill rows, row_len]: a flat token budget (the scheduler's per-shard prefill budget,
    max_tokens_per_step - max_batch_size in total) cut into rows of `row_len` tokens. A prompt chunk of n tokens
    takes ceil(n / row_len) consecutive rows, each with the request's page table and its own positions.
The programs (`Runner.programs`) are: decode only, one per decode bucket, and one mixed program (the largest decode
bucket + the prefill group; a step with prompt chunks but no decode rows runs it with an all-padding decode group).
So an Engine compiles len(row_buckets) + 1 <= 3 step programs by default, whatever the mix of prompt lengths and
batch sizes. Before, rows and chunk lengths were bucketed separately per group: measured on the 2-core CPU box
(tiny model, 2026-11-30), the mixed workload of tests/test_compile_bound.py compiled 17 programs (now 3), and
issue 22's 64 prompts of 50-1500 tokens with Engine(max_batch_size=64, max_seq_len=2048) 17 programs in a first
call of 501 s (now 3 programs, 128 s; the box was shared, so the times are rough).

Why rows of `row_len` tokens rather than one [1, N] row per token or [rows, prefill_chunk] rectangles: a chunk
split into rows is exact (every row of the group writes its keys before any row attends, so a later row of the
same chunk sees the earlier ones through the cache, causally by position), and the kernels' work does not
depend on how a request's queries are split into rows as long as a row is at least one kernel tile: the GPU dense
and indexer kernels tile each row by TQ = 128 / G_padded tokens (8 for M3: 16 query heads per KV group) and walk
the history per tile; the sparse kernel runs per token, and its KV-block-major schedule is chosen from the total
number of queries (pallas_kernels/gpu/attention.py). Per token rows ([N, 1]) would instead give every token its own
page-table row and decode-style programs; [rows, prefill_chunk] rectangles pad every short prompt to the chunk
length. row_len = 64 (DEFAULT_ROW_LEN) wastes < 64 tokens per prompt (the last chunk's last row) and lets up to
8 prompts share a step of the default 512-token prefill budget. The reference (CPU) kernels gather a row's whole
page table once per row, so very short rows cost more there. row_len and the padded decode rows of the mixed
program have not been swept on the GPU yet (issue 22 asks for that sweep). The full-attention layers get the
`contiguous_chunks` promise (each row: consecutive positions, then padding; a chunk spread over several rows is
exact, since every row writes its keys before any row attends): which computation that gives per group is
`Runner.dense_attention_paths` (logged at construction; see m3jax.model.cached.dense_attention_paths). With the
default 64-token rows that is the paged kernel: rows under pallas_kernels.gpu.attention.CHUNK_MIN_QUERIES (512)
were measured no faster through cuDNN on the H200. The MSA layers' computation per group (how the kernels join
selection and attention: pallas_kernels.gpu.msa) is `Runner.msa_paths`, logged likewise.

Weights are read in place. Each LayerStack runs as a `lax.scan` (compile time flat in the layer count), and every
matmul weight of a stack is an `InPlace` parameter (m3jax.model.layers.InPlace): the step holds the stack [L, ...]
and its layer index, and the kernels read layer l where it lies (the routed experts: `dispatch.moe(layer=)`; the
attention projections, dense MLP and shared expert: `stacked_matmul` -> `dispatch.linear`, on steps of at most
`dispatch.LINEAR_KERNEL_MAX_ROWS` rows; longer prompt chunks slice the layer and run XLA's matmul, where the copy is
amortised). Why: a scanned weight's per-step slice is a copy (XLA materialises it; measured on the H200: a 1.6 ms
memcpy per decode step of the scaled M3, 37% of batch 1, which XLA's dynamic-slice fusion did not remove), and
the kernel reads a layer's weight once where XLA's slice + matmul read it three times (benchmarks/RESULTS.md,
"Every stacked matmul weight read in place"). `Runner.stacked_matmul_paths` says which path the decode and
prompt-chunk steps take (logged at construction). This retired the "split" layer loop (per-layer copies of the
non-expert weights, made once, and a Python loop whose compile time grew with the layer count).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from m3jax import cache as cache_lib
from m3jax.distributed import start_to_host, to_host
from m3jax.model.cached import StepGroup, dense_attention_paths, forward_cached, msa_paths, stacked_matmul_paths
from m3jax.sampling import Sampled, SamplingBatch, SamplingParams, TopLogprob, sample
from m3jax.scheduler import Batch, Row, SampledToken
from m3jax.sharding import DATA

log = logging.getLogger(__name__)
DEFAULT_ROW_LEN = 64                 # tokens per prefill row (see the module docstring)
_TRACES = collections.Counter()      # step-program shape -> number of times it was traced (= compiled)


def trace_count() -> int:
    """How many times a jitted step program has been traced (each trace is one compilation)."""
    return sum(_TRACES.values())


class _Structure:
    """The static half of a step's weights: the model's graphdef and the treedef of its weights' leaves.

    The runner flattens the weights once and hands the step their leaves, a flat list: every call of a jitted
    function flattens its arguments and hashes its static ones, and for an nnx.State (Python flatten callbacks
    that sort keys) and a graphdef (hashed by walking the module graph) that is host time on every decode step,
    growing with the number of weight arrays. The hash is computed once; equal
    structures of two runners still share compiled programs."""

    def __init__(self, graphdef, treedef):
        self.graphdef, self.treedef = graphdef, treedef
        self._hash = hash((graphdef, treedef))

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return self is other or (isinstance(other, _Structure) and self._hash == other._hash
                                 and self.treedef == other.treedef and self.graphdef == other.graphdef)


def _step_impl(structure: _Structure, weights, cache, groups, logits_at, input_embeds=None):
    _TRACES[tuple(tuple(g.tokens.shape) for g in groups) + (input_embeds is not None,)] += 1
    model = nnx.merge(structure.graphdef, jax.tree.unflatten(structure.treedef, weights))
    logits, cache = forward_cached(model, cache, groups, logits_at, input_embeds=input_embeds)
    logits = jnp.concatenate(logits, axis=0)
    return logits, jnp.isfinite(logits).all(axis=-1), cache


# The cache is donated: each step updates the page pools in place. Without donation every step copies the
# whole pool (on the CPU backend too, which honours donation: 0.6 s per GiB of pool per step, measured).
_step = jax.jit(_step_impl, static_argnums=0, donate_argnums=2)


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


def default_row_buckets(max_batch_size: int) -> list[int]:
    """Decode buckets: a small one (few requests decode with little padding) and the full batch."""
    return sorted({min(8, max_batch_size), max_batch_size})


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


@dataclasses.dataclass(frozen=True)
class Slot:
    """One row of a step group: tokens [offset, offset + length) of a scheduled Row (a decode row is one slot;
    a prompt chunk is cut into slots of at most row_len tokens)."""

    row: Row
    offset: int
    length: int

    @property
    def last(self) -> bool:
        return self.offset + self.length == len(self.row.tokens)


@dataclasses.dataclass(frozen=True)
class StepProgram:
    """The shape of one compiled step: decode rows and prefill rows per data shard (0: no such group)."""

    decode_rows: int
    prefill_rows: int
    row_len: int

    def __str__(self) -> str:
        parts = [f"decode {self.decode_rows}"] * bool(self.decode_rows)
        parts += [f"prefill {self.prefill_rows}x{self.row_len}"] * bool(self.prefill_rows)
        return " + ".join(parts) + " rows/shard"


@dataclasses.dataclass(frozen=True)
class NonFinite:
    """Returned by Runner.execute, in place of a sample, for a row whose logits hold NaN or inf."""

    request_id: object


class Runner:
    """Model state + cache + the jitted step programs (see the module docstring).

    model: an M3ForCausalLM, already placed on `mesh` (its kernel choice is read once, from the model). num_pages:
    pages per layer in each data shard's pool. max_batch_size / max_seq_len bound the shapes. row_buckets: the
    padded decode batch sizes (all shards' rows). prefill_rows / row_len: the prefill group, rows per data shard
    and tokens per row (the scheduler's prefill budget, m3jax.scheduler.Scheduler.prefill_rows_per_shard).
    fp8_index_k: store index-K as float8_e4m3fn with a float32 scale per token (m3jax.cache).
    """

    def __init__(self, model, *, num_pages: int, max_batch_size: int, max_seq_len: int, prefill_rows: int,
                 row_len: int, mesh=None, row_buckets: Sequence[int] | None = None,
                 fp8_index_k: bool = False):
        self.model = model
        self.mesh = mesh
        self.data_shards = 1 if mesh is None else mesh.shape[DATA]
        self.max_blocks = cache_lib.max_blocks(max_seq_len, model.config.msa.block_size)
        self.cache = cache_lib.init_cache(model, num_pages, mesh=mesh, fp8_index_k=fp8_index_k)
        graphdef, state = nnx.split(model)
        self._weights, treedef = jax.tree.flatten(state)
        self._structure = _Structure(graphdef, treedef)
        self._rows_sharding = None if mesh is None else NamedSharding(mesh, P(DATA))
        total = _check_buckets("row_buckets", row_buckets, max_batch_size, default_row_buckets(max_batch_size))
        self.row_buckets = sorted({-(-b // self.data_shards) for b in total})     # rows per data shard
        self.prefill_rows, self.row_len = prefill_rows, row_len
        self.num_steps = 0
        self.dense_attention_paths = dense_attention_paths(model, {"decode": 1, "prefill": row_len})
        if self.dense_attention_paths:
            log.info("full-attention layers: %s", ", ".join(f"{k} rows -> {v}"
                                                            for k, v in self.dense_attention_paths.items()))
        self.msa_paths = msa_paths(model, {"decode": 1, "prefill": row_len})
        if self.msa_paths:
            log.info("MSA layers: %s", ", ".join(f"{k} rows -> {v}" for k, v in self.msa_paths.items()))
        # the attention projections and dense / shared MLPs of the largest decode step and of a prompt-chunk group
        # (the kernels see every row of the step: rows are not split over "data" for them)
        shards = self.data_shards
        self.stacked_matmul_paths = stacked_matmul_paths(
            model, {"decode": self.row_buckets[-1] * shards, "prefill": self.prefill_rows * self.row_len * shards})
        log.info("stacked matmuls: %s", ", ".join(f"{k} rows -> {v}" for k, v in self.stacked_matmul_paths.items()))

    @property
    def programs(self) -> list[StepProgram]:
        """Every step shape this runner can run (warmup compiles them all)."""
        decode = [StepProgram(b, 0, self.row_len) for b in self.row_buckets]
        return decode + [StepProgram(self.row_buckets[-1], self.prefill_rows, self.row_len)]

    def program_for(self, batch: Batch) -> StepProgram:
        shards = range(self.data_shards)
        decode = max(sum(r.shard == d for r in batch.decode) for d in shards)
        tiles = max(sum(-(-len(r.tokens) // self.row_len) for r in batch.prefill if r.shard == d) for d in shards)
        if tiles > self.prefill_rows:
            raise ValueError(f"step: prompt chunks need {tiles} rows of {self.row_len} tokens in one data shard, "
                             f"the prefill group has {self.prefill_rows} (the scheduler's budget was exceeded)")
        if not batch.prefill:
            return StepProgram(_bucket(decode, self.row_buckets), 0, self.row_len)
        return StepProgram(self.row_buckets[-1], self.prefill_rows, self.row_len)

    def _slots(self, batch: Batch, program: StepProgram) -> list[tuple[list[list[Slot]], int, int]]:
        """Per group of the program: (slots of each data shard, rows per shard, tokens per row)."""
        shards = range(self.data_shards)
        groups = [([[Slot(r, 0, 1) for r in batch.decode if r.shard == d] for d in shards], program.decode_rows, 1)]
        if program.prefill_rows:
            per_shard = [[Slot(r, o, min(self.row_len, len(r.tokens) - o))
                          for r in batch.prefill if r.shard == d for o in range(0, len(r.tokens), self.row_len)]
                         for d in shards]
            groups.append((per_shard, program.prefill_rows, self.row_len))
        return groups

    def _group(self, per_shard: list[list[Slot]], rows: int, width: int):
        """(StepGroup, logits index per row, the Slot at each batch position or None for padding)."""
        layout: list[Slot | None] = [None] * (rows * self.data_shards)
        for d, slots in enumerate(per_shard):
            layout[d * rows:d * rows + len(slots)] = slots
        tokens = np.zeros((len(layout), width), np.int32)
        q_pos = np.full((len(layout), width), -1, np.int32)
        table = np.zeros((len(layout), self.max_blocks), np.int32)
        last = np.zeros((len(layout),), np.int32)
        for i, s in enumerate(layout):
            if s is None:
                continue
            r, n = s.row, s.length
            tokens[i, :n] = r.tokens[s.offset:s.offset + n]
            q_pos[i, :n] = np.arange(r.start + s.offset, r.start + s.offset + n)
            table[i, :len(r.pages)] = r.pages
            last[i] = n - 1
        group = StepGroup(tokens, q_pos, table)
        if self._rows_sharding is not None:
            group, last = jax.device_put((group, last), self._rows_sharding)
        return group, last, layout

    def _embeds(self, layout: Sequence[Slot | None], width: int, overrides: Mapping[Any, EmbedOverride]):
        """(mask [B, T], values [B, T, D]) of a group whose slots' tokens meet an override, else None."""
        mask, values = None, None
        for i, s in enumerate(layout):
            o = None if s is None else overrides.get(s.row.request_id)
            if o is None:
                continue
            first = s.row.start + s.offset
            lo, hi = np.searchsorted(o.positions, [first, first + s.length])
            if lo == hi:
                continue
            if mask is None:
                mask = np.zeros((len(layout), width), bool)
                values = np.zeros((len(layout), width, o.values.shape[-1]), np.dtype(self.model.dtype))
            mask[i, o.positions[lo:hi] - first] = True
            values[i, o.positions[lo:hi] - first] = o.values[lo:hi]
        if mask is None:
            return None
        if self._rows_sharding is not None:
            return jax.device_put((mask, values), self._rows_sharding)
        return mask, values

    def _run(self, batch: Batch, program: StepProgram, overrides: Mapping[Any, EmbedOverride] | None = None):
        groups, logits_at, layout, embeds = [], [], [], []
        for per_shard, rows, width in self._slots(batch, program):
            g, last, lay = self._group(per_shard, rows, width)
            groups.append(g)
            logits_at.append(last)
            layout.extend(lay)
            embeds.append(self._embeds(lay, width, overrides) if overrides else None)
        embeds = tuple(embeds) if any(e is not None for e in embeds) else None
        logits, finite, self.cache = _step(self._structure, self._weights, self.cache, tuple(groups),
                                           tuple(logits_at), embeds)
        return logits, finite, layout

    def execute(self, batch: Batch, overrides: Mapping[Any, EmbedOverride] | None = None
                ) -> list[SampledToken | NonFinite | None]:
        """Compute the batch's rows; returns, per row of batch.rows, a SampledToken (the token, and its logprob
        and top alternatives when the request asks) for rows with `sample`, NonFinite for a row whose logits are
        not all finite (nothing is sampled for it), else None. overrides: request id -> input embeddings
        replacing some of its prompt tokens' (image features at their placeholders); a step whose rows meet one
        runs the mixed program's variant with input embeddings (one more program, compiled when first needed:
        warmup does not compile it)."""
        if not batch.rows:
            return []
        logits, finite, layout = self._run(batch, self.program_for(batch), overrides)
        self.num_steps += 1
        # Sampling is dispatched before anything comes back to the host, so a step costs one device->host wait:
        # rows whose logits turn out non-finite are sampled too and their tokens dropped.
        want = [i for i, s in enumerate(layout) if s is not None and s.last and s.row.sample]
        if want:
            chosen = [layout[i].row for i in want]
            sampled = self._sample(logits, layout, all(r.params.temperature == 0 for r in chosen),
                                   any(r.params.logprobs for r in chosen), any(r.params.top_logprobs for r in chosen))
        start_to_host(finite, *(sampled if want else ()))
        finite = to_host(finite)                   # multi-host: gathered from every process's devices
        bad = {id(s.row) for i, s in enumerate(layout) if s is not None and not finite[i]}
        out: dict[int, SampledToken | NonFinite] = {id(r): NonFinite(r.request_id) for r in batch.rows
                                                    if id(r) in bad}
        if want:
            host = Sampled(*(None if a is None else to_host(a) for a in sampled))    # multi-host: every process's
            for i in want:
                row = layout[i].row
                if id(row) in bad:
                    continue
                n = row.params.top_logprobs
                top = None if not n else tuple(TopLogprob(int(t), float(lp)) for t, lp in
                                               zip(host.top_ids[i, :n], host.top_logprobs[i, :n]))
                lp = None if host.logprobs is None or not row.params.logprobs else float(host.logprobs[i])
                out[id(row)] = SampledToken(int(host.tokens[i]), lp, top)
        return [out.get(id(r)) for r in batch.rows]

    @staticmethod
    def _sample(logits, layout: list[Slot | None], all_greedy: bool, want_logprobs: bool,
                want_top: bool = False) -> Sampled:
        rows = [s.row if s is not None and s.last else None for s in layout]
        params = [r.params if r is not None else SamplingParams() for r in rows]
        seeds = [r.seed if r is not None else 0 for r in rows]
        counters = [r.num_generated if r is not None else 0 for r in rows]
        sb = SamplingBatch.from_params(params, seeds, counters, len(rows))
        return sample(logits, sb, all_greedy=all_greedy, want_logprobs=want_logprobs, want_top=want_top)  # device

    def warmup(self, on_program: Callable[[StepProgram], None] | None = None) -> None:
        """Compile (and run once, on padding only: keys go to the sink page) every step program, with the greedy
        and the sampling sampler of its logits shape. on_program(program) is called after each."""
        for program in self.programs:
            logits, _, layout = self._run(Batch(), program)
            for greedy in (True, False):
                self._sample(logits, layout, greedy, False)
            if on_program is not None:
                on_program(program)
