"""Generation throughput of a scaled MiniMax-M3: m3jax Engine vs transformers==5.23.0 (PyTorch), same card.

Scaled M3: the real hidden size and attention / MSA / MoE geometry (hidden 6144, 64 q heads, 4 KV heads, head dim
128, index 4 x 128, blocks of 128, top-16, expert width 3072, top-4 + 1 shared expert, vocab 200064) with the first
6 layers of the real pattern (3 dense full-attention layers, then 3 MSA + MoE layers), random bf16 weights.
Fewer routed experts than the release (default 64 of 128) so that both frameworks fit one 80 GB card with a
32 x 32K cache.

Measured, one process per framework (`--part jax` / `--part torch`), results as JSON lines:
  prefill tokens/s of one prompt of 8K and 32K tokens (m3jax: Engine, chunks of --jax-chunk tokens;
  transformers: one forward at 8K; at 32K chunked through its DynamicCache, --torch-chunk tokens per forward,
  because its SDPA path builds a [heads, T, S] block mask: 128 GiB at T = S = 32K);
  decode tokens/s at batch 1 / 8 / 32 with 32K tokens of context per request (the caches are filled with
  random keys directly instead of prefilling 1M tokens; MSA still scores every block and keeps 16).
m3jax decode time is one `Engine.runner.execute(batch)` (the runner's public seam, fed decode rows directly
instead of scheduled requests): row layout, the jitted cached forward, sampling and the host round trip.
transformers decode is model(input_ids[B, 1], past_key_values=DynamicCache) (greedy argmax added).
Each m3jax decode row also carries the bytes the step must read (`decode_step_bytes`: weights, the routed experts
hit, the cache) and `x_bound`, its time over those bytes at the copy rate measured at the start of the same run
(`kernels.copy_rate`); a table of them is printed at the end.

    python benchmarks/generate.py --part jax --out results.jsonl
    python benchmarks/generate.py --part torch --out results.jsonl
    python benchmarks/generate.py --small ...      # a tiny config that runs on CPU (checks the script)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LAYERS = (("full_attention", "dense"),) * 3 + (("minimax_m3_sparse", "sparse"),) * 3
# Device ops that copy memory (XLA's names: memcpy*, copy*, *dynamic-slice* fusions that materialise a slice of a
# stacked weight). The paged-cache update is a dynamic-update-slice in place and is not counted.
COPY_OPS = re.compile(r"memcpy|copy|dynamic[-_]slice", re.IGNORECASE)


def geometry(args) -> dict:
    if args.small:
        return dict(vocab=512, hidden=128, heads=8, kv=4, head_dim=32, index_dim=32, block=16, topk=4, experts=8,
                    top_experts=2, expert_width=64, dense_width=256, rotary=16)
    return dict(vocab=200064, hidden=6144, heads=64, kv=4, head_dim=128, index_dim=128, block=128, topk=16,
                experts=args.experts, top_experts=4, expert_width=3072, dense_width=12288, rotary=64)


def jax_model(args, **config):
    """The scaled M3 of geometry(args) with random bf16 weights, initialised on the device (one jitted init);
    `config` overrides M3Config fields; attention / MoE kernels from args.impl and MXFP8 routed experts with
    args.fp8_experts when the script has those options. The one builder for generate.py, batch.py and serve.py."""
    import jax.numpy as jnp
    from flax import nnx

    import m3jax
    from m3jax.config import M3Config, MSAConfig
    from m3jax.model import M3ForCausalLM

    g = geometry(args)
    cfg = M3Config(vocab_size=g["vocab"], hidden_size=g["hidden"], num_hidden_layers=len(LAYERS),
                   num_attention_heads=g["heads"], num_key_value_heads=g["kv"], head_dim=g["head_dim"],
                   rotary_dim=g["rotary"], dense_intermediate_size=g["dense_width"],
                   intermediate_size=g["expert_width"], shared_intermediate_size=g["expert_width"],
                   num_local_experts=g["experts"], num_experts_per_tok=g["top_experts"],
                   layer_types=tuple(a for a, _ in LAYERS), mlp_layer_types=tuple(m for _, m in LAYERS),
                   msa=MSAConfig(num_index_heads=g["kv"], index_dim=g["index_dim"], block_size=g["block"],
                                 topk_blocks=g["topk"]), **config)
    impl = getattr(args, "impl", None)
    model = nnx.jit(lambda: M3ForCausalLM(cfg, dtype=jnp.bfloat16, attn_impl=impl, rngs=nnx.Rngs(0)))()
    return m3jax.quantize_experts(model) if getattr(args, "fp8_experts", False) else model


def model_arguments(ap, parts=("jax", "torch"), experts=64):
    """The options jax_model, torch_model and emit read (--part, --out, --small, --experts, --impl): one
    definition for generate.py, batch.py and long_context.py."""
    ap.add_argument("--part", choices=parts, required=True)
    ap.add_argument("--out", default=None, help="append JSON lines here")
    ap.add_argument("--small", action="store_true", help="tiny geometry (CPU check of the script)")
    ap.add_argument("--experts", type=int, default=experts, help="routed experts of the scaled M3")
    ap.add_argument("--impl", default=None, help="m3jax attention impl (default: the backend's kernels)")


def emit(args, **row):
    """Print `row` (plus the run's part, experts and small) as a JSON line, append it to --out; returns it."""
    row.update(part=args.part, experts=geometry(args)["experts"], small=args.small)
    line = json.dumps(row)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return row


# ------------------------------------------------------------------------------------------------ m3jax
def expected_experts_hit(experts: int, top_k: int, tokens: int) -> float:
    """Distinct experts that `tokens` tokens route to, in expectation, when each picks `top_k` of `experts`
    uniformly at random (the random-weight model routes close to uniformly)."""
    return experts * (1 - (1 - top_k / experts) ** tokens)


def decode_step_bytes(model, cache, batch: int, context: int) -> dict:
    """Bytes one decode step of `batch` requests with `context` tokens each must read from HBM at least (the
    numerator of the copy-rate bound), from the model's arrays and the cache's layout:
      weights: every parameter once, except the routed experts (only the experts hit, in expectation
        under uniform routing, `expected_experts_hit`) and the embedding table (one row per request);
      cache: per request and layer, a full-attention layer's K and V of the whole context; an MSA layer's
        index-K of the whole context (the indexer scores every block) and the K and V of its top-k blocks.
    Activations and the one token written per layer are left out (kilobytes)."""
    import jax
    from flax import nnx

    from m3jax.model.moe import FP8_SCALES

    cfg = model.config
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))     # noqa: E731
    routed = {*FP8_SCALES, *FP8_SCALES.values()}            # the routed experts' weights and MXFP8 exponents
    experts = nbytes(nnx.state(model, lambda path, _: str(path[-1]) in routed))
    table = nbytes(model.embed_vd)
    # the table is read whole when it is also the LM head (tied), else one row per request
    rows = table if cfg.tie_word_embeddings else batch * table // cfg.vocab_size
    vision = 0 if model.vision is None else nbytes(nnx.state(model.vision, nnx.Param))
    hit = expected_experts_hit(cfg.num_local_experts, cfg.num_experts_per_tok, batch)
    weights = (nbytes(nnx.state(model, nnx.Param)) - vision - experts - table
               + experts * hit / cfg.num_local_experts + rows)
    kv = 0.0
    attended = min(context, cfg.msa.topk_blocks * cfg.msa.block_size)
    for stack in cache.stacks:
        slots = stack.k_pages.shape[1] * stack.k_pages.shape[2]          # layers x pages x page size
        per_token = nbytes((stack.k_pages, stack.v_pages)) / slots
        layers = slots // (cache.num_shards * cache.num_pages * cache.page_size)
        if stack.ik_pages is None:
            kv += layers * per_token * context
        else:
            index = nbytes((stack.ik_pages, stack.ik_scale)) / slots
            kv += layers * (index * context + per_token * attended)
    return dict(bytes=weights + batch * kv, weight_bytes=weights, cache_bytes=batch * kv, experts_hit=hit)


