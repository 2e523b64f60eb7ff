"""Multi-host runs: one process per host (or per GPU), every process running the same program (SPMD).

    m3jax.distributed.initialize("10.0.0.1:1234", num_processes=2, process_id=I)   # first, before any jax call
    mesh = m3jax.sharding.make_mesh(data=1, model=16)        # jax.devices(): every process's devices
    model = m3jax.load(path, mesh=mesh)                      # each process reads only its devices' slices
    out = m3jax.generate(model, prompts, params)             # the same prompts in every process

Start-up wraps `jax.distributed.initialize`. The arguments may also come from the environment: the coordinator
from `JAX_COORDINATOR_ADDRESS` (read by jax itself), the process count and id from `M3JAX_NUM_PROCESSES` and
`M3JAX_PROCESS_ID`, the local devices from `JAX_LOCAL_DEVICE_IDS` (jax). On Cloud TPU, Slurm and Open MPI all
of them may be left out: jax detects them. The command line spells them `--coordinator HOST:PORT
--num-processes N --process-id I` (`add_distributed_args`, `maybe_initialize`).

The engine in SPMD: every process gets the same request stream (the same prompts and sampling parameters, in
the same order) and runs the same host-side scheduler, so every process makes the same decisions and launches
the same jitted programs; request seeds depend only on the engine seed and the request's serial number, so
sampling draws the same numbers everywhere. Sampled tokens come back to every process's host (`to_host`:
`process_allgather` when the array spans other hosts' devices), so every process holds every result.
`check_agree` all-gathers a hash (tests and debugging) and raises when processes disagree. When requests arrive
in process 0 only (the HTTP server), process 0 drives a `LeaderEngine`, which publishes each step's new requests
and cancellations through jax's coordination service, and the other processes `follow` it: the same request
stream again, replayed.

Failure: a process that cannot join (coordinator unreachable, another process missing) prints one line naming the
coordinator and exits with status 1 after `init_timeout_s`; a process that dies is noticed by the others through missed heartbeats (`heartbeat_timeout_s`), which makes jax's
distributed runtime end them with an error naming the cause; an uncaught exception in one process (after
`initialize`) prints it and exits that process at once (`os._exit(1)`) instead of waiting at jax's shutdown
barrier, so the others are ended by the heartbeat check. Nothing waits forever.
CPU: cross-process collectives use gloo (`jax_cpu_collectives_implementation`, set here: the one place that
names it; jax 0.10.2 already defaults to it). Private jax used here, and only here: the coordination service's
key-value client (`jax._src.distributed.global_state.client`) for LeaderEngine / follow.
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import logging
import os
import pickle
import sys
import threading
import traceback
from typing import Sequence

import jax
import numpy as np

log = logging.getLogger(__name__)
INIT_TIMEOUT_S = 300            # jax's default: how long process 0 waits for the others at start-up
HEARTBEAT_TIMEOUT_S = 100       # jax's default: a process silent this long is taken as dead
_JAX_TIMEOUT_MARGIN_S = 30      # jax's own start-up timeout: after the watchdog's (see initialize)
_ENV_NUM_PROCESSES, _ENV_PROCESS_ID = "M3JAX_NUM_PROCESSES", "M3JAX_PROCESS_ID"


class DistributedError(RuntimeError):
    """Start-up of a multi-process run failed, or processes disagree."""


def _env_int(name: str) -> int | None:
    text = os.environ.get(name)
    if text in (None, ""):
        return None
    if not text.isdigit():
        raise ValueError(f"environment variable {name} must be a non-negative integer, got {text!r}")
    return int(text)


def _use_gloo_on_cpu() -> None:
    """CPU collectives across processes: gloo (the option `jax_cpu_collectives_implementation` of jax 0.10.2 and
    of jax's main branch; a jax without it is told nothing, and a log line says so)."""
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except AttributeError:        # pragma: no cover - a jax without the option
        log.warning("distributed: this jax has no jax_cpu_collectives_implementation option; CPU collectives "
                    "across processes use its default")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: Sequence[int] | None = None, *,
               init_timeout_s: int = INIT_TIMEOUT_S, heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S,
               exit_on_error: bool = True) -> None:
    """Join a multi-process run (`jax.distributed.initialize`); must come before any other jax call.

    coordinator_address: "HOST:PORT" of process 0, which also serves the coordination service there (None:
        JAX_COORDINATOR_ADDRESS, or detected on Cloud TPU / Slurm / Open MPI). num_processes / process_id
        (None: M3JAX_NUM_PROCESSES / M3JAX_PROCESS_ID, or detected). local_device_ids: the devices of this
        process (None: all it sees; JAX_LOCAL_DEVICE_IDS).
    init_timeout_s: how long to wait for every process to connect; then one line naming the coordinator goes to
        stderr and the process exits with status 1 (a watchdog: jax's own timeout aborts with a C++ stack trace).
    heartbeat_timeout_s: a process that stops answering for this long ends the run on every host; also the
        longest wait at jax's shutdown barrier on exit (jax's default, 300 s, would hold a failed process).
    exit_on_error: an uncaught exception in this process prints its traceback and exits at once (status 1), so
        the others are ended by the heartbeat check instead of waiting in a collective.
    """
    num_processes = _env_int(_ENV_NUM_PROCESSES) if num_processes is None else num_processes
    process_id = _env_int(_ENV_PROCESS_ID) if process_id is None else process_id
    for name, v in (("num_processes", num_processes), ("process_id", process_id)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise ValueError(f"distributed: {name} must be a non-negative integer, got {v!r}")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"distributed: num_processes must be >= 1, got {num_processes}")
    if num_processes is not None and process_id is not None and process_id >= num_processes:
        raise ValueError(f"distributed: process_id {process_id} must be < num_processes {num_processes}")
    if jax.distributed.is_initialized():
        raise DistributedError("distributed: already initialized (initialize() is called once per process)")
    _use_gloo_on_cpu()
    where = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or "the detected coordinator"
    who = "this process" if process_id is None else f"process {process_id} of {num_processes}"
    message = (f"m3jax.distributed: {who} could not join the run through "
               f"coordinator {where} within {init_timeout_s} s; check that every process was started with the same "
               f"--coordinator and --num-processes, and that the port is reachable from every host")
    # jax's own start-up timeout aborts the process with a C++ stack trace; this watchdog ends it first, with one
    # line (jax's timeout, set later, stays as the backstop).
    watchdog = threading.Timer(init_timeout_s, _die, (message,))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id, local_device_ids,
                                   initialization_timeout=int(init_timeout_s) + _JAX_TIMEOUT_MARGIN_S,
                                   heartbeat_timeout_seconds=int(heartbeat_timeout_s),
                                   shutdown_timeout_seconds=int(heartbeat_timeout_s))
    except RuntimeError as e:
        if "must be called before" in str(e):
            raise DistributedError("distributed: initialize() must come before any other jax call in the "
                                   "process (jax.devices(), an array, a jit)") from None
        raise DistributedError(f"{message} ({_first_line(e)})") from None
    finally:
        watchdog.cancel()
    if exit_on_error:
        _exit_on_uncaught_exception()


