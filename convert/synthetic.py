"""Synthetic release checkpoints at any size: the real tensor names, shapes and dtypes of a config (BF16 or
MXFP8), written streaming, with pattern data or as sparse files (headers only, zeros that take no disk).

Used by the converter benchmark (multi-GB checkpoints with full widths) and by tests that validate and plan the
full 60-layer, 128-expert release without its 854 GB.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np

from convert.release import release_config, release_specs
from convert.safetensors_io import DTYPES
from m3jax.config import M3Config

_BLOCK = 64 << 20


def _pattern(dtype: str, rng) -> bytes:
    """64 MiB of plausible data: small finite bf16/f32 values, any E4M3 byte but NaN, scales near 2**-8."""
    if dtype == "BF16":
        return (rng.standard_normal(_BLOCK // 2, np.float32) * 0.02).astype(DTYPES["BF16"]).tobytes()
    if dtype == "F32":
        return (rng.standard_normal(_BLOCK // 4, np.float32) * 0.02).tobytes()
    if dtype == "F8_E4M3":
        b = rng.integers(0, 0x7E, _BLOCK, dtype=np.uint8)
        return (b | (rng.integers(0, 2, _BLOCK, dtype=np.uint8) << 7)).tobytes()
    return rng.integers(115, 125, _BLOCK, dtype=np.uint8).tobytes()


def write_release(path: str, cfg: M3Config, quant: str | None = None, shard_bytes: int = 5 << 30,
                  sparse: bool = False) -> int:
    """Write a sharded release checkpoint (index json, config.json) to `path`; returns the tensor bytes.
    Never more than 64 MiB of data in memory; `sparse` leaves the data as holes (reads give zeros). Names,
    shapes, dtypes and config.json come from `convert.release`, the writer `m3jax.testing` uses too."""
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(0)
    patterns = {} if sparse else {d: _pattern(d, rng) for d in ("BF16", "F32", "F8_E4M3", "U8")}
    shards, cur, size = [], [], 0
    for name, dt, shape in release_specs(cfg, quant):
        n = int(np.prod(shape, dtype=np.int64)) * DTYPES[dt].itemsize
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, dt, shape, n))
        size += n
    shards.append(cur)
    weight_map_json, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, dt, shape, n in shard:
            header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
            weight_map_json[name] = fname
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        with open(os.path.join(path, fname), "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            if sparse:
                f.truncate(8 + len(blob) + off)
            else:
                for name, dt, shape, n in shard:
                    pat = patterns[dt]
                    for a in range(0, n, _BLOCK):
                        f.write(pat[: min(_BLOCK, n - a)])
                f.flush()
                os.fsync(f.fileno())
        total += off
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map_json}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(release_config(cfg, quant), f, indent=1)
    return total


__all__ = ["release_specs", "write_release"]
