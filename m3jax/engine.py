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
stays usable; a request whose logits turn non-finite (NaN / inf) fails alone (finish_reason "error", the error
names it) and the others go on; `cancel(request_id)` drops a request at any time.

Compiled programs: an Engine runs a fixed set of step programs (`Engine.programs`, len(row_buckets) + 1, 3 by
default; see m3jax.runner); `warmup()` compiles them up front (generate() does it once per engine). JAX's
persistent compilation cache is turned on at construction (`compile_cache`, `configure_compile_cache`), so a
new process loads them from disk instead of compiling.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterator, Sequence

import jax

from m3jax import cache as cache_lib
from m3jax.runner import (DEFAULT_ROW_LEN, EmbedOverride, NonFinite, Runner, StepProgram,  # noqa: F401
                          trace_count)  # trace_count: re-exported for tests and benchmarks
from m3jax.sampling import SamplingParams
from m3jax.scheduler import (FINISH_ERROR, FINISH_LENGTH, FINISH_STOP, Batch, GenerationResult,  # noqa: F401
                             PageAllocator, Scheduler, StepOutput)
from m3jax.sharding import DATA
from m3jax.vision import prompt as vision_prompt

DEFAULT_MAX_SEQ_LEN = 8192

log = logging.getLogger(__name__)
COMPILE_CACHE_ENV = "M3JAX_COMPILE_CACHE"
_OFF = ("", "0", "off", "false", "no")


def default_prefill_chunk(backend: str) -> int:
    """The prompt tokens one request may compute per step (with max_tokens_per_step's default, the step's prompt
    budget too). The mixed step program always computes its whole prompt budget, so a larger chunk means fewer
    steps, each costing more. Measured on one H200 (benchmarks/RESULTS.md, "Batch generation": scaled M3, 128
    experts, 64 prompts of 100-4000 tokens, 256 new tokens each): total tokens/s 4,986 / 5,322 / 5,892 / 6,403
    at chunks of 512 / 1024 / 2048 / 4096. The GPU takes 2048, as the serving benchmark does: 4096 gained 9%
    offline but doubles the prompt work that running requests' decode steps wait behind. Elsewhere 512: on CPU
    the padded prompt budget is paid in full by every mixed step, and nothing was measured on a TPU."""
    return 2048 if backend == "gpu" else 512


