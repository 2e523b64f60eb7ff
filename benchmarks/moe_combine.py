"""Expert-parallel MoE on several GPUs: how to combine the devices' partial outputs (issue 12, item 3).

    python benchmarks/moe_combine.py [--out DIR] [--small] [--devices N] [--weights bf16|mxfp8]

M3's routed experts (128, hidden 6144, width 3072, top-4; bf16 or MXFP8), split evenly over N devices, as
m3jax.model.moe.MoE.routed splits them: rows (tokens) replicated, each device runs the fused MoE kernel
(dispatch.moe, impl "gpu"; "tpu-interpret" with --small on CPU) over the rows routed to its own experts (the
others contribute 0) and yields a float32 partial [T, D]. The partials must be summed and the sum must end up
where the next layer reads it (replicated: the attention that follows splits heads, not rows). Variants, each
one jitted shard_map with the varying-axes check on, timed from the replicated rows to the replicated sum:

  local       the kernel alone, no combine (the floor the collectives add to)
  psum        all-reduce of the float32 partials (what the model does)
  psum-bf16   all-reduce of the partials rounded to bf16 (half the bytes; the sum of N bf16 roundings, so its
              relative error against psum is reported)
  rs-ag       reduce-scatter over the rows inside the shard_map, then XLA's reshard of the row-split sum to
              replicated (an all-gather): the two halves of an all-reduce, spelled out (same bytes, other schedule)

Cases: decode batch 1 / 8 / 32 and prefill 8K tokens. Each row records the variant's time, the collective's
share (time - local), the bytes one device sends in a ring all-reduce (2 (N-1)/N x T x D x itemsize), and the
relative L2 error against the single-device kernel. Writes moe_combine.jsonl under --out and prints one table.
An all-to-all dispatch (rows sent to their experts' devices instead of replicated) is not among the variants:
with replicated rows the kernel already computes only the local experts' rows, so it would save only the
combine of prefill-sized batches, at the price of ragged, capacity-bounded buffers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels import bench  # noqa: E402  (benchmarks/kernels.py: the shared timer)

from pallas_kernels import dispatch  # noqa: E402

ALPHA, LIMIT, TOP_K = 1.702, 7.0, 4
VARIANTS = ("local", "psum", "psum-bf16", "rs-ag")
AXIS = "e"


def geometry(small: bool) -> dict:
    if small:
        return dict(experts=8, hidden=64, width=32, cases=[("decode", 1), ("decode", 4), ("prefill", 32)])
    return dict(experts=128, hidden=6144, width=3072,
                cases=[("decode", 1), ("decode", 8), ("decode", 32), ("prefill", 8192)])


def _weights(key, e, d, f, fp8: bool, dtype):
    """(gate, up, down) [E, ...] and, with fp8, their E8M0 exponents (2**0 everywhere), on the host's default
    device; random e4m3 bytes avoid the two NaN codes."""
    shapes = ((e, d, f), (e, d, f), (e, f, d))
    keys = jax.random.split(key, 3)
    if not fp8:
        return [jax.random.normal(k, s, jnp.float32).astype(dtype) / np.sqrt(s[-2]) for k, s in zip(keys, shapes)]
    out = []
    for k, s in zip(keys, shapes):
        b = jax.random.randint(k, s, 0, 256, jnp.int32).astype(jnp.uint8)
        b = jnp.where((b & 0x7F) == 0x7F, b & 0xF0, b)                     # no NaN codes
        out.append(jax.lax.bitcast_convert_type(b, jnp.float8_e4m3fn))
    scales = [jnp.full((e, -(-s[1] // 32), s[2]), 127, jnp.uint8) for s in shapes]
    return out + scales


def combine_fn(mesh, n, e, impl, variant, num_weights):
    """The jitted expert-parallel MoE with one way to combine the partials (module docstring)."""
    local = e // n

    def shard(x, ids, comb, *stored):
        x, comb = jax.lax.pcast((x, comb), AXIS, to="varying")            # as the model: cotangents summed
        first = jax.lax.axis_index(AXIS) * local
        out = dispatch.moe(x, ids - first, comb, *stored, alpha=ALPHA, limit=LIMIT, impl=impl)
        if variant == "local":
            return out[None]                                                 # each device's partial, [1, T, D]
        if variant == "psum":
            return jax.lax.psum(out, AXIS)
        if variant == "psum-bf16":
            return jax.lax.psum(out.astype(jnp.bfloat16), AXIS).astype(jnp.float32)
        pad = -out.shape[0] % n                                              # rows split evenly
        return jax.lax.psum_scatter(jnp.pad(out, ((0, pad), (0, 0))), AXIS, scatter_dimension=0, tiled=True)

    mapped = jax.shard_map(shard, mesh=mesh, in_specs=(P(),) * 3 + (P(AXIS),) * num_weights,
                           out_specs=P(AXIS) if variant in ("local", "rs-ag") else P())
    if variant != "rs-ag":
        return jax.jit(mapped)
    replicated = NamedSharding(mesh, P())

    def reduce_scatter_then_gather(x, *rest):       # the gather: XLA's reshard of the row-split sum
        return jax.lax.with_sharding_constraint(mapped(x, *rest), replicated)[:x.shape[0]]

    return jax.jit(reduce_scatter_then_gather)


def run(args):
    g = geometry(args.small)
    devices = jax.devices()[:args.devices] if args.devices else jax.devices()
    n = len(devices)
    e, d, f = g["experts"], g["hidden"], g["width"]
    if e % n:
        raise SystemExit(f"moe_combine: {e} experts do not split over {n} devices")
    impl = "tpu-interpret" if args.small else "gpu"
    mesh = jax.sharding.Mesh(np.asarray(devices), (AXIS,))
    fp8 = args.weights == "mxfp8"
    dtype = jnp.float32 if args.small else jnp.bfloat16
    weights = _weights(jax.random.key(0), e, d, f, fp8, dtype)
    split = [jax.device_put(w, NamedSharding(mesh, P(AXIS))) for w in weights]
    rep = lambda a: jax.device_put(a, NamedSharding(mesh, P()))             # noqa: E731
    fns = {v: combine_fn(mesh, n, e, impl, v, len(split)) for v in VARIANTS}
    one_device = jax.jit(lambda x, ids, comb, *w: dispatch.moe(x, ids, comb, *w, alpha=ALPHA, limit=LIMIT,
                                                                   impl=impl))
    rows = []
    meta = dict(device=str(getattr(devices[0], "device_kind", devices[0])), devices=n, jax=jax.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                weights=args.weights if fp8 else jnp.dtype(dtype).name, impl=impl, experts=e, hidden=d, width=f)
    out_path = os.path.join(args.out, "moe_combine.jsonl")
    os.makedirs(args.out, exist_ok=True)
    for kind, t in [c for c in g["cases"] if not args.tokens or c[1] in args.tokens]:
        k1, k2, k3 = jax.random.split(jax.random.key(t), 3)
        x = jax.random.normal(k1, (t, d), jnp.float32).astype(dtype)
        ids = jax.random.randint(k2, (t, TOP_K), 0, e, jnp.int32)          # may repeat an expert: it counts twice
        comb = jax.random.uniform(k3, (t, TOP_K), jnp.float32, 0.1, 1.0)
        inputs = (rep(x), rep(ids), rep(comb), *split)
        want = np.asarray(one_device(x, ids, comb, *weights), np.float32)
        local_s = None
        for v in VARIANTS:
            row = dict(meta, case=kind, tokens=t, variant=v)
            try:
                got = fns[v](*inputs)
                secs = bench(fns[v], *inputs, iters=5 if args.small else 20, reps=3 if args.small else 5)
                local_s = secs if v == "local" else local_s
                if v != "local":
                    got = np.asarray(got, np.float32)
                    row["rel_err"] = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
                    itemsize = 2 if v == "psum-bf16" else 4
                    row["ring_bytes_per_device"] = int(2 * (n - 1) / n * t * d * itemsize)
                    row["collective_ms"] = None if local_s is None else 1e3 * (secs - local_s)
                row["ms"] = 1e3 * secs
            except Exception as exc:                # noqa: BLE001 - record and go on to the next variant
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            rows.append(row)
            with open(out_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
    print(f"{meta['device']} x {n}, jax {meta['jax']}, {meta['date']}, {meta['weights']} experts {e} x {d} -> {f}")
    print(f"{'case':<14}{'variant':<11}{'ms':>9}{'collective ms':>15}{'ring MB/dev':>13}{'rel err':>10}")
    for r in rows:
        case = f"{r['case']} {r['tokens']}"
        if "error" in r:
            print(f"{case:<14}{r['variant']:<11} error: {r['error'][:80]}")
            continue
        coll = "" if r.get("collective_ms") is None else f"{r['collective_ms']:.3f}"
        ring = "" if "ring_bytes_per_device" not in r else f"{r['ring_bytes_per_device'] / 1e6:.1f}"
        err = "" if "rel_err" not in r else f"{r['rel_err']:.1e}"
        print(f"{case:<14}{r['variant']:<11}{r['ms']:>9.3f}{coll:>15}{ring:>13}{err:>10}")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--small", action="store_true", help="tiny geometry, TPU interpreter (CPU check)")
    ap.add_argument("--devices", type=int, default=None, help="the first N devices (default: all)")
    ap.add_argument("--weights", choices=("bf16", "mxfp8"), default="bf16",
                    help="bf16 (float32 with --small) or MXFP8 experts")
    ap.add_argument("--tokens", type=int, nargs="*", default=None, help="only the cases of these token counts")
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    main()
