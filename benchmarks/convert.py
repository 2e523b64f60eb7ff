"""Converter benchmark (not a test): throughput and peak host memory of `m3jax convert` on a synthetic
checkpoint with the real M3 tensor names and full widths (hidden 6144, vocab 200064, q 64x128, experts
3072 wide) but few layers / experts.

    python benchmarks/convert.py --dir /tmp/m3bench [--quant mxfp8] [--layers 3] [--experts 8] [--keep]

Writes the synthetic release checkpoint (sharded, with index json) under --dir streaming, drops it from the
page cache (posix_fadvise DONTNEED on our own files, so reads are cold), converts it to the Orbax format and
reports source GB, seconds, GB/s and the peak RSS above the baseline taken just before the conversion (the
kernel's VmHWM, reset through /proc/self/clear_refs, cross-checked by a 5 ms sampler). Optionally restores
the result (--restore; on CPU the restored model itself lives in host memory, so only its time is reported).
Deletes everything it wrote unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


from convert.synthetic import write_release  # noqa: E402
from m3jax.config import DENSE_MLP, FULL_ATTENTION, MOE_MLP, SPARSE_ATTENTION, M3Config  # noqa: E402


def bench_config(layers: int, experts: int) -> M3Config:
    kinds = [(FULL_ATTENTION, DENSE_MLP)] + [(SPARSE_ATTENTION, MOE_MLP)] * (layers - 1)
    return M3Config(num_hidden_layers=layers, num_local_experts=experts, num_experts_per_tok=min(4, experts),
                    layer_types=tuple(a for a, _ in kinds), mlp_layer_types=tuple(m for _, m in kinds))


def drop_page_cache(path: str) -> None:
    for root, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class PeakRSS:
    """Peak resident set size during a block, above the RSS at its start (bytes)."""

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")                               # reset VmHWM to the current RSS
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        self.base = _status_kb("VmRSS") * 1024
        self.sampled, self._stop = self.base, threading.Event()

        def sample():
            while not self._stop.wait(0.005):
                self.sampled = max(self.sampled, _status_kb("VmRSS") * 1024)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        hwm = _status_kb("VmHWM") * 1024 if self.hwm_reset else self.sampled
        self.peak = max(hwm, self.sampled)
        self.above = self.peak - self.base


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/m3jax-convert-bench")
    ap.add_argument("--quant", choices=["mxfp8"], default=None)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--shard-gb", type=float, default=2.0)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--restore", action="store_true")
    ap.add_argument("--compress", action="store_true", help="zstd in Orbax")
    ap.add_argument("--piece-mb", type=int, default=128)
    ap.add_argument("--group-mb", type=int, default=256)
    ap.add_argument("--reuse", action="store_true", help="reuse an existing synthetic source under --dir")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)

    import jax
    from convert import orbax_io

    src, dst = os.path.join(args.dir, "src"), os.path.join(args.dir, "dst")
    cfg = bench_config(args.layers, args.experts)
    try:
        t = time.perf_counter()
        if args.reuse and os.path.exists(os.path.join(src, "config.json")):
            from convert.safetensors_io import checkpoint_tensors
            total = sum(i.nbytes for i in checkpoint_tensors(src).values())
        else:
            total = write_release(src, cfg, args.quant, int(args.shard_gb * 1e9))
        print(f"wrote synthetic {args.quant or 'bf16'} checkpoint: {total / 1e9:.2f} GB in "
              f"{len(os.listdir(src)) - 2} shards ({time.perf_counter() - t:.0f} s)", flush=True)
        drop_page_cache(src)
        jax.devices()                                        # backend up before the baseline
        with PeakRSS() as rss:
            s = orbax_io.convert(src, dst, args.dtype, overwrite=True, progress=False, compress=args.compress,
                                 piece_bytes=args.piece_mb << 20, group_bytes=args.group_mb << 20)
        out = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(dst) for f in fs)
        res = {"source_GB": round(total / 1e9, 3), "output_GB": round(out / 1e9, 3), "quant": args.quant or "bf16",
               "dtype": args.dtype, "layers": args.layers, "experts": args.experts, "compress": args.compress,
               "piece_MiB": args.piece_mb, "group_MiB": args.group_mb,
               "seconds": round(s["seconds"], 2), "GB_per_s": round(total / 1e9 / s["seconds"], 3),
               "baseline_RSS_GB": round(rss.base / 1e9, 3), "peak_RSS_above_baseline_GB": round(rss.above / 1e9, 3),
               "hwm_reset": rss.hwm_reset, "cpus": os.cpu_count(), "jax": jax.__version__,
               "date": time.strftime("%Y-%m-%d", time.gmtime())}
        if args.restore:
            import m3jax.api
            drop_page_cache(dst)
            t = time.perf_counter()
            m = m3jax.api.load(dst, args.dtype, progress=False)
            jax.block_until_ready(jax.tree_util.tree_leaves(m))
            res["restore_seconds"] = round(time.perf_counter() - t, 2)
            res["restore_GB_per_s"] = round(out / 1e9 / res["restore_seconds"], 3)
        print(json.dumps(res))
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
