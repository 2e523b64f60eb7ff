"""`m3jax serve` under load: TTFT, TPOT and throughput at 1 / 8 / 32 / 64 concurrent streaming clients, and the
TTFT of a second turn that shares a 32K-token prefix against a cold 32K prefill.

The server runs in this process (uvicorn in a thread over an Engine). The load generator runs in a child process
(its own interpreter, so its JSON parsing does not share the server's GIL) and talks to 127.0.0.1 only, through
the official `openai` client, streaming /v1/completions with token-id prompts (exact lengths; sent in the body as
is, see `_one`) and ignore_eos (exactly --new-tokens tokens). Each level's load first runs once unmeasured (compiling the engine's batch
shapes), then measured. It is bounded: at most --requests-per-level requests per level (default 2 x the
concurrency) and --level-timeout seconds per level; a request still open then is counted as lost.

Per level: TTFT (send -> first streamed chunk; the server sends one chunk per engine step of the request), TPOT
((last chunk - first chunk) / (tokens - 1)), output tokens/s over the level's wall time, and the outcome of
every request (ok / HTTP status + reason / lost). Prefix turn: a cold request with a fresh 32K prefix + 64
tokens, then a second request with the same prefix + 64 other tokens, which takes every full block of the prefix
from the engine's prefix cache (its `cached_tokens` is reported; --prefix-caching off makes it a cold prefill too),
then another cold request with a fresh prefix; repeated for --prefix-repeats fresh prefixes, the speedup is the
median cold TTFT over the median second-turn TTFT.

    python benchmarks/serve.py --out benchmarks/results_serve_h200.json          # scaled M3 (generate.py), GPU
    python benchmarks/serve.py --model /path/to/checkpoint ...                   # a checkpoint instead
    python benchmarks/serve.py --small                                           # tiny model on CPU (checks it)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import socket
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.append(os.path.dirname(os.path.abspath(__file__)))      # generate.py; after the repo (convert/ wins)

MODEL_NAME = "m3-bench"


# ------------------------------------------------------------------------------------------------ server side
def _scaled_model(args):
    """The scaled M3 of benchmarks/generate.py (real geometry, first 6 layers, random bf16 weights)."""
    from generate import jax_model

    scaled = argparse.Namespace(small=False, experts=args.experts, impl=None, fp8_experts=args.fp8_experts)
    return jax_model(scaled, max_position_embeddings=max(args.max_seq_len, 40960))


def start_server(args):
    """(url, uvicorn server, thread, description) with the engine stepping in its own thread."""
    import tempfile

    import uvicorn

    import m3jax
    from m3jax.serve import create_app
    from m3jax.tokenizer import M3Tokenizer, write_byte_level_tokenizer

    if args.small or args.model:
        from m3jax.api import bundled_tiny_checkpoint
        path = args.model or bundled_tiny_checkpoint()
        model = m3jax.load(path, dtype=args.dtype or ("float32" if args.small else "bfloat16"), progress=False,
                           fp8_experts=args.fp8_experts)
        tok, what = M3Tokenizer.from_pretrained(path), path
    else:
        model = _scaled_model(args)
        tmp = tempfile.mkdtemp(prefix="m3jax-serve-bench-")
        write_byte_level_tokenizer(os.path.join(tmp, "tokenizer.json"))     # prompts are token ids
        tok, what = M3Tokenizer.from_pretrained(tmp), f"scaled M3 ({args.experts} experts, random weights)"
    # Few compiled shapes: each (decode rows, prefill rows x chunk) bucket combination compiles once, so rows are
    # bucketed at the concurrency levels and prompt chunks are always --prefill-chunk long.
    rows = sorted({min(c, args.max_batch_size) for c in args.levels} | {args.max_batch_size})
    engine = m3jax.Engine(model, tokenizer=tok, max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len,
                          prefill_chunk=args.prefill_chunk, memory_fraction=args.memory_fraction,
                          row_buckets=rows,
                          enable_prefix_caching=args.prefix_caching == "on")
    app = create_app(engine, model_name=MODEL_NAME, tokenizer=tok, max_queue=args.max_queue,
                     completion_default_max_tokens=args.new_tokens)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    t0 = time.time()
    while not server.started:
        if not thread.is_alive() or time.time() - t0 > 120:
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}/v1", server, thread, what, engine


# ------------------------------------------------------------------------------------------------ client side
async def _one(client, prompt, new_tokens, timeout):
    """One streamed completion: {"ok", "ttft", "tpot", "tokens", "cached", "error"}."""
    import openai
    t0 = time.perf_counter()
    first = last = None
    chunks = 0
    usage = None
    try:
        # The token ids travel in extra_body: the client sends it as is, whereas a `prompt=` list is walked
        # element by element by the client's request transform (0.73 s for 32K ids on the 2-core box), a cost
        # of this load generator's process, not of the server, that would otherwise count in every TTFT.
        stream = await client.completions.create(
            model=MODEL_NAME, prompt="", max_tokens=new_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"prompt": prompt, "ignore_eos": True},
            timeout=timeout)
        async for c in stream:
            now = time.perf_counter()
            if c.choices:
                chunks += 1
                first = first or now
                last = now
            if c.usage is not None:
                usage = c.usage
    except openai.APIStatusError as e:
        return {"ok": False, "error": f"HTTP {e.status_code}: {str(e.message)[:200]}"}
    except (openai.APIConnectionError, openai.APITimeoutError, asyncio.TimeoutError) as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[:200]}
    if usage is None or first is None:
        return {"ok": False, "error": "stream ended without usage"}
    n = usage.completion_tokens
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return {"ok": True, "ttft": first - t0, "tpot": (last - first) / (n - 1) if n > 1 else None, "tokens": n,
            "cached": cached, "total": time.perf_counter() - t0}


async def _level(url, concurrency, prompts, new_tokens, level_timeout):
    import openai
    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0)
    sem = asyncio.Semaphore(concurrency)
    deadline = time.perf_counter() + level_timeout

    async def run(p):
        async with sem:
            left = deadline - time.perf_counter()
            if left <= 0:
                return {"ok": False, "error": "lost: level time limit reached before it was sent"}
            try:
                return await asyncio.wait_for(_one(client, p, new_tokens, left), left)
            except asyncio.TimeoutError:
                return {"ok": False, "error": "lost: no answer within the level time limit"}

    t0 = time.perf_counter()
    results = await asyncio.gather(*(run(p) for p in prompts))
    wall = time.perf_counter() - t0
    await client.close()
    return results, wall


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(math.ceil(q * len(xs))) - 1)] if xs else None


def _summary(concurrency, results, wall, prompt_lens):
    ok = [r for r in results if r["ok"]]
    errors = {}
    for r in results:
        if not r["ok"]:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
    ttft = [r["ttft"] for r in ok]
    tpot = [r["tpot"] for r in ok if r["tpot"] is not None]
    return {"what": "load", "concurrency": concurrency, "requests": len(results), "ok": len(ok), "errors": errors,
            "prompt_tokens_mean": statistics.mean(prompt_lens), "output_tokens": sum(r["tokens"] for r in ok),
            "wall_s": wall, "output_tokens_per_s": sum(r["tokens"] for r in ok) / wall,
            "ttft_p50_s": _pct(ttft, 0.5), "ttft_p90_s": _pct(ttft, 0.9),
            "tpot_p50_s": _pct(tpot, 0.5), "tpot_p90_s": _pct(tpot, 0.9)}


def client_main(url, plan, out_queue):
    """The load generator (child process): runs the plan, puts one summary dict per measurement."""
    import random
    rng = random.Random(plan["seed"])
    vocab = plan["vocab"]

    def ids(n):
        return [rng.randrange(0, vocab) for _ in range(n)]

    async def main():
        # Warm-up (not measured): compiles the step programs for short and long prompts.
        await _level(url, 2, [ids(plan["min_prompt"]), ids(plan["max_prompt"])], plan["new_tokens"],
                     plan["level_timeout"])
        for c in plan["levels"]:
            n = plan["requests_per_level"] or 2 * c
            if plan["warm_levels"]:                 # the same load once, unmeasured: compiles its batch shapes
                lens = [rng.randint(plan["min_prompt"], plan["max_prompt"]) for _ in range(n)]
                await _level(url, c, [ids(n_) for n_ in lens], plan["new_tokens"], plan["level_timeout"])
            lens = [rng.randint(plan["min_prompt"], plan["max_prompt"]) for _ in range(n)]
            results, wall = await _level(url, c, [ids(n_) for n_ in lens], plan["new_tokens"],
                                         plan["level_timeout"])
            out_queue.put(_summary(c, results, wall, lens))
        if plan["prefix"]:
            import openai
            client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0)
            pre, t = plan["prefix"], plan["level_timeout"]
            await _one(client, ids(pre) + ids(64), 1, t)                   # warm-up at this length
            trials = []
            for _ in range(plan["prefix_repeats"]):                        # a fresh prefix each time
                shared = ids(pre)
                cold = await _one(client, shared + ids(64), 1, t)         # first turn: the prefix is new
                second = await _one(client, shared + ids(64), 1, t)       # second turn: same prefix, cached
                other = await _one(client, ids(pre) + ids(64), 1, t)      # another cold prefill
                trials.append({"first_turn": cold, "second_turn": second, "cold_again": other})
            await client.close()
            ok = all(x["ok"] for tr in trials for x in tr.values())
            med = {k: statistics.median(tr[k]["ttft"] for tr in trials) if ok else None
                   for k in ("first_turn", "second_turn", "cold_again")}
            out_queue.put({"what": "prefix", "prefix_tokens": pre, "trials": trials,
                           "second_turn_cached": [tr["second_turn"].get("cached") for tr in trials],
                           "ttft_median_s": med,
                           "speedup": med["cold_again"] / med["second_turn"] if ok else None})

    asyncio.run(main())
    out_queue.put(None)


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="the bundled tiny model on CPU, short prompts")
    ap.add_argument("--model", help="a checkpoint directory instead of the scaled M3")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--experts", type=int, default=64, help="routed experts of the scaled M3")
    ap.add_argument("--fp8-experts", action="store_true")
    ap.add_argument("--prefix-caching", choices=["on", "off"], default="on",
                    help="Engine(enable_prefix_caching=...): off makes the second turn a cold prefill too")
    ap.add_argument("--levels", default=None, help="concurrency levels (default 1,8,32,64; small: 1,4,8)")
    ap.add_argument("--max-batch-size", type=int, default=None, help="default: the largest level")
    ap.add_argument("--max-seq-len", type=int, default=None, help="default 40960 (small: 512)")
    ap.add_argument("--max-queue", type=int, default=256)
    ap.add_argument("--prefill-chunk", type=int, default=None, help="default 2048 (small: 64)")
    ap.add_argument("--memory-fraction", type=float, default=0.85)
    ap.add_argument("--min-prompt", type=int, default=None, help="default 1024 (small: 16)")
    ap.add_argument("--max-prompt", type=int, default=None, help="default 8192 (small: 64)")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 256 (small: 8)")
    ap.add_argument("--prefix", type=int, default=None, help="shared-prefix tokens (default 32768; small: 256; 0: "
                    "skip)")
    ap.add_argument("--prefix-repeats", type=int, default=None, help="fresh shared prefixes measured (median; "
                    "default 3, small: 5)")
    ap.add_argument("--requests-per-level", type=int, default=None, help="default 2 x concurrency (max 256)")
    ap.add_argument("--level-timeout", type=float, default=None, help="seconds per level (default 600; small 300)")
    ap.add_argument("--warm-levels", choices=["on", "off"], default=None, help="run each level's load once "
                    "unmeasured before measuring it (compiles the engine's batch shapes; default on, off with --small)")
    ap.add_argument("--out", default=None, help="append JSON lines here")
    args = ap.parse_args(argv)
    small = args.small
    d = lambda v, big, tiny: v if v is not None else (tiny if small else big)        # noqa: E731
    levels = [int(x) for x in d(args.levels, "1,8,32,64", "1,4,8").split(",")]
    args.levels = levels
    args.max_batch_size = d(args.max_batch_size, max(levels), max(levels))
    args.max_seq_len = d(args.max_seq_len, 40960, 512)
    args.prefill_chunk = d(args.prefill_chunk, 2048, 64)
    args.new_tokens = d(args.new_tokens, 256, 8)
    plan = {"levels": levels, "min_prompt": d(args.min_prompt, 1024, 16), "max_prompt": d(args.max_prompt, 8192, 64),
            "new_tokens": args.new_tokens, "prefix": d(args.prefix, 32768, 256),
            "prefix_repeats": max(1, d(args.prefix_repeats, 3, 5)),
            "requests_per_level": min(args.requests_per_level or 0, 256),
            "level_timeout": d(args.level_timeout, 600.0, 300.0), "seed": 0,
            "warm_levels": d(args.warm_levels, "on", "off") == "on"}
    if plan["max_prompt"] + plan["new_tokens"] > args.max_seq_len or plan["prefix"] + 64 >= args.max_seq_len:
        print("serve.py: error: --max-seq-len is too small for the prompts", file=sys.stderr)
        return 2

    import jax
    url, server, thread, what, engine = start_server(args)
    plan["vocab"] = min(engine.config.vocab_size, 256) if small else engine.config.vocab_size
    dev = jax.devices()[0]
    setup = {"what": "setup", "device": str(getattr(dev, "device_kind", dev)), "jax": jax.__version__,
             "model": what, "max_batch_size": args.max_batch_size, "max_seq_len": args.max_seq_len,
             "prefill_chunk": args.prefill_chunk, "num_pages": engine.num_pages, "plan": plan,
             "prefix_caching": engine.enable_prefix_caching,
             "date": time.strftime("%Y-%m-%d", time.gmtime())}
    rows = [setup]
    _emit(args, setup)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    child = ctx.Process(target=client_main, args=(url, plan, q), daemon=True)
    child.start()
    limit = time.time() + plan["level_timeout"] * (len(levels) + 3) + 600
    try:
        while time.time() < limit:
            try:
                row = q.get(timeout=5)
            except Exception:                                              # noqa: BLE001 - queue.Empty
                if not child.is_alive():
                    print("serve.py: the load generator exited early", file=sys.stderr)
                    break
                continue
            if row is None:
                break
            rows.append(row)
            _emit(args, row)
    finally:
        if child.is_alive():
            child.terminate()
        server.should_exit = True
        thread.join(30)
    _table(rows)
    return 0


def _emit(args, row):
    line = json.dumps(row)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")


def _table(rows):
    ms = lambda v: "-" if v is None else f"{v * 1e3:.1f}"                         # noqa: E731
    print("\n| clients | requests | ok | mean prompt | TTFT p50 / p90 ms | TPOT p50 / p90 ms | output tok/s | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["what"] == "load":
            print(f"| {r['concurrency']} | {r['requests']} | {r['ok']} | {r['prompt_tokens_mean']:.0f} | "
                  f"{ms(r['ttft_p50_s'])} / {ms(r['ttft_p90_s'])} | {ms(r['tpot_p50_s'])} / {ms(r['tpot_p90_s'])} | "
                  f"{r['output_tokens_per_s']:.1f} | {r['errors'] or '-'} |")
    for r in rows:
        if r["what"] == "prefix":
            med = r["ttft_median_s"]
            sp = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
            print(f"\nshared {r['prefix_tokens']}-token prefix, median of {len(r['trials'])} fresh prefixes: first "
                  f"turn TTFT {ms(med['first_turn'])} ms, second turn {ms(med['second_turn'])} ms (cached tokens "
                  f"{r['second_turn_cached']}), another cold prefill {ms(med['cold_again'])} ms; cold / second = {sp}")


if __name__ == "__main__":
    sys.exit(main())
