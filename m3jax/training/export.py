"""Export trained parameters in the HF release layout that `m3jax.load` and `m3jax convert` read.

The directory holds config.json (the release's VL-wrapper config), bfloat16 safetensors (the router in float32,
as the release keeps it) sharded so that no file exceeds `max_shard_bytes`, with model.safetensors.index.json,
and the training tokenizer's tokenizer.json (all `m3jax.tokenizer.M3Tokenizer` reads). It is assembled under
a temporary name beside `out_dir` and renamed when complete; an existing `out_dir` is refused.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Mapping

import numpy as np

from m3jax.config import M3Config


def export_release(out_dir: str, cfg: M3Config, params: Mapping[str, np.ndarray], tokenizer_json: str, *,
                   dtype: str = "bfloat16", max_shard_bytes: int = 14 << 20) -> dict:
    """Write the release directory; returns {"files": {name: bytes}, "num_shards": n, "tensor_bytes": b}."""
    from convert import release

    if os.path.exists(out_dir):
        raise ValueError(f"{out_dir} already exists; refusing to overwrite it")
    params = {p: np.asarray(v, np.float32) for p, v in params.items()}
    tensors = list(release.release_tensors(cfg, params, dtype))
    total = sum(a.nbytes for _, a in tensors)
    largest = max(a.nbytes for _, a in tensors)
    if largest > max_shard_bytes:
        raise ValueError(f"a tensor of {largest} bytes does not fit a shard of {max_shard_bytes} bytes")
    num_shards = _fewest_shards([a.nbytes for _, a in tensors], max_shard_bytes)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        os.chmod(tmp, 0o755)
        release.write_release(tmp, cfg, params, dtype, num_shards=num_shards)
        shutil.copyfile(tokenizer_json, os.path.join(tmp, "tokenizer.json"))
        files = {f: os.path.getsize(os.path.join(tmp, f)) for f in sorted(os.listdir(tmp))}
        too_big = {f: b for f, b in files.items() if b > max_shard_bytes}
        if too_big:
            raise RuntimeError(f"export: files over {max_shard_bytes} bytes: {too_big}")
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"files": files, "num_shards": num_shards, "tensor_bytes": total}


def _fewest_shards(sizes: list[int], max_shard_bytes: int) -> int:
    """The fewest shards for which convert.safetensors_io.write_sharded (tensors in order, shard i taking those
    that start in [i * per, (i + 1) * per), per = ceil(total / n)) keeps every shard within max_shard_bytes
    (the written files are checked again after writing)."""
    total = sum(sizes)
    for n in range(1, len(sizes) + 1):
        per = -(-total // n)
        shard = [0] * n
        filled = 0
        for b in sizes:
            shard[min(filled // per, n - 1)] += b
            filled += b
        if max(shard) <= max_shard_bytes:
            return n
    raise ValueError(f"tensors of {sizes} bytes do not fit shards of {max_shard_bytes} bytes")


__all__ = ["export_release"]