def default_compile_cache_dir() -> str:
    """~/.cache/m3jax/jax_cache (under $XDG_CACHE_HOME when it is set)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "m3jax", "jax_cache")


def configure_compile_cache(setting: str | bool | None = None) -> str | None:
    """Turn on JAX's persistent compilation cache; returns the directory in use (None: off).

    setting: a directory; True or None: $M3JAX_COMPILE_CACHE if set (a directory, or 0 / off to turn it off),
    else default_compile_cache_dir(); False: leave it off. A directory already set in jax.config (by the user,
    or by an earlier Engine) is kept as it is, whatever the setting: it is process-wide, so it is set once.
    JAX only stores programs that took longer than jax_persistent_cache_min_compile_time_secs (1 s by default)
    to compile: the step programs of a real model do; tiny test models may not.
    """
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    if setting is False:
        return None
    if setting is None or setting is True:
        env = os.environ.get(COMPILE_CACHE_ENV)
        if env is not None and env.strip().lower() in _OFF:
            return None
        setting = env or default_compile_cache_dir()
    if not isinstance(setting, (str, os.PathLike)):
        raise ValueError(f"Engine: compile_cache must be a directory, True, False or None, got {setting!r}")
    path = os.path.abspath(os.path.expanduser(os.fspath(setting)))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    log.info("JAX persistent compilation cache: %s", path)
    return path


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
    (max_batch_size decode rows + the rest for prompt chunks, rounded up to whole prefill rows; fixed, so that
    the step has one shape). prefill_chunk: longest prompt chunk of one request in a step (default: the
    backend's, `default_prefill_chunk`). tokenizer:
    for string prompts, stop strings and text; defaults to the checkpoint's (model.checkpoint_dir). mesh: the
    device mesh, which must be the one the model was placed on (default: model.mesh); K/V pools split on their head
    axis over "model" and one pool per "data" shard (see cache.init_cache); the model's parameters are placed by
    m3jax.load / m3jax.params. row_buckets: the padded decode batch sizes (default: min(8, max_batch_size) and
    max_batch_size; with D data shards they count the rows of all shards and are rounded up to multiples of D).
    prefill_row_len: tokens per row of the prefill group (default 64; see m3jax.runner). The step programs are
    one per decode bucket plus one mixed decode + prefill program (`programs`). compile_cache: JAX's persistent compilation cache directory;
    None (default): $M3JAX_COMPILE_CACHE or ~/.cache/m3jax/jax_cache; False: off; a directory already set in
    jax.config is kept (see configure_compile_cache). The directory in use is `compile_cache_dir`.
    enable_prefix_caching: a request reuses the cached K, V and index-K pages of every full block of its prompt
    that an earlier request computed on the same data shard (m3jax.scheduler); outputs are those without a hit, and
    GenerationResult.num_cached_tokens says how many prompt tokens were not computed.
    fp8_index_k: store the MSA layers' index keys as float8_e4m3fn with a float32 scale per token (132 instead of
    256 bytes per token and layer for M3: half of what the decode indexer reads; m3jax.cache). The block
    selection is then made on the quantised keys, so it may differ from the bf16 cache's where two blocks' scores
    nearly tie (benchmarks/fp8_index_k.py measures how often).
    """

    def __init__(self, model, max_batch_size: int = 8, max_seq_len: int | None = None, mesh=None, *,
                 num_pages: int | None = None, max_tokens_per_step: int | None = None,
                 prefill_chunk: int | None = None, tokenizer=None, memory_fraction: float = 0.5, seed: int = 0,
                 row_buckets: Sequence[int] | None = None, prefill_row_len: int = DEFAULT_ROW_LEN,
                 compile_cache: str | bool | None = None,
                 enable_prefix_caching: bool = True, fp8_index_k: bool = False):
        cfg = model.config
        if max_seq_len is None:
            max_seq_len = min(DEFAULT_MAX_SEQ_LEN, cfg.max_position_embeddings)
        if prefill_chunk is None:
            prefill_chunk = default_prefill_chunk(jax.default_backend())
        if not isinstance(fp8_index_k, bool):
            raise ValueError(f"Engine: fp8_index_k must be True or False, got {fp8_index_k!r}")
        for name, v in (("max_batch_size", max_batch_size), ("max_seq_len", max_seq_len),
                        ("prefill_chunk", prefill_chunk), ("prefill_row_len", prefill_row_len)):
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
                                                       memory_fraction=memory_fraction, mesh=self.mesh,
                                                       fp8_index_k=fp8_index_k)
        self.compile_cache_dir = configure_compile_cache(compile_cache)
        self.scheduler = Scheduler(vocab_size=cfg.vocab_size, eos_ids=cfg.eos_token_id,
                                   max_batch_size=max_batch_size, max_seq_len=max_seq_len, page_size=page_size,
                                   num_pages=num_pages, data_shards=data_shards,
                                   max_tokens_per_step=max_tokens_per_step, prefill_chunk=prefill_chunk,
                                   prefill_row_len=prefill_row_len,
                                   tokenizer=tokenizer if tokenizer is not None else checkpoint_tokenizer(model),
                                   seed=seed, enable_prefix_caching=enable_prefix_caching)
        self.runner = Runner(model, num_pages=num_pages, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                             prefill_rows=self.scheduler.prefill_rows_per_shard,
                             row_len=self.scheduler.prefill_row_len, mesh=self.mesh, row_buckets=row_buckets,
                             fp8_index_k=fp8_index_k)
        self.num_pages = num_pages
        self.warmed_up = False
        self._vision_setup(model)

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
    programs = property(lambda self: self.runner.programs)
    enable_prefix_caching = property(lambda self: self.scheduler.enable_prefix_caching)
    fp8_index_k = property(lambda self: self.runner.cache.fp8_index_k)    # False for a model without MSA layers

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

    # ------------------------------------------------------------------------------------------ images
    def _vision_setup(self, model) -> None:
        """Processors from the checkpoint's preprocessor_config.json (defaults without one); pixels per request."""
        self.vision = getattr(model, "vision", None)
        self._pixels: dict[Any, vision_prompt.PromptVision] = {}      # request id -> its pixels and features
        if self.vision is not None:
            from m3jax.vision.processor import ImageProcessor, VideoProcessor
            path = getattr(model, "checkpoint_dir", None)
            self.image_processor = ImageProcessor.from_pretrained(path) if path else ImageProcessor()
            self.video_processor = VideoProcessor.from_pretrained(path) if path else VideoProcessor()

    def multimodal_prompt(self, prompt, request="<new>", chat: bool | dict = False) -> vision_prompt.MultimodalPrompt:
        """A multimodal prompt (m3jax.vision.prompt) processed, expanded and tokenized as add_request does it
        (the server prepares image prompts off the engine thread with it); ValueError names `request`."""
        return vision_prompt.prepare_prompt(
            prompt, tokenizer=self.tokenizer, vision_config=None if self.vision is None else self.vision.config,
            image_processor=getattr(self, "image_processor", None),
            video_processor=getattr(self, "video_processor", None), chat=chat, request=request)

    def _overrides(self, batch) -> dict:
        """Input-embedding overrides of the batch's rows: each request's features, computed at its first chunk."""
        out = {}
        for row in batch.rows:
            pv = self._pixels.get(row.request_id)
            if pv is not None:
                out[row.request_id] = EmbedOverride(*pv.features(self.vision))
        return out

    def _forget_pixels(self) -> None:
        """Drop the pixels of requests that are gone or whose placeholders are all in the cache."""
        live = {r.id: r for r in self.scheduler.running}
        live.update({r.id: r for r in self.scheduler.waiting})
        for rid in list(self._pixels):
            r, pv = live.get(rid), self._pixels[rid]
            if r is None or (pv.positions is not None and r.num_computed > pv.positions[-1]):
                del self._pixels[rid]

    # ------------------------------------------------------------------------------------------ requests
    def encode_prompt(self, prompt, request, chat: bool | dict = False) -> list[int]:
        """Token ids of a prompt (str or ids), checked against the vocab and max_seq_len; ValueError names it."""
        return self.scheduler.encode_prompt(prompt, request, chat)

    def prepare(self, prompt, sampling: SamplingParams | None = None, request_id=None, chat: bool | dict = False):
        """Validate one request without queueing it: (token ids, params). Raises ValueError naming it.
        A multimodal prompt (m3jax.vision.prompt) gives its MultimodalPrompt instead of the ids."""
        if vision_prompt.is_multimodal(prompt):
            mm = self.multimodal_prompt(prompt, request_id if request_id is not None else "<new>", chat)
            return mm, self.scheduler.prepare(mm.token_ids, sampling, request_id)[1]
        return self.scheduler.prepare(prompt, sampling, request_id, chat)

    def add_request(self, prompt, sampling: SamplingParams | None = None, *, request_id=None,
                    on_token: Callable[[Any, int], None] | None = None, chat: bool | dict = False):
        """Queue a request; returns its id. Invalid input raises ValueError before anything is queued.

        on_token(request_id, token_id) is called for every generated token, as it is produced; if it raises,
        that request finishes with finish_reason "error".
        """
        if not vision_prompt.is_multimodal(prompt):
            return self.scheduler.add(prompt, sampling, request_id=request_id, on_token=on_token, chat=chat)
        mm = self.multimodal_prompt(prompt, request_id if request_id is not None else "<new>", chat)
        salt = mm.cache_salt(self.vision.config) if mm.has_pixels else b""    # prefix cache: keyed by content
        rid = self.scheduler.add(mm.token_ids, sampling, request_id=request_id, on_token=on_token, cache_salt=salt)
        if mm.has_pixels:
            self._pixels[rid] = vision_prompt.PromptVision(mm)
        return rid

    def cancel(self, request_id) -> bool:
        """Drop a queued or running request and free its pages (no result is kept); False if it is not live."""
        self._pixels.pop(request_id, None)
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
    def warmup(self, progress: bool = True) -> None:
        """Compile every step program now (`programs`; from the persistent cache when it has them), each run
        once on padding only, so that no later step compiles. progress: a tqdm bar."""
        if self.warmed_up:
            return
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(self.programs), desc="compile", unit="program")
        try:
            self.runner.warmup(None if bar is None else (lambda program: bar.update(1)))
        finally:
            if bar is not None:
                bar.close()
        self.warmed_up = True

    def step(self) -> list[StepOutput]:
        """Schedule, run one jitted step, sample, and retire finished requests."""
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        try:
            overrides = self._overrides(batch) if self._pixels else None
            sampled = self.runner.execute(batch, overrides) if overrides else self.runner.execute(batch)
        except BaseException as e:
            # The step's requests cannot continue (their cache state is unknown): fail them, free their pages.
            self.scheduler.fail([r.request_id for r in batch.rows], f"step failed: {type(e).__name__}: {e}")
            if self._pixels:
                self._forget_pixels()
            raise
        bad = [(row, s) for row, s in zip(batch.rows, sampled) if isinstance(s, NonFinite)]
        if not bad:
            out = self.scheduler.complete(batch, sampled)
            if self._pixels:
                self._forget_pixels()
            return out
        # Non-finite logits: those requests fail (sampling them would emit garbage), the rest of the step stands.
        failed = {row.request_id for row, _ in bad}
        keep = lambda rows: tuple(r for r in rows if r.request_id not in failed)      # noqa: E731
        outputs = self.scheduler.complete(Batch(keep(batch.decode), keep(batch.prefill)),
                                          [s for row, s in zip(batch.rows, sampled) if row.request_id not in failed])
        for row, _ in bad:
            where = (f"computing positions {row.start}..{row.start + len(row.tokens) - 1}" if len(row.tokens) > 1
                     else f"at position {row.start}")
            result = self.scheduler.fail([row.request_id], f"request {row.request_id!r}: the model produced "
                                         f"non-finite logits (NaN or inf) {where}; generation stopped")[0]
            outputs.append(StepOutput(row.request_id, [], True, result))
        if self._pixels:
            self._forget_pixels()
        return outputs

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
             *, tokenizer=None, chat: bool | dict = False, progress: bool | None = None,
             on_token: Callable[[int, int], None] | None = None, **engine_kwargs) -> list[GenerationResult]:
    """Generate for every prompt; returns one GenerationResult per prompt, in order.

    model_or_engine: an M3ForCausalLM (an Engine is built with engine_kwargs, e.g. max_batch_size,
    max_seq_len) or an Engine (its queue must be empty). prompts: list[str] (tokenizer= or the checkpoint's)
    or list[list[int]]; with a vision tower also {"text": ..., "images": [...], "videos": [...]}
    (m3jax.vision.prompt); with chat=True also lists of OpenAI chat messages (image_url parts as data URLs).
    chat: True renders each prompt (a string as one user message) with the tokenizer's chat template, the
    renderer of `m3jax serve` (m3jax.chat: the checkpoint's chat_template.jinja, else the built-in M3 layout),
    so a conversation gives the token ids /v1/chat/completions gives it; a dict does the same with template
    arguments, e.g. {"tools": [...], "thinking_mode": "enabled"} (the server's tools and chat_template_kwargs;
    the text is returned raw: reasoning and tool calls are parsed by the server only). sampling: one
    SamplingParams for all, or one per prompt. on_token(prompt_index, token_id) streams tokens. progress: tqdm
    bar (default: 8+ prompts).
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
    show = bool(progress or (progress is None and len(prompts) >= 8))
    engine.warmup(progress=show)          # once per engine: every step program, before any request runs
    ids = {}
    for i, (tok, s) in enumerate(prepared):
        cb = None if on_token is None else (lambda _rid, t, i=i: on_token(i, t))
        ids[engine.add_request(tok, s, on_token=cb)] = i
    bar = None
    if show:
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