def _profile_table(args, label, fn):
    """Run fn under jax.profiler and emit the device ops that took the most time (perfetto trace)."""
    import glob
    import gzip
    import tempfile

    import jax

    d = tempfile.mkdtemp(prefix="m3prof")
    with jax.profiler.trace(d, create_perfetto_trace=True):
        fn()
    files = glob.glob(os.path.join(d, "**", "*perfetto_trace.json.gz"), recursive=True)
    if not files:
        emit(args, what="profile", label=label, error="no perfetto trace written")
        return
    with gzip.open(files[0]) as f:
        events = json.load(f)
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    procs = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    totals: dict[str, float] = {}
    for e in events:
        if e.get("ph") == "X" and "gpu" in procs.get(e.get("pid"), "").lower():
            totals[e["name"]] = totals.get(e["name"], 0.0) + float(e.get("dur", 0))
    top = sorted(totals.items(), key=lambda kv: -kv[1])[:args.profile_top]
    copies = sorted(((k, v) for k, v in totals.items() if COPY_OPS.search(k)), key=lambda kv: -kv[1])
    total = sum(totals.values())
    emit(args, what="profile", label=label, device_ms_total=total / 1e3,
         processes=sorted(set(procs.values()))[:12] if not totals else None,
         top_ms=[(k[:90], round(v / 1e3, 3)) for k, v in top],
         copy_ms=sum(v for _, v in copies) / 1e3, copy_share=sum(v for _, v in copies) / total if total else None,
         copy_top_ms=[(k[:90], round(v / 1e3, 3)) for k, v in copies[:6]])


