"""The batch generation engine: continuous batching, chunked prefill mixed with decode, sampling, streaming.

    engine = m3jax.Engine(model, max_batch_size=8, max_seq_len=8192)
    rid = engine.add_request([1, 2, 3], m3jax.SamplingParams(max_new_tokens=16), on_token=print)
    while engine.has_work(): engine.step()          # or engine.run(), or engine.stream(prompt)
    out = m3jax.generate(model_or_engine, ["hello"], m3jax.SamplingParams(max_new_tokens=64))

Scheduling, once per `step()`:
  1. Admit waiting requests (FIFO) while a batch slot is free and the pages for the whole request
     (prompt + max_new_tokens, capped at max_seq_len) can be reserved; otherwise they wait in the queue.
     Reserving up front means a running request can never run out of pages mid-generation.
  2. Every request whose prompt is done decodes one token (the decode group, [B, 1]).
  3. The remaining token budget (`max_tokens_per_step` minus the decode rows) goes to prompt chunks of at most
     `prefill_chunk` tokens, oldest request first (the prefill group, [B, T]).
  Both groups run in one jitted step (m3jax.model.cached.forward_cached) that writes the new keys into the
  donated cache, then the sampler picks the next token of every row that finished its prompt or decoded.
Shapes are bucketed (rows and chunk lengths to powers of two, capped by max_batch_size / prefill_chunk), so a
steady stream of decode steps reuses one compiled program per batch bucket.
On a mesh with "data" = D > 1, each data shard owns a page pool and its own allocator; a request is admitted to
the shard with the fewest running requests (that has the pages), and a group's rows are laid out shard by
shard, [D, rows per shard], so that every data shard computes only its requests, over its own pages.
On GPU, `split_layer_weights=True` keeps per-layer copies of the stacked layer weights: XLA otherwise copies each
layer's weight slice at every step (2.9x faster decode on the scaled-M3 benchmark, for 2x weight memory; see
benchmarks/RESULTS.md, "Generation").
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import logging
import os
import sys
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from m3jax import cache as cache_lib
from m3jax.model.cached import StepGroup, forward_cached, split_layer_states
from m3jax.sampling import SamplingBatch, SamplingParams, sample
from m3jax.sharding import DATA

log = logging.getLogger(__name__)

FINISH_STOP, FINISH_LENGTH = "stop", "length"
_TRACES = collections.Counter()      # key -> number of times the step function was traced (= compiled)


def trace_count() -> int:
    """How many times the jitted engine step has been traced (each trace is one compilation)."""
    return sum(_TRACES.values())


@dataclasses.dataclass
class GenerationResult:
    """The outcome of one request. token_ids holds the generated ids (a final eos / stop id included);
    text is their decoding (without that id, cut before a stop string) or None without a tokenizer."""

    token_ids: list[int]
    text: str | None
    finish_reason: str                 # "stop" | "length"
    logprobs: list[float] | None = None
    prompt_token_ids: list[int] | None = None
    request_id: Any = None


@dataclasses.dataclass
class StepOutput:
    """What one step produced for one request."""

    request_id: Any
    new_token_ids: list[int]
    finished: bool
    result: GenerationResult | None = None


@dataclasses.dataclass(eq=False)
class _Request:
    id: Any
    prompt: list[int]
    params: SamplingParams
    seed: int
    on_token: Callable[[Any, int], None] | None
    shard: int = 0                   # the data shard that holds its pages and computes it
    tokens: list[int] = dataclasses.field(default_factory=list)    # prompt + generated
    num_computed: int = 0            # tokens whose keys are in the cache
    logprobs: list[float] = dataclasses.field(default_factory=list)
    max_total: int = 0               # stop with "length" once len(tokens) reaches this

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - len(self.prompt)

    @property
    def pending(self) -> int:
        return len(self.tokens) - self.num_computed


def _step_impl(graphdef, unroll, state, layer_states, cache, groups, logits_at):
    _TRACES[(tuple(tuple(g.tokens.shape) for g in groups))] += 1
    model = nnx.merge(graphdef, state)
    logits, cache = forward_cached(model, cache, groups, logits_at, unroll_layers=unroll, layer_states=layer_states)
    return jnp.concatenate(logits, axis=0), cache


_step_donating = jax.jit(_step_impl, static_argnums=(0, 1), donate_argnums=4)
_step_plain = jax.jit(_step_impl, static_argnums=(0, 1))


def _buckets(limit: int, start: int = 1) -> list[int]:
    out, b = [], start
    while b < limit:
        out.append(b)
        b *= 2
    return out + [limit]


def _bucket(n: int, buckets: list[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


class Engine:
    """Continuous-batching generation over a paged KV + index-K cache. See the module docstring.

    model: an M3ForCausalLM (its attn_impl picks the attention kernels). max_batch_size: requests decoding at once.
    max_seq_len: prompt + generated tokens per request. num_pages: pages per layer (page 0 is the sink) in each data
    shard's pool; None sizes the pool from free device memory (`memory_fraction` of it), at most enough for the
    shard's share of max_batch_size full-length requests. max_tokens_per_step: token budget of one step (decode rows
    + prefill chunk tokens). prefill_chunk: longest prompt chunk of one request in a step. tokenizer: for string
    prompts, stop strings and text; defaults to the checkpoint's (model.checkpoint_dir). mesh: the device mesh,
    which must be the one the model was placed on (default: model.mesh); K/V pools split on their head axis over
    "model" and one pool per "data" shard (see cache.init_cache); the model's parameters are placed by m3jax.load /
    m3jax.sharding. row_buckets / len_buckets: the padded batch sizes / prefill chunk lengths to compile for
    (default: powers of two up to max_batch_size / prefill_chunk; with D data shards, row buckets count the rows of
    all shards and are rounded up to multiples of D); each (decode rows, prefill rows x length) combination compiles
    once. unroll_layers: run each stack's layers as a Python loop instead of a scan (longer compile; avoids slicing
    the stacked weights inside the loop). split_layer_weights (with unroll_layers): keep per-layer copies of the
    stacked weights (2x weight memory while the model lives) so that no step slices them.
    """

    def __init__(self, model, max_batch_size: int = 8, max_seq_len: int = 8192, mesh=None, *,
                 num_pages: int | None = None, max_tokens_per_step: int | None = None,
                 prefill_chunk: int = 512, tokenizer=None, memory_fraction: float = 0.5, seed: int = 0,
                 row_buckets: Sequence[int] | None = None, len_buckets: Sequence[int] | None = None,
                 unroll_layers: bool = False, split_layer_weights: bool = False):
        cfg = model.config
        for name, v in (("max_batch_size", max_batch_size), ("max_seq_len", max_seq_len),
                        ("prefill_chunk", prefill_chunk)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"Engine: {name} must be a positive integer, got {v!r}")
        if max_seq_len > cfg.max_position_embeddings:
            raise ValueError(f"Engine: max_seq_len ({max_seq_len}) exceeds the model's max_position_embeddings "
                             f"({cfg.max_position_embeddings})")
        self.model = model
        self.config = cfg
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.page_size = cfg.msa.block_size
        self.max_blocks = cache_lib.max_blocks(max_seq_len, self.page_size)
        self.prefill_chunk = min(prefill_chunk, max_seq_len)
        self.max_tokens_per_step = max_tokens_per_step or (max_batch_size + self.prefill_chunk)
        if self.max_tokens_per_step <= max_batch_size:
            raise ValueError(f"Engine: max_tokens_per_step ({self.max_tokens_per_step}) must exceed "
                             f"max_batch_size ({max_batch_size}) so that prompts progress while batches decode")
        self.eos_ids = frozenset(cfg.eos_token_id)
        self._tokenizer = tokenizer
        self.seed = seed
        mesh = mesh if mesh is not None else getattr(model, "mesh", None)
        self.mesh = mesh
        self.data_shards = 1 if mesh is None else mesh.shape[DATA]
        self.rows_per_shard = -(-max_batch_size // self.data_shards)
        want = self.rows_per_shard * self.max_blocks + 1
        self.num_pages = num_pages if num_pages is not None else cache_lib.num_pages_for_memory(
            cfg, model.dtype, max_pages=want, memory_fraction=memory_fraction, mesh=mesh)
        self.cache = cache_lib.init_cache(model, self.num_pages, mesh=mesh)
        self.allocators = [cache_lib.PageAllocator(self.num_pages) for _ in range(self.data_shards)]
        self._rows_sharding = None if mesh is None else NamedSharding(mesh, P(DATA))
        self._graphdef, self._state = nnx.split(model)
        self._step_fn = _step_plain if jax.default_backend() == "cpu" else _step_donating
        total = self._check_buckets("row_buckets", row_buckets, max_batch_size, _buckets(max_batch_size))
        self._row_buckets = sorted({-(-b // self.data_shards) for b in total})     # rows per data shard
        self._len_buckets = self._check_buckets("len_buckets", len_buckets, self.prefill_chunk,
                                                _buckets(self.prefill_chunk, min(16, self.prefill_chunk)))
        self._waiting: collections.deque[_Request] = collections.deque()
        self._running: list[_Request] = []
        self._results: dict[Any, GenerationResult] = {}
        self._ids = itertools.count()
        self._known_ids: set = set()
        self.num_steps = 0
        self.unroll_layers = bool(unroll_layers or split_layer_weights)
        self._layer_states = split_layer_states(model) if split_layer_weights else None

    @staticmethod
    def _check_buckets(name, given, limit, default) -> list[int]:
        if given is None:
            return default
        b = sorted(set(int(x) for x in given))
        if not b or b[0] < 1 or b[-1] != limit:
            raise ValueError(f"Engine: {name} must be positive sizes ending at {limit}, got {list(given)}")
        return b

    # ------------------------------------------------------------------------------------------ input
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            path = getattr(self.model, "checkpoint_dir", None)
            if path is not None and os.path.exists(os.path.join(path, "tokenizer.json")):
                from m3jax.tokenizer import M3Tokenizer
                self._tokenizer = M3Tokenizer.from_pretrained(path)
        return self._tokenizer

    def encode_prompt(self, prompt, request, chat: bool = False) -> list[int]:
        """Token ids of a prompt (str or ids), checked against the vocab and max_seq_len; ValueError names it."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError(f"request {request}: prompt is empty")
            tok = self.tokenizer
            if tok is None:
                raise ValueError(f"request {request}: prompt is a string but no tokenizer is known (pass "
                                 f"tokenizer= or token ids)")
            if chat:
                prompt = tok.apply_chat_template([{"role": "user", "content": prompt}])
            ids = tok.encode(prompt)
        elif isinstance(prompt, (list, tuple, np.ndarray)):
            ids = [int(t) if isinstance(t, (int, np.integer)) and not isinstance(t, bool) else t for t in prompt]
            bad = [t for t in ids if not isinstance(t, int)]
            if bad:
                raise ValueError(f"request {request}: prompt token ids must be ints, got {bad[0]!r}")
        else:
            raise ValueError(f"request {request}: prompt must be a str or a list of token ids, got "
                             f"{type(prompt).__name__}")
        if not ids:
            raise ValueError(f"request {request}: prompt is empty")
        v = self.config.vocab_size
        out = [t for t in ids if not 0 <= t < v]
        if out:
            raise ValueError(f"request {request}: prompt token id {out[0]} is outside the vocab [0, {v})")
        if len(ids) > self.max_seq_len:
            raise ValueError(f"request {request}: prompt has {len(ids)} tokens, more than max_seq_len="
                             f"{self.max_seq_len}")
        return ids

    def _check_params(self, params: SamplingParams, request) -> None:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"request {request}: sampling must be a SamplingParams, got {type(params).__name__}")
        params.check(request)
        v = self.config.vocab_size
        if any(not 0 <= t < v for t in params.stop_token_ids):
            raise ValueError(f"request {request}: sampling.stop_token_ids must be in [0, {v}), got "
                             f"{list(params.stop_token_ids)}")
        if params.stop and self.tokenizer is None:
            raise ValueError(f"request {request}: sampling.stop (stop strings) needs a tokenizer")

    def _pages_needed(self, num_prompt: int, params: SamplingParams) -> int:
        total = min(num_prompt + params.max_new_tokens, self.max_seq_len)
        return cache_lib.pages_per_sequence(total, self.page_size)

    def prepare(self, prompt, sampling: SamplingParams | None = None, request_id=None, chat: bool = False):
        """Validate one request without queueing it: (token ids, params). Raises ValueError naming it."""
        name = request_id if request_id is not None else "<new>"
        sampling = SamplingParams() if sampling is None else sampling
        ids = self.encode_prompt(prompt, name, chat)
        self._check_params(sampling, name)
        need = self._pages_needed(len(ids), sampling)
        capacity = self.allocators[0].capacity
        if need > capacity:
            raise ValueError(f"request {name}: needs {need} pages (prompt {len(ids)} + max_new_tokens "
                             f"{sampling.max_new_tokens}), a cache pool has {capacity}")
        return ids, sampling

    def add_request(self, prompt, sampling: SamplingParams | None = None, *, request_id=None,
                    on_token: Callable[[Any, int], None] | None = None, chat: bool = False):
        """Queue a request; returns its id. Invalid input raises ValueError before anything is queued.

        on_token(request_id, token_id) is called for every generated token, as it is produced.
        """
        if request_id is not None and request_id in self._known_ids:
            raise ValueError(f"request {request_id}: request_id is already in use")
        ids, sampling = self.prepare(prompt, sampling, request_id, chat)
        serial = next(self._ids)
        rid = serial if request_id is None else request_id
        seed = sampling.seed if sampling.seed is not None else (self.seed * 1_000_003 + serial) % 2**32
        req = _Request(rid, ids, sampling, seed, on_token, tokens=list(ids),
                       max_total=min(len(ids) + sampling.max_new_tokens, self.max_seq_len))
        self._known_ids.add(rid)
        self._waiting.append(req)
        return rid

    # ------------------------------------------------------------------------------------------ state
    @property
    def allocator(self) -> cache_lib.PageAllocator:
        """The page allocator of a single-pool engine (with data shards: `allocators[shard]`)."""
        if self.data_shards != 1:
            raise ValueError(f"Engine: {self.data_shards} data shards have one allocator each; use allocators[d]")
        return self.allocators[0]

    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def pop_result(self, request_id) -> GenerationResult | None:
        return self._results.pop(request_id, None)

    # ------------------------------------------------------------------------------------------ steps
    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.max_batch_size:
            req = self._waiting[0]
            need = self._pages_needed(len(req.prompt), req.params)
            load = collections.Counter(r.shard for r in self._running)
            fits = [d for d in range(self.data_shards)
                    if load[d] < self.rows_per_shard and self.allocators[d].can_allocate(need)]
            if not fits:
                break                                     # queued until a running request frees pages
            req.shard = min(fits, key=lambda d: (load[d], -self.allocators[d].num_free))
            self.allocators[req.shard].allocate(req.id, need)
            self._running.append(self._waiting.popleft())

    def _schedule(self):
        decode = [r for r in self._running if r.pending == 1]
        budget = self.max_tokens_per_step - len(decode)
        chunks = []
        for r in self._running:
            if r.pending > 1 and budget > 0 and len(chunks) < self.max_batch_size:
                n = min(r.pending, self.prefill_chunk, budget)
                chunks.append((r, n))
                budget -= n
        return decode, chunks

    def _group(self, rows: list[tuple[_Request, int]], t_bucket: int):
        """(StepGroup, logits index per row, the (request, tokens) of each row or None for padding).

        Rows are laid out shard by shard: data shard d's requests sit in rows [d*b, (d+1)*b), b = its bucket.
        """
        per_shard = [[rn for rn in rows if rn[0].shard == d] for d in range(self.data_shards)]
        b = _bucket(max(map(len, per_shard)), self._row_buckets)
        layout = [None] * (b * self.data_shards)
        for d, shard_rows in enumerate(per_shard):
            layout[d * b:d * b + len(shard_rows)] = shard_rows
        tokens = np.zeros((len(layout), t_bucket), np.int32)
        q_pos = np.full((len(layout), t_bucket), -1, np.int32)
        table = np.zeros((len(layout), self.max_blocks), np.int32)
        last = np.zeros((len(layout),), np.int32)
        for i, rn in enumerate(layout):
            if rn is None:
                continue
            r, n = rn
            s = r.num_computed
            tokens[i, :n] = r.tokens[s:s + n]
            q_pos[i, :n] = np.arange(s, s + n)
            pages = self.allocators[r.shard].pages(r.id)
            table[i, :len(pages)] = pages
            last[i] = n - 1
        group = StepGroup(tokens, q_pos, table)
        if self._rows_sharding is not None:
            group, last = jax.device_put((group, last), self._rows_sharding)
        return group, last, layout

    def step(self) -> list[StepOutput]:
        """Admit, schedule, run one jitted step, sample, and retire finished requests."""
        self._admit()
        if not self._running:
            return []
        decode, chunks = self._schedule()
        groups, logits_at, rows = [], [], []
        for sel, t_bucket in ((([(r, 1) for r in decode]), 1),
                              (chunks, _bucket(max((n for _, n in chunks), default=1), self._len_buckets))):
            if not sel:
                continue
            g, last, layout = self._group(sel, t_bucket)
            groups.append(g)
            logits_at.append(last)
            rows.extend(layout)
        logits, self.cache = self._step_fn(self._graphdef, self.unroll_layers, self._state, self._layer_states,
                                           self.cache, tuple(groups), tuple(logits_at))
        self.num_steps += 1
        for r, n in itertools.chain(((r, 1) for r in decode), chunks):
            r.num_computed += n
        # Sample for every row whose request has now computed all its tokens.
        want = [i for i, rn in enumerate(rows) if rn is not None and rn[0].pending == 0]
        if not want:
            return []
        reqs = [rows[i][0] for i in range(len(rows))
                if rows[i] is not None and rows[i][0].pending == 0]
        pad = len(rows)
        params = [rows[i][0].params if rows[i] is not None else SamplingParams() for i in range(pad)]
        seeds = [rows[i][0].seed if rows[i] is not None else 0 for i in range(pad)]
        counters = [rows[i][0].num_generated if rows[i] is not None else 0 for i in range(pad)]
        batch = SamplingBatch.from_params(params, seeds, counters, pad)
        all_greedy = all(r.params.temperature == 0 for r in reqs)
        want_lp = any(r.params.logprobs for r in reqs)
        tokens, lps = sample(logits, batch, all_greedy=all_greedy, want_logprobs=want_lp)
        tokens = np.asarray(tokens)
        lps = None if lps is None else np.asarray(lps)
        outputs = []
        for i in want:
            r = rows[i][0]
            outputs.append(self._append(r, int(tokens[i]), None if lps is None else float(lps[i])))
        return outputs

    def _append(self, r: _Request, token: int, logprob: float | None) -> StepOutput:
        r.tokens.append(token)
        if r.params.logprobs:
            r.logprobs.append(logprob)
        if r.on_token is not None:
            r.on_token(r.id, token)
        reason, cut = None, None
        if (token in self.eos_ids and not r.params.ignore_eos) or token in r.params.stop_token_ids:
            reason = FINISH_STOP
        elif r.params.stop:
            # Only a window of recent tokens can complete a stop string (4 byte-tokens per character at most).
            window = 4 * max(len(s) for s in r.params.stop) + 8
            out = r.tokens[len(r.prompt):]
            tail = self.tokenizer.decode(out[-window:])
            if any(s in tail for s in r.params.stop):
                text = self.tokenizer.decode(out)
                hits = [text.find(s) for s in r.params.stop if s in text]
                if hits:
                    reason, cut = FINISH_STOP, min(hits)
        if reason is None and len(r.tokens) >= r.max_total:
            reason = FINISH_LENGTH
        if reason is None:
            return StepOutput(r.id, [token], False)
        result = self._finish(r, reason, cut)
        return StepOutput(r.id, [token], True, result)

    def _finish(self, r: _Request, reason: str, cut: int | None) -> GenerationResult:
        out = r.tokens[len(r.prompt):]
        text = None
        if self.tokenizer is not None:
            ids = out
            if reason == FINISH_STOP and cut is None:
                ids = out[:-1]                              # the eos / stop id is not text
            text = self.tokenizer.decode(ids)
            if cut is not None:
                text = text[:cut]
        result = GenerationResult(list(out), text, reason, list(r.logprobs) if r.params.logprobs else None,
                                  list(r.prompt), r.id)
        self.allocators[r.shard].release(r.id)
        self._running.remove(r)
        self._results[r.id] = result
        return result

    def run(self) -> dict[Any, GenerationResult]:
        """Step until every queued request has finished; returns (and forgets) all finished results."""
        while self.has_work():
            self.step()
        results, self._results = self._results, {}
        return results

    def stream(self, prompt, sampling: SamplingParams | None = None, **kw) -> Iterator[int]:
        """Yield the generated token ids of one new request as they come (other requests progress too).
        The final GenerationResult is then available from pop_result(request_id) (request_id= in kw)."""
        rid = self.add_request(prompt, sampling, **kw)
        while True:
            for out in self.step():
                if out.request_id == rid:
                    yield from out.new_token_ids
                    if out.finished:
                        return


