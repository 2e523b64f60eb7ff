"""A released checkpoint as a validated, lazily read source of m3jax parameters.

`ReleaseCheckpoint(path, targets)` reads only the safetensors headers, maps every tensor through the weight map
and checks the whole checkpoint against config.json and the model's parameter shapes before a byte of data is
read; every problem is collected and raised together in one `CheckpointError` naming the tensor, the file and
expected versus actual. `read_box(param, box)` then returns any box of any parameter (a device's shard, one
layer, a few experts) in the target dtype, reading only the bytes of that box (positional reads, no mmap) and
dequantising MXFP8 block-aligned.

FP8 weights: `read_box` dequantises. `read_box_fp8` returns the raw E4M3 bytes and E8M0 scales of a box (whole
32-input blocks) in the released layout: the hook for a later option that keeps experts in FP8 (placement would
put both arrays with the expert sharding; the model would need an FP8 grouped matmul).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import re
import threading
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from convert import mxfp8, weight_map
from convert.safetensors_io import DTYPES, CheckpointError, TensorInfo, checkpoint_tensors, read_region
from m3jax.config import M3Config

log = logging.getLogger(__name__)

SUPPORTED_QUANT = ("mxfp8",)
FLOAT_DTYPES = ("BF16", "F16", "F32")
Box = tuple[tuple[int, int], ...]          # (start, stop) per axis of a parameter

_LAYER = re.compile(r"^language_model\.model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"^language_model\.model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.")


def check_quantization(cfg: M3Config) -> None:
    """Raise unless the checkpoint's quantization_config (if any) is one this converter reads."""
    q = cfg.quantization
    if not q:
        return
    method = q.get("quant_method")
    if method not in SUPPORTED_QUANT:
        raise CheckpointError(f"config.json quantization_config.quant_method {method!r} is not supported; "
                              f"expected one of {list(SUPPORTED_QUANT)} (or no quantization_config)")
    block = q.get("weight_block_size", [1, mxfp8.BLOCK])
    if list(block) != [1, mxfp8.BLOCK]:
        raise CheckpointError(f"config.json quantization_config.weight_block_size must be [1, {mxfp8.BLOCK}], "
                              f"got {block}")


def raise_problems(problems: Sequence[str]) -> None:
    """One CheckpointError for all problems: the first in full, then how many more (all on `.problems`)."""
    if not problems:
        return
    more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    err = CheckpointError(problems[0] + more)
    err.problems = list(problems)
    raise err


class Leaf(NamedTuple):
    """One m3jax parameter and the released tensors that fill it."""
    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    rule: weight_map.Rule
    num_index_axes: int                        # 0 (model), 1 (layer in stack) or 2 (layer, expert)
    tensors: dict[tuple[int, ...], str]        # index along the leading axes -> released name

    @property
    def item_shape(self) -> tuple[int, ...]:
        return self.shape[self.num_index_axes:]

    def cut_axes(self, layer_axis_free: bool = True) -> tuple[int, ...]:
        """Axes along which pieces of this parameter are cut, in order: the stacked-layer axis (unless the
        caller shards it), then the first axis indexing rows of the released tensors (contiguous reads). The
        expert axis is never cut: an expert-parallel placement keeps reading only its own experts."""
        k = self.num_index_axes
        row_axis = k + (self.rule.in_axes if self.rule.layout == "t" else 0)
        return ((0,) if k and layer_axis_free else ()) + ((row_axis,) if row_axis < len(self.shape) else ())

    @property
    def stored_perm(self) -> tuple[int, ...]:
        """Axis order of the released layout: a "t" parameter (index..., in..., out...) is stored as
        (index..., out..., in...), i.e. param.transpose(stored_perm), which needs no host transpose."""
        k, n = self.num_index_axes, len(self.shape)
        if self.rule.layout != "t":
            return tuple(range(n))
        ia = self.rule.in_axes
        return tuple(range(k)) + tuple(range(k + ia, n)) + tuple(range(k, k + ia))