def run_jax(args):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from m3jax.engine import Engine
    from m3jax.runner import trace_count
    from m3jax.scheduler import Batch, Row
    from m3jax.sampling import SamplingParams

    impl = args.impl
    from kernels import copy_rate

    model = jax_model(args)
    cfg = model.config
    dev = jax.devices()[0]
    copy_gbs = copy_rate(2 ** 24 if args.small else 2 ** 31)      # the bound's denominator, this run, this card
    emit(args, what="setup", device=str(getattr(dev, "device_kind", dev)), jax=jax.__version__, impl=impl or "default",
         fp8_experts=args.fp8_experts, copy_gbs=copy_gbs)
    ctx, batches = args.context, args.batches
    max_batch = max(batches)
    max_seq = max(ctx, max(args.prefill)) + 64
    blocks = math.ceil(max_seq / cfg.msa.block_size)
    rs = np.random.RandomState(0)

    # Prefill: one request, max_new_tokens=1 (the last chunk's logits give the token), chunks of jax_chunk.
    eng = Engine(model, max_batch_size=1, max_seq_len=max_seq, num_pages=blocks + 2,
                 prefill_chunk=args.jax_chunk, max_tokens_per_step=args.jax_chunk + 1)
    for s in args.prefill:
        try:
            prompt = rs.randint(0, cfg.vocab_size, s).tolist()
            one = SamplingParams(max_new_tokens=1, ignore_eos=True)
            eng.add_request(prompt, one)
            t0 = time.perf_counter(); eng.run(); warm = time.perf_counter() - t0       # compiles
            times = []
            for _ in range(args.reps):
                eng.add_request(prompt, one)
                t0 = time.perf_counter(); eng.run(); times.append(time.perf_counter() - t0)
            best = float(np.median(times))
            emit(args, what="prefill", tokens=s, chunk=args.jax_chunk, seconds=best, tokens_per_s=s / best,
                 first_run_s=warm, stacked_matmuls=eng.runner.stacked_matmul_paths["prefill"])
            if args.profile and s == args.prefill[0]:
                def once():
                    eng.add_request(prompt, one)
                    eng.run()
                _profile_table(args, f"prefill {s}", once)
        except Exception as e:          # noqa: BLE001 - record and go on to the next measurement
            emit(args, what="prefill", tokens=s, chunk=args.jax_chunk, error=f"{type(e).__name__}: {str(e)[:300]}")
            eng = Engine(model, max_batch_size=1, max_seq_len=max_seq, num_pages=blocks + 2,
                         prefill_chunk=args.jax_chunk, max_tokens_per_step=args.jax_chunk + 1)
    del eng

    # Decode: max_batch requests at `ctx` tokens of context each, cache filled with random keys.
    eng = Engine(model, max_batch_size=max_batch, max_seq_len=max_seq, num_pages=max_batch * blocks + 1,
                 prefill_chunk=args.jax_chunk, max_tokens_per_step=args.jax_chunk + max_batch)
    key = jax.random.key(1)

    def fill(x, i):
        return (jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32) * 0.5).astype(x.dtype)

    leaves, treedef = jax.tree_util.tree_flatten(eng.cache)
    eng.cache = jax.tree_util.tree_unflatten(treedef, [jax.jit(fill, static_argnums=1)(x, i)
                                                       for i, x in enumerate(leaves)])
    greedy = SamplingParams(max_new_tokens=10_000, ignore_eos=True)
    decode_rows = []
    for b in batches:
        # b requests whose first ctx - 1 tokens are "in the cache" (random keys): each step decodes one token of
        # each, through the runner directly (no scheduler), feeding back the sampled token.
        ids = [("d", b, i) for i in range(b)]
        pages = [tuple(eng.allocator.allocate(r, math.ceil(max_seq / cfg.msa.block_size))) for r in ids]
        state = {"tokens": [int(t) for t in rs.randint(0, cfg.vocab_size, b)], "pos": ctx - 1, "n": 0}

        def decode_step():
            batch = Batch(decode=tuple(Row(r, (t,), state["pos"], p, 0, True, greedy, 0, state["n"])
                                       for r, t, p in zip(ids, state["tokens"], pages)))
            state["tokens"] = [s.token_id for s in eng.runner.execute(batch)]
            state["pos"] += 1
            state["n"] += 1

        try:
            before = trace_count()
            for _ in range(args.warmup):
                decode_step()
            jax.block_until_ready(eng.cache)
            compiled = trace_count() - before
            t0 = time.perf_counter()
            for _ in range(args.decode_steps):
                decode_step()
            dt = (time.perf_counter() - t0) / args.decode_steps
            need = decode_step_bytes(model, eng.cache, b, ctx)
            bound_ms = need["bytes"] / (copy_gbs * 1e9) * 1e3
            decode_rows.append(emit(args, what="decode", batch=b, context=ctx, step_ms=dt * 1e3, tokens_per_s=b / dt,
                                    stacked_matmuls=eng.runner.stacked_matmul_paths["decode"],
                                    compiles_in_warmup=compiled, compiles_in_timing=trace_count() - before - compiled,
                                    **need, bound_ms=bound_ms, x_bound=dt * 1e3 / bound_ms))
            if args.profile:
                def steps():
                    for _ in range(3):
                        decode_step()
                    jax.block_until_ready(eng.cache)
                _profile_table(args, f"decode batch {b} (3 steps)", steps)
        except Exception as e:          # noqa: BLE001
            emit(args, what="decode", batch=b, context=ctx, error=f"{type(e).__name__}: {str(e)[:300]}")
        for r in ids:
            eng.allocator.release(r)
    print(decode_table(decode_rows, copy_gbs), flush=True)


