"""The server's only contact with the Engine: one thread owns it and steps it while requests come and go.

Request handlers (asyncio) never touch the engine. They `submit` a request and read its `Event`s from an
asyncio.Queue; the engine thread takes submissions and cancellations from a thread-safe inbox between steps,
runs `engine.step()`, and hands each request's new tokens to its queue with `loop.call_soon_threadsafe`.

Cancellation: when the Engine has `cancel(request_id)` it is called (the request leaves the batch and its pages
are freed). Without it, the request's events are dropped and its result is discarded when it finishes; its
pages stay held until then.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from typing import Any

from m3jax.engine import GenerationResult
from m3jax.sampling import SamplingParams
from m3jax.vision.prompt import MultimodalPrompt

log = logging.getLogger("m3jax.serve")


class QueueFull(Exception):
    """More requests are outstanding than the server accepts (HTTP 503)."""


class EngineFailed(Exception):
    """The engine raised during a step; the server no longer accepts requests (HTTP 503)."""


@dataclasses.dataclass
class Event:
    """What a handler receives for one engine request. kind: "accepted" | "tokens" | "done" | "error"."""

    kind: str
    choice: int = 0
    token_ids: list[int] = dataclasses.field(default_factory=list)
    result: GenerationResult | None = None
    error: str | None = None
    time: float = 0.0
    logprobs: list[float] | None = None                  # of token_ids, when the request asked
    top_logprobs: list | None = None                     # of token_ids: per token, [TopLogprob]


def cached_tokens(result: GenerationResult | None) -> int:
    """Prompt tokens the engine took from its prefix cache (GenerationResult.num_cached_tokens; 0 without a
    result)."""
    return 0 if result is None else result.num_cached_tokens


def prompt_ids(prompt: list[int] | MultimodalPrompt) -> list[int]:
    """The token ids of a submitted prompt (a MultimodalPrompt's with its image placeholders expanded)."""
    return prompt.token_ids if isinstance(prompt, MultimodalPrompt) else prompt


@dataclasses.dataclass
class _Sink:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    choice: int


class EngineWorker:
    """Owns an Engine in a background thread. max_outstanding: requests submitted and not yet finished (waiting +
    running) beyond which `submit` raises QueueFull."""

    def __init__(self, engine, max_outstanding: int, idle_wait_s: float = 0.5):
        self.engine = engine
        self.max_outstanding = max_outstanding
        self.cancel_frees_pages = callable(getattr(engine, "cancel", None))
        self._idle_wait_s = idle_wait_s
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[Any, _Sink] = {}          # engine thread only
        self._abandoned: set = set()                # engine thread only: cancelled without Engine.cancel
        self._outstanding = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.failure: str | None = None
        self.num_steps = 0
        self._thread = threading.Thread(target=self._run, name="m3jax-engine", daemon=True)
        log.info("engine worker: cancellation %s", "calls Engine.cancel (frees pages)" if self.cancel_frees_pages
                 else "drops the stream; pages are freed when the request finishes (Engine has no cancel)")

    # ------------------------------------------------------------------------------------ handler side
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(("wake",))
        self._thread.join(timeout)

    @property
    def outstanding(self) -> int:
        return self._outstanding

    def submit(self, request_id, prompt: list[int] | MultimodalPrompt, sampling: SamplingParams,
               out: asyncio.Queue, choice: int = 0) -> None:
        """Queue one engine request (token ids, or a prepared prompt with images), counted by an earlier
        `reserve`; its events go to `out` (first "accepted" or "error")."""
        self._inbox.put(("add", request_id, prompt, sampling, _Sink(asyncio.get_running_loop(), out, choice)))

    def reserve(self, n: int) -> None:
        """Count n requests as in flight, or raise QueueFull / EngineFailed (all or nothing)."""
        if self.failure is not None:
            raise EngineFailed(self.failure)
        with self._lock:
            if self._outstanding + n > self.max_outstanding:
                raise QueueFull(f"{self._outstanding} requests are in flight, the server takes at most "
                                f"{self.max_outstanding}; retry later")
            self._outstanding += n

    def unreserve(self, n: int) -> None:
        """Give back n reservations that were not submitted."""
        with self._lock:
            self._outstanding -= n

    def cancel(self, request_id) -> None:
        self._inbox.put(("cancel", request_id))

    # ------------------------------------------------------------------------------------ engine thread
    def _emit(self, sink: _Sink, event: Event) -> None:
        event.time = time.perf_counter()
        sink.loop.call_soon_threadsafe(sink.queue.put_nowait, event)

    def _release(self, request_id) -> None:
        self._sinks.pop(request_id, None)
        with self._lock:
            self._outstanding -= 1

    def _handle(self, msg) -> None:
        if msg[0] == "add":
            _, rid, ids, sampling, sink = msg
            try:
                self.engine.add_request(ids, sampling, request_id=rid)
            except ValueError as e:
                with self._lock:
                    self._outstanding -= 1
                self._emit(sink, Event("error", sink.choice, error=str(e)))
                return
            self._sinks[rid] = sink
            self._emit(sink, Event("accepted", sink.choice))
        elif msg[0] == "cancel":
            rid = msg[1]
            if rid not in self._sinks:
                return                                   # finished already
            if self.cancel_frees_pages:
                try:
                    self.engine.cancel(rid)
                except (KeyError, ValueError) as e:          # e.g. it finished inside the engine meanwhile
                    log.warning("engine worker: cancel(%r): %s", rid, e)
                self.engine.pop_result(rid)
                self._release(rid)
            else:
                self._abandoned.add(rid)
                self._sinks.pop(rid, None)

    def _deliver(self, outputs) -> None:
        for o in outputs:
            rid = o.request_id
            if rid in self._abandoned:
                if o.finished:
                    self._abandoned.discard(rid)
                    self.engine.pop_result(rid)
                    with self._lock:
                        self._outstanding -= 1
                continue
            sink = self._sinks.get(rid)
            if sink is None:
                continue
            if o.finished:
                result = o.result if o.result is not None else self.engine.pop_result(rid)
                self.engine.pop_result(rid)
                self._emit(sink, Event("done", sink.choice, list(o.new_token_ids), result,
                                       logprobs=o.logprobs,
                                       top_logprobs=o.top_logprobs))
                self._release(rid)
            else:
                self._emit(sink, Event("tokens", sink.choice, list(o.new_token_ids),
                                       logprobs=o.logprobs,
                                       top_logprobs=o.top_logprobs))

    def _fail(self, exc: BaseException) -> None:
        self.failure = f"engine step failed: {type(exc).__name__}: {exc}"
        log.exception("engine worker: %s; failing %d requests, accepting no more", self.failure, len(self._sinks))
        for rid, sink in list(self._sinks.items()):
            self._emit(sink, Event("error", sink.choice, error=self.failure))
            self._release(rid)
        while True:                                      # submissions not yet taken: refused the same way
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if msg[0] == "add":
                self._emit(msg[4], Event("error", msg[4].choice, error=self.failure))
                with self._lock:
                    self._outstanding -= 1

    def _run(self) -> None:
        while not self._stop.is_set() and self.failure is None:
            try:
                busy = self.engine.has_work()
                try:
                    msg = self._inbox.get_nowait() if busy else self._inbox.get(timeout=self._idle_wait_s)
                except queue.Empty:
                    msg = None
                while msg is not None:
                    if msg[0] != "wake":
                        self._handle(msg)
                    try:
                        msg = self._inbox.get_nowait()
                    except queue.Empty:
                        msg = None
                if self.engine.has_work():
                    outputs = self.engine.step()
                    self.num_steps += 1
                    self._deliver(outputs)
            except Exception as e:                       # noqa: BLE001 - a failing step must not hang clients
                self._fail(e)


__all__ = ["EngineFailed", "EngineWorker", "Event", "QueueFull", "cached_tokens", "prompt_ids"]
