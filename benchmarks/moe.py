"""MoE micro-benchmark: the fused Pallas MoE kernel against the copy-rate bound (and jax's ragged_dot path).

    python benchmarks/moe.py [--out DIR] [--small] [--weights bf16,mxfp8] [--sweep mxfp8] [--ragged]
                             [--fp8-layers 2] [--budget-s S]

M3's routed experts: 128 experts, hidden 6144, expert width 3072, top-4, SwiGLU-OAI, bf16 or MXFP8 (e4m3 +
E8M0 exponents per 32 inputs) weights, random weights and random top-4 routings (uniform over experts).
Cases: decode batch 1 / 8 / 32 (one token per request) and prefill 8K (8192 tokens = 32768 routed rows).
Layouts: bf16 experts [E, D, F] (one layer, 4.8 GB per matrix: int64 offsets in the kernel); MXFP8 experts as
the model stacks them, [L=2, E, D, F] (4.8 GB per matrix), read in place at layer 1. One layer of e4m3 alone
(2.4 GB, what a scan over the stack hands each layer: --fp8-layers 0) is read through the kernel's int32 view;
the stack's bytes are loaded directly. Every row records the path (gpu.moe.byte_load_path) and the table prints
it.

Implementations, each timed as one jitted call from x, ids, combine weights and the stored experts to the f32
[T, D] routed output:
  fused     dispatch.moe(impl="gpu"): pallas_kernels/gpu/moe.py with default_tiles, then (--sweep) the tile
            candidates of the weights named; the best is reported and printed as MoETiles(...)
  ragged    (--ragged) the path the model ran before: rows sorted by expert, three dispatch.grouped_matmul
            calls (jax's Mosaic GPU ragged_dot_mgpu on Hopper) with SwiGLU in XLA; with MXFP8 the experts (layer
            1, sliced once outside the timed call) are first dequantised to bf16 in HBM (only the routed ones
            when there are fewer slots than experts)
Bound: the bytes the step must read (the distinct routed experts' weights as stored, plus the exponents for
MXFP8; activations are negligible) at the copy rate measured in the same run (2 GiB device copy, bytes read +
written per second, as benchmarks/kernels.py). TFLOP/s (2 x rows x D x F x 3) against the bf16 matmul peak
measured in the same run (8192^3 jnp.dot). rel_err: relative L2 difference to ragged (when run) or to the
default tiles.
--budget-s: no new variant starts after that many seconds (the table is still printed).
Writes moe.jsonl (one row per variant, as it runs) and moe.json under --out (default $OUT or .); prints one
table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import sys
import time
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
FP8_LAYER = 1                        # the layer of the MXFP8 stack that is read
T = gpu_moe.MoETiles
# Candidates besides default_tiles. bf16: swept on the H200 (the best is the default). MXFP8: the int32-view
# sweep's best is the default; direct e4m3 loads need no unpack, so 128-byte rows (block_n 128, as bf16's 64) and
# longer K steps (several exponent rows per step) are candidates again. The best per case is printed last.
SWEEP = {
    ("bf16", "decode"): [T(16, 32, 32, 256, 4, 4), T(16, 64, 64, 64, 4, 6)],
    ("bf16", "prefill"): [T(128, 128, 128, 64, 8, 3), T(128, 128, 128, 32, 8, 4)],
    ("mxfp8", "decode"): [T(16, 64, 64, 128, 4, 4), T(16, 64, 64, 256, 4, 3), T(16, 128, 128, 128, 4, 4),
                          T(16, 128, 128, 256, 4, 3),
                          # exponents on the products (MoETiles.scaled_dot): not yet run on a GPU
                          T(16, 32, 32, 256, 4, 4, True), T(16, 64, 64, 128, 4, 4, True),
                          T(16, 128, 128, 128, 4, 4, True), T(16, 64, 64, 256, 4, 3, True)],
    ("mxfp8", "prefill"): [T(128, 128, 128, 64, 8, 3), T(64, 128, 128, 64, 4, 4), T(128, 128, 128, 128, 8, 2),
                           T(256, 64, 128, 64, 8, 3)],        # 256 rows: each dequantised tile feeds more MMAs
}


def geometry(small: bool) -> dict:
    if small:
        return dict(experts=8, hidden=64, width=32, cases=[("decode", 1), ("decode", 4), ("prefill", 64)])
    return dict(experts=128, hidden=6144, width=3072,
                cases=[("decode", 1), ("decode", 8), ("decode", 32), ("prefill", 8192)])


def random_experts(key, e, d, f, fp8: bool, fp8_layers: int = 2):
    """(gate, up, down[, scales...]) in the stored layouts: bf16 [E, ...], or e4m3 bytes (no NaN codes) +
    exponents stacked [fp8_layers, E, ...] ([E, ...] when 0; each layer drawn on its own: fewer than 2**32
    random numbers per draw)."""
    shapes = [(e, d, f), (e, d, f), (e, f, d)]
    keys = jax.random.split(key, 6)
    if not fp8:
        return tuple((jax.random.normal(k, s, jnp.float32) / np.sqrt(s[1])).astype(jnp.bfloat16)
                     for k, s in zip(keys, shapes))

    @functools.partial(jax.jit, static_argnums=2)
    def layers(k, ks, s):
        ws, ss = [], []
        for layer in range(max(1, fp8_layers)):
            b = jax.random.bits(jax.random.fold_in(k, layer), s, jnp.uint8)
            b = jnp.where((b & 0x7F) == 0x7F, b ^ 0x01, b)                   # 0x7F / 0xFF are NaN in e4m3fn
            ws.append(jax.lax.bitcast_convert_type(b, jnp.float8_e4m3fn))
            ss.append(jax.random.randint(jax.random.fold_in(ks, layer), (s[0], s[1] // 32, s[2]), 112, 118,
                                         jnp.int32).astype(jnp.uint8))
        return (jnp.stack(ws), jnp.stack(ss)) if fp8_layers else (ws[0], ss[0])

    ws, ss = zip(*(layers(k, ks, s) for k, ks, s in zip(keys[:3], keys[3:], shapes)))
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


def tiles_name(tl) -> str:
    return (f"{tl.block_m}x{tl.block_n_up}/{tl.block_n_down}x{tl.block_k} w{tl.num_warps}s{tl.num_stages}"
            + (" scaled" if tl.scaled_dot else ""))


def run_case(kind, t, fp8, weights, geo, ceil, impl, sweep, ragged, deadline, rows_out, jsonl=None):
    e, d, f = geo["experts"], geo["hidden"], geo["width"]
    wname = "mxfp8" if fp8 else "bf16"
    layer = FP8_LAYER if fp8 and weights[0].ndim == 4 else None
    ids, comb = routing(jax.random.key(t), t, e)
    x = jax.random.normal(jax.random.key(t + 1), (t, d), jnp.float32).astype(jnp.bfloat16)
    hit = len(np.unique(np.asarray(ids)))
    need = hit * expert_bytes(d, f, fp8)
    flops = 2 * t * TOP_K * d * f * 3
    path = gpu_moe.byte_load_path(weights[0])
    default = gpu_moe.default_tiles(ids.size, e, fp8)
    base = dict(kind=kind, tokens=t, weights=wname, experts_hit=hit, bytes=need, flops=flops, load_path=path,
                layer=layer, weight_shape=list(weights[0].shape))
    interpret = impl.endswith("interpret")
    variants = [(None, jax.jit(lambda x, i, c, *w: dispatch.moe(x, i, c, *w, alpha=ALPHA, limit=LIMIT, layer=layer,
                                                                impl=impl)))]
    for tl in SWEEP[(wname, kind)] if sweep else []:
        if tl != default:
            variants.append((tl, jax.jit(lambda x, i, c, *w, tl=tl: gpu_moe.moe_tuned(
                x, i, c, *w, alpha=ALPHA, limit=LIMIT, layer=layer, tiles=tl, interpret=interpret))))
    if ragged:   # one layer, sliced once here so that the timed call is the ragged path alone
        per_layer = [w[layer] for w in weights] if layer is not None else list(weights)
        gm = "gpu" if impl == "gpu" else "reference"
        variants.append(("ragged", jax.jit(lambda x, i, c, *w: ragged_path(x, i, c, *w, impl=gm))))
    iters = 20 if kind == "decode" else 3
    want = None
    for tl, fn in variants:
        name = "ragged" if tl == "ragged" else "fused " + tiles_name(tl if tl else default)
        row = dict(base, impl=name, default_tiles=tl is None)
        if tl != "ragged":
            row["tiles"] = dataclasses.astuple(tl or default)
        args = (x, ids, comb, *(per_layer if tl == "ragged" else weights))
        if time.monotonic() > deadline:
            row["error"] = "skipped: --budget-s reached"
        else:
            try:
                t0 = time.monotonic()
                out = np.asarray(fn(*args))
                row["first_call_s"] = time.monotonic() - t0
                if want is None:     # ragged when it runs, else the first variant that runs (the default tiles)
                    want = out if not ragged else np.asarray(variants[-1][1](x, ids, comb, *per_layer))
                    want_name = "ragged" if ragged else name
                row["rel_err"] = float(np.linalg.norm(out - want) / np.linalg.norm(want))
                row["rel_err_vs"] = want_name
                s = bench(fn, *args, iters=iters, reps=3)
                row["ms"] = s * 1e3
                row["bound_ms"] = need / (ceil["copy_gbs"] * 1e9) * 1e3
                row["ratio_to_bound"] = row["ms"] / row["bound_ms"]
                row["tflops"] = flops / s / 1e12
                row["frac_matmul_peak"] = row["tflops"] / ceil["matmul_tflops"]
            except Exception as exc:                                        # a variant that does not compile
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                traceback.print_exc(limit=2)
        print(json.dumps(row), flush=True)
        rows_out.append(row)
        if jsonl:
            with open(jsonl, "a") as fh:
                fh.write(json.dumps(row) + "\n")


def table(rows, ceil):
    lines = [f"ceilings: bf16 matmul {ceil['matmul_tflops']:.0f} TFLOP/s, copy {ceil['copy_gbs']:.0f} GB/s",
             f"{'case':<13} {'w':<5} {'read':<10} {'hit':>3} {'GB':>6} {'bound ms':>8} | {'fused ms':>8} "
             f"{'x bound':>7} {'TF/s':>6} {'default ms':>10} | {'ragged ms':>9} {'x bound':>7}  best tiles"]
    keys = sorted({(r["kind"], r["tokens"], r["weights"]) for r in rows}, key=lambda k: (k[0] != "decode", k[1], k[2]))
    best_fp8 = []
    for kind, t, w in keys:
        rs = [r for r in rows if (r["kind"], r["tokens"], r["weights"]) == (kind, t, w) and "ms" in r]
        fused = [r for r in rs if r["impl"].startswith("fused")]
        rag = [r for r in rs if r["impl"] == "ragged"]
        if not fused:
            continue
        best = min(fused, key=lambda r: r["ms"])
        dflt = [r for r in fused if r["default_tiles"]]
        case = f"{kind} {'b' if kind == 'decode' else 'T='}{t}"
        lines.append(f"{case:<13} {w:<5} {best['load_path']:<10} {best['experts_hit']:>3} {best['bytes'] / 1e9:6.2f} "
                     f"{best['bound_ms']:8.3f} | {best['ms']:8.3f} {best['ratio_to_bound']:7.2f} "
                     f"{best['tflops']:6.0f} " + (f"{dflt[0]['ms']:10.3f}" if dflt else f"{'-':>10}") + " | "
                     + (f"{rag[0]['ms']:9.3f} {rag[0]['ratio_to_bound']:7.2f}" if rag else f"{'-':>9} {'-':>7}")
                     + f"  {best['impl'][6:]}")
        if w == "mxfp8":
            best_fp8.append(f"  {case:<13} MoETiles{tuple(best['tiles'])} {best['ms']:.3f} ms"
                            + (f" (default_tiles {dflt[0]['ms']:.3f} ms)" if dflt else ""))
    if best_fp8:
        lines += ["best MXFP8 tiles (block_m, block_n_up, block_n_down, block_k, num_warps, num_stages, "
                  "scaled_dot), for default_tiles:"] + best_fp8
    return "\n".join(lines)


def main(argv=None):
    t_start = time.monotonic()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--small", action="store_true", help="tiny shapes, kernels interpreted: runs on CPU")
    ap.add_argument("--weights", default="bf16,mxfp8", help="comma list of bf16, mxfp8")
    ap.add_argument("--sweep", default="bf16,mxfp8", help="comma list of the weights whose tiles are swept ('' none)")
    ap.add_argument("--ragged", action="store_true", help="also time the ragged_dot path (the previous model path)")
    ap.add_argument("--fp8-layers", type=int, default=2,
                    help="layers of the MXFP8 stack (read at layer 1); 0: one layer [E, D, F], as a scan slice")
    ap.add_argument("--budget-s", type=float, default=float("inf"), help="start no variant after this many seconds")
    args = ap.parse_args(argv)
    if args.fp8_layers < 0 or args.fp8_layers == 1:
        ap.error(f"--fp8-layers is 0 (one layer) or >= 2 (a stack read at layer {FP8_LAYER}), got {args.fp8_layers}")
    weights_list = [w for w in args.weights.split(",") if w]
    sweep = {w for w in args.sweep.split(",") if w}
    if not set(weights_list) | sweep <= {"bf16", "mxfp8"}:
        ap.error(f"--weights/--sweep take bf16, mxfp8; got {args.weights!r} / {args.sweep!r}")
    geo = geometry(args.small)
    on_gpu = jax.default_backend() == "gpu"
    impl = "gpu" if on_gpu else "gpu-interpret"
    ceil = ceilings() if on_gpu else {"matmul_tflops": float("nan"), "copy_gbs": float("nan")}
    deadline = t_start + args.budget_s
    rows = []
    os.makedirs(args.out, exist_ok=True)
    print(json.dumps({"ceilings": ceil}), flush=True)
    for wname in weights_list:
        fp8 = wname == "mxfp8"
        weights = random_experts(jax.random.key(7), geo["experts"], geo["hidden"], geo["width"], fp8,
                                 args.fp8_layers)
        for kind, t in geo["cases"]:
            run_case(kind, t, fp8, weights, geo, ceil, impl, wname in sweep, args.ragged, deadline, rows,
                     os.path.join(args.out, "moe.jsonl"))
        del weights
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=jax.devices()[0].device_kind, jax=jax.__version__, ceilings=ceil, small=args.small,
                wall_s=time.monotonic() - t_start)
    with open(os.path.join(args.out, "moe.json"), "w") as fh:
        json.dump(dict(meta=meta, rows=rows), fh, indent=1)
    print(f"{meta['device']}, jax {meta['jax']}, {meta['date']}, {meta['wall_s']:.0f} s")
    print(table(rows, ceil))
    return rows


if __name__ == "__main__":
    main()
