"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds, optional logprobs and top logprobs.

Every row of a batch is sampled independently from its own key `fold_in(key(seed), n)`, n = the number of
tokens the request has generated so far, with Gumbel-max over the filtered, temperature-scaled logits. The
result therefore depends only on the request's logits, its parameters, its seed and n: the same seed gives the
same tokens whatever else is in the batch. Greedy rows (temperature 0) take the argmax.

Log-probabilities (`logprobs`, `top_logprobs`) are those of the model's raw distribution, log_softmax of the
logits before temperature, top-k and top-p, as OpenAI and vLLM report them by default: they say what the model
thinks, whatever the request sampled with. The top alternatives are computed on the device only in steps where a
request asks for them, always MAX_TOP_LOGPROBS of them (one more sampler program, whatever n each request wants),
and cut to each request's n on the host.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

f32 = jnp.float32
MAX_TOP_LOGPROBS = 20        # OpenAI's limit for top_logprobs; the device always computes this many


class TopLogprob(NamedTuple):
    """One of the most likely tokens at a position, with its log-probability under the raw distribution."""

    token_id: int
    logprob: float


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick the tokens of one request.

    temperature 0 is greedy (argmax). top_k 0 disables top-k; top_p 1.0 disables nucleus filtering.
    seed: per-request seed (None: derived from the request id, so runs differ per request but are
    reproducible). stop_token_ids and the model's eos ids end a request with finish_reason "stop" (the id is
    kept in token_ids, not in text); stop strings end it when the decoded text contains one (the text is cut
    before it). logprobs: return the log-probability (under the model's unscaled, unfiltered distribution)
    of each chosen token. top_logprobs: with logprobs, also the n most likely tokens at every generated
    position and their log-probabilities under that same distribution (0 <= n <= MAX_TOP_LOGPROBS; the chosen
    token is among them only if it ranks in the top n). Values are checked by the engine, which names the
    request in its error.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0

    def check(self, request, vocab_size: int | None = None) -> None:
        """Raise ValueError naming `request` and the field for any invalid value.

        vocab_size (when the model is known): top_k must be <= it and stop_token_ids inside [0, vocab_size).
        Integers must be real integers: `True` is not a token id nor a count. stop_token_ids must be a sequence
        (`(5,)`, not `5`): a bare int is refused rather than guessed at.
        """
        def bad(field, want, got):
            raise ValueError(f"request {request}: sampling.{field} must be {want}, got {got!r}")

        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            bad("max_new_tokens", "an integer >= 1", self.max_new_tokens)
        if not _is_real(self.temperature) or not np.isfinite(self.temperature) or self.temperature < 0:
            bad("temperature", ">= 0 (0 = greedy)", self.temperature)
        if not _is_int(self.top_k) or not 0 <= self.top_k <= INT32_MAX:
            bad("top_k", f"an integer in [0, {INT32_MAX}] (0 = off)", self.top_k)
        if vocab_size is not None and self.top_k > vocab_size:
            bad("top_k", f"<= the vocab size {vocab_size} (0 = off)", self.top_k)
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "in (0, 1]", self.top_p)
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**32):
            bad("seed", "None or an integer in [0, 2**32)", self.seed)
        if isinstance(self.stop, str) or not isinstance(self.stop, Sequence) \
                or not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "a sequence of non-empty strings", self.stop)
        ids = self.stop_token_ids
        if isinstance(ids, (str, bytes)) or not isinstance(ids, (Sequence, np.ndarray)) \
                or not all(_is_int(t) for t in ids):
            bad("stop_token_ids", "a sequence of token ids (e.g. (5,) for one id)", ids)
        if vocab_size is not None and any(not 0 <= t < vocab_size for t in ids):
            bad("stop_token_ids", f"token ids in [0, {vocab_size})", list(ids))
        for field in ("ignore_eos", "logprobs"):
            if not isinstance(getattr(self, field), (bool, np.bool_)):
                bad(field, "True or False", getattr(self, field))
        if not _is_int(self.top_logprobs) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            bad("top_logprobs", f"an integer in [0, {MAX_TOP_LOGPROBS}]", self.top_logprobs)
        if self.top_logprobs and not self.logprobs:
            bad("top_logprobs", "0 unless logprobs=True", self.top_logprobs)