def _die(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    os._exit(1)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _exit_on_uncaught_exception() -> None:
    previous = sys.excepthook

    def hook(kind, value, tb):
        if issubclass(kind, KeyboardInterrupt):
            return previous(kind, value, tb)
        traceback.print_exception(kind, value, tb)
        print(f"m3jax.distributed: process {jax.process_index()} of {jax.process_count()} failed: "
              f"{kind.__name__}: {_first_line(value)}; exiting so that the run ends on every host", file=sys.stderr)
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(1)        # not sys.exit: jax's shutdown barrier would wait for processes that are stuck

    sys.excepthook = hook


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """--coordinator / --num-processes / --process-id (plus timeouts) for a command that may run multi-host."""
    g = parser.add_argument_group("multi-host (jax.distributed; see m3jax.distributed)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="address of process 0's coordination service, or 'auto' (Cloud TPU, Slurm, Open MPI: "
                        "jax detects the coordinator, process count and id); enables a multi-process run")
    g.add_argument("--num-processes", type=int, default=None, help="number of processes in the run")
    g.add_argument("--process-id", type=int, default=None, help="this process's index, 0 .. num-processes - 1")
    g.add_argument("--init-timeout", type=int, default=INIT_TIMEOUT_S,
                   help=f"seconds to wait for every process to join (default {INIT_TIMEOUT_S})")
    g.add_argument("--heartbeat-timeout", type=int, default=HEARTBEAT_TIMEOUT_S,
                   help=f"seconds of silence after which a process counts as dead (default {HEARTBEAT_TIMEOUT_S})")


def maybe_initialize(args: argparse.Namespace, quiet_followers: bool = True) -> bool:
    """initialize() when the command line (or M3JAX_NUM_PROCESSES) asks for a multi-process run; True if it did.

    A partial set of the three options raises ValueError naming the missing ones; so does a command with a --mesh
    option left unset (a multi-process run needs a mesh over every process's devices). quiet_followers: the
    standard output of processes other than 0 goes to os.devnull (their results are process 0's); errors still
    reach their standard error."""
    given = {"--coordinator": args.coordinator, "--num-processes": args.num_processes,
             "--process-id": args.process_id}
    if all(v is None for v in given.values()) and _env_int(_ENV_NUM_PROCESSES) is None:
        return False
    if args.coordinator == "auto":               # Cloud TPU, Slurm, Open MPI: jax detects all three
        _check_mesh_arg(args)
        initialize(None, args.num_processes, args.process_id, init_timeout_s=args.init_timeout,
                   heartbeat_timeout_s=args.heartbeat_timeout)
        _quiet(quiet_followers)
        return True
    env = {"--coordinator": os.environ.get("JAX_COORDINATOR_ADDRESS"),
           "--num-processes": _env_int(_ENV_NUM_PROCESSES), "--process-id": _env_int(_ENV_PROCESS_ID)}
    missing = [k for k, v in given.items() if v is None and env[k] is None]
    if missing:
        raise ValueError(f"a multi-process run needs --coordinator, --num-processes and --process-id; missing "
                         f"{', '.join(missing)}")
    _check_mesh_arg(args)
    initialize(args.coordinator, args.num_processes, args.process_id, init_timeout_s=args.init_timeout,
               heartbeat_timeout_s=args.heartbeat_timeout)
    _quiet(quiet_followers)
    return True


def _check_mesh_arg(args: argparse.Namespace) -> None:
    if getattr(args, "mesh", "") is None:
        raise ValueError("a multi-process run needs --mesh DATAxMODEL over the devices of every process "
                         "(e.g. 1x16 for two hosts of 8 GPUs)")


def _quiet(quiet_followers: bool) -> None:
    if quiet_followers and not is_main_process():
        sys.stdout = open(os.devnull, "w")      # every process holds every result: process 0 prints them


def is_multi_process() -> bool:
    """More than one process in this run (jax.distributed was initialised with num_processes > 1)."""
    return jax.process_count() > 1


def is_main_process() -> bool:
    """Process 0: the one that prints results, writes files and serves HTTP in a multi-process run."""
    return jax.process_index() == 0


def start_to_host(*xs) -> None:
    """Start the device-to-host copies of the addressable arrays among `xs` (None skipped), so that the `to_host`
    calls that follow wait once for all of them instead of one round trip each."""
    for x in xs:
        if isinstance(x, jax.Array) and x.is_fully_addressable:
            x.copy_to_host_async()


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of `x` as numpy in every process, also when its shards live on other hosts' devices."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def min_over_processes(value: int) -> int:
    """The smallest of every process's `value` (an int), the same in every process (e.g. the free memory of the
    device with the least of it: every process must size its caches alike)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils
    return int(np.min(multihost_utils.process_allgather(np.asarray([value], np.int64))))


def check_agree(what: str, value) -> None:
    """Raise DistributedError unless every process passes the same `value` (anything with a stable repr: a
    batch layout, a list of token ids). One small all-gather: for tests and debug mode, not every step."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils
    digest = np.frombuffer(hashlib.sha256(repr(value).encode()).digest()[:8], np.uint32)
    got = np.asarray(multihost_utils.process_allgather(digest))          # [processes, 2]
    if not (got == got[0]).all():
        bad = [i for i in range(len(got)) if not (got[i] == got[0]).all()]
        raise DistributedError(f"distributed: processes disagree on {what}: process(es) {bad} differ from process 0 "
                               f"(process {jax.process_index()} has {repr(value)[:200]})")


# ------------------------------------------------------------------------------------ a leader and followers
_OPS_PREFIX = "m3jax/engine_ops"
_POLL_MS = 60_000               # a follower of an idle server waits in slices of this, forever


def _client():
    from jax._src import distributed as jax_distributed     # the coordination service's key-value store
    if jax_distributed.global_state.client is None:
        raise DistributedError("distributed: initialize() first (leader/follower engines need jax.distributed)")
    return jax_distributed.global_state.client


class LeaderEngine:
    """Process 0's Engine when requests arrive in process 0 only (the HTTP server): every `add_request` and
    `cancel` is applied here and recorded, and each `step()` first publishes the record through jax's
    coordination service, so that the Engines of the other processes (`follow`) apply the same operations in
    the same order and run the same step. Prompts travel as token ids (text is tokenised here). Everything
    else is the wrapped Engine's (`leader.tokenizer`, `leader.pop_result`...).
    """

    def __init__(self, engine):
        self.engine = engine
        self._ops: list[tuple] = []
        self._published = 0
        self._closed = False
        atexit.register(self.close)      # runs before jax's shutdown barrier, which the followers then reach

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def add_request(self, prompt, sampling=None, *, request_id=None, on_token=None, chat: bool = False):
        ids, params = self.engine.prepare(prompt, sampling, request_id, chat)
        rid = self.engine.add_request(ids, params, request_id=request_id, on_token=on_token)
        self._ops.append(("add", rid, list(ids), params))
        return rid

    def cancel(self, request_id) -> bool:
        self._ops.append(("cancel", request_id))
        return self.engine.cancel(request_id)

    def step(self):
        self._publish(self._ops + [("step",)])
        self._ops = []
        return self.engine.step()

    def run(self) -> dict:
        """Step until every queued request has finished; returns (and forgets) all finished results."""
        while self.engine.has_work():
            self.step()
        results, self.engine.scheduler.results = self.engine.scheduler.results, {}
        return results

    def stream(self, *args, **kwargs):
        raise NotImplementedError("LeaderEngine.stream: use add_request(..., on_token=) and step()")

    def close(self) -> None:
        """Tell the followers to return (they return from `follow`); once, also at exit."""
        if not self._closed:
            self._closed = True
            self._publish(self._ops + [("stop",)])
            self._ops = []

    def _publish(self, ops) -> None:
        client = _client()
        client.key_value_set_bytes(f"{_OPS_PREFIX}/{self._published}", pickle.dumps(ops))
        if self._published >= 2:     # every follower has read n - 2: it took part in step n - 1's collectives
            client.key_value_delete(f"{_OPS_PREFIX}/{self._published - 2}")
        self._published += 1


def follow(engine) -> int:
    """Run `engine` as process 0's `LeaderEngine` directs (in every process but 0) until it closes; returns the
    number of steps run. Results are dropped here: process 0 holds them."""
    client, n, steps = _client(), 0, 0
    while True:
        try:
            blob = client.blocking_key_value_get_bytes(f"{_OPS_PREFIX}/{n}", _POLL_MS)
        except Exception as e:        # noqa: BLE001 - jax raises its runtime error type on the timeout
            if "DEADLINE_EXCEEDED" in str(e) or "timed out" in str(e).lower():
                continue              # an idle leader; a dead one ends this process through the heartbeat check
            raise
        n += 1
        for op in pickle.loads(blob):
            if op[0] == "add":
                engine.add_request(op[2], op[3], request_id=op[1])
            elif op[0] == "cancel":
                engine.cancel(op[1])
                engine.pop_result(op[1])
            elif op[0] == "step":
                for out in engine.step():
                    if out.finished:
                        engine.pop_result(out.request_id)
                steps += 1
            elif op[0] == "stop":
                return steps


__all__ = ["DistributedError", "INIT_TIMEOUT_S", "HEARTBEAT_TIMEOUT_S", "add_distributed_args", "check_agree",
           "follow", "initialize", "is_main_process", "is_multi_process", "LeaderEngine", "maybe_initialize", "min_over_processes",
           "to_host"]