def decode_table(rows, copy_gbs: float) -> str:
    """The decode rows against the copy-rate bound: bytes a step must read (decode_step_bytes) / copy rate."""
    lines = [f"decode vs the copy-rate bound (copy {copy_gbs:.0f} GB/s, this run; experts hit: expected, uniform)",
             f"{'batch':>5} {'context':>8} {'ms/step':>8} {'GB read':>8} {'experts hit':>11} {'bound ms':>8} "
             f"{'x bound':>7}"]
    for r in rows:
        lines.append(f"{r['batch']:>5} {r['context']:>8} {r['step_ms']:>8.2f} {r['bytes'] / 1e9:>8.2f} "
                     f"{r['experts_hit']:>11.1f} {r['bound_ms']:>8.3f} {r['x_bound']:>7.2f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ torch
def torch_model(args):
    """The scaled M3 in transformers (bf16, sdpa), random weights in the same ranges as the jax side; (model, device)."""
    import torch
    from transformers.models.minimax_m3_vl import configuration_minimax_m3_vl as hf_config
    from transformers.models.minimax_m3_vl import modeling_minimax_m3_vl as hf_modeling

    g = geometry(args)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    text = dict(
        vocab_size=g["vocab"], hidden_size=g["hidden"], intermediate_size=g["expert_width"],
        num_hidden_layers=len(LAYERS), num_attention_heads=g["heads"], num_key_value_heads=g["kv"],
        head_dim=g["head_dim"], dense_intermediate_size=g["dense_width"], shared_intermediate_size=g["expert_width"],
        num_local_experts=g["experts"], num_experts_per_tok=g["top_experts"], index_n_heads=g["kv"],
        index_head_dim=g["index_dim"], index_block_size=g["block"], index_topk_blocks=g["topk"],
        index_local_blocks=1, layer_types=[a for a, _ in LAYERS], mlp_layer_types=[m for _, m in LAYERS],
        rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                         "partial_rotary_factor": g["rotary"] / g["head_dim"]},
        rotary_dim=g["rotary"], max_position_embeddings=1 << 20, bos_token_id=None, eos_token_id=0,
        pad_token_id=0,
    )
    cfg = hf_config.MiniMaxM3VLTextConfig(**text)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("meta"):
        model = hf_modeling.MiniMaxM3VLForCausalLM(cfg)
    model = model.to_empty(device=dev).to(torch.bfloat16).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.normal_(0.0, 0.2) if p.ndim == 1 else p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.05)
        rot = model.model.rotary_emb          # to_empty() left the RoPE buffers uninitialised
        inv = 1.0 / (5e6 ** (torch.arange(0, g["rotary"], 2, dtype=torch.float32, device=dev) / g["rotary"]))
        for attr in ("inv_freq", "original_inv_freq"):
            if isinstance(getattr(rot, attr, None), torch.Tensor):
                getattr(rot, attr).copy_(inv)
    return model, dev


