"""MoE micro-benchmark: the fused Pallas MoE kernel against jax's ragged_dot path and the copy-rate bound.

    python benchmarks/moe.py [--out DIR] [--small] [--no-sweep]

M3's routed experts: 128 experts, hidden 6144, expert width 3072, top-4, SwiGLU-OAI, bf16 or MXFP8 (e4m3 +
E8M0 exponents per 32 inputs) weights, random weights and random top-4 routings (uniform over experts).
Cases: decode batch 1 / 8 / 32 (one token per request) and prefill 8K (8192 tokens = 32768 routed rows).

Implementations, each timed as one jitted call from x, ids, combine weights and the stored experts to the f32
[T, D] routed output:
  fused     dispatch.moe(impl="gpu"): pallas_kernels/gpu/moe.py (tile sizes swept; the best is reported)
  ragged    the path the model ran before: rows sorted by expert, three dispatch.grouped_matmul calls (jax's
            Mosaic GPU ragged_dot_mgpu on Hopper) with SwiGLU in XLA; with MXFP8 the experts are first
            dequantised to bf16 in HBM (only the routed ones when there are fewer slots than experts)
Bound: the bytes the step must read (the distinct routed experts' weights as stored, plus the exponents for
MXFP8; activations are negligible) at the copy rate measured in the same run (2 GiB device copy, bytes read +
written per second, as benchmarks/kernels.py). Prefill also reports TFLOP/s (2 x rows x D x F x 3) against the
bf16 matmul peak measured in the same run (8192^3 jnp.dot).
Prints one table last and writes moe.json under --out (default $OUT or .).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels import bench, ceilings  # noqa: E402  (benchmarks/kernels.py: the shared timer and ceilings)

from pallas_kernels import dispatch, reference  # noqa: E402
from pallas_kernels.gpu import moe as gpu_moe  # noqa: E402

ALPHA, LIMIT, TOP_K = 1.702, 7.0, 4
# Swept on the GPU; MXFP8 with block_k 32 needs no in-register reshape of the exponents (one per column).
DECODE_TILES = [gpu_moe.MoETiles(16, 64, 64, 128, 4, 4), gpu_moe.MoETiles(16, 32, 32, 256, 4, 4),
                gpu_moe.MoETiles(16, 64, 64, 64, 4, 6)]
PREFILL_TILES = [gpu_moe.MoETiles(128, 128, 128, 64, 8, 3), gpu_moe.MoETiles(64, 128, 128, 64, 4, 4),
                 gpu_moe.MoETiles(128, 128, 128, 32, 8, 4)]
# MXFP8 only: the column-lane unpack (no interleave), added after the second H200 run (not yet measured)
FP8_DECODE_TILES = [gpu_moe.MoETiles(16, 64, 64, 128, 4, 4, "lanes"), gpu_moe.MoETiles(16, 64, 64, 256, 4, 3, "lanes")]
FP8_PREFILL_TILES = [gpu_moe.MoETiles(128, 128, 128, 32, 8, 4, "lanes"), gpu_moe.MoETiles(128, 256, 256, 32, 8, 3,
                                                                                          "lanes")]


def geometry(small: bool) -> dict:
    if small:
        return dict(experts=8, hidden=64, width=32, cases=[("decode", 1), ("decode", 4), ("prefill", 64)])
    return dict(experts=128, hidden=6144, width=3072,
                cases=[("decode", 1), ("decode", 8), ("decode", 32), ("prefill", 8192)])


def random_experts(key, e, d, f, fp8: bool):
    """(gate, up, down[, scales...]) in the stored layouts: bf16, or e4m3 bytes (no NaN codes) + exponents."""
    shapes = [(e, d, f), (e, d, f), (e, f, d)]
    keys = jax.random.split(key, 6)
    if not fp8:
        return tuple((jax.random.normal(k, s, jnp.float32) / np.sqrt(s[1])).astype(jnp.bfloat16)
                     for k, s in zip(keys, shapes))
    ws, ss = [], []
    for k, ks, s in zip(keys[:3], keys[3:], shapes):
        b = jax.random.bits(k, s, jnp.uint8)
        b = jnp.where((b & 0x7F) == 0x7F, b ^ 0x01, b)                   # 0x7F / 0xFF are NaN in e4m3fn
        ws.append(jax.lax.bitcast_convert_type(b, jnp.float8_e4m3fn))
        ss.append(jax.random.randint(ks, (s[0], s[1] // 32, s[2]), 112, 118, jnp.int32).astype(jnp.uint8))
    return tuple(ws) + tuple(ss)


def routing(key, t, e):
    kx, kr, kc = jax.random.split(key, 3)
    _, ids = jax.lax.top_k(jax.random.normal(kr, (t, e)), TOP_K)
    comb = jax.random.uniform(kc, (t, TOP_K), minval=0.1, maxval=1.0)
    return ids.astype(jnp.int32), comb / comb.sum(-1, keepdims=True)


def ragged_path(x, ids, comb, *stored, impl="gpu"):
    """The model's MoE before the fused kernel: sorted rows, three grouped matmuls, dequantise-then-matmul."""
    t, k = ids.shape
    e = stored[0].shape[0]
    weights = list(stored)
    if len(weights) == 6:
        if t * k < e:
            rows = jnp.bincount(ids.reshape(-1), length=e)
            used = jnp.nonzero(rows, size=t * k, fill_value=e)[0]
            slot_of = jnp.full((e + 1,), t * k, jnp.int32).at[used].set(jnp.arange(t * k, dtype=jnp.int32))
            ids = slot_of[ids]
            weights = [jnp.take(w, jnp.minimum(used, e - 1), axis=0) for w in weights]
            e = t * k
        weights = [reference.dequantize_mxfp8(w, s, x.dtype) for w, s in zip(weights[:3], weights[3:])]
    gate, up, down = weights
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token = order // k
    xs = x[token]
    sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
    g = dispatch.grouped_matmul(xs, gate, sizes, impl=impl)
    u = dispatch.grouped_matmul(xs, up, sizes, impl=impl)
    h = reference.swiglu_oai(g, u, ALPHA, LIMIT).astype(x.dtype)
    y = dispatch.grouped_matmul(h, down, sizes, impl=impl) * comb.reshape(-1)[order][:, None]
    return jnp.zeros((t, x.shape[1]), jnp.float32).at[token].add(y)


