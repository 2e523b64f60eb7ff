"""A 1M-token context end to end (issue 13, item 5): one prompt through the m3jax Engine on the scaled M3, then
decoding; time to first token and decode tokens/s. And what transformers does with long prompts of the same model.

Model: the scaled M3 of benchmarks/generate.py (`generate.jax_model`: real widths, 3 dense full-attention + 3 MSA /
MoE layers, random bf16 weights), the release's 128 routed experts by default. Context: the model's limit,
max_position_embeddings = 2**20 tokens in all, so the prompt is 2**20 - new_tokens tokens of random ids and the
last generated token sits at position 2**20 - 1.

m3jax (`--part jax`): Engine(max_batch_size=1, max_seq_len=2**20) with its defaults (prefill chunk, token budget,
paged cache of exactly what one 2**20-token request needs); `Engine.warmup()` compiles first (reported apart), then
one request (greedy, eos ignored) run by the Engine's step loop (`add_request` + `step`, a progress bar of steps):
  ttft_s: from adding the request to its first token (the whole prefill, chunked as the Engine chunks);
  decode_tokens_per_s: (new_tokens - 1) / (time from the first token to the last);
  prefill_tokens_per_s: prompt tokens / ttft_s; peak device memory where the backend reports it.
transformers (`--part torch`): one forward of the whole prompt (the way `generate` prefills) at each of
--torch-lengths; records its time, or the out-of-memory error with the length that hit it.

    python benchmarks/long_context.py --part jax --out results.jsonl            # one H200: ~5 minutes at 2**20
    python benchmarks/long_context.py --part torch --torch-lengths 16384 32768 --out results.jsonl
    python benchmarks/long_context.py --part jax --small                        # CPU check of the script
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repo, before benchmarks/

from benchmarks.generate import emit, jax_model, torch_model  # noqa: E402


def _peak_bytes(dev) -> int | None:
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    return None if not stats else stats.get("peak_bytes_in_use")


def run_jax(args):
    import jax
    import numpy as np

    from tqdm.auto import tqdm

    import m3jax

    model = jax.block_until_ready(jax_model(args, eos_token_id=(0,), bos_token_id=None))
    limit = model.config.max_position_embeddings if args.context is None else args.context
    n_prompt = limit - args.new_tokens
    dev = jax.devices()[0]
    eng = m3jax.Engine(model, max_batch_size=1, max_seq_len=limit,
                       **({"prefill_chunk": args.prefill_chunk} if args.prefill_chunk else {}),
                       fp8_index_k=args.fp8_index_k)
    t0 = time.perf_counter()
    eng.warmup(progress=True)
    warmup_s = time.perf_counter() - t0
    emit(args, what="setup", device=str(getattr(dev, "device_kind", dev)), jax=jax.__version__,
         context=limit, prompt_tokens=n_prompt, new_tokens=args.new_tokens, prefill_chunk=eng.prefill_chunk,
         fp8_index_k=args.fp8_index_k, warmup_s=warmup_s, step_programs=len(eng.programs))

    prompt = np.random.default_rng(0).integers(1, model.config.vocab_size, n_prompt).tolist()
    sampling = m3jax.SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    # The Engine's own loop (add_request + step), so that a bar shows the minutes of prefill advance: a step
    # prefills at most prefill_chunk prompt tokens, then each step decodes one token.
    expected = -(-n_prompt // eng.prefill_chunk) + args.new_tokens - 1
    times: list[float] = []
    steps0 = eng.num_steps
    t0 = time.perf_counter()
    eng.add_request(prompt, sampling, request_id="long")
    with tqdm(total=expected, desc=f"{n_prompt:,}-token prompt", unit="step") as bar:
        while eng.has_work():
            for out in eng.step():
                times.extend([time.perf_counter()] * len(out.new_token_ids))
            bar.update(1)
    res = eng.pop_result("long")
    if res is None or res.finish_reason == "error":
        raise RuntimeError(f"the request failed: {None if res is None else res.error}")
    assert len(res.token_ids) == args.new_tokens == len(times)
    ttft = times[0] - t0
    decode = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else None
    emit(args, what="long_context", context=limit, prompt_tokens=n_prompt, new_tokens=args.new_tokens,
         ttft_s=ttft, prefill_tokens_per_s=n_prompt / ttft, decode_tokens_per_s=decode,
         decode_ms_per_token=None if decode is None else 1e3 / decode, steps=eng.num_steps - steps0,
         peak_device_bytes=_peak_bytes(dev))


def run_torch(args):
    import torch

    model, dev = torch_model(args)
    emit(args, what="setup", device=torch.cuda.get_device_name() if dev == "cuda" else "cpu",
         torch=torch.__version__)
    g = torch.Generator().manual_seed(0)
    for n in args.torch_lengths:
        ids = torch.randint(1, model.config.vocab_size, (1, n), generator=g).to(dev)
        try:
            with torch.no_grad():
                t0 = time.perf_counter()
                model(input_ids=ids, use_cache=True)
                if dev == "cuda":
                    torch.cuda.synchronize()
            emit(args, what="torch_prefill", prompt_tokens=n, wall_s=time.perf_counter() - t0,
                 peak_device_bytes=torch.cuda.max_memory_allocated() if dev == "cuda" else None)
        except torch.OutOfMemoryError as e:
            emit(args, what="torch_prefill", prompt_tokens=n, error=f"OutOfMemoryError: {str(e)[:200]}")
        if dev == "cuda":
            torch.cuda.empty_cache()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("jax", "torch"), required=True)
    ap.add_argument("--out", default=None, help="append JSON lines here")
    ap.add_argument("--small", action="store_true", help="tiny geometry (CPU check of the script)")
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--impl", default=None, help="m3jax attention impl (default: the backend's kernels)")
    ap.add_argument("--context", type=int, default=None,
                    help="tokens in all, prompt + new (default: the model's max_position_embeddings, 2**20)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prefill-chunk", type=int, default=None, help="Engine option (default: the Engine's)")
    ap.add_argument("--fp8-index-k", action="store_true", help="Engine(fp8_index_k=True)")
    ap.add_argument("--torch-lengths", type=int, nargs="+", default=[16384, 32768])
    args = ap.parse_args(argv)
    if args.small and args.context is None:
        args.context = 512
    if args.new_tokens < 1 or (args.context is not None and args.context <= args.new_tokens):
        ap.error("--new-tokens must be >= 1 and below --context")
    (run_torch if args.part == "torch" else run_jax)(args)


if __name__ == "__main__":
    main()
