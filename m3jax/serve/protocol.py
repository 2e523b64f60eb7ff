"""OpenAI request fields -> checked values. Every bad field raises APIError naming it (HTTP 400), never a 500."""

from __future__ import annotations

import dataclasses
from typing import Any

from m3jax.sampling import MAX_TOP_LOGPROBS, SamplingParams


class APIError(Exception):
    """An OpenAI-style error: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or {400: "invalid_request_error", 404: "invalid_request_error",
                              503: "service_unavailable"}.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str | None = None) -> APIError:
    return APIError(400, f"{param}: {message}", param, code or "invalid_value")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def opt_int(body: dict, name: str, lo: int | None = None, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if not _is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f" in [{lo}, {hi}]" if hi is not None else (f" >= {lo}" if lo is not None else "")
        raise bad(name, f"must be an integer{rng}, got {v!r}")
    return v


def opt_num(body: dict, name: str, lo: float, hi: float, lo_open: bool = False) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if not _is_num(v) or v != v or v > hi or v < lo or (lo_open and v == lo):
        raise bad(name, f"must be a number in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}")
    return float(v)


def opt_bool(body: dict, name: str) -> bool | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, bool):
        raise bad(name, f"must be true or false, got {v!r}")
    return v


# Fields that would change the output and that this server cannot honour: refused, not ignored.
_UNSUPPORTED = {
    "presence_penalty": lambda v: v not in (None, 0, 0.0),
    "frequency_penalty": lambda v: v not in (None, 0, 0.0),
    "logit_bias": lambda v: bool(v),
    "best_of": lambda v: v not in (None, 1),
    "suffix": lambda v: v is not None,
    "echo": lambda v: bool(v),
}


@dataclasses.dataclass
class Common:
    """The sampling and streaming fields shared by /v1/completions and /v1/chat/completions."""

    max_tokens: int | None
    sampling: SamplingParams            # max_new_tokens filled in per prompt (see `sampling_for`)
    n: int
    stream: bool
    include_usage: bool
    logprobs: bool                      # the top alternatives per position: sampling.top_logprobs


def parse_common(body: dict, chat: bool) -> Common:
    for name, refused in _UNSUPPORTED.items():
        if name in body and refused(body[name]):
            raise bad(name, f"is not supported by this server (got {body[name]!r})", "unsupported_parameter")
    max_tokens = opt_int(body, "max_tokens", 1)
    mct = opt_int(body, "max_completion_tokens", 1)
    if mct is not None:
        max_tokens = mct
    temperature = opt_num(body, "temperature", 0.0, 2.0)
    top_p = opt_num(body, "top_p", 0.0, 1.0, lo_open=True)
    top_k = opt_int(body, "top_k", -1, 2**31 - 1)         # int32 on the device (a larger k filters nothing)
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**32):
        raise bad("seed", f"must be an integer in [0, 2**32), got {seed!r}")
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise bad("stop", f"must be a string or a list of at most 4 strings, got {stop!r:.80}")
    if any(not s for s in stops):
        raise bad("stop", "stop strings must be non-empty")
    ignore_eos = bool(opt_bool(body, "ignore_eos"))     # extra (as vLLM): generate exactly max_tokens
    n = opt_int(body, "n", 1, 128) or 1
    stream = bool(opt_bool(body, "stream"))
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not stream:
            raise bad("stream_options", "is only allowed when stream is true")
        if not isinstance(opts, dict):
            raise bad("stream_options", f"must be an object, got {opts!r:.80}")
        include_usage = bool(opt_bool(opts, "include_usage")) if "include_usage" in opts else False
        if "include_usage" in opts and not isinstance(opts["include_usage"], bool):
            raise bad("stream_options.include_usage", "must be true or false")
    if chat:
        logprobs = bool(opt_bool(body, "logprobs"))
        top = opt_int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
        if top is not None and not logprobs:
            raise bad("top_logprobs", "needs logprobs: true")
    else:                                 # OpenAI allows 5 here; 20 as in chat (and vLLM)
        top = opt_int(body, "logprobs", 0, MAX_TOP_LOGPROBS)
        logprobs = top is not None
    sampling = SamplingParams(
        max_new_tokens=1, temperature=1.0 if temperature is None else temperature,
        top_k=0 if top_k in (None, -1) else top_k, top_p=1.0 if top_p is None else top_p,
        seed=seed, stop=stops, logprobs=logprobs, top_logprobs=top or 0, ignore_eos=ignore_eos)
    return Common(max_tokens, sampling, n, stream, include_usage, logprobs)


def sampling_for(common: Common, num_prompt: int, max_seq_len: int, default_max_tokens: int | None,
                 prompt_field: str, choice: int) -> SamplingParams:
    """The SamplingParams of one choice of one prompt: checks the length budget, derives per-choice seeds."""
    room = max_seq_len - num_prompt
    if room < 1:
        raise bad(prompt_field, f"the prompt has {num_prompt} tokens; this server's max_seq_len is {max_seq_len} "
                                f"(prompt + completion), so nothing is left to generate", "context_length_exceeded")
    if common.max_tokens is None:
        max_new = room if default_max_tokens is None else min(room, default_max_tokens)
    elif common.max_tokens > room:
        raise bad("max_tokens", f"the prompt has {num_prompt} tokens and max_tokens is {common.max_tokens}; "
                                f"together they exceed max_seq_len={max_seq_len}", "context_length_exceeded")
    else:
        max_new = common.max_tokens
    seed = common.sampling.seed
    if seed is not None and choice:
        seed = (seed + choice) % 2**32                   # n > 1: distinct, reproducible draws per choice
    return dataclasses.replace(common.sampling, max_new_tokens=max_new, seed=seed)


def usage(prompt_tokens: int, completion_tokens: int, cached: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached}}


__all__ = ["APIError", "Common", "bad", "opt_bool", "opt_int", "parse_common", "sampling_for", "usage"]