def _file(info: TensorInfo) -> str:
    return os.path.basename(info.file)


def _flat(box: Sequence[tuple[int, int]], dims: Sequence[int]):
    """Flattened (row-major) indices of a box over `dims`: (start, stop, None) if contiguous, else
    (min, max + 1, index array)."""
    if not dims:
        return 0, 1, None
    sizes = [b - a for a, b in box]
    j = next((i for i, n in enumerate(sizes) if n != 1), len(dims))      # axes before j have one index
    if all(tuple(box[i]) == (0, dims[i]) for i in range(j + 1, len(dims))):  # axes after j are whole
        start = int(np.ravel_multi_index([a for a, _ in box], dims))
        return start, start + math.prod(sizes), None
    grids = np.meshgrid(*[np.arange(a, b) for a, b in box], indexing="ij")
    idx = np.ravel_multi_index(grids, dims).reshape(-1)
    return int(idx.min()), int(idx.max()) + 1, idx


def _transpose_into(dst: np.ndarray, src: np.ndarray, tile: int = 256) -> None:
    """dst[...] = src.T in cache-sized tiles (5-10x faster than one strided copy for large matrices)."""
    r, c = src.shape
    if r * c <= tile * tile:
        dst[...] = src.T
        return
    for i in range(0, r, tile):
        for j in range(0, c, tile):
            dst[j:j + tile, i:i + tile] = src[i:i + tile, j:j + tile].T