def generate(model_or_engine, prompts: Sequence, sampling: SamplingParams | Sequence[SamplingParams] | None = None,
             *, tokenizer=None, chat: bool = False, progress: bool | None = None,
             on_token: Callable[[int, int], None] | None = None, **engine_kwargs) -> list[GenerationResult]:
    """Generate for every prompt; returns one GenerationResult per prompt, in order.

    model_or_engine: an M3ForCausalLM (an Engine is built with engine_kwargs, e.g. max_batch_size,
    max_seq_len) or an Engine (its queue must be empty). prompts: list[str] (tokenizer= or the checkpoint's;
    chat=True applies the chat template) or list[list[int]]. sampling: one SamplingParams for all, or one per
    prompt. on_token(prompt_index, token_id) streams tokens. progress: tqdm bar (default: 8+ prompts).
    Every prompt and parameter is checked before any work: ValueError names the request (its index).
    """
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise ValueError("prompts must be a list of strings or a list of token-id lists")
    if isinstance(model_or_engine, Engine):
        engine = model_or_engine
        if tokenizer is not None:
            engine._tokenizer = tokenizer
        if engine.has_work():
            raise ValueError("generate: the engine still has queued requests; run() them first")
    else:
        engine_kwargs.setdefault("max_batch_size", 8)
        engine = Engine(model_or_engine, tokenizer=tokenizer, **engine_kwargs)
    if sampling is None or isinstance(sampling, SamplingParams):
        params = [sampling or SamplingParams()] * len(prompts)
    else:
        params = list(sampling)
        if len(params) != len(prompts):
            raise ValueError(f"sampling: got {len(params)} SamplingParams for {len(prompts)} prompts")
    prepared = [engine.prepare(p, s, i, chat) for i, (p, s) in enumerate(zip(prompts, params))]   # all first
    ids = {}
    for i, (tok, s) in enumerate(prepared):
        cb = None if on_token is None else (lambda _rid, t, i=i: on_token(i, t))
        ids[engine.add_request(tok, s, on_token=cb)] = i
    bar = None
    if progress or (progress is None and len(prompts) >= 8):
        from tqdm.auto import tqdm
        bar = tqdm(total=len(prompts), desc="generate", unit="req")
    results: list[GenerationResult | None] = [None] * len(prompts)
    try:
        while engine.has_work():
            for out in engine.step():
                if out.finished and out.request_id in ids:
                    results[ids[out.request_id]] = engine.pop_result(out.request_id)
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return results


