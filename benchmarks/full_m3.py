"""The real MiniMax-M3 geometry on one GPU, layer by layer, and a projection of TPOT / TTFT for all 60 layers.

    python benchmarks/full_m3.py [--out DIR] [--batches 1,4,8,32,64] [--contexts 1024,32768,131072]
                                 [--prefill 8192,32768] [--max-layers N] [--allreduce-us 20] [--small]

Geometry (M3_SPEC.md, /work/shared/data/MiniMax-M3-MXFP8.config.json): hidden 6144, 64 query / 4 KV heads of
128, index branch 4 x 128 + one shared index-K head, MSA blocks (pages) of 128, top-16, 128 routed experts of
width 3072 in MXFP8 (e4m3 + E8M0 exponents, read as stored by pallas_kernels/gpu/moe.py), top-4 + one shared
expert (bf16), dense MLP 12288 (layers 0-2, bf16), vocab 200064 (bf16 lm_head). Random weights in the real
shapes (m3jax's own DecoderLayer modules), bf16 activations and cache.

What runs: as many MSA+MoE layers as fit the card beside the largest cache, as one LayerStack like the model's
(the routed experts stay [L, E, ...] stacks that the MoE kernels read in place by layer index; each layer has
its own weights, so no layer finds another's weights in L2), and one dense layer (full attention + dense MLP). Each timed call is one
layer of a cached step (m3jax.model: norm, projections, cache write, MSA index + sparse attention or dense
attention through pallas_kernels.dispatch, output projection, FFN block); the calls cycle through the layers,
and the per-layer time is the total over the cycle divided by the layers in it. The layers share one paged
cache pool (every layer reads and writes the bytes a separate cache would; the MoE's weight stream, hundreds
of MB, evicts the L2 between layers). Decode: batch B of one new token at position ctx - 1 with ctx tokens of
random keys per request; prefill: one request of S tokens as one chunk. The FFN block alone is timed too
(attention = layer - FFN). lm_head (final norm + [6144, 200064] matmul) is timed per batch.

Projection to n GPUs (4xH200 and 8xH200), every assumption printed with the table:
  A1 routed + shared experts split evenly over the n GPUs (expert parallelism): FFN time / n.
  A2 attention: the 4 KV groups split over the GPUs at most 4 ways, and the shared index-K head is read whole by
     every GPU; the projection gives a range: attention time / min(n, 4) (optimistic) to attention time not
     reduced (conservative). The dense layers (3) are treated like attention (their MLP is not split: a small
     overestimate).
  A3 two all-reduces per layer (attention output, MoE output) of B x 6144 values, `--allreduce-us` each (an
     assumption, default 20 us: the 2xH200 collective measurement of issue 12 was not run).
  A4 lm_head split over the vocabulary: / n. Embedding, sampling and host time are not included; no overlap of
     communication and compute.
  TPOT(B, ctx) = 3 dense layers + 57 MSA/MoE layers + lm_head at batch B; TTFT(S) the same for one prefill of S.
vLLM's published figure beside it: 8.4 ms TPOT on 8xH200, FP8, concurrency 4, 1K in / 1K out.
Prints one table last; writes full_m3.json (and full_m3.jsonl as it goes) under --out (default $OUT or .).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VLLM_TPOT_MS = 8.4
MOE_LAYERS, DENSE_LAYERS = 57, 3


def config(small: bool):
    from m3jax.config import M3Config, MSAConfig
    if small:
        return M3Config.tiny(num_hidden_layers=2, hidden_size=64, intermediate_size=32, num_local_experts=8,
                             num_experts_per_tok=2)
    return M3Config(vocab_size=200064, hidden_size=6144, num_hidden_layers=2, num_attention_heads=64,
                    num_key_value_heads=4, head_dim=128, rotary_dim=64, dense_intermediate_size=12288,
                    intermediate_size=3072, shared_intermediate_size=3072, num_local_experts=128,
                    num_experts_per_tok=4, layer_types=("full_attention", "minimax_m3_sparse"),
                    mlp_layer_types=("dense", "sparse"),
                    msa=MSAConfig(num_index_heads=4, index_dim=128, block_size=128, topk_blocks=16))


def _merge(graphdef, state):
    """A layer from its graphdef and state: one State (a lone layer), or (the stack's InPlace weights, this
    layer's slice of the others: norms, router) of a LayerStack."""
    from flax import nnx
    return nnx.merge(graphdef, *state) if isinstance(state, tuple) else nnx.merge(graphdef, state)


def timed(fn, *args, reps=3, iters=3):
    """Median seconds per call of fn(*args) (fn returns something to block on)."""
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t0) / iters)
    return float(np.median(ts))


