"""Read a released (HF-format) checkpoint into m3jax parameters.

Tensors are read lazily from memory-mapped shards, dequantised when they carry an MXFP8 scale, transposed into
the einsum layout and written into the stacked parameter arrays. Every released text tensor must match one
rule of the weight map and every parameter must be filled: anything else is an error naming the tensor.
"""

from __future__ import annotations

import logging
from typing import Mapping

import numpy as np
from tqdm.auto import tqdm

from convert import mxfp8, weight_map
from convert.safetensors_io import DTYPES, CheckpointError, TensorInfo, checkpoint_tensors, read_tensor
from m3jax.config import M3Config

log = logging.getLogger(__name__)
SUPPORTED_QUANT = ("mxfp8",)


def check_quantization(cfg: M3Config) -> None:
    q = cfg.quantization
    if not q:
        return
    method = q.get("quant_method")
    if method not in SUPPORTED_QUANT:
        raise CheckpointError(f"quantization_config.quant_method {method!r} is not supported; expected one of "
                              f"{list(SUPPORTED_QUANT)}")
    block = q.get("weight_block_size", [1, mxfp8.BLOCK])
    if list(block) != [1, mxfp8.BLOCK]:
        raise CheckpointError(f"quantization_config.weight_block_size must be [1, {mxfp8.BLOCK}], got {block}")


def read_weight(tensors: Mapping[str, TensorInfo], name: str, out_dtype) -> np.ndarray:
    """One released tensor as `out_dtype`, dequantising MXFP8 when a `<name>_scale_inv` sibling exists."""
    info = tensors[name]
    w = read_tensor(info)
    scale_name = name + weight_map.SCALE_SUFFIX
    if scale_name in tensors:
        s = tensors[scale_name]
        if info.dtype != "F8_E4M3" or s.dtype != "U8":
            raise CheckpointError(f"{name}: MXFP8 weight must be F8_E4M3 with a U8 scale, got {info.dtype} "
                                  f"with {s.dtype} ({info.file})")
        try:
            return mxfp8.dequantize(np.asarray(w), np.asarray(read_tensor(s)), out_dtype)
        except ValueError as e:
            raise CheckpointError(f"{scale_name}: {e} ({s.file})") from None
    if info.dtype.startswith("F8"):
        raise CheckpointError(f"{name}: {info.dtype} weight without a {scale_name} tensor ({info.file})")
    return np.asarray(w).astype(out_dtype)


def classify(cfg: M3Config, tensors: Mapping[str, TensorInfo]):
    """Split the checkpoint into text placements; raise on unexpected, missing or mis-shaped tensors."""
    placements, skipped, unexpected = [], [], []
    for name in tensors:
        if name.endswith(weight_map.SCALE_SUFFIX):
            if name[: -len(weight_map.SCALE_SUFFIX)] not in tensors:
                unexpected.append(name)
            continue
        if weight_map.SKIP.match(name) or weight_map.VISION.match(name):
            skipped.append(name)
            continue
        p = weight_map.place(cfg, name)
        (placements.append(p) if p is not None else unexpected.append(name))
    if unexpected:
        info = tensors[unexpected[0]]
        raise CheckpointError(f"unexpected tensor {unexpected[0]} in {info.file} (and {len(unexpected) - 1} more) "
                              f"for this config ({cfg.num_hidden_layers} layers, {cfg.num_local_experts} experts, "
                              f"layer_types / mlp_layer_types as configured)")
    want = {p.name for p in weight_map.expected(cfg)}
    missing = sorted(want - {p.name for p in placements})
    if missing:
        raise CheckpointError(f"missing tensor {missing[0]} (and {len(missing) - 1} more) expected by config.json")
    if skipped:
        vision = sum(1 for n in skipped if weight_map.VISION.match(n))
        log.info("skipped %d vision/projector tensors (no vision tower yet) and %d mtp tensors",
                 vision, len(skipped) - vision)
    return placements


def check_shape(p: weight_map.Placement, info: TensorInfo, item_shape: tuple[int, ...]) -> None:
    want = weight_map.torch_shape(p.rule, item_shape)
    if info.shape != want:
        raise CheckpointError(f"tensor {p.name} in {info.file} has shape {list(info.shape)}, expected {list(want)} "
                              f"from config.json")


def load_host_params(path: str, cfg: M3Config, targets: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                     *, progress: bool = True) -> dict[str, np.ndarray]:
    """Host numpy arrays for every parameter path in `targets` ({path: (shape, dtype)}).

    The minimal loader: it assembles whole parameters on the host. Use the streaming converter for the
    released checkpoints.
    """
    check_quantization(cfg)
    tensors = checkpoint_tensors(path)
    placements = classify(cfg, tensors)
    out = {k: np.zeros(shape, dtype) for k, (shape, dtype) in targets.items()}
    for p in tqdm(placements, desc="loading tensors", unit="tensor", disable=not progress):
        if p.path not in out:
            raise CheckpointError(f"tensor {p.name} maps to {p.path}, which this model does not have")
        arr = out[p.path]
        item_shape = arr.shape[len(p.index):]
        info = tensors[p.name]
        check_shape(p, info, item_shape)
        w = read_weight(tensors, p.name, np.float32)
        arr[p.index] = weight_map.to_param(p.rule, w, item_shape).astype(arr.dtype)
    return out


def describe(tensors: Mapping[str, TensorInfo]) -> str:
    total = sum(t.nbytes for t in tensors.values())
    dtypes = sorted({t.dtype for t in tensors.values()})
    return f"{len(tensors)} tensors, {total / 2**30:.2f} GiB, dtypes {dtypes}"


__all__ = ["check_quantization", "classify", "describe", "load_host_params", "read_weight"]
