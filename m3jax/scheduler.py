"""The host side of generation: the request queue, admission, page allocators, the per-step token budget, and the
stop rules. No device arrays here: the runner (m3jax.runner) computes what the scheduler hands it.

Once per step (`Scheduler.schedule`):
  1. Admit waiting requests (FIFO) while a batch slot is free and the pages for the whole request (prompt +
     max_new_tokens, capped at max_seq_len) can be reserved; otherwise they wait in the queue. Reserving up front
     means a running request can never run out of pages mid-generation.
  2. Every request whose prompt is done decodes one token (the decode rows).
  3. The prefill budget goes to prompt chunks of at most `prefill_chunk` tokens, oldest request first (the
     prefill rows). The budget is fixed, so that the runner's prefill group has one shape: each data shard has
     `prefill_rows_per_shard` rows of `prefill_row_len` tokens (together max_tokens_per_step - max_batch_size
     tokens, rounded up to whole rows), and a chunk of n tokens takes ceil(n / prefill_row_len) of its shard's
     rows (m3jax.runner lays it out that way).
Then `Scheduler.complete` takes the sampled tokens, applies the stop rules and retires finished requests.

On a mesh with "data" = D > 1 each data shard owns a page pool and its own `PageAllocator`; a request is admitted
to the shard that holds the longest cached prefix of its prompt, then the one with the fewest running requests
(among those with a free row and the pages), and its rows carry the shard so that the runner lays them out where
its pages are.

Prefix caching (`enable_prefix_caching`): a page is one MSA block of `page_size` tokens, and one page id covers
the K, V and index-K rows of that block in every layer (layers are folded into the page axis, cache.layer_offset),
so sharing a page id shares all of them. Every full block whose keys are computed is registered in its shard's
allocator under a chain key, sha256(parent key, the block's token ids), so a key names the whole prefix up to the
block's end. A new request looks up the keys of its prompt's full blocks, shares the longest cached run (refcount
+ 1) and starts computing after it. Only full blocks are ever shared, and the last prompt token is always
computed (there must be logits to sample from), so a request never writes into a page it shares: no copy on
write. A page whose last reference goes stays cached on the free list, least recently used first in line to be
handed out again (evicted); uncached free pages go before any cached one. A hit counts only on the data shard that
holds the pages: a request admitted to another shard computes its whole prompt. Keys see token ids only: a request
whose keys depend on more (image or video features behind placeholder tokens) must put that content's hash in
`Request.cache_salt`, which starts its chain.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from m3jax.cache import SINK_PAGE, OutOfPages, pages_per_sequence
from m3jax.chat import template_arguments
from m3jax.sampling import SamplingParams, TopLogprob, _is_int

FINISH_STOP, FINISH_LENGTH, FINISH_ERROR = "stop", "length", "error"


@dataclasses.dataclass
class GenerationResult:
    """The outcome of one request. token_ids holds the generated ids (a final eos / stop id included);
    text is their decoding (without that id, cut before a stop string) or None without a tokenizer;
    error says what failed when finish_reason is "error". With SamplingParams.logprobs, logprobs[i] is the
    log-probability of token_ids[i]; with top_logprobs = n, top_logprobs[i] lists the n most likely tokens at
    that position, best first (both under the model's raw distribution, m3jax.sampling)."""

    token_ids: list[int]
    text: str | None
    finish_reason: str                 # "stop" | "length" | "error"
    logprobs: list[float] | None = None
    prompt_token_ids: list[int] | None = None
    request_id: Any = None
    error: str | None = None
    num_cached_tokens: int = 0         # prompt tokens whose keys came from the prefix cache (not computed)
    top_logprobs: list[list[TopLogprob]] | None = None


class SampledToken(NamedTuple):
    """What the runner sampled for one row: the token, its logprob (None unless the request asked) and its top
    alternatives (None unless the request asked; already cut to its n)."""

    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[TopLogprob, ...] | None = None


@dataclasses.dataclass
class StepOutput:
    """What one step produced for one request (logprobs / top_logprobs: of new_token_ids, when it asked)."""

    request_id: Any
    new_token_ids: list[int]
    finished: bool
    result: GenerationResult | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[list[TopLogprob]] | None = None


@dataclasses.dataclass(eq=False)
class Request:
    """A request's host state: its tokens so far and how many of them have keys in the cache."""

    id: Any
    prompt: list[int]
    params: SamplingParams
    seed: int
    on_token: Callable[[Any, int], None] | None = None
    shard: int = 0                   # the data shard that holds its pages and computes it
    tokens: list[int] = dataclasses.field(default_factory=list)    # prompt + generated
    num_computed: int = 0            # tokens whose keys are in the cache
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[list[TopLogprob]] = dataclasses.field(default_factory=list)
    max_total: int = 0               # stop with "length" once len(tokens) reaches this
    cache_salt: bytes = b""          # folded into its first block key: content the token ids do not show
    block_keys: list[bytes] = dataclasses.field(default_factory=list)   # chain keys of its first full blocks
    num_registered: int = 0          # its first blocks registered in (or taken from) the prefix cache
    num_cached: int = 0              # prompt tokens taken from the prefix cache at admission

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - len(self.prompt)

    @property
    def pending(self) -> int:
        return len(self.tokens) - self.num_computed


@dataclasses.dataclass(frozen=True)
class Row:
    """One request's work in one step, all the runner needs: compute `tokens` (write their keys at positions
    start, start+1, ...) and, if `sample`, sample the token after the last one."""

    request_id: Any
    tokens: tuple[int, ...]
    start: int                       # absolute position of tokens[0]
    pages: tuple[int, ...]           # the request's page table (page ids local to its data shard)
    shard: int
    sample: bool
    params: SamplingParams
    seed: int
    num_generated: int               # tokens generated so far: the sampling counter

    @classmethod
    def of(cls, req: Request, n: int, pages: Sequence[int]) -> "Row":
        s = req.num_computed
        return cls(req.id, tuple(req.tokens[s:s + n]), s, tuple(pages), req.shard, req.pending == n, req.params,
                   req.seed, req.num_generated)


@dataclasses.dataclass(frozen=True)
class Batch:
    """The rows of one step: decode rows (one token each) and prefill rows (prompt chunks)."""

    decode: tuple[Row, ...] = ()
    prefill: tuple[Row, ...] = ()

    @property
    def rows(self) -> tuple[Row, ...]:
        return self.decode + self.prefill


def block_key(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The prefix-cache key of a full block: sha256 over the parent block's key and the block's token ids, so equal
    keys mean equal prefixes (a cryptographic hash: one user cannot craft a prompt that collides with another's)."""
    return hashlib.sha256(parent + np.asarray(tokens, np.int64).tobytes()).digest()


def root_key(salt: bytes = b"") -> bytes:
    """The parent key of a sequence's first block (salt: content that the token ids do not show)."""
    return hashlib.sha256(b"m3jax prefix root" + salt).digest()


class PageAllocator:
    """Host-side owner of the physical page ids 1..num_pages-1 of one pool (page 0 is the sink), and the prefix
    cache of that pool.

    `allocate(owner, n)` gives `owner` n more pages (appended to its page list) or raises OutOfPages and changes
    nothing; `share(owner, pages)` appends pages that are held or cached (refcount + 1); `release(owner)` drops all
    of the owner's references, and a page returns to the free list when its last reference goes.

    Prefix cache: `register(page, key)` records that a held page holds the full block named `key` (block_key);
    `lookup(keys)` gives the pages of the longest cached run of keys. A cached page whose last reference goes stays
    cached on the free list: free pages are handed out uncached ones first, then cached ones least recently
    released first (and forgotten then: evicted). `num_free` counts cached free pages too (they can be taken at any
    time). `check()` verifies every count against the owners and the cache maps.
    """

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is the sink), got {num_pages}")
        self.num_pages = num_pages
        self._free = collections.OrderedDict.fromkeys(range(1, num_pages))   # handed out from the front
        self._refs: dict[int, int] = {}
        self._pages: dict[object, list[int]] = {}
        self._key_of: dict[int, bytes] = {}          # cached page -> its block key
        self._page_of: dict[bytes, int] = {}         # block key -> cached page
        self.num_evicted = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached(self) -> int:
        """Pages that hold a registered full block (held or free)."""
        return len(self._page_of)

    @property
    def capacity(self) -> int:
        """Pages a single request could ever hold (all but the sink)."""
        return self.num_pages - 1

    def pages(self, owner) -> list[int]:
        """The owner's pages in logical order (block m of the sequence is pages(owner)[m])."""
        return list(self._pages.get(owner, ()))

    def owners(self) -> list:
        return list(self._pages)

    def refcount(self, page: int) -> int:
        return self._refs.get(page, 0)

    def can_allocate(self, n: int, shared: Sequence[int] = ()) -> bool:
        """Whether n fresh pages can be allocated after sharing `shared` (cached free pages among them leave the
        free list)."""
        return n + sum(1 for p in shared if p in self._free) <= len(self._free)

    def allocate(self, owner, n: int) -> list[int]:
        """Append n fresh pages to owner's list and return them; raises OutOfPages (changing nothing) if short."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > len(self._free):
            raise OutOfPages(f"{owner!r} needs {n} pages, {len(self._free)} of {self.capacity} are free")
        got = []
        for _ in range(n):
            p, _ = self._free.popitem(last=False)
            key = self._key_of.pop(p, None)
            if key is not None:                       # the least recently used cached block: evicted
                del self._page_of[key]
                self.num_evicted += 1
            self._refs[p] = 1
            got.append(p)
        self._pages.setdefault(owner, []).extend(got)
        return got

    def share(self, owner, pages: Sequence[int]) -> None:
        """Append pages that are held or cached (e.g. a cached prefix) to owner's list: one more reference each."""
        for p in pages:
            if self._refs.get(p, 0) < 1 and p not in self._key_of:
                raise ValueError(f"page {p} is not held and not cached; only held or cached pages can be shared")
        for p in pages:
            if p in self._free:
                del self._free[p]
            self._refs[p] = self._refs.get(p, 0) + 1
        self._pages.setdefault(owner, []).extend(pages)

    def ensure(self, owner, num_tokens: int, page_size: int) -> list[int]:
        """Grow owner's page list to hold num_tokens tokens; returns the new pages (maybe none)."""
        need = pages_per_sequence(num_tokens, page_size) - len(self._pages.get(owner, ()))
        return self.allocate(owner, need) if need > 0 else []

    def register(self, page: int, key: bytes) -> bool:
        """Record that held page `page` holds the full block `key`; False (nothing changes) when another page
        already holds that block or this page holds one already."""
        if self._refs.get(page, 0) < 1:
            raise ValueError(f"page {page} is not held; only a held page's block can be cached")
        if key in self._page_of or page in self._key_of:
            return False
        self._page_of[key] = page
        self._key_of[page] = key
        return True

    def lookup(self, keys: Sequence[bytes]) -> list[int]:
        """The pages of the longest cached run keys[0], keys[1], ... (held or free)."""
        out = []
        for k in keys:
            p = self._page_of.get(k)
            if p is None:
                break
            out.append(p)
        return out

    def reset_cache(self) -> int:
        """Forget every cached block (held pages stay held); returns how many were forgotten."""
        n = len(self._page_of)
        for p in list(self._free):
            if p in self._key_of:
                self._free.move_to_end(p, last=False)
        self._key_of.clear()
        self._page_of.clear()
        return n

    def release(self, owner) -> int:
        """Drop all of owner's page references; returns how many pages it held. Unknown owners raise KeyError."""
        if owner not in self._pages:
            raise KeyError(f"{owner!r} holds no pages")
        pages = self._pages.pop(owner)
        for p in reversed(pages):          # a prefix's later blocks go first in line: they are useless without it
            n = self._refs.get(p, 0)
            if n < 1:
                raise RuntimeError(f"page {p} listed for {owner!r} has no references")
            if n == 1:
                del self._refs[p]
                self._free[p] = None
                if p not in self._key_of:
                    self._free.move_to_end(p, last=False)        # nothing to keep: handed out before cached pages
            else:
                self._refs[p] = n - 1
        return len(pages)

    def check(self) -> None:
        """Invariants: every page 1..P-1 is free xor referenced; a page's count equals the owner lists holding it;
        the sink is never handed out; the two cache maps are inverse."""
        free = set(self._free)
        if SINK_PAGE in free or SINK_PAGE in self._refs:
            raise RuntimeError("page allocator: the sink page was handed out")
        if free & set(self._refs):
            raise RuntimeError("page allocator: a page is both free and held")
        if len(free) + len(self._refs) != self.num_pages - 1:
            raise RuntimeError(f"page allocator: {len(free)} free + {len(self._refs)} held != "
                               f"{self.num_pages - 1} pages")
        held = collections.Counter(p for pages in self._pages.values() for p in pages)
        if held != collections.Counter(self._refs):
            raise RuntimeError("page allocator: reference counts differ from the owners' page lists")
        if {p: k for k, p in self._page_of.items()} != self._key_of:
            raise RuntimeError("page allocator: the prefix cache's key and page maps disagree")


class Scheduler:
    """Queue, admission, page allocators, chunk budget and stop rules (see the module docstring).

    tokenizer: for string prompts, chat prompts, stop strings and result text (None: token ids only).
    enable_prefix_caching: reuse the cached full blocks of a prompt (see the module docstring).
    """

    def __init__(self, *, vocab_size: int, eos_ids, max_batch_size: int, max_seq_len: int, page_size: int,
                 num_pages: int, data_shards: int = 1, max_tokens_per_step: int, prefill_chunk: int,
                 prefill_row_len: int = 1, tokenizer=None, seed: int = 0,
                 enable_prefix_caching: bool = True):
        self.vocab_size = vocab_size
        self.eos_ids = frozenset(eos_ids)
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.page_size = page_size
        self.data_shards = data_shards
        self.rows_per_shard = -(-max_batch_size // data_shards)
        self.max_tokens_per_step = max_tokens_per_step
        self.prefill_chunk = prefill_chunk
        # The prefill budget of each data shard, in whole rows (see the module docstring).
        per_shard = -(-(max_tokens_per_step - max_batch_size) // data_shards)
        if per_shard < 1 or prefill_row_len < 1:
            raise ValueError(f"Engine: max_tokens_per_step ({max_tokens_per_step}) must exceed max_batch_size "
                             f"({max_batch_size}) and prefill_row_len ({prefill_row_len}) must be positive")
        self.prefill_row_len = min(prefill_row_len, per_shard)
        self.prefill_rows_per_shard = -(-per_shard // self.prefill_row_len)
        self.tokenizer = tokenizer
        self.seed = seed
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self.allocators = [PageAllocator(num_pages) for _ in range(data_shards)]
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.results: dict[Any, GenerationResult] = {}
        self._serials = itertools.count()

    # ------------------------------------------------------------------------------------------ input
    def encode_prompt(self, prompt, request, chat: bool | dict = False) -> list[int]:
        """Token ids of a prompt (str or ids), checked against the vocab and max_seq_len; ValueError names it.
        chat: True or a dict of template arguments (m3jax.chat.template_arguments) renders a str prompt as one
        user message through the tokenizer's chat template."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError(f"request {request}: prompt is empty")
            tok = self.tokenizer
            if tok is None:
                raise ValueError(f"request {request}: prompt is a string but no tokenizer is known (pass "
                                 f"tokenizer= or token ids)")
            try:
                args = template_arguments(chat)
                if args is not None:
                    prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], **args)
            except ValueError as e:
                raise ValueError(f"request {request}: {e}") from None
            ids = tok.encode(prompt)
        elif isinstance(prompt, (list, tuple, np.ndarray)):
            bad = [t for t in prompt if not _is_int(t)]          # True is not token id 1
            if bad:
                raise ValueError(f"request {request}: prompt token ids must be ints, got {bad[0]!r}")
            ids = [int(t) for t in prompt]
        else:
            raise ValueError(f"request {request}: prompt must be a str or a list of token ids, got "
                             f"{type(prompt).__name__}")
        if not ids:
            raise ValueError(f"request {request}: prompt is empty")
        v = self.vocab_size
        out = [t for t in ids if not 0 <= t < v]
        if out:
            raise ValueError(f"request {request}: prompt token id {out[0]} is outside the vocab [0, {v})")
        if len(ids) > self.max_seq_len:
            raise ValueError(f"request {request}: prompt has {len(ids)} tokens, more than max_seq_len="
                             f"{self.max_seq_len}")
        return ids

    def check_params(self, params: SamplingParams, request) -> None:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"request {request}: sampling must be a SamplingParams, got {type(params).__name__}")
        params.check(request, vocab_size=self.vocab_size)        # top_k and stop_token_ids against the vocab too
        if params.stop and self.tokenizer is None:
            raise ValueError(f"request {request}: sampling.stop (stop strings) needs a tokenizer")

    def pages_needed(self, num_prompt: int, params: SamplingParams) -> int:
        return pages_per_sequence(min(num_prompt + params.max_new_tokens, self.max_seq_len), self.page_size)

    def prepare(self, prompt, sampling: SamplingParams | None = None, request_id=None, chat: bool | dict = False):
        """Validate one request without queueing it: (token ids, params). Raises ValueError naming it."""
        name = request_id if request_id is not None else "<new>"
        sampling = SamplingParams() if sampling is None else sampling
        ids = self.encode_prompt(prompt, name, chat)
        self.check_params(sampling, name)
        need = self.pages_needed(len(ids), sampling)
        capacity = self.allocators[0].capacity
        if need > capacity:
            raise ValueError(f"request {name}: needs {need} pages (prompt {len(ids)} + max_new_tokens "
                             f"{sampling.max_new_tokens}), a cache pool has {capacity}")
        return ids, sampling

    def in_use(self, request_id) -> bool:
        """Whether the id names a queued, running or finished-but-unread request."""
        return (request_id in self.results or any(r.id == request_id for r in self.running)
                or any(r.id == request_id for r in self.waiting))

    def add(self, prompt, sampling: SamplingParams | None = None, *, request_id=None,
            on_token: Callable[[Any, int], None] | None = None, chat: bool | dict = False, cache_salt: bytes = b""):
        """Queue a request; returns its id. Invalid input raises ValueError before anything is queued.
        cache_salt: see `Request.cache_salt` (the Engine passes the hash of a prompt's images)."""
        if request_id is not None and self.in_use(request_id):
            raise ValueError(f"request {request_id}: request_id is already in use")
        ids, sampling = self.prepare(prompt, sampling, request_id, chat)
        serial = next(self._serials)
        rid = serial if request_id is None else request_id
        while request_id is None and self.in_use(rid):       # a caller's id may equal a later serial
            rid = serial = next(self._serials)
        seed = sampling.seed if sampling.seed is not None else (self.seed * 1_000_003 + serial) % 2**32
        self.waiting.append(Request(rid, ids, sampling, seed, on_token, tokens=list(ids),
                                    max_total=min(len(ids) + sampling.max_new_tokens, self.max_seq_len),
                                    cache_salt=cache_salt))
        return rid

    # ------------------------------------------------------------------------------------------ steps
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def admit(self) -> None:
        while self.waiting and len(self.running) < self.max_batch_size:
            req = self.waiting[0]
            need = self.pages_needed(len(req.prompt), req.params)
            load = collections.Counter(r.shard for r in self.running)
            # The full blocks before the last prompt token may come from the cache (that token is always computed).
            keys = self._block_keys(req, (len(req.prompt) - 1) // self.page_size)
            fits = {}
            for d in range(self.data_shards):
                hit = self.allocators[d].lookup(keys)
                if load[d] < self.rows_per_shard and self.allocators[d].can_allocate(need - len(hit), hit):
                    fits[d] = hit
            if not fits:
                break                                     # queued until a running request frees pages
            req.shard = min(fits, key=lambda d: (-len(fits[d]), load[d], -self.allocators[d].num_free))
            hit = fits[req.shard]
            self.allocators[req.shard].share(req.id, hit)         # first: allocate may evict free cached pages
            self.allocators[req.shard].allocate(req.id, need - len(hit))
            req.num_computed = req.num_cached = len(hit) * self.page_size
            req.num_registered = len(hit)
            self.running.append(self.waiting.popleft())

    def _block_keys(self, req: Request, n: int) -> list[bytes]:
        """The chain keys of req's first n full blocks (computed once; [] with prefix caching off)."""
        if not self.enable_prefix_caching:
            return []
        r = self.page_size
        while len(req.block_keys) < n:
            m = len(req.block_keys)
            parent = req.block_keys[-1] if m else root_key(req.cache_salt)
            req.block_keys.append(block_key(parent, req.tokens[m * r:(m + 1) * r]))
        return req.block_keys[:n]

    def _register_blocks(self, req: Request) -> None:
        """Cache req's full blocks whose keys are now all computed (prompt and generated tokens alike)."""
        done = req.num_computed // self.page_size
        if not self.enable_prefix_caching or done <= req.num_registered:
            return
        alloc, keys = self.allocators[req.shard], self._block_keys(req, done)
        pages = alloc.pages(req.id)
        for m in range(req.num_registered, done):
            alloc.register(pages[m], keys[m])
        req.num_registered = done

    def reset_prefix_cache(self) -> int:
        """Forget every cached block in every shard (pages in use stay in use); returns how many were cached."""
        return sum(a.reset_cache() for a in self.allocators)

    def schedule(self) -> Batch | None:
        """Admit, then the rows of the next step (None when nothing runs)."""
        self.admit()
        if not self.running:
            return None
        decode = [r for r in self.running if r.pending == 1]
        width = self.prefill_row_len
        budget = [self.prefill_rows_per_shard * width] * self.data_shards      # tokens, whole rows
        chunks = []
        for r in self.running:
            if r.pending > 1 and budget[r.shard] > 0:
                n = min(r.pending, self.prefill_chunk, budget[r.shard])
                chunks.append((r, n))
                budget[r.shard] -= -(-n // width) * width
        pages = lambda r: self.allocators[r.shard].pages(r.id)     # noqa: E731
        return Batch(tuple(Row.of(r, 1, pages(r)) for r in decode),
                     tuple(Row.of(r, n, pages(r)) for r, n in chunks))

    def _request(self, request_id) -> Request:
        for r in self.running:
            if r.id == request_id:
                return r
        raise KeyError(f"request {request_id!r} is not running")

    def complete(self, batch: Batch, sampled: Sequence[SampledToken | tuple[int, float | None] | None]
                 ) -> list[StepOutput]:
        """Record a computed step: every row's tokens are in the cache; rows with a SampledToken (or a
        (token, logprob) pair) get it appended (stop rules, on_token). Returns the outputs of the rows that
        sampled, in row order."""
        rows = batch.rows
        reqs = [self._request(row.request_id) for row in rows]
        for r, row in zip(reqs, rows):
            r.num_computed += len(row.tokens)
            self._register_blocks(r)
        outputs = []
        for r, row, got in zip(reqs, rows, sampled):
            if got is not None:
                outputs.append(self._append(r, *got))
        return outputs

    def fail(self, request_ids: Sequence, error: str) -> list[GenerationResult]:
        """Finish these running requests with finish_reason "error" and free their pages. The prefix cache is
        forgotten too: after a failed step nothing vouches for the cache's contents."""
        self.reset_prefix_cache()
        return [self._finish(self._request(i), FINISH_ERROR, None, error) for i in request_ids]

    def cancel(self, request_id) -> bool:
        """Drop a queued or running request and free its pages; no result is kept. False if it is not live."""
        for r in list(self.waiting):
            if r.id == request_id:
                self.waiting.remove(r)
                return True
        for r in self.running:
            if r.id == request_id:
                self.allocators[r.shard].release(r.id)
                self.running.remove(r)
                return True
        return False

    def _append(self, r: Request, token: int, logprob: float | None,
                top: Sequence[TopLogprob] | None = None) -> StepOutput:
        r.tokens.append(token)
        lps = [logprob] if r.params.logprobs else None
        tops = [list(top)] if r.params.top_logprobs else None
        if lps is not None:
            r.logprobs.append(logprob)
        if tops is not None:
            r.top_logprobs.append(tops[0])

        def output(finished: bool, result: GenerationResult | None = None) -> StepOutput:
            return StepOutput(r.id, [token], finished, result, lps, tops)

        if r.on_token is not None:
            try:
                r.on_token(r.id, token)
            except Exception as e:           # noqa: BLE001 - a caller's callback must not wedge the engine
                result = self._finish(r, FINISH_ERROR, None, f"on_token raised {type(e).__name__}: {e}")
                return output(True, result)
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
            return output(False)
        return output(True, self._finish(r, reason, cut))

    def _finish(self, r: Request, reason: str, cut: int | None, error: str | None = None) -> GenerationResult:
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
                                  list(r.prompt), r.id, error, r.num_cached,
                                  list(r.top_logprobs) if r.params.top_logprobs else None)
        self.allocators[r.shard].release(r.id)
        self.running.remove(r)
        self.results[r.id] = result
        return result
