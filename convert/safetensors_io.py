"""Lazy safetensors reading (memory-mapped, per-tensor, sliceable) and atomic writing.

The reader never loads a shard: `tensor(name)` returns a read-only numpy memmap view, so reading a slice
touches only that slice's bytes. Formats: https://github.com/huggingface/safetensors (8-byte little-endian
header length, JSON header with dtype/shape/data_offsets, raw little-endian data).
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import threading
import uuid
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint file or tensor that is missing, truncated, corrupt or does not match the config."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str
    dtype: str          # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int         # absolute byte offset of the data in `file`
    nbytes: int


def read_header(file: str) -> dict[str, TensorInfo]:
    """The tensors of one .safetensors file, validated against the file size."""
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{file}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100_000_000:
                raise CheckpointError(f"{file}: corrupt safetensors header (length {n}, file {size} bytes)")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {file} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: corrupt safetensors header ({e})") from None
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (start, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
        if dtype not in DTYPES:
            raise CheckpointError(f"{file}: tensor {name} has unsupported dtype {dtype}")
        want = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
        if end - start != want:
            raise CheckpointError(f"{file}: tensor {name} has {end - start} bytes, expected {want} for {dtype}{list(shape)}")
        if base + end > size:
            raise CheckpointError(f"{file}: truncated: tensor {name} ends at byte {base + end}, file has {size}")
        out[name] = TensorInfo(name, file, dtype, shape, base + start, end - start)
    return out


def read_tensor(info: TensorInfo) -> np.ndarray:
    """A read-only memory-mapped view of one tensor (no bytes are read until they are touched)."""
    if info.nbytes == 0:
        return np.zeros(info.shape, DTYPES[info.dtype])
    return np.memmap(info.file, dtype=DTYPES[info.dtype], mode="r", offset=info.offset, shape=info.shape)


def write_file(file: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors to `file` atomically (a temporary file in the same directory, then rename)."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    arrays = []
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        if a.dtype not in NAMES:
            raise TypeError(f"tensor {name}: dtype {a.dtype} cannot be written to safetensors")
        header[name] = {"dtype": NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = f"{os.path.abspath(file)}.{uuid.uuid4().hex[:8]}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)   # the umask's mode (mkstemp: 0600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for a in arrays:
                f.write(a.tobytes())
        os.replace(tmp, file)
    except BaseException:
        os.unlink(tmp)
        raise


def checkpoint_tensors(path: str) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint directory: via model.safetensors.index.json, or the .safetensors files."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        out: dict[str, TensorInfo] = {}
        headers: dict[str, dict[str, TensorInfo]] = {}
        for name, shard in weight_map.items():
            file = os.path.join(path, shard)
            if shard not in headers:
                if not os.path.exists(file):
                    raise CheckpointError(f"{index} maps tensor {name} to {shard}, which does not exist")
                headers[shard] = read_header(file)
            if name not in headers[shard]:
                raise CheckpointError(f"{index} maps tensor {name} to {shard}, which does not contain it")
            out[name] = headers[shard][name]
        return out
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"no model.safetensors.index.json or *.safetensors files in {path}")
    out = {}
    for f in files:
        out.update(read_header(os.path.join(path, f)))
    return out


def write_sharded(path: str, tensors: Iterable[tuple[str, np.ndarray]], num_shards: int) -> None:
    """Write tensors as `num_shards` files named like the release, plus the index json when sharded."""
    items = list(tensors)
    if num_shards == 1:
        write_file(os.path.join(path, "model.safetensors"), dict(items), {"format": "pt"})
        return
    total = sum(a.nbytes for _, a in items)
    per = -(-total // num_shards)
    shards: list[dict[str, np.ndarray]] = [{} for _ in range(num_shards)]
    filled = 0
    for name, a in items:
        shards[min(filled // per, num_shards - 1)][name] = a
        filled += a.nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        write_file(os.path.join(path, fname), shard, {"format": "pt"})
        weight_map.update({name: fname for name in shard})
    _write_json(os.path.join(path, "model.safetensors.index.json"),
                {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_json(file: str, obj) -> None:
    tmp = file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, file)


# Region reads (positional reads into a fresh buffer: no mmap, so nothing but the result stays resident) -----

_MAX_READ = 1 << 28
_read_lock = threading.Lock()
_bytes_read = 0               # tensor bytes read by read_region in this process (see bytes_read)


def bytes_read() -> int:
    """Tensor bytes this process has read through `read_region` so far: a multi-process load reads only the slices
    of its own devices, which tests check by the difference of two calls."""
    return _bytes_read


def _pread_into(fd: int, buf: memoryview, offset: int, info: TensorInfo) -> None:
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:done + _MAX_READ]], offset + done)
        if n <= 0:
            raise CheckpointError(f"{info.file}: truncated while reading tensor {info.name} "
                                  f"(byte {offset + done} of {info.offset + info.nbytes} expected)")
        done += n
    global _bytes_read
    with _read_lock:
        _bytes_read += done


def read_region(fd: int, info: TensorInfo, rows: tuple[int, int], cols: tuple[int, int],
                scratch: bytearray | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """[r0:r1, c0:c1] of a tensor viewed as 2-D [shape[0], prod(shape[1:])] (a 1-D tensor as [1, n]).

    Whole rows are one read; a column range is one read per row, so only the region's bytes are read. With
    `scratch` (grown as needed) the result is a view into it, valid until the next read into the same scratch:
    reusing memory avoids a page fault per 4 KiB of every fresh buffer. With `out` (C-contiguous, the region's
    size and the tensor's dtype) the bytes are read straight into it.
    """
    dt = DTYPES[info.dtype]
    shape = info.shape if len(info.shape) >= 2 else (1, *info.shape)
    width = int(np.prod(shape[1:], dtype=np.int64))
    (r0, r1), (c0, c1) = rows, cols
    nbytes = (r1 - r0) * (c1 - c0) * dt.itemsize
    if out is not None:
        if not out.flags.c_contiguous or out.dtype != dt or out.size * dt.itemsize != nbytes:
            raise ValueError(f"read_region: out must be C-contiguous {dt}[{r1 - r0}, {c1 - c0}]")
        out = out.reshape(r1 - r0, c1 - c0)
    elif scratch is None:
        out = np.empty((r1 - r0, c1 - c0), dt)
    else:
        if len(scratch) < nbytes:
            scratch.extend(bytes(nbytes - len(scratch)))
        out = np.frombuffer(scratch, np.uint8, nbytes).view(dt).reshape(r1 - r0, c1 - c0)
    if out.size == 0:
        return out
    flat = memoryview(out.reshape(-1).view(np.uint8))
    row_bytes = width * dt.itemsize
    if c0 == 0 and c1 == width:
        _pread_into(fd, flat, info.offset + r0 * row_bytes, info)
        return out
    n = (c1 - c0) * dt.itemsize
    for k, r in enumerate(range(r0, r1)):
        _pread_into(fd, flat[k * n:(k + 1) * n], info.offset + r * row_bytes + c0 * dt.itemsize, info)
    return out