INT32_MAX = 2**31 - 1     # top_k travels to the device as int32


def _is_int(v) -> bool:
    """An integer that is not a bool (True would otherwise be token id 1, or one new token)."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


class SamplingBatch(NamedTuple):
    """Per-row sampling parameters as device arrays (one row per request of the step)."""

    temperature: jax.Array   # f32[B]; 0 = greedy
    top_k: jax.Array         # i32[B]; 0 = off
    top_p: jax.Array         # f32[B]; 1 = off
    seed: jax.Array          # u32[B]
    counter: jax.Array       # i32[B] tokens generated so far by the request

    @classmethod
    def from_params(cls, params: Sequence[SamplingParams], seeds: Sequence[int], counters: Sequence[int],
                    pad_to: int) -> "SamplingBatch":
        n = len(params)
        pad = pad_to - n

        def arr(vals, fill, dtype):
            return np.asarray(list(vals) + [fill] * pad, dtype)

        return cls(arr((p.temperature for p in params), 0.0, np.float32),
                   arr((p.top_k for p in params), 0, np.int32),
                   arr((p.top_p for p in params), 1.0, np.float32),
                   arr(seeds, 0, np.uint32), arr(counters, 0, np.int32))


def filter_logits(logits_bv, temperature_b, top_k_b, top_p_b):
    """Temperature-scaled logits with everything outside top-k / top-p set to -inf (per row)."""
    v = logits_bv.shape[-1]
    t = jnp.where(temperature_b > 0, temperature_b, 1.0)[:, None]
    x = logits_bv.astype(f32) / t
    sorted_x = jnp.sort(x, axis=-1)[:, ::-1]                                  # descending
    rank = jnp.arange(v)[None, :]
    k = jnp.where(top_k_b > 0, jnp.minimum(top_k_b, v), v)[:, None]
    keep = rank < k
    probs = jax.nn.softmax(jnp.where(keep, sorted_x, -jnp.inf), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs                               # mass strictly above this rank
    keep &= (before < top_p_b[:, None]) | (rank == 0)
    cutoff = jnp.min(jnp.where(keep, sorted_x, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(x >= cutoff, x, -jnp.inf)


def _row_key(seed, counter):
    return jax.random.fold_in(jax.random.key(seed), counter)


class Sampled(NamedTuple):
    """One step's samples, device arrays: the chosen tokens and, when asked for, their log-probabilities and the
    MAX_TOP_LOGPROBS most likely tokens of every row (best first; fewer if the vocab is smaller)."""

    tokens: jax.Array                     # i32[B]
    logprobs: jax.Array | None = None     # f32[B]
    top_ids: jax.Array | None = None      # i32[B, n]
    top_logprobs: jax.Array | None = None  # f32[B, n]


@functools.partial(jax.jit, static_argnames=("all_greedy", "want_logprobs", "want_top"))
def sample(logits_bv, batch: SamplingBatch, *, all_greedy: bool, want_logprobs: bool,
           want_top: bool = False) -> Sampled:
    """The tokens of one step, and their logprobs (want_logprobs) and the top alternatives (want_top) under the
    raw log_softmax of the logits. `all_greedy` skips the sort/noise entirely."""
    greedy = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    if all_greedy:
        tokens = greedy
    else:
        x = filter_logits(logits_bv, batch.temperature, batch.top_k, batch.top_p)
        keys = jax.vmap(_row_key)(batch.seed, batch.counter)
        gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (logits_bv.shape[-1],), f32))(keys)
        drawn = jnp.argmax(x + gumbel, axis=-1).astype(jnp.int32)
        tokens = jnp.where(batch.temperature > 0, drawn, greedy)
    if not (want_logprobs or want_top):
        return Sampled(tokens)
    lp = jax.nn.log_softmax(logits_bv.astype(f32), axis=-1)
    chosen = jnp.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0]
    if not want_top:
        return Sampled(tokens, chosen)
    top_lp, top_ids = jax.lax.top_k(lp, min(MAX_TOP_LOGPROBS, lp.shape[-1]))     # ties: the lower id first
    return Sampled(tokens, chosen, top_ids.astype(jnp.int32), top_lp)
