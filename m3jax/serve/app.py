"""The OpenAI-compatible HTTP server: a Starlette ASGI app over an EngineWorker (one thread owns the engine).

    app = create_app(engine, model_name="m3")          # uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (SSE streaming with
`stream: true`, closed by `data: [DONE]`; `stream_options.include_usage` adds a usage chunk). Chat user messages
may hold `image_url` parts with data URLs when the model has a vision tower (m3jax.serve.images). Errors are OpenAI
error JSON naming the field: 400 bad field or a prompt longer than max_seq_len, 404 unknown model or path, 503
queue full or a failed engine. A client that disconnects cancels its requests (see worker.py for what that frees).
Each request logs one line: id, prompt / completion / cached tokens, time to first token, total time.
`usage.prompt_tokens_details.cached_tokens` counts the prompt tokens the engine took from its prefix cache
(GenerationResult.num_cached_tokens; once per prompt, from its first choice).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from typing import Any

from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from m3jax.chat import THINK_START, ChatTemplate, FieldError, ImagePart, check_messages, check_tools
from m3jax.serve.images import image_prompt
from m3jax.serve.parsing import ChatOutputParser, ParsedDelta
from m3jax.serve.protocol import APIError, Common, bad, parse_common, sampling_for, usage
from m3jax.serve.text import StreamText
from m3jax.serve.worker import EngineFailed, EngineWorker, Event, QueueFull, cached_tokens, prompt_ids

log = logging.getLogger("m3jax.serve")


@dataclasses.dataclass
class ServerConfig:
    model_name: str
    max_seq_len: int
    max_outstanding: int                       # requests waiting + running before 503
    completion_default_max_tokens: int = 16    # OpenAI's default for /v1/completions
    chat_default_max_tokens: int | None = None  # None: all the room max_seq_len leaves


@dataclasses.dataclass
class _Choice:
    index: int
    prompt_index: int
    request_id: str
    stream: StreamText
    parser: ChatOutputParser | None
    token_ids: list[int] = dataclasses.field(default_factory=list)
    result: Any = None
    first_token_at: float | None = None
    parsed: ParsedDelta = dataclasses.field(default_factory=ParsedDelta)
    logprobs: list[float] = dataclasses.field(default_factory=list)       # of token_ids, when asked
    top_logprobs: list[list] = dataclasses.field(default_factory=list)    # of token_ids: [TopLogprob] each
    logprobs_sent: int = 0            # tokens whose logprobs a response chunk carried
    text_offset: int = 0              # completions: characters of the token strings sent so far


class Server:
    """Request handling: parse and check the request, submit its choices, turn engine events into responses."""

    def __init__(self, worker: EngineWorker, tokenizer, config: ServerConfig, chat_template: ChatTemplate):
        self.worker, self.tok, self.cfg, self.template = worker, tokenizer, config, chat_template
        self.vocab_size = getattr(getattr(worker.engine, "config", None), "vocab_size", None)

    def _parse_common(self, body: dict, chat: bool) -> Common:
        common = parse_common(body, chat)
        if self.vocab_size is not None and common.sampling.top_k > self.vocab_size:
            # A k beyond the vocab filters nothing (the extra is unbounded, as vLLM's): off, which the engine takes.
            common = dataclasses.replace(common, sampling=dataclasses.replace(common.sampling, top_k=0))
        return common

    # ------------------------------------------------------------------------------------------ helpers
    def _check_model(self, body: dict) -> None:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise bad("model", f"must be the served model's name ({self.cfg.model_name!r})")
        if model != self.cfg.model_name:
            raise APIError(404, f"model {model!r} does not exist; this server serves {self.cfg.model_name!r}",
                           "model", "model_not_found")

    async def _body(self, request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", None, "invalid_json")
        return body

    def _check_length(self, num_tokens: int, field: str) -> None:
        if num_tokens > self.cfg.max_seq_len:
            raise bad(field, f"the prompt has {num_tokens} tokens, more than this server's max_seq_len="
                             f"{self.cfg.max_seq_len}", "context_length_exceeded")

    def _encode(self, text: str, field: str) -> list[int]:
        if not text:
            raise bad(field, "must not be empty")
        ids = self.tok.encode(text)
        self._check_length(len(ids), field)
        return ids

    def _token_prompt(self, ids: list, field: str) -> list[int]:
        if not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise bad(field, "a token-id prompt must be a non-empty list of integers")
        self._check_length(len(ids), field)
        return list(ids)

    # ------------------------------------------------------------------------------------------ endpoints
    async def health(self, request: Request):
        if self.worker.failure is not None:
            return JSONResponse({"status": "error", "detail": self.worker.failure}, 503)
        return JSONResponse({"status": "ok", "outstanding": self.worker.outstanding})

    async def models(self, request: Request):
        return JSONResponse({"object": "list", "data": [{
            "id": self.cfg.model_name, "object": "model", "created": 0, "owned_by": "m3jax",
            "max_model_len": self.cfg.max_seq_len}]})

    async def completions(self, request: Request):
        body = await self._body(request)
        self._check_model(body)
        common = self._parse_common(body, chat=False)
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompts = [self._encode(prompt, "prompt")]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = [self._encode(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
            prompts = [self._token_prompt(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
        elif isinstance(prompt, list) and prompt:
            prompts = [self._token_prompt(prompt, "prompt")]
        else:
            raise bad("prompt", "must be a string, a list of strings, a list of token ids or a list of those")
        return await self._generate(request, "completion", prompts, common, "prompt",
                                    self.cfg.completion_default_max_tokens, None)

    async def chat(self, request: Request):
        body = await self._body(request)
        self._check_model(body)
        common = self._parse_common(body, chat=True)
        images: list[ImagePart] = []
        try:           # validated and rendered as M3Tokenizer.apply_chat_template does it (m3jax.chat)
            messages = check_messages(body.get("messages"), images)
            tools = check_tools(body.get("tools"))
        except FieldError as e:
            raise bad(e.field, e.detail) from None
        choice = body.get("tool_choice", "auto")
        if choice not in ("auto", "none"):
            raise bad("tool_choice", f"only 'auto' and 'none' are supported (no constrained decoding), got "
                                     f"{choice!r:.60}", "unsupported_parameter")
        if choice == "none":
            tools = None
        kwargs = body.get("chat_template_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise bad("chat_template_kwargs", "must be an object")
        try:
            text = self.template.render(messages, tools, True, **kwargs)
        except FieldError as e:         # a template variable by its name, or the messages a jinja template refused
            raise bad(e.field if e.field == "messages" else f"chat_template_kwargs.{e.field}", e.detail) from None
        rid = "chatcmpl-" + uuid.uuid4().hex[:24]
        if images:      # decoding and patching are CPU work: off the event loop
            prompt = await asyncio.to_thread(image_prompt, self.worker.engine, text, images, rid)
            self._check_length(len(prompt.token_ids), "messages")
        else:
            prompt = self._encode(text, "messages")
        in_reasoning = text.endswith(THINK_START)
        make_parser = lambda: ChatOutputParser(reasoning=True, starts_in_reasoning=in_reasoning,  # noqa: E731
                                               tools=tools)
        return await self._generate(request, "chat", [prompt], common, "messages", self.cfg.chat_default_max_tokens,
                                    make_parser, rid)

    # ------------------------------------------------------------------------------------------ generation
    async def _generate(self, request: Request, kind: str, prompts: list, common: Common,
                        prompt_field: str, default_max: int | None, make_parser, rid: str | None = None):
        """prompts: token ids, or MultimodalPrompts (chat with images), each run common.n times."""
        t0 = time.perf_counter()
        rid = rid or ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        total = len(prompts) * common.n
        if total > self.worker.max_outstanding:
            raise bad("n", f"{len(prompts)} prompt(s) x n={common.n} = {total} requests, more than this server "
                           f"takes at once ({self.worker.max_outstanding})")
        params = [sampling_for(common, len(prompt_ids(p)), self.cfg.max_seq_len, default_max, prompt_field, c)
                  for p in prompts for c in range(common.n)]
        try:
            self.worker.reserve(total)
        except QueueFull as e:
            raise APIError(503, f"the server is busy: {e}", None, "queue_full") from None
        except EngineFailed as e:
            raise APIError(503, str(e), None, "engine_failed") from None
        out: asyncio.Queue = asyncio.Queue()
        choices = []
        for i in range(total):
            p = i // common.n
            c = _Choice(i, p, f"{rid}-{i}", StreamText(self.tok, common.sampling.stop),
                        make_parser() if make_parser else None)
            choices.append(c)
            self.worker.submit(c.request_id, prompts[p], params[i], out, i)
        # Every choice is accepted or refused before any response starts (a refusal is a 400 for all).
        early, pending, errors = [], set(range(total)), []
        while pending:
            ev: Event = await self._get(out)
            if ev.kind == "accepted":
                pending.discard(ev.choice)
            elif ev.kind == "error":
                pending.discard(ev.choice)
                errors.append(ev.error)
                if self.worker.failure is not None:
                    break
            else:
                early.append(ev)
        if errors:
            self._cancel(choices)
            if self.worker.failure is not None:
                raise APIError(503, self.worker.failure, None, "engine_failed")
            raise bad(prompt_field, errors[0])
        state = _Run(self, kind, rid, prompts, common, choices, out, early, t0)
        if common.stream:
            return EventSourceResponse(state.stream(), ping=15, sep="\n")
        return await state.complete(request)

    async def _get(self, out: asyncio.Queue) -> Event:
        """The next event; if the engine thread died without answering, an error event says so."""
        while True:
            try:
                return await asyncio.wait_for(out.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if self.worker.failure is not None and out.empty():
                    return Event("error", 0, error=self.worker.failure)

    def _cancel(self, choices: list[_Choice]) -> None:
        for c in choices:
            if c.result is None:
                self.worker.cancel(c.request_id)


class _Run:
    """One HTTP request's choices in flight: consumes their events into chunks or one final response."""

    def __init__(self, server: Server, kind, rid, prompts, common: Common, choices, out, early, t0):
        self.s, self.kind, self.rid, self.prompts, self.common = server, kind, rid, prompts, common
        self.choices, self.out, self.early, self.t0 = choices, out, early, t0
        self.created = int(time.time())
        self.done = 0

    async def _next(self) -> Event:
        if self.early:
            return self.early.pop(0)
        return await self.s._get(self.out)

    def _apply(self, ev: Event) -> tuple[_Choice, str, ParsedDelta | None, bool]:
        """Feed one event to its choice: (choice, new text, new parsed delta (chat), finished)."""
        c = self.choices[ev.choice]
        if ev.kind == "error":
            raise APIError(500, f"request {c.request_id} failed: {ev.error}", None, "engine_error",
                           "server_error")
        if c.first_token_at is None and (ev.token_ids or ev.kind == "done"):
            c.first_token_at = ev.time
        c.token_ids += ev.token_ids
        c.logprobs += ev.logprobs or []
        c.top_logprobs += ev.top_logprobs or []
        if ev.kind == "tokens":
            text = c.stream.push(ev.token_ids)
            finished = False
        else:
            c.result = ev.result
            text = c.stream.finish(ev.result.text)
            finished = True
            self.done += 1
        parsed = None
        if c.parser is not None:
            parsed = c.parser.feed(text)
            if finished:
                parsed.extend(c.parser.finish())
            c.parsed.extend(parsed)
        return c, text, parsed, finished

    def _finish_reason(self, c: _Choice) -> str:
        reason = c.result.finish_reason
        if self.kind == "chat" and reason == "stop" and c.parsed.tool_calls:
            return "tool_calls"
        return reason

    def _logprobs(self, c: _Choice):
        """The logprobs of c's tokens that no chunk carried yet, in OpenAI's shape (None when not asked): chat
        {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}, completions {"tokens",
        "token_logprobs", "top_logprobs": [{token: logprob}] (the top n and the chosen token; tokens that decode
        to one string share an entry) or None, "text_offset"}. A response, or the chunks of a stream together,
        carry each token once, in order."""
        start, end = c.logprobs_sent, len(c.logprobs)
        if not self.common.logprobs or (self.common.stream and start == end):
            return None
        n = self.common.sampling.top_logprobs
        c.logprobs_sent = end
        decode = lambda t: self.s.tok.decode([t])                                      # noqa: E731
        strings = [decode(t) for t in c.token_ids[start:end]]
        lps, tops = c.logprobs[start:end], c.top_logprobs[start:end] if n else [[]] * (end - start)
        if self.kind == "chat":
            def entry(s: str, lp: float) -> dict:
                return {"token": s, "logprob": lp, "bytes": None if "\ufffd" in s else list(s.encode("utf-8"))}
            return {"content": [dict(entry(s, lp), top_logprobs=[entry(decode(a.token_id), a.logprob) for a in top])
                                for s, lp, top in zip(strings, lps, tops)]}
        offsets = []
        for s in strings:
            offsets.append(c.text_offset)
            c.text_offset += len(s)
        top_dicts = None
        if n:       # OpenAI: the n best and always the chosen token, so up to n + 1 entries. Tokens that decode
            # to the same string (special tokens, pieces of one character) share an entry: the best one's.
            top_dicts = [{**{decode(a.token_id): a.logprob for a in reversed(top)}, s: lp} for s, lp, top in
                         zip(strings, lps, tops)]
        return {"tokens": strings, "token_logprobs": lps, "top_logprobs": top_dicts, "text_offset": offsets}

    def _usage(self) -> dict:
        prompt = sum(len(prompt_ids(p)) for p in self.prompts)
        completion = sum(len(c.result.token_ids) for c in self.choices if c.result is not None)
        cached = sum(cached_tokens(c.result) for c in self.choices[::self.common.n] if c.result is not None)
        return usage(prompt, completion, cached)

    def _log(self, status: str) -> None:
        firsts = [c.first_token_at for c in self.choices if c.first_token_at is not None]
        ttft = f"{(min(firsts) - self.t0) * 1e3:.1f} ms" if firsts else "-"
        u = self._usage()
        log.info("request %s: %s, prompt %d tokens, completion %d tokens, cached %d tokens, TTFT %s, total %.1f ms",
                 self.rid, status, u["prompt_tokens"], u["completion_tokens"],
                 u["prompt_tokens_details"]["cached_tokens"], ttft, (time.perf_counter() - self.t0) * 1e3)

    def _cancel_rest(self) -> None:
        self.s._cancel(self.choices)

    # ------------------------------------------------------------------------------------------ non-streaming
    async def complete(self, request: Request):
        finished = False
        try:
            while self.done < len(self.choices):
                try:
                    ev = await asyncio.wait_for(self._next(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        self._log("cancelled (client disconnected)")
                        return JSONResponse({}, 499)
                    continue
                self._apply(ev)
            finished = True
        finally:
            if not finished:
                self._cancel_rest()
        self._log("ok")
        if self.kind == "chat":
            out = []
            for c in self.choices:
                # OpenAI: content is null when the turn is only tool calls
                msg = {"role": "assistant", "content": c.parsed.content or (None if c.parsed.tool_calls else ""),
                       "reasoning_content": c.parsed.reasoning or None}
                if c.parsed.tool_calls:
                    msg["tool_calls"] = [t.to_openai() for t in c.parsed.tool_calls]
                out.append({"index": c.index, "message": msg, "finish_reason": self._finish_reason(c),
                            "logprobs": self._logprobs(c)})
            return JSONResponse({"id": self.rid, "object": "chat.completion", "created": self.created,
                                 "model": self.s.cfg.model_name, "choices": out, "usage": self._usage()})
        out = [{"index": c.index, "text": c.stream.emitted, "finish_reason": self._finish_reason(c),
                "logprobs": self._logprobs(c)} for c in self.choices]
        return JSONResponse({"id": self.rid, "object": "text_completion", "created": self.created,
                             "model": self.s.cfg.model_name, "choices": out, "usage": self._usage()})

    # ------------------------------------------------------------------------------------------ streaming
    def _chunk(self, choices: list[dict]) -> dict:
        d = {"id": self.rid, "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
             "created": self.created, "model": self.s.cfg.model_name, "choices": choices}
        if self.common.include_usage:
            d["usage"] = None
        return {"data": json.dumps(d, ensure_ascii=False)}

    def _chat_deltas(self, c: _Choice, parsed: ParsedDelta) -> list[dict]:
        out = []
        if parsed.reasoning:
            out.append({"reasoning_content": parsed.reasoning})
        if parsed.content:
            out.append({"content": parsed.content})
        if parsed.tool_calls:
            out.append({"tool_calls": [t.to_openai(with_index=True) for t in parsed.tool_calls]})
        return out

    async def stream(self):
        status = "cancelled (client disconnected)"
        try:
            if self.kind == "chat":
                for c in self.choices:
                    yield self._chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}])
            while self.done < len(self.choices):
                ev = await self._next()
                try:
                    c, text, parsed, finished = self._apply(ev)
                except APIError as e:
                    status = f"failed: {e.message}"
                    yield {"data": json.dumps(e.body())}
                    break
                if self.kind == "chat":
                    for delta in self._chat_deltas(c, parsed):
                        yield self._chunk([{"index": c.index, "delta": delta, "logprobs": self._logprobs(c),
                                            "finish_reason": None}])
                    if finished:
                        yield self._chunk([{"index": c.index, "delta": {}, "logprobs": self._logprobs(c),
                                            "finish_reason": self._finish_reason(c)}])
                else:
                    # One chunk per engine event, even when the text is held back or empty (a token that is
                    # half a character): clients see every token arrive, which is what TTFT / TPOT measure.
                    yield self._chunk([{"index": c.index, "text": text, "logprobs": self._logprobs(c),
                                        "finish_reason": self._finish_reason(c) if finished else None}])
            else:
                status = "ok"
                if self.common.include_usage:
                    d = {"id": self.rid, "object": "chat.completion.chunk" if self.kind == "chat"
                         else "text_completion", "created": self.created, "model": self.s.cfg.model_name,
                         "choices": [], "usage": self._usage()}
                    yield {"data": json.dumps(d)}
            yield {"data": "[DONE]"}
        finally:
            if self.done < len(self.choices):
                self._cancel_rest()
            self._log(status)


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), e.status)