def run_torch(args):
    import torch
    import transformers
    from transformers.cache_utils import DynamicCache

    g = geometry(args)
    model, dev = torch_model(args)
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    emit(args, what="setup", device=name, torch=torch.__version__, transformers=transformers.__version__,
         attn="sdpa")

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    gen = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for s in args.prefill:
            ids = torch.randint(0, g["vocab"], (1, s), generator=gen).to(dev)
            chunk = s if s <= args.torch_chunk_above else args.torch_chunk

            def prefill():
                cache = DynamicCache(config=model.config)
                out = None
                for a in range(0, s, chunk):
                    piece = ids[:, a:a + chunk]
                    pos = torch.arange(a, a + piece.shape[1], device=dev)[None]
                    out = model(input_ids=piece, position_ids=pos, past_key_values=cache, use_cache=True,
                                logits_to_keep=1)
                return out.logits.argmax(-1)

            try:
                prefill(); sync()
                times = []
                for _ in range(args.reps):
                    t0 = time.perf_counter(); prefill(); sync(); times.append(time.perf_counter() - t0)
                best = sorted(times)[len(times) // 2]
                emit(args, what="prefill", tokens=s, chunk=chunk, seconds=best, tokens_per_s=s / best)
            except torch.OutOfMemoryError as e:
                emit(args, what="prefill", tokens=s, chunk=chunk, error=f"OOM: {str(e)[:120]}")
            torch.cuda.empty_cache() if dev == "cuda" else None

        ctx = args.context
        kv, hd, idim = g["kv"], g["head_dim"], g["index_dim"]
        for b in args.batches:
            try:
                cache = DynamicCache(config=model.config)
                for li, layer in enumerate(cache.layers):
                    k = torch.randn(b, kv, ctx, hd, device=dev, dtype=torch.bfloat16) * 0.5
                    v = torch.randn(b, kv, ctx, hd, device=dev, dtype=torch.bfloat16) * 0.5
                    cache.update(k, v, li)
                    if hasattr(layer, "update_index"):
                        layer.update_index(torch.randn(b, 1, ctx, idim, device=dev, dtype=torch.bfloat16) * 0.5)
                tok = torch.randint(0, g["vocab"], (b, 1), generator=gen).to(dev)
                n = 0

                def step():
                    nonlocal tok, n
                    pos = torch.full((b, 1), ctx + n, device=dev)
                    out = model(input_ids=tok, position_ids=pos, past_key_values=cache, use_cache=True)
                    tok = out.logits[:, -1].argmax(-1, keepdim=True)
                    n += 1
                    return tok

                for _ in range(args.warmup):
                    step()
                sync()
                t0 = time.perf_counter()
                for _ in range(args.decode_steps):
                    step()
                tok.cpu()
                dt = (time.perf_counter() - t0) / args.decode_steps
                emit(args, what="decode", batch=b, context=ctx, step_ms=dt * 1e3, tokens_per_s=b / dt)
            except torch.OutOfMemoryError as e:
                emit(args, what="decode", batch=b, context=ctx, error=f"OOM: {str(e)[:120]}")
            del cache
            torch.cuda.empty_cache() if dev == "cuda" else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(ap)
    ap.add_argument("--prefill", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--jax-chunk", type=int, default=8192)
    ap.add_argument("--torch-chunk", type=int, default=2048)
    ap.add_argument("--torch-chunk-above", type=int, default=8192, help="prompts longer than this are chunked")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--profile", action="store_true", help="m3jax: per-op device time of one prefill / 3 decode steps")
    ap.add_argument("--profile-top", type=int, default=14)
    ap.add_argument("--fp8-experts", action="store_true", help="m3jax: routed experts held in MXFP8 "
                    "(m3jax.quantize_experts)")
    args = ap.parse_args(argv)
    (run_jax if args.part == "jax" else run_torch)(args)


if __name__ == "__main__":
    main()