# ---------------------------------------------------------------------------------------------- CLI
def generate_main(argv: Sequence[str] | None = None) -> int:
    """`m3jax generate`: returns the exit code. Errors print one line to stderr and return 2."""
    ap = argparse.ArgumentParser(prog="m3jax generate", description="Generate text with an M3 checkpoint.")
    ap.add_argument("--model", help="checkpoint directory (default: the bundled tiny model)")
    ap.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ap.add_argument("--chat", action="store_true", help="apply the chat template to each prompt")
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--max-seq-len", type=int, default=None, help="default: 4096, or the tiny model's limit")
    ap.add_argument("--dtype", default=None, help="bfloat16 | float32 (default: float32 for the tiny model)")
    ap.add_argument("--attn-impl", default=None, help="reference | gpu | tpu | ... (default: the backend's)")
    ap.add_argument("--mesh", default=None, help="DATAxMODEL device mesh, e.g. 1x8 (default: one device)")
    ap.add_argument("--fp8-experts", action="store_true", help="keep an MXFP8 release's routed experts in FP8")
    ap.add_argument("--stream", action="store_true", help="print tokens as they come (one prompt)")
    ap.add_argument("--ids", action="store_true", help="also print the generated token ids")
    args = ap.parse_args(argv)
    try:
        from m3jax.api import load
        from m3jax.tokenizer import M3Tokenizer
        from m3jax.testing import bundled_tiny_checkpoint
        from m3jax.sharding import parse_mesh
        path = args.model or bundled_tiny_checkpoint()
        mesh = parse_mesh(args.mesh) if args.mesh else None
        dtype = args.dtype or ("float32" if args.model is None else "bfloat16")
        model = load(path, dtype=dtype, mesh=mesh, attn_impl=args.attn_impl, progress=False,
                     fp8_experts=args.fp8_experts)
        tok = M3Tokenizer.from_pretrained(path)
        max_seq_len = args.max_seq_len or min(4096, model.config.max_position_embeddings)
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=tuple(args.stop))
        engine = Engine(model, max_batch_size=args.max_batch_size, max_seq_len=max_seq_len, tokenizer=tok,
                        prefill_chunk=min(512, max_seq_len), mesh=mesh)
        if args.stream and len(args.prompt) == 1:
            for t in engine.stream(args.prompt[0], params, chat=args.chat, request_id="cli"):
                sys.stdout.write(tok.decode([t]))
                sys.stdout.flush()
            sys.stdout.write("\n")
            return 0
        for i, r in enumerate(generate(engine, args.prompt, params, chat=args.chat, progress=False)):
            if len(args.prompt) > 1:
                print(f"--- [{i}] ({r.finish_reason}, {len(r.token_ids)} tokens)")
            print(r.text)
            if args.ids:
                print(f"token ids: {list(r.token_ids)} ({r.finish_reason})")
        return 0
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"m3jax generate: error: {e}", file=sys.stderr)
        return 2