class Bench:
    def __init__(self, args):
        from flax import nnx

        from m3jax.model.decoder import DecoderLayer, LayerStack
        self.args = args
        self.cfg = cfg = config(args.small)
        self.r = cfg.msa.block_size
        dt = jnp.bfloat16

        # The MSA/MoE layers are one LayerStack, as in the model: the routed experts stay [L, E, ...] stacks that
        # the kernels read in place at (layer, expert) (an MXFP8 stack of M3 takes the direct e4m3 loads; a lone
        # layer's 2.4 GB stack would take the int32 view), the other weights are sliced once per layer here.
        make_moe = lambda n: nnx.jit(lambda: LayerStack(cfg, 3, n, "minimax_m3_sparse", "sparse", dtype=dt,
                                                        rngs=nnx.Rngs(10), fp8_experts=True))()
        make_dense = nnx.jit(lambda key: DecoderLayer(cfg, "full_attention", "dense", dtype=dt, rngs=nnx.Rngs(key)))
        max_pages = max(b * -(-c // self.r) for b in args.batches for c in args.contexts)
        max_pages = max(max_pages, max(-(-s // self.r) for s in args.prefill)) + 1
        k, h, i = cfg.num_key_value_heads, cfg.head_dim, cfg.msa.index_dim
        key = jax.random.key(0)
        self.pools = (jax.random.normal(key, (k, max_pages, self.r, h), dt),
                      jax.random.normal(jax.random.fold_in(key, 1), (k, max_pages, self.r, h), dt),
                      jax.random.normal(jax.random.fold_in(key, 2), (max_pages, self.r, i), dt))
        self.pool_bytes = sum(p.nbytes for p in self.pools)
        self.head = jax.random.normal(key, (cfg.hidden_size, cfg.vocab_size), dt) * 0.01
        self.dense = (*nnx.split(make_dense(jax.random.key(1))), None)
        one = nnx.eval_shape(lambda: DecoderLayer(cfg, "minimax_m3_sparse", "sparse", dtype=dt, rngs=nnx.Rngs(0),
                                                  fp8_experts=True))
        self.layer_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(one)))
        free = self._free_bytes()
        n = args.max_layers if free is None else max(1, min(args.max_layers, int((free - 8e9) // self.layer_bytes)))
        stack = make_moe(n)                                         # 8 GB kept for activations
        graphdef, whole, sliced = stack._partition()
        self.moe_layers = [(graphdef, (whole, jax.tree.map(lambda x: x[l], sliced)), jnp.int32(l))
                           for l in range(stack.num_layers)]
        self.steps = {}

    def _free_bytes(self):
        stats = jax.devices()[0].memory_stats() or {}
        if "bytes_limit" not in stats:
            return None
        return stats["bytes_limit"] - stats.get("bytes_in_use", 0)

    def _layer_fn(self, graphdef, sparse: bool):
        from flax import nnx

        from m3jax.model.attention import PagedKV
        from m3jax.model.layers import rope_cos_sin
        cfg = self.cfg

        def step(state, index, h, k_pool, v_pool, ik_pool, table, q_pos):
            layer = _merge(graphdef, state)
            cos, sin = rope_cos_sin(jnp.maximum(q_pos, 0), cfg.rotary_dim, cfg.rope_theta)
            p = layer.attn.project(layer.input_norm(h), cos, sin, index)
            o, kv = layer.attn.attend_cached(p, PagedKV(k_pool, v_pool, table, ik_pool if sparse else None), q_pos,
                                             0)
            h = layer.ffn_block(h + layer.attn.output(o, index), index)
            return h, kv.k_pages, kv.v_pages, (kv.ik_pages if sparse else ik_pool)

        return jax.jit(step, donate_argnums=(3, 4, 5))

    def _ffn_fn(self, graphdef):
        from flax import nnx
        return jax.jit(lambda state, index, h: _merge(graphdef, state).ffn_block(h, index))

    def inputs(self, b, t, ctx):
        m = -(-ctx // self.r)
        table = (1 + jnp.arange(b * m, dtype=jnp.int32)).reshape(b, m)
        q_pos = (jnp.broadcast_to(jnp.arange(ctx - t, ctx, dtype=jnp.int32), (b, t)))
        h = (jax.random.normal(jax.random.key(b * 7 + t), (b, t, self.cfg.hidden_size), jnp.float32)
             ).astype(jnp.bfloat16)
        return h, table, q_pos

    def time_layers(self, layers, sparse, h, table, q_pos):
        """Median per-layer seconds of one cached layer step, cycling through `layers` (distinct weights)."""
        fn = self._layer_fn(layers[0][0], sparse)
        pools = self.pools
        out, *pools = fn(layers[0][1], layers[0][2], h, *pools, table, q_pos)           # compile + warm
        jax.block_until_ready(out)
        per = []
        cycles = max(1, 6 // len(layers))
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(cycles):
                for _, st, index in layers:
                    out, *pools = fn(st, index, h, *pools, table, q_pos)
            jax.block_until_ready(out)
            per.append((time.perf_counter() - t0) / (cycles * len(layers)))
        self.pools = tuple(pools)
        return float(np.median(per))

    def time_ffn(self, layers, h):
        fn = self._ffn_fn(layers[0][0])
        jax.block_until_ready(fn(layers[0][1], layers[0][2], h))
        per = []
        for _ in range(3):
            t0 = time.perf_counter()
            for _, st, index in layers:
                out = fn(st, index, h)
            jax.block_until_ready(out)
            per.append((time.perf_counter() - t0) / len(layers))
        return float(np.median(per))

    def time_head(self, b):
        fn = jax.jit(lambda h, w: jnp.einsum("bd,dv->bv", h, w, preferred_element_type=jnp.float32))
        h = jnp.ones((b, self.cfg.hidden_size), jnp.bfloat16)
        return timed(fn, h, self.head, iters=5)          # the weight is an argument, not a 2.5 GB constant


def project(rows, n, allreduce_us):
    """TPOT/TTFT ms on n GPUs from per-layer times (see A1-A4 in the module docstring): (optimistic, conservative)."""
    out = {}
    for r in rows:
        attn = max(r["moe_layer_ms"] - r["ffn_ms"], 0.0)
        comm = 2 * allreduce_us / 1e3
        split = min(n, 4)
        opt = (DENSE_LAYERS * r["dense_layer_ms"] / split + MOE_LAYERS * (attn / split + r["ffn_ms"] / n + comm)
               + DENSE_LAYERS * comm + r["head_ms"] / n)
        con = (DENSE_LAYERS * r["dense_layer_ms"] + MOE_LAYERS * (attn + r["ffn_ms"] / n + comm)
               + DENSE_LAYERS * comm + r["head_ms"] / n)
        out[(r["kind"], r["batch"], r["tokens"], r["context"])] = (opt, con)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--small", action="store_true", help="a tiny config on CPU (checks the script)")
    ap.add_argument("--batches", default="1,4,8,32,64")
    ap.add_argument("--contexts", default="1024,32768,131072")
    ap.add_argument("--prefill", default="8192,32768")
    ap.add_argument("--max-layers", type=int, default=16)
    ap.add_argument("--allreduce-us", type=float, default=20.0)
    args = ap.parse_args(argv)
    ints = lambda s: [int(x) for x in s.split(",") if x]
    args.batches, args.contexts, args.prefill = ints(args.batches), ints(args.contexts), ints(args.prefill)
    if args.small:
        args.batches, args.contexts, args.prefill, args.max_layers = [2], [40], [32], 2
    os.makedirs(args.out, exist_ok=True)
    jsonl = os.path.join(args.out, "full_m3.jsonl")
    bench = Bench(args)
    dev = jax.devices()[0]
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=str(dev.device_kind), jax=jax.__version__, moe_layers_resident=len(bench.moe_layers),
                moe_layer_gb=bench.layer_bytes / 1e9, cache_pool_gb=bench.pool_bytes / 1e9, small=args.small)
    print(json.dumps(meta), flush=True)
    rows = []

    def emit(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(jsonl, "a") as fh:
            fh.write(json.dumps(row) + "\n")

    ffn_cache, head_cache = {}, {}
    # the first context's decode cases, then prefill, then the other contexts (a run cut short keeps the most)
    decode = [("decode", b, 1, c) for c in args.contexts for b in args.batches]
    first = len(args.batches)
    cases = decode[:first] + [("prefill", 1, s, s) for s in args.prefill] + decode[first:]
    for kind, b, t, ctx in cases:
        try:
            h, table, q_pos = bench.inputs(b, t, ctx)
            moe_ms = bench.time_layers(bench.moe_layers, True, h, table, q_pos) * 1e3
            dense_ms = bench.time_layers([bench.dense], False, h, table, q_pos) * 1e3
            if (b, t) not in ffn_cache:
                ffn_cache[(b, t)] = bench.time_ffn(bench.moe_layers, h) * 1e3
            if b not in head_cache:
                head_cache[b] = bench.time_head(b if kind == "decode" else 1) * 1e3
            emit(dict(kind=kind, batch=b, tokens=t, context=ctx, moe_layer_ms=moe_ms, ffn_ms=ffn_cache[(b, t)],
                      dense_layer_ms=dense_ms, head_ms=head_cache[b]))
        except Exception as exc:                                      # e.g. out of memory at 64 x 128K
            emit(dict(kind=kind, batch=b, tokens=t, context=ctx, error=f"{type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:300]}"))
    ok = [r for r in rows if "error" not in r]
    proj = {n: project(ok, n, args.allreduce_us) for n in (4, 8)}
    for r in ok:
        for n in (4, 8):
            lo, hi = proj[n][(r["kind"], r["batch"], r["tokens"], r["context"])]
            r[f"proj_{n}gpu_ms"] = [lo, hi]
    with open(os.path.join(args.out, "full_m3.json"), "w") as fh:
        json.dump(dict(meta=meta, allreduce_us_assumed=args.allreduce_us, vllm_tpot_ms_8xh200_c4=VLLM_TPOT_MS,
                       rows=rows), fh, indent=1)
    print(f"{meta['device']}, jax {meta['jax']}, {meta['date']}; {meta['moe_layers_resident']} MSA/MoE layers "
          f"resident ({meta['moe_layer_gb']:.2f} GB each, MXFP8 experts), cache pool {meta['cache_pool_gb']:.1f} GB")
    print(f"assumed all-reduce {args.allreduce_us:.0f} us x 2 per layer (not measured); attention split "
          f"min(n,4) ways (opt) or not (cons); FFN / n; lm_head / n.  vLLM: {VLLM_TPOT_MS} ms TPOT, 8xH200, c=4")
    print(f"{'case':<22} {'MSA+MoE ms':>10} {'FFN ms':>7} {'dense ms':>8} {'head ms':>7} | "
          f"{'1 GPU 60L ms':>12} | {'4xH200 opt-cons ms':>18} | {'8xH200 opt-cons ms':>18}")
    for r in rows:
        case = f"{r['kind']} b{r['batch']} ctx{r['context']}" if r["kind"] == "decode" else \
            f"prefill {r['tokens']}"
        if "error" in r:
            print(f"{case:<22} {r['error'][:90]}")
            continue
        one = DENSE_LAYERS * r["dense_layer_ms"] + MOE_LAYERS * r["moe_layer_ms"] + r["head_ms"]
        p4, p8 = r["proj_4gpu_ms"], r["proj_8gpu_ms"]
        print(f"{case:<22} {r['moe_layer_ms']:10.3f} {r['ffn_ms']:7.3f} {r['dense_layer_ms']:8.3f} "
              f"{r['head_ms']:7.3f} | {one:12.1f} | {p4[0]:8.1f} - {p4[1]:7.1f} | {p8[0]:8.1f} - {p8[1]:7.1f}")
    return rows


if __name__ == "__main__":
    main()
