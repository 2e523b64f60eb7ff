"""Stacked-weight matmul micro-benchmark: the Pallas kernel that reads a layer of a [L, K, N] stack in place,
against XLA's slice-then-matmul and against XLA on a separate per-layer array, at M3 widths.

    python benchmarks/stacked_linear.py [--out FILE] [--small] [--sweep] [--sweep-rows 1,32] [--rows 1,32]
                                        [--weights q,o] [--dtype bfloat16] [--budget-s S]

Weights of one M3 layer (widths from the release config, tests/data/MiniMax-M3.config.json, via m3jax.config):
q 6144 -> 8192 (64 heads x 128), k / v / index q 6144 -> 512 (4 x 128), o 8192 -> 6144, index k 6144 -> 128,
dense MLP gate / up 6144 -> 12288 and down 12288 -> 6144, shared expert gate / up 6144 -> 3072 and down
3072 -> 6144. Each is a random bf16 stack of L = 8 layers; x has `rows` rows (1, 8, 32, 64, 128, 256).
Methods, each timed as one jitted program over all L layers, divided by L (scan form: the layer is traced, as in
the model's lax.scan over its layer stack):
  kernel      pallas_kernels/gpu/linear.py with default_tiles, reading layer l of the stack in place
  xla_slice   w[l] (lax.dynamic_index_in_dim), then jnp.dot: what the model runs without the kernel (XLA copies
              the slice every step)
  xla_separate  jnp.dot on L separate per-layer arrays (a Python loop in one jit: no slice, no copy): the no-copy
              lower bound of cuBLAS
plus kernel_l5: one kernel call reading layer 5 (not in a scan: includes the per-call dispatch overhead).
Every method's layer-5 output is checked against reference.linear (rel_err). Bound: the bytes of one layer's
weight (plus x and the f32 output) at the copy rate measured in the same run (kernels.copy_rate: a 2 GiB device
copy, bytes read + written per second); each method's ratio to it is printed.
Measured (H200, jax 0.11.2, bf16, 2026-12-01; copy rate 3.26 TB/s): q / o / dense MLP, 1-64 rows: kernel
1.0-1.2x the bound, xla_slice 3.0-3.2x, xla_separate 0.9-1.1x; 256 rows: 1.7-1.8x / 3.1-3.3x / 1.3x. Shared
expert (38 MB): kernel 1.6-1.8x, xla_slice 3.4-5.2x, xla_separate 1.1-2.5x. k / v / index (<= 6 MB): 10-35 us
for every method (fixed costs, noisy run to run).
--sweep: rows 1 and 32 (--sweep-rows) at the q, o and k/v widths (or those of --weights), linear_tuned over
block_n (32..256) x k_splits (1..16) x block_k (64..256) (rows past 64: x block_m 64 / 128), the combinations that
fit the shape unchanged (gpu.linear.fit_tiles); the best per shape is printed (to tune default_tiles).
--small: tiny shapes, kernels interpreted, runs on CPU in seconds. --out FILE: jsonl, one row per measurement
as it runs. Prints one table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels import bench, copy_rate  # noqa: E402  (benchmarks/kernels.py: the shared timer and copy rate)

from m3jax.config import M3Config  # noqa: E402
from pallas_kernels import reference  # noqa: E402
from pallas_kernels.gpu import linear as gpu_linear  # noqa: E402

RELEASE_CONFIG = os.path.join(ROOT, "tests", "data", "MiniMax-M3.config.json")
LAYERS, READ_LAYER = 8, 5
ROWS = (1, 8, 32, 64, 128, 256)
SWEEP_ROWS, SWEEP_WEIGHTS = (1, 32), ("q", "o", "kv")
SWEEP_BLOCK_N, SWEEP_SPLITS, SWEEP_BLOCK_K = (32, 64, 128, 256), (1, 2, 4, 8, 16), (64, 128, 256)


def m3_weights(cfg: M3Config) -> dict:
    """name -> (K, N, the weights of a layer with this shape)."""
    d, hd = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    iq, ik = cfg.msa.num_index_heads * cfg.msa.index_dim, cfg.msa.index_dim
    return {"q": (d, q, "q"), "kv": (d, kv, "k, v" + (", index q" if iq == kv else "")), "o": (q, d, "o"),
            **({} if iq == kv else {"index_q": (d, iq, "index q")}),
            "index_k": (d, ik, "index k"),
            "mlp_up": (d, cfg.dense_intermediate_size, "dense MLP gate, up"),
            "mlp_down": (cfg.dense_intermediate_size, d, "dense MLP down"),
            "shared_up": (d, cfg.shared_intermediate_size, "shared expert gate, up"),
            "shared_down": (cfg.shared_intermediate_size, d, "shared expert down")}


def geometry(small: bool) -> dict:
    if small:
        return dict(weights={"q": (64, 96, "q"), "o": (96, 64, "o")}, rows=(1, 20), layers=2, read_layer=1,
                    sweep=dict(rows=(1,), block_n=(32, 64), splits=(1, 2), block_k=(32,)), copy_bytes=2 ** 22)
    return dict(weights=m3_weights(M3Config.from_pretrained(RELEASE_CONFIG)), rows=ROWS, layers=LAYERS,
                read_layer=READ_LAYER, sweep=dict(rows=SWEEP_ROWS, block_n=SWEEP_BLOCK_N, splits=SWEEP_SPLITS,
                                                  block_k=SWEEP_BLOCK_K), copy_bytes=2 ** 31)


def _dot(x, w):
    return jnp.dot(x, w, preferred_element_type=jnp.float32,
                   precision="highest" if w.dtype == jnp.float32 else None)


def scan_program(step, layers):
    """jit(x, w) -> f32 [L, M, N]: step(x, w, l) for l = 0..L-1 inside lax.scan (l traced)."""
    def run(x, w):
        return jax.lax.scan(lambda c, l: (c, step(x, w, l)), 0, jnp.arange(layers, dtype=jnp.int32))[1]
    return jax.jit(run)


def methods(interpret: bool, layers: int, read_layer: int, tiles=None):
    def kernel(x, w, l):
        if tiles is None:
            return gpu_linear.linear(x, w, layer=l, interpret=interpret)
        return gpu_linear.linear_tuned(x, w, layer=l, tiles=tiles, interpret=interpret)

    def xla_slice(x, w, l):
        return _dot(x, jax.lax.dynamic_index_in_dim(w, l, axis=0, keepdims=False))

    def separate(x, ws):
        return jnp.stack([_dot(x, w) for w in ws])

    return {"kernel": (scan_program(kernel, layers), "stack", layers),
            "kernel_l5": (jax.jit(lambda x, w, l: kernel(x, w, l)[None]), "stack+layer", 1),
            "xla_slice": (scan_program(xla_slice, layers), "stack", layers),
            "xla_separate": (jax.jit(separate), "separate", layers)}


def _time(fn, args, per, iters):
    return bench(fn, *args, iters=iters, reps=3) / per


def run_weight(name, k, n, what, geo, dtype, copy_gbs, impl_interpret, rows_list, deadline, out_rows, emit,
               sweep_cfg=None):
    layers, read_layer = geo["layers"], geo["read_layer"]
    itemsize = jnp.dtype(dtype).itemsize
    w = jax.jit(lambda key: (jax.random.normal(key, (layers, k, n), jnp.float32) / np.sqrt(k)).astype(dtype))(
        jax.random.key(k * 7 + n))
    separate = [w[i] for i in range(layers)]
    jax.block_until_ready(separate)
    for m in rows_list:
        x = jax.random.normal(jax.random.key(m), (m, k), jnp.float32).astype(dtype)
        want = np.asarray(reference.linear(x, w, layer=read_layer))
        nbytes = k * n * itemsize + m * k * itemsize + m * n * 4
        bound_s = nbytes / (copy_gbs * 1e9)
        base = dict(weight=name, what=what, k=k, n=n, rows=m, layers=layers, dtype=jnp.dtype(dtype).name,
                    bytes=nbytes, bound_us=bound_s * 1e6)
        variants = [(meth, None) for meth in ("kernel", "kernel_l5", "xla_slice", "xla_separate")]
        default = gpu_linear.fit_tiles(k, n, gpu_linear.default_tiles(m, k, n, dtype))
        if sweep_cfg and m in sweep_cfg["rows"]:
            # rows past 64 also sweep the row tile: (64 rows, 4 warps, 4 stages) and (128, 8, 3)
            launch = [(64, 4, 4), (128, 8, 3)] if m > 64 else [(default.block_m, default.num_warps,
                                                                 default.num_stages)]
            for (bm, warps, stages), bn, s, bk in itertools.product(launch, sweep_cfg["block_n"],
                                                                     sweep_cfg["splits"], sweep_cfg["block_k"]):
                t = gpu_linear.LinearTiles(bm, bn, bk, s, warps, stages)
                if gpu_linear.fit_tiles(k, n, t) == t and t != default:
                    variants.append(("sweep", t))
        iters = 3 if impl_interpret else 20
        for meth, tiles in variants:
            row = dict(base, method=meth)
            if meth.startswith("kernel") or meth == "sweep":
                row["tiles"] = list(dataclasses.astuple(tiles or default))
            if time.monotonic() > deadline:
                row["error"] = "skipped: --budget-s reached"
            else:
                try:
                    fn, form, per = methods(impl_interpret, layers, read_layer, tiles)[
                        "kernel" if meth == "sweep" else meth]
                    args = {"stack": (x, w), "stack+layer": (x, w, jnp.int32(read_layer)),
                            "separate": (x, separate)}[form]
                    t0 = time.monotonic()
                    got = np.asarray(fn(*args))
                    row["first_call_s"] = time.monotonic() - t0
                    got = got[0] if form == "stack+layer" else got[read_layer]
                    row["rel_err"] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
                    s = _time(fn, args, per, iters)
                    row["us"] = s * 1e6
                    row["ratio_to_bound"] = s / bound_s
                    row["gbs"] = nbytes / s / 1e9
                except Exception as exc:                                     # a variant that does not compile
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                    traceback.print_exc(limit=2)
            emit(row)
            out_rows.append(row)
    del w, separate


def table(rows, copy_gbs):
    lines = [f"copy rate {copy_gbs:.0f} GB/s; us per layer (ratio to the bound = weight bytes / copy rate)",
             f"{'weight':<12} {'K':>6} {'N':>6} {'rows':>4} {'MB':>7} {'bound':>7} | {'kernel':>15} "
             f"{'kernel_l5':>15} {'xla_slice':>15} {'xla_separate':>15} | default tiles"]
    keys = sorted({(r["weight"], r["rows"]) for r in rows}, key=lambda t: (list(dict.fromkeys(
        r["weight"] for r in rows)).index(t[0]), t[1]))
    for wname, m in keys:
        rs = {r["method"]: r for r in rows if (r["weight"], r["rows"]) == (wname, m) and r["method"] != "sweep"}
        any_r = next(iter(rs.values()), None)
        if any_r is None:
            continue

        def cell(meth):
            r = rs.get(meth)
            return f"{r['us']:8.1f} ({r['ratio_to_bound']:4.2f})" if r and "us" in r else f"{'-':>15}"

        tl = rs.get("kernel", {}).get("tiles")
        lines.append(f"{wname:<12} {any_r['k']:>6} {any_r['n']:>6} {m:>4} {any_r['bytes'] / 1e6:7.2f} "
                     f"{any_r['bound_us']:7.1f} | {cell('kernel')} {cell('kernel_l5')} {cell('xla_slice')} "
                     f"{cell('xla_separate')} | {tuple(tl) if tl else '-'}")
    sweep_keys = sorted({(r["weight"], r["rows"]) for r in rows if r["method"] == "sweep"})
    if sweep_keys:
        lines.append("sweep, best LinearTiles(block_m, block_n, block_k, k_splits, num_warps, num_stages) per shape:")
    for wname, m in sweep_keys:
        cand = [r for r in rows if (r["weight"], r["rows"]) == (wname, m) and r["method"] in ("kernel", "sweep")
                and "us" in r]
        if not cand:
            continue
        best = min(cand, key=lambda r: r["us"])
        dflt = [r for r in cand if r["method"] == "kernel"]
        lines.append(f"  {wname:<6} rows {m:>3}: {tuple(best['tiles'])} {best['us']:.1f} us "
                     f"({best['ratio_to_bound']:.2f} x bound)"
                     + (f"; default {tuple(dflt[0]['tiles'])} {dflt[0]['us']:.1f} us" if dflt else ""))
    return "\n".join(lines)


def main(argv=None):
    t_start = time.monotonic()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="jsonl file: one row per measurement")
    ap.add_argument("--small", action="store_true", help="tiny shapes, kernels interpreted: runs on CPU")
    ap.add_argument("--sweep", action="store_true", help="sweep the kernel's tiles (rows 1, 32 at q and o)")
    ap.add_argument("--sweep-rows", default=None, help="comma list of the row counts swept (default 1,32)")
    ap.add_argument("--rows", default=None, help="comma list of row counts (default 1,8,32,64,128,256)")
    ap.add_argument("--weights", default=None, help="comma list of weight names (default: all)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--budget-s", type=float, default=float("inf"), help="start no variant after this many seconds")
    args = ap.parse_args(argv)
    geo = geometry(args.small)
    weights = geo["weights"]
    if args.weights:
        names = [w for w in args.weights.split(",") if w]
        unknown = set(names) - set(weights)
        if unknown:
            ap.error(f"--weights: unknown {sorted(unknown)}; known {list(weights)}")
        weights = {k: v for k, v in weights.items() if k in names}
    rows_list = tuple(int(r) for r in args.rows.split(",")) if args.rows else geo["rows"]
    dtype = jnp.dtype(args.dtype)
    on_gpu = jax.default_backend() == "gpu"
    interpret = not on_gpu
    copy_gbs = copy_rate(geo["copy_bytes"])
    deadline = t_start + args.budget_s
    print(json.dumps({"copy_gbs": copy_gbs, "device": jax.devices()[0].device_kind, "interpret": interpret}),
          flush=True)
    fh = open(args.out, "w") if args.out else None

    def emit(row):
        print(json.dumps(row), flush=True)
        if fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()

    rows = []
    sweep_cfg = dict(geo["sweep"]) if args.sweep else None
    if sweep_cfg and args.sweep_rows:
        sweep_cfg["rows"] = tuple(int(r) for r in args.sweep_rows.split(","))
    try:
        for name, (k, n, what) in weights.items():
            sw = sweep_cfg if sweep_cfg and (args.small or args.weights or name in SWEEP_WEIGHTS) else None
            wanted = tuple(dict.fromkeys(rows_list + (sw["rows"] if sw else ())))
            run_weight(name, k, n, what, geo, dtype, copy_gbs, interpret, wanted, deadline, rows, emit, sw)
    finally:
        if fh:
            fh.close()
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, "
          f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}, "
          f"{time.monotonic() - t_start:.0f} s")
    print(table(rows, copy_gbs))
    return rows


if __name__ == "__main__":
    main()
