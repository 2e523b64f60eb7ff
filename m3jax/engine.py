"""The batch generation engine: a thin facade over the scheduler (host) and the runner (device).

    engine = m3jax.Engine(model, max_batch_size=8, max_seq_len=8192)
    rid = engine.add_request([1, 2, 3], m3jax.SamplingParams(max_new_tokens=16), on_token=print)
    while engine.has_work(): engine.step()          # or engine.run(), or engine.stream(prompt)
    out = m3jax.generate(model_or_engine, ["hello"], m3jax.SamplingParams(max_new_tokens=64))

One `step()`: the scheduler (m3jax.scheduler) admits waiting requests and picks the rows of the step (decode
rows, then prompt chunks within the token budget); the runner (m3jax.runner) computes them in one jitted step over
the paged cache and samples; the scheduler appends the tokens, applies the stop rules and retires finished
requests. Continuous batching, chunked prefill mixed with decode, per-data-shard page pools: see those modules.
A step that raises fails the requests it held (finish_reason "error", pages freed) and re-raises, so the engine
stays usable; `cancel(request_id)` drops a request at any time.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Sequence

from m3jax import cache as cache_lib
from m3jax.runner import Runner, trace_count  # noqa: F401  (trace_count: re-exported for tests and benchmarks)
from m3jax.sampling import SamplingParams
from m3jax.scheduler import (FINISH_ERROR, FINISH_LENGTH, FINISH_STOP, GenerationResult,  # noqa: F401
                             PageAllocator, Scheduler, StepOutput)
from m3jax.sharding import DATA

DEFAULT_MAX_SEQ_LEN = 8192


def checkpoint_tokenizer(model):
    """The tokenizer of the checkpoint the model was loaded from (model.checkpoint_dir), or None."""
    path = getattr(model, "checkpoint_dir", None)
    if path is not None and os.path.exists(os.path.join(path, "tokenizer.json")):
        from m3jax.tokenizer import M3Tokenizer
        return M3Tokenizer.from_pretrained(path)
    return None


class Engine:
    """Continuous-batching generation over a paged KV + index-K cache. See the module docstring.

    model: an M3ForCausalLM (its attn_impl picks the attention and MoE kernels). max_batch_size: requests decoding
    at once. max_seq_len: prompt + generated tokens per request (default: 8192, or the model's
    max_position_embeddings if lower). num_pages: pages per layer (page 0 is the sink) in
    each data shard's pool; None sizes the pool from free device memory (`memory_fraction` of it), at most enough
    for the shard's share of max_batch_size full-length requests. max_tokens_per_step: token budget of one step
    (decode rows + prefill chunk tokens). prefill_chunk: longest prompt chunk of one request in a step. tokenizer:
    for string prompts, stop strings and text; defaults to the checkpoint's (model.checkpoint_dir). mesh: the
    device mesh, which must be the one the model was placed on (default: model.mesh); K/V pools split on their head
    axis over "model" and one pool per "data" shard (see cache.init_cache); the model's parameters are placed by
    m3jax.load / m3jax.params. row_buckets / len_buckets: the padded batch sizes / prefill chunk lengths to compile
    for (default: powers of two up to max_batch_size / prefill_chunk; with D data shards, row buckets count the
    rows of all shards and are rounded up to multiples of D); each (decode rows, prefill rows x length)
    combination compiles once. layer_loop: "scan" | "split" | None (the backend's choice; see m3jax.runner).
    enable_prefix_caching: a request reuses the cached K, V and index-K pages of every full block of its prompt
    that an earlier request computed on the same data shard (m3jax.scheduler); outputs are those without a hit, and
    GenerationResult.num_cached_tokens says how many prompt tokens were not computed.
    """

    def __init__(self, model, max_batch_size: int = 8, max_seq_len: int | None = None, mesh=None, *,
                 num_pages: int | None = None, max_tokens_per_step: int | None = None,
                 prefill_chunk: int = 512, tokenizer=None, memory_fraction: float = 0.5, seed: int = 0,
                 row_buckets: Sequence[int] | None = None, len_buckets: Sequence[int] | None = None,
                 layer_loop: str | None = None, enable_prefix_caching: bool = True):
        cfg = model.config
        if max_seq_len is None:
            max_seq_len = min(DEFAULT_MAX_SEQ_LEN, cfg.max_position_embeddings)
        for name, v in (("max_batch_size", max_batch_size), ("max_seq_len", max_seq_len),
                        ("prefill_chunk", prefill_chunk)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"Engine: {name} must be a positive integer, got {v!r}")
        if max_seq_len > cfg.max_position_embeddings:
            raise ValueError(f"Engine: max_seq_len ({max_seq_len}) exceeds the model's max_position_embeddings "
                             f"({cfg.max_position_embeddings})")
        prefill_chunk = min(prefill_chunk, max_seq_len)
        max_tokens_per_step = max_tokens_per_step or (max_batch_size + prefill_chunk)
        if max_tokens_per_step <= max_batch_size:
            raise ValueError(f"Engine: max_tokens_per_step ({max_tokens_per_step}) must exceed "
                             f"max_batch_size ({max_batch_size}) so that prompts progress while batches decode")
        self.model = model
        self.config = cfg
        self.mesh = mesh if mesh is not None else getattr(model, "mesh", None)
        data_shards = 1 if self.mesh is None else self.mesh.shape[DATA]
        page_size = cfg.msa.block_size
        if num_pages is None:
            want = -(-max_batch_size // data_shards) * cache_lib.max_blocks(max_seq_len, page_size) + 1
            num_pages = cache_lib.num_pages_for_memory(cfg, model.dtype, max_pages=want,
                                                       memory_fraction=memory_fraction, mesh=self.mesh)
        self.runner = Runner(model, num_pages=num_pages, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                             prefill_chunk=prefill_chunk, mesh=self.mesh, row_buckets=row_buckets,
                             len_buckets=len_buckets, layer_loop=layer_loop)
        self.scheduler = Scheduler(vocab_size=cfg.vocab_size, eos_ids=cfg.eos_token_id,
                                   max_batch_size=max_batch_size, max_seq_len=max_seq_len, page_size=page_size,
                                   num_pages=num_pages, data_shards=data_shards,
                                   max_tokens_per_step=max_tokens_per_step, prefill_chunk=prefill_chunk,
                                   tokenizer=tokenizer if tokenizer is not None else checkpoint_tokenizer(model),
                                   seed=seed, enable_prefix_caching=enable_prefix_caching)
        self.num_pages = num_pages

    # ------------------------------------------------------------------------------------------ settings
    max_batch_size = property(lambda self: self.scheduler.max_batch_size)
    max_seq_len = property(lambda self: self.scheduler.max_seq_len)
    page_size = property(lambda self: self.scheduler.page_size)
    prefill_chunk = property(lambda self: self.scheduler.prefill_chunk)
    max_tokens_per_step = property(lambda self: self.scheduler.max_tokens_per_step)
    data_shards = property(lambda self: self.scheduler.data_shards)
    rows_per_shard = property(lambda self: self.scheduler.rows_per_shard)
    max_blocks = property(lambda self: self.runner.max_blocks)
    allocators = property(lambda self: self.scheduler.allocators)
    num_steps = property(lambda self: self.runner.num_steps)
    layer_loop = property(lambda self: self.runner.layer_loop)
    enable_prefix_caching = property(lambda self: self.scheduler.enable_prefix_caching)

    @property
    def eos_ids(self) -> frozenset:
        return self.scheduler.eos_ids

    @eos_ids.setter
    def eos_ids(self, ids) -> None:
        self.scheduler.eos_ids = frozenset(ids)

    @property
    def tokenizer(self):
        return self.scheduler.tokenizer

    @tokenizer.setter
    def tokenizer(self, tok) -> None:
        self.scheduler.tokenizer = tok

    @property
    def cache(self) -> cache_lib.KVCache:
        return self.runner.cache

    @cache.setter
    def cache(self, value: cache_lib.KVCache) -> None:
        self.runner.cache = value

    @property
    def allocator(self) -> PageAllocator:
        """The page allocator of a single-pool engine (with data shards: `allocators[shard]`)."""
        if self.data_shards != 1:
            raise ValueError(f"Engine: {self.data_shards} data shards have one allocator each; use allocators[d]")
        return self.allocators[0]

    # ------------------------------------------------------------------------------------------ requests
    def encode_prompt(self, prompt, request, chat: bool = False) -> list[int]:
        """Token ids of a prompt (str or ids), checked against the vocab and max_seq_len; ValueError names it."""
        return self.scheduler.encode_prompt(prompt, request, chat)

    def prepare(self, prompt, sampling: SamplingParams | None = None, request_id=None, chat: bool = False):
        """Validate one request without queueing it: (token ids, params). Raises ValueError naming it."""
        return self.scheduler.prepare(prompt, sampling, request_id, chat)

    def add_request(self, prompt, sampling: SamplingParams | None = None, *, request_id=None,
                    on_token: Callable[[Any, int], None] | None = None, chat: bool = False):
        """Queue a request; returns its id. Invalid input raises ValueError before anything is queued.

        on_token(request_id, token_id) is called for every generated token, as it is produced; if it raises,
        that request finishes with finish_reason "error".
        """
        return self.scheduler.add(prompt, sampling, request_id=request_id, on_token=on_token, chat=chat)

    def cancel(self, request_id) -> bool:
        """Drop a queued or running request and free its pages (no result is kept); False if it is not live."""
        return self.scheduler.cancel(request_id)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix block (pages in use stay in use); returns how many blocks were cached."""
        return self.scheduler.reset_prefix_cache()

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    def pop_result(self, request_id) -> GenerationResult | None:
        return self.scheduler.results.pop(request_id, None)

    # ------------------------------------------------------------------------------------------ steps
    def step(self) -> list[StepOutput]:
        """Schedule, run one jitted step, sample, and retire finished requests."""
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        try:
            sampled = self.runner.execute(batch)
        except BaseException as e:
            # The step's requests cannot continue (their cache state is unknown): fail them, free their pages.
            self.scheduler.fail([r.request_id for r in batch.rows], f"step failed: {type(e).__name__}: {e}")
            raise
        return self.scheduler.complete(batch, sampled)

    def run(self) -> dict[Any, GenerationResult]:
        """Step until every queued request has finished; returns (and forgets) all finished results."""
        while self.has_work():
            self.step()
        results, self.scheduler.results = self.scheduler.results, {}
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
            engine.tokenizer = tokenizer
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
    except BaseException:
        for rid in ids:                    # leave the engine empty for the next call
            engine.cancel(rid)
            engine.pop_result(rid)
        raise
    finally:
        if bar is not None:
            bar.close()
    return results