class ReleaseCheckpoint:
    """A validated HF-release checkpoint (BF16/FP32 or MXFP8, single file or sharded with an index json).

    targets: {param path: (shape, dtype)} of the model to fill (see `convert.placement.abstract_params`).
    """

    def __init__(self, path: str, targets: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                 cfg: M3Config | None = None):
        self.path = os.fspath(path)
        self.cfg = cfg if cfg is not None else M3Config.from_pretrained(self.path)
        check_quantization(self.cfg)
        self.tensors = checkpoint_tensors(self.path)
        self.leaves = self._validate(targets)
        self._fds: dict[str, int] = {}
        self._scratch = threading.local()           # reused read buffers (see read_region)
        self._lock = threading.Lock()                # read_box may run in several threads at once

    # Validation -----------------------------------------------------------------------------------------------
    def _counts(self) -> list[str]:
        """Config/checkpoint disagreements in layer and expert counts (clearer than the per-tensor errors)."""
        cfg, problems = self.cfg, []
        layers = {int(m.group(1)) for n in self.tensors if (m := _LAYER.match(n))}
        if layers and max(layers) + 1 != cfg.num_hidden_layers:
            problems.append(f"config/checkpoint disagreement: config.json has num_hidden_layers="
                            f"{cfg.num_hidden_layers}, the checkpoint has layers 0..{max(layers)}")
        experts: dict[int, set[int]] = {}
        for n in self.tensors:
            if (m := _EXPERT.match(n)):
                experts.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
        for layer, ids in sorted(experts.items()):
            if max(ids) + 1 != cfg.num_local_experts:
                name = next(n for n in self.tensors if n.startswith(
                    f"language_model.model.layers.{layer}.block_sparse_moe.experts.{max(ids)}."))
                problems.append(f"config/checkpoint disagreement: config.json has num_local_experts="
                                f"{cfg.num_local_experts}, the checkpoint has {max(ids) + 1} experts in layer "
                                f"{layer} ({name} in {_file(self.tensors[name])})")
                break
        return problems

    def _validate(self, targets) -> dict[str, Leaf]:
        cfg, tensors = self.cfg, self.tensors
        problems = self._counts()
        placements, vision, mtp = [], 0, 0
        for name, info in tensors.items():
            if name.endswith(weight_map.SCALE_SUFFIX):
                if name[: -len(weight_map.SCALE_SUFFIX)] not in tensors:
                    problems.append(f"unexpected tensor {name} in {_file(info)}: a MXFP8 scale without its weight "
                                    f"{name[: -len(weight_map.SCALE_SUFFIX)]}")
                continue
            if weight_map.SKIP.match(name):
                mtp += 1
                continue
            if weight_map.VISION.match(name):
                vision += 1
                continue
            p = weight_map.place(cfg, name)
            if p is None:
                problems.append(f"unexpected tensor {name} in {_file(info)}: no weight-map rule takes it for "
                                f"this config.json ({cfg.num_hidden_layers} layers, {cfg.num_local_experts} "
                                f"experts, layer_types / mlp_layer_types as configured)")
            else:
                placements.append(p)
        found = {p.name for p in placements}
        for p in weight_map.expected(cfg):
            if p.name not in found:
                problems.append(f"missing tensor {p.name}: expected by config.json, not in the checkpoint "
                                f"{self.path}")
        if vision or mtp:
            log.info("%d vision/projector tensors are read by the vision loader; skipping %d mtp tensors", vision, mtp)

        leaves: dict[str, Leaf] = {}
        for p in placements:
            if p.path not in targets:
                problems.append(f"tensor {p.name} maps to parameter {p.path}, which this model does not have")
                continue
            shape, dtype = targets[p.path]
            leaf = leaves.get(p.path) or Leaf(p.path, tuple(shape), np.dtype(dtype), p.rule, len(p.index), {})
            leaves[p.path] = leaf
            leaf.tensors[p.index] = p.name
            problems += self._check_tensor(p, leaf)
        for path in targets:
            if path not in leaves and not problems:
                problems.append(f"parameter {path} of the model is filled by no released tensor (weight map)")
        raise_problems(problems)
        return leaves

    def _check_tensor(self, p: weight_map.Placement, leaf: Leaf) -> list[str]:
        info = self.tensors[p.name]
        want = weight_map.torch_shape(p.rule, leaf.item_shape)
        if info.shape != want:
            return [f"tensor {p.name} in {_file(info)} has shape {list(info.shape)}, expected {list(want)} "
                    f"from config.json"]
        scale = self.tensors.get(p.name + weight_map.SCALE_SUFFIX)
        if scale is None:
            if info.dtype not in FLOAT_DTYPES:
                hint = f" without a {p.name}{weight_map.SCALE_SUFFIX} tensor" if info.dtype.startswith("F8") else ""
                return [f"tensor {p.name} in {_file(info)} has dtype {info.dtype}{hint}, expected one of "
                        f"{list(FLOAT_DTYPES)} (or F8_E4M3 with a U8 {weight_map.SCALE_SUFFIX} sibling)"]
            return []
        if info.dtype != "F8_E4M3" or scale.dtype != "U8" or len(info.shape) != 2 or p.rule.layout != "t":
            return [f"tensor {p.name} in {_file(info)}: an MXFP8 weight must be a 2-D F8_E4M3 matrix with a U8 "
                    f"scale, got {info.dtype}{list(info.shape)} with a {scale.dtype} scale"]
        want_s = mxfp8.scale_shape(info.shape)
        if scale.shape != want_s:
            return [f"tensor {scale.name} in {_file(scale)} has shape {list(scale.shape)}, expected "
                    f"{list(want_s)} (one E8M0 exponent per {mxfp8.BLOCK} inputs of {p.name})"]
        return []

    # Reading --------------------------------------------------------------------------------------------------
    def source_bytes(self, path: str) -> int:
        """Bytes of the released tensors (and scales) that fill parameter `path`."""
        total = 0
        for name in self.leaves[path].tensors.values():
            total += self.tensors[name].nbytes
            s = self.tensors.get(name + weight_map.SCALE_SUFFIX)
            total += s.nbytes if s is not None else 0
        return total

    def is_quantized(self, path: str) -> bool:
        return any(n + weight_map.SCALE_SUFFIX in self.tensors for n in self.leaves[path].tensors.values())

    def _fd(self, file: str) -> int:
        with self._lock:
            if file not in self._fds:
                self._fds[file] = os.open(file, os.O_RDONLY)
            return self._fds[file]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _buffers(self) -> tuple[bytearray, bytearray]:
        if not hasattr(self._scratch, "w"):
            self._scratch.w, self._scratch.s = bytearray(), bytearray()
        return self._scratch.w, self._scratch.s

    def _raw_region(self, name: str, rows: tuple[int, int], cols: tuple[int, int]):
        """(values, scales or None, column offset into values): MXFP8 regions are widened to whole blocks.
        Views into this thread's scratch buffers: valid until its next read."""
        info = self.tensors[name]
        scale = self.tensors.get(name + weight_map.SCALE_SUFFIX)
        wbuf, sbuf = self._buffers()
        if scale is None:
            return read_region(self._fd(info.file), info, rows, cols, wbuf), None, 0
        b = mxfp8.BLOCK
        a0, a1 = cols[0] // b * b, min(-(-cols[1] // b) * b, info.shape[1])
        w = read_region(self._fd(info.file), info, rows, (a0, a1), wbuf)
        s = read_region(self._fd(scale.file), scale, rows, (a0 // b, -(-a1 // b)), sbuf)
        return w, s, cols[0] - a0

    def _region(self, name: str, rows: tuple[int, int], cols: tuple[int, int], dtype: np.dtype) -> np.ndarray:
        w, s, off = self._raw_region(name, rows, cols)
        if s is None:
            return w if w.dtype == dtype else w.astype(dtype)      # a scratch view when no cast is needed
        out = np.empty((w.shape[0], cols[1] - cols[0]), dtype)
        step = max(1, (32 << 20) // (4 * max(w.shape[1], 1)))          # float32 temporaries <= 32 MiB
        for r in range(0, w.shape[0], step):
            try:
                d = mxfp8.dequantize(w[r:r + step], s[r:r + step], dtype)
            except ValueError as e:
                raise CheckpointError(f"{name}: {e}") from None
            out[r:r + step] = d[:, off:off + cols[1] - cols[0]]
        return out

    def _read_item(self, leaf: Leaf, name: str, box: Box, out: np.ndarray, stored: bool) -> None:
        """Write a box of one released tensor into `out`: in the m3jax layout of `leaf` (the box's shape), or
        with `stored` in the released axis order (box shape permuted by `leaf.stored_perm`)."""
        item, rule = leaf.item_shape, leaf.rule
        if rule.layout == "t":          # torch [out, in]: rows = out axes = item[in_axes:], cols = item[:in_axes]
            ia = rule.in_axes
            row_dims, col_dims, row_box, col_box = item[ia:], item[:ia], box[ia:], box[:ia]
        elif len(item) == 1:            # a vector, read as [1, n]
            row_dims, col_dims, row_box, col_box = (), item, (), box
        else:
            row_dims, col_dims, row_box, col_box = item[:1], item[1:], box[:1], box[1:]
        r0, r1, ridx = _flat(row_box, row_dims)
        c0, c1, cidx = _flat(col_box, col_dims)
        if not out.flags.c_contiguous:  # the reshapes below must be views
            raise RuntimeError("internal: _read_item needs a contiguous output box")
        info = self.tensors[name]
        direct = (rule.layout != "t" or stored) and ridx is None and cidx is None
        if direct and DTYPES[info.dtype] == out.dtype and name + weight_map.SCALE_SUFFIX not in self.tensors:
            read_region(self._fd(info.file), info, (r0, r1), (c0, c1), out=out)      # no copy at all
            return
        region = self._region(name, (r0, r1), (c0, c1), out.dtype)
        if ridx is not None:
            region = region[ridx - r0]
        if cidx is not None:
            region = region[:, cidx - c0]
        if rule.layout == "t" and not stored:   # [rows, cols] -> [cols, rows] = (in axes..., out axes...)
            _transpose_into(out.reshape(region.shape[::-1]), region)
        else:
            out[...] = region.reshape(out.shape)

    def read_box(self, path: str, box: Box, dtype=None, stored: bool = False) -> np.ndarray:
        """Parameter `path`[box] (box: (start, stop) per axis) as a numpy array of `dtype` (default: the
        parameter's dtype), reading only the box's bytes from the released tensors. With `stored`, the result
        is `path[box].transpose(leaf.stored_perm)`: the released axis order, read without any transpose."""
        leaf = self.leaves[path]
        dtype = np.dtype(dtype if dtype is not None else leaf.dtype)
        box = tuple((int(a), int(b)) for a, b in box)
        k = leaf.num_index_axes
        perm = leaf.stored_perm if stored else tuple(range(len(box)))
        out = np.empty([box[i][1] - box[i][0] for i in perm], dtype)
        for idx in itertools.product(*(range(a, b) for a, b in box[:k])):
            rel = tuple(i - a for i, (a, _) in zip(idx, box[:k]))
            self._read_item(leaf, leaf.tensors[idx], box[k:], out[rel], stored)
        return out


    def read_box_fp8(self, path: str, box: Box) -> tuple[np.ndarray, np.ndarray]:
        """The raw MXFP8 bytes of `path`[box], for a later option that keeps (expert) weights in FP8.

        Returns (w e4m3[*index_box, R, C], scales uint8[*index_box, R, ceil(C/32)]) in the released layout: R
        = the box's out axes flattened, C = its in axes flattened, which must be whole 32-blocks (start a
        multiple of 32, end a multiple of 32 or the full width). `mxfp8.dequantize(w[i], s[i])` equals
        `read_box(path, box, stored=True)[i]` reshaped to [R, C].
        """
        leaf = self.leaves[path]
        if leaf.rule.layout != "t" or not self.is_quantized(path):
            raise ValueError(f"parameter {path} is not an MXFP8 matrix in {self.path}")
        k, ia, item = leaf.num_index_axes, leaf.rule.in_axes, leaf.item_shape
        box = tuple((int(a), int(b)) for a, b in box)
        r0, r1, ridx = _flat(box[k + ia:], item[ia:])
        c0, c1, cidx = _flat(box[k:k + ia], item[:ia])
        width = math.prod(item[:ia])
        if cidx is not None or c0 % mxfp8.BLOCK or (c1 % mxfp8.BLOCK and c1 != width):
            raise ValueError(f"{path}: an FP8 box must cover whole {mxfp8.BLOCK}-input blocks, got inputs "
                             f"{c0}..{c1} of {width}")
        index = [b - a for a, b in box[:k]]
        rows = (r1 - r0) if ridx is None else len(ridx)
        w = np.empty(index + [rows, c1 - c0], mxfp8.E4M3)
        sc = np.empty(index + [rows, -(-c1 // mxfp8.BLOCK) - c0 // mxfp8.BLOCK], np.uint8)
        for idx in itertools.product(*(range(a, b) for a, b in box[:k])):
            rel = tuple(i - a for i, (a, _) in zip(idx, box[:k]))
            wr, sr, _ = self._raw_region(leaf.tensors[idx], (r0, r1), (c0, c1))
            w[rel], sc[rel] = (wr, sr) if ridx is None else (wr[ridx - r0], sr[ridx - r0])
        return w, sc


def describe(tensors: Mapping[str, TensorInfo]) -> str:
    total = sum(t.nbytes for t in tensors.values())
    dtypes = sorted({t.dtype for t in tensors.values()})
    return f"{len(tensors)} tensors, {total / 2**30:.2f} GiB, dtypes {dtypes}"


__all__ = ["Box", "Leaf", "ReleaseCheckpoint", "check_quantization", "describe", "raise_problems"]