def _wrap(handler):
    async def endpoint(request: Request):
        try:
            return await handler(request)
        except APIError as e:
            if e.status >= 500:
                log.error("%s %s: %s", request.method, request.url.path, e.message)
            return _error_response(e)
        except Exception as e:                                          # noqa: BLE001
            log.exception("%s %s: internal error", request.method, request.url.path)
            return _error_response(APIError(500, f"internal server error: {type(e).__name__}: {e}", None,
                                            "internal_error"))
    return endpoint


async def _http_error(request: Request, exc: HTTPException):
    return _error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", None,
                                    "not_found" if exc.status_code == 404 else None,
                                    "invalid_request_error"))


def create_app(engine, *, model_name: str = "m3jax", max_queue: int | None = None,
               chat_template: ChatTemplate | None = None, tokenizer=None, checkpoint_dir: str | None = None,
               completion_default_max_tokens: int = 16, chat_default_max_tokens: int | None = None) -> Starlette:
    """The ASGI app serving `engine` (an m3jax.Engine with a tokenizer). max_queue: requests that may wait for
    a batch slot beyond the max_batch_size running ones (default 4 x max_batch_size); more get 503. tokenizer:
    default the engine's. chat_template: default the tokenizer's (M3Tokenizer.chat_template: its checkpoint's
    chat_template.jinja, else the built-in M3 layout), so that a conversation gives the prompt that
    m3jax.generate(..., chat=True) gives it; for a tokenizer without one, checkpoint_dir's (m3jax.chat)."""
    tok = tokenizer or engine.tokenizer
    if tok is None:
        raise ValueError("create_app: the engine has no tokenizer (pass tokenizer= or a checkpoint with "
                         "tokenizer.json)")
    if chat_template is None:
        chat_template = getattr(tok, "chat_template", None)
        if not isinstance(chat_template, ChatTemplate):       # a tokenizer of another kind
            chat_template = ChatTemplate.from_checkpoint(checkpoint_dir)
    max_queue = 4 * engine.max_batch_size if max_queue is None else max_queue
    if max_queue < 0:
        raise ValueError(f"create_app: max_queue must be >= 0, got {max_queue}")
    worker = EngineWorker(engine, engine.max_batch_size + max_queue)
    cfg = ServerConfig(model_name, engine.max_seq_len, worker.max_outstanding, completion_default_max_tokens,
                       chat_default_max_tokens)
    server = Server(worker, tok, cfg, chat_template)
    log.info("serving %r: max_seq_len %d, max_batch_size %d, up to %d requests in flight; chat prompts from the %s",
             model_name, engine.max_seq_len, engine.max_batch_size, worker.max_outstanding, chat_template.source)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    routes = [Route("/health", _wrap(server.health), methods=["GET"]),
              Route("/v1/models", _wrap(server.models), methods=["GET"]),
              Route("/v1/completions", _wrap(server.completions), methods=["POST"]),
              Route("/v1/chat/completions", _wrap(server.chat), methods=["POST"])]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: _http_error})
    app.state.server = server
    app.state.worker = worker
    return app


__all__ = ["Server", "ServerConfig", "create_app"]