def expert_bytes(d, f, fp8: bool) -> int:
    return 3 * d * f * (1 + 1 / 32) if fp8 else 3 * d * f * 2


def run_case(kind, t, fp8, weights, geo, ceil, impl, sweep, rows_out, jsonl=None):
    e, d, f = geo["experts"], geo["hidden"], geo["width"]
    ids, comb = routing(jax.random.key(t), t, e)
    x = jax.random.normal(jax.random.key(t + 1), (t, d), jnp.float32).astype(jnp.bfloat16)
    hit = len(np.unique(np.asarray(ids)))
    need = hit * expert_bytes(d, f, fp8)
    flops = 2 * t * TOP_K * d * f * 3
    base = dict(kind=kind, tokens=t, weights="mxfp8" if fp8 else "bf16", experts_hit=hit, bytes=need, flops=flops)
    want = None
    results = []
    tiles = (DECODE_TILES if kind == "decode" else PREFILL_TILES) if sweep else [None]
    if sweep and fp8:
        tiles = tiles + (FP8_DECODE_TILES if kind == "decode" else FP8_PREFILL_TILES)
    for tl in tiles:
        name = "fused" if tl is None else f"fused {tl.block_m}x{tl.block_n_up}/{tl.block_n_down}x{tl.block_k} " \
                                          f"w{tl.num_warps}s{tl.num_stages}" + (" lanes" if fp8 and
                                                                                tl.fp8_unpack == "lanes" else "")
        if tl is None:
            fn = jax.jit(lambda x, i, c, *w: dispatch.moe(x, i, c, *w, alpha=ALPHA, limit=LIMIT, impl=impl))
        else:
            fn = jax.jit(lambda x, i, c, *w, tl=tl: gpu_moe.moe_tuned(
                x, i, c, *w, alpha=ALPHA, limit=LIMIT, tiles=tl, interpret=impl.endswith("interpret")))
        results.append((name, fn))
    gm = "gpu" if impl == "gpu" else "reference"
    results.append(("ragged", jax.jit(lambda x, i, c, *w: ragged_path(x, i, c, *w, impl=gm))))
    iters = 20 if kind == "decode" else 3
    for name, fn in results:
        row = dict(base, impl=name)
        try:
            out = np.asarray(fn(x, ids, comb, *weights))
            if want is None:
                want = out if name == "ragged" else np.asarray(results[-1][1](x, ids, comb, *weights))
            row["rel_err_vs_ragged"] = float(np.linalg.norm(out - want) / np.linalg.norm(want))
            s = bench(fn, x, ids, comb, *weights, iters=iters, reps=3)
            row["ms"] = s * 1e3
            row["bound_ms"] = need / (ceil["copy_gbs"] * 1e9) * 1e3
            row["ratio_to_bound"] = row["ms"] / row["bound_ms"]
            row["tflops"] = flops / s / 1e12
            row["frac_matmul_peak"] = row["tflops"] / ceil["matmul_tflops"]
        except Exception as exc:                                            # a variant that does not compile
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            traceback.print_exc(limit=2)
        print(json.dumps(row), flush=True)
        rows_out.append(row)
        if jsonl:
            with open(jsonl, "a") as fh:
                fh.write(json.dumps(row) + "\n")


