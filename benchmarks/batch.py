"""Offline batch generation as a user runs it: m3jax.generate on a list of prompts vs transformers==5.23.0.

Model: the scaled M3 of benchmarks/generate.py (real widths and attention / MSA / MoE geometry, 3 dense + 3 MSA/MoE
layers, --experts routed experts, random bf16 weights); --small: its tiny geometry (runs on CPU).

Workload (fixed): for N in --prompts (64 and 256), N prompts of random token ids whose lengths are drawn
log-uniformly from [100, 4000] tokens (numpy RandomState(seed): lengths = round(exp(U(ln 100, ln 4000))), median
about 630, mean about 1050), --new-tokens (256) greedy tokens each, eos ignored. m3jax's first call uses seed 0,
the timed (second) call and transformers seed 1: fresh prompts, so that the prefix cache (on by default) has
nothing to reuse. --small: lengths in [10, 200], 8 new tokens, 8 and 16 prompts.

Measured, one process per framework (`--part jax` / `--part torch`), JSON lines:
  m3jax, per N (one Engine(max_batch_size=--max-batch-size), reused by the second call):
    first_call_s: Engine construction + m3jax.generate (warmup compiles every step program, then the batch);
    step_programs_compiled: traces of the step program in that call (m3jax.runner.trace_count), and
    xla_compiles / compile_s: every XLA compilation of the process in that call and the seconds it took
      (jax.monitoring "/jax/core/compile/backend_compile_duration"), persistent-cache hits separately;
    then a second call (same N, fresh prompts): wall time and prompt / generated / total tokens per second of wall time
      (each count over the whole call: the throughputs of one offline batch, not separate phases).
  m3jax, second process (`--part jax-second`, run after `--part jax` has exited, so the persistent compilation
    cache holds the programs and the first process no longer holds device memory): the first call of the smallest
    N in a fresh process: ttft_s (Engine construction to the first token of any request), first_call_s, its
    compiles and cache hits, and process_s (the script's start to the first token, including imports_s and
    model_build_s, the random model's build; the compilation cache is on before the build, so its initializer's
    compile is cached too).
  transformers: model.generate on sub-batches of --torch-batch prompts, left-padded, greedy, the same lengths
    and new tokens (one warm-up sub-batch first). Sub-batches because the SDPA path materialises a
    [batch, heads, T, T] mask (2 GB per 4K-token prompt); a sub-batch that runs out of memory is halved and retried,
    and the size that ran is recorded. --torch-prompts K times only the first K prompts of each N (whole
    sub-batches; transformers is slow enough that the whole N does not fit a bounded run): the throughputs are
    those of the prompts that ran, and the row records K.

    python benchmarks/batch.py --part jax --out results.jsonl
    python benchmarks/batch.py --part jax-second --out results.jsonl
    python benchmarks/batch.py --part torch --out results.jsonl
    python benchmarks/batch.py --part jax --small          # CPU check of the script
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.generate import emit, geometry, jax_model, model_arguments, torch_model  # noqa: E402

PROCESS_START = time.perf_counter()


def workload(args, n: int, seed: int = 0) -> list[list[int]]:
    """The first n prompts of the workload (the module docstring): the N = 64 prompts are the first 64 of 256."""
    import numpy as np
    lo, hi = (10, 200) if args.small else (100, 4000)
    rs = np.random.RandomState(seed)
    lengths = np.round(np.exp(rs.uniform(math.log(lo), math.log(hi), max(args.prompts)))).astype(int)[:n]
    vocab = geometry(args)["vocab"]
    return [rs.randint(1, vocab, int(s)).tolist() for s in lengths]


# ------------------------------------------------------------------------------------------------ m3jax
class CompileEvents:
    """XLA compilations (count, seconds) and persistent-cache hits while active."""

    def __init__(self):
        import jax
        self.jax, self.compiles, self.seconds, self.hits = jax, 0, 0.0, 0

    def _duration(self, event, secs, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            self.compiles += 1
            self.seconds += secs

    def _event(self, event, **kw):
        if event == "/jax/compilation_cache/cache_hits":
            self.hits += 1

    def __enter__(self):
        self.jax.monitoring.register_event_duration_secs_listener(self._duration)
        self.jax.monitoring.register_event_listener(self._event)
        return self

    def __exit__(self, *exc):
        self.jax.monitoring.unregister_event_duration_listener(self._duration)
        self.jax.monitoring.unregister_event_listener(self._event)


def engine_kw(args) -> dict:
    hi = 200 if args.small else 4000
    kw = dict(max_batch_size=args.max_batch_size, max_seq_len=hi + args.new_tokens + 64)
    if args.prefill_chunk:
        kw["prefill_chunk"] = args.prefill_chunk
    if args.max_tokens_per_step:
        kw["max_tokens_per_step"] = args.max_tokens_per_step
    return kw


def first_call(args, model, prompts, sampling):
    """Engine + m3jax.generate in a process that has not run this configuration: (engine, row fields)."""
    import m3jax
    from m3jax.runner import trace_count

    first = []
    traces = trace_count()
    with CompileEvents() as ev:
        t0 = time.perf_counter()
        eng = m3jax.Engine(model, **engine_kw(args))
        results = m3jax.generate(eng, prompts, sampling, progress=False,
                                 on_token=lambda i, t: first or first.append(time.perf_counter()))
        wall = time.perf_counter() - t0
    bad = [r.error for r in results if r.finish_reason == "error"]
    if bad:
        raise RuntimeError(f"{len(bad)} requests failed, e.g. {bad[0]}")
    return eng, dict(first_call_s=wall, ttft_s=first[0] - t0, process_s=first[0] - PROCESS_START,
                     step_programs=len(eng.programs),
                     step_programs_compiled=trace_count() - traces, xla_compiles=ev.compiles,
                     compile_s=ev.seconds, cache_hits=ev.hits, compile_cache_dir=eng.compile_cache_dir)


def run_jax(args):
    import jax

    import m3jax
    from m3jax.engine import configure_compile_cache

    # The Engine turns the persistent compilation cache on; turning it on first lets the random-weight
    # initializer's compile be cached too (a checkpoint load, what a user runs, has no initializer to compile).
    imports_s = time.perf_counter() - PROCESS_START
    configure_compile_cache()
    t0 = time.perf_counter()
    model = jax.block_until_ready(jax_model(args, eos_token_id=(0,), bos_token_id=None))
    build_s = time.perf_counter() - t0
    dev = jax.devices()[0]
    sampling = m3jax.SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    if args.part == "jax-second":      # the second process: only the first call of the smallest N
        t0 = time.perf_counter()
        _, row = first_call(args, model, workload(args, min(args.prompts)), sampling)
        emit(args, what="second_process", prompts=min(args.prompts), wall_s=time.perf_counter() - t0,
             imports_s=imports_s, model_build_s=build_s, **row)
        return
    emit(args, what="setup", device=str(getattr(dev, "device_kind", dev)), jax=jax.__version__,
         impl=args.impl or "default", **engine_kw(args))
    for n in args.prompts:
        prompts = workload(args, n)
        n_gen = n * args.new_tokens
        try:
            eng, row = first_call(args, model, prompts, sampling)
            del row["process_s"]                  # meaningful in the second process only
            fresh = workload(args, n, seed=1)     # new prompts: no prefix-cache hit on the first call's
            n_prompt = sum(map(len, fresh))       # the second call's (first call: first_call_prompt_tokens)
            row["first_call_prompt_tokens"] = sum(map(len, prompts))
            t0, steps = time.perf_counter(), eng.num_steps
            results = m3jax.generate(eng, fresh, sampling, progress=False)
            wall = time.perf_counter() - t0
            assert all(len(r.token_ids) == args.new_tokens for r in results)
            emit(args, what="batch", prompts=n, prompt_tokens=n_prompt, new_tokens=args.new_tokens, **row,
                 second_call_s=wall, prompt_tokens_per_s=n_prompt / wall, generated_tokens_per_s=n_gen / wall,
                 total_tokens_per_s=(n_prompt + n_gen) / wall, steps=eng.num_steps - steps)
            del eng
        except Exception as e:          # noqa: BLE001 - record and go on to the next measurement
            emit(args, what="batch", prompts=n, error=f"{type(e).__name__}: {str(e)[:300]}")


# ------------------------------------------------------------------------------------------------ torch
def run_torch(args):
    import torch
    import transformers

    model, dev = torch_model(args)
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    emit(args, what="setup", device=name, torch=torch.__version__, transformers=transformers.__version__,
         attn="sdpa", torch_batch=args.torch_batch)

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def generate(prompts):
        width = max(map(len, prompts))
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):                       # left padding
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), do_sample=False,
                             max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0)
        assert out.shape[1] == width + args.new_tokens
        return out

    with torch.no_grad():
        generate(workload(args, 1))                           # warm-up
        sync()
        for n in args.prompts:
            prompts = workload(args, n, seed=1)               # the prompts of m3jax's timed (second) call
            if args.torch_prompts:
                prompts = prompts[:args.torch_prompts]
            n_prompt, n_gen = sum(map(len, prompts)), len(prompts) * args.new_tokens
            size, i, t0 = args.torch_batch, 0, time.perf_counter()
            try:
                while i < len(prompts):
                    try:
                        generate(prompts[i:i + size])
                        sync()
                        done = prompts[:i + size]     # a partial row survives a run cut by its time limit
                        i += size
                        emit(args, what="progress", prompts=n, done_prompts=len(done),
                             wall_s=time.perf_counter() - t0,
                             total_tokens_per_s=(sum(map(len, done)) + len(done) * args.new_tokens)
                             / (time.perf_counter() - t0))
                    except torch.OutOfMemoryError:
                        if size == 1:
                            raise
                        size //= 2
                        torch.cuda.empty_cache() if dev == "cuda" else None
                wall = time.perf_counter() - t0
                emit(args, what="batch", prompts=n, timed_prompts=len(prompts), prompt_tokens=n_prompt,
                     new_tokens=args.new_tokens, torch_batch=size, wall_s=wall, prompt_tokens_per_s=n_prompt / wall,
                     generated_tokens_per_s=n_gen / wall, total_tokens_per_s=(n_prompt + n_gen) / wall)
            except torch.OutOfMemoryError as e:
                emit(args, what="batch", prompts=n, error=f"OOM at sub-batch 1: {str(e)[:120]}")
            torch.cuda.empty_cache() if dev == "cuda" else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(ap, parts=("jax", "jax-second", "torch"), experts=128)   # --small: the workload too
    ap.add_argument("--prompts", type=int, nargs="+", default=None, help="batch sizes N (default 64 256)")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 256 (--small: 8)")
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--prefill-chunk", type=int, default=None, help="m3jax Engine option (default: its own)")
    ap.add_argument("--max-tokens-per-step", type=int, default=None, help="m3jax Engine option")
    ap.add_argument("--torch-batch", type=int, default=16, help="transformers: prompts per generate call")
    ap.add_argument("--torch-prompts", type=int, default=None,
                    help="transformers: time only the first K prompts of each N (default: all)")
    args = ap.parse_args(argv)
    if args.prompts is None:
        args.prompts = [8, 16] if args.small else [64, 256]
    if args.new_tokens is None:
        args.new_tokens = 8 if args.small else 256
    (run_torch if args.part == "torch" else run_jax)(args)


if __name__ == "__main__":
    main()