def table(rows, ceil):
    lines = [f"ceilings: bf16 matmul {ceil['matmul_tflops']:.0f} TFLOP/s, copy {ceil['copy_gbs']:.0f} GB/s",
             f"{'case':<14} {'w':<5} {'hit':>3} {'GB':>6} {'bound ms':>8} | {'fused ms':>8} {'x bound':>7} "
             f"{'TF/s':>6} | {'ragged ms':>9} {'x bound':>7} | {'speedup':>7}  best tiles"]
    keys = sorted({(r["kind"], r["tokens"], r["weights"]) for r in rows}, key=lambda k: (k[0] != "decode", k[1], k[2]))
    for kind, t, w in keys:
        rs = [r for r in rows if (r["kind"], r["tokens"], r["weights"]) == (kind, t, w) and "ms" in r]
        fused = [r for r in rs if r["impl"].startswith("fused")]
        rag = [r for r in rs if r["impl"] == "ragged"]
        if not fused:
            continue
        best = min(fused, key=lambda r: r["ms"])
        rg = rag[0] if rag else None
        case = f"{kind} {'b' if kind == 'decode' else 'T='}{t}"
        lines.append(f"{case:<14} {w:<5} {best['experts_hit']:>3} {best['bytes'] / 1e9:6.2f} {best['bound_ms']:8.3f} | "
                     f"{best['ms']:8.3f} {best['ratio_to_bound']:7.2f} {best['tflops']:6.0f} | "
                     + (f"{rg['ms']:9.3f} {rg['ratio_to_bound']:7.2f} | {rg['ms'] / best['ms']:7.2f}" if rg else
                        f"{'-':>9} {'-':>7} | {'-':>7}") + f"  {best['impl']}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--small", action="store_true", help="tiny shapes, kernels interpreted: runs on CPU")
    ap.add_argument("--no-sweep", action="store_true", help="only the default tiles")
    ap.add_argument("--weights", default="bf16,mxfp8", help="comma list of bf16, mxfp8")
    args = ap.parse_args(argv)
    geo = geometry(args.small)
    on_gpu = jax.default_backend() == "gpu"
    impl = "gpu" if on_gpu else "gpu-interpret"
    ceil = ceilings() if on_gpu else {"matmul_tflops": float("nan"), "copy_gbs": float("nan")}
    rows = []
    os.makedirs(args.out, exist_ok=True)
    print(json.dumps({"ceilings": ceil}), flush=True)
    for fp8 in [w == "mxfp8" for w in args.weights.split(",")]:
        weights = random_experts(jax.random.key(7), geo["experts"], geo["hidden"], geo["width"], fp8)
        for kind, t in geo["cases"]:
            run_case(kind, t, fp8, weights, geo, ceil, impl, on_gpu and not args.no_sweep, rows,
                     os.path.join(args.out, "moe.jsonl"))
        del weights
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=jax.devices()[0].device_kind, jax=jax.__version__, ceilings=ceil, small=args.small)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "moe.json"), "w") as fh:
        json.dump(dict(meta=meta, rows=rows), fh, indent=1)
    print(f"{meta['device']}, jax {meta['jax']}, {meta['date']}")
    print(table(rows, ceil))
    return rows


if __name__ == "__main__":
    main()
