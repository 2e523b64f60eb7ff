"""Load a released (HF-format) checkpoint onto devices, streaming.

Every parameter is placed in pieces of at most `piece_bytes` (cut along layers, then rows) with
`jax.make_array_from_callback`: each device's callback reads only its own slice of the released tensors
(dequantising MXFP8 block-aligned; distinct slices read by several threads), so peak host memory is about one
piece's local slices (at most `piece_bytes`), never a shard file and never the model; device memory holds the
parameters plus one piece. Slices are read in the released axis order (no host transpose) and transposed on device.
"""

from __future__ import annotations

import collections.abc
import functools
import logging
import math
import os
from typing import Mapping

import jax
import numpy as np
from tqdm.auto import tqdm

from convert import placement, weight_map
from convert.safetensors_io import CheckpointError  # noqa: F401  (re-exported for callers)
from convert.source import ReleaseCheckpoint, check_quantization, describe  # noqa: F401
from m3jax.config import M3Config

log = logging.getLogger(__name__)
PIECE_BYTES = 256 << 20


def release_pieces(ckpt: ReleaseCheckpoint, shardings: Mapping[str, jax.sharding.Sharding],
                   piece_bytes: int = PIECE_BYTES):
    """(path, box) of every piece to place, at most `piece_bytes` where possible (see `Leaf.cut_axes`; the
    layer axis is cut only when the sharding leaves it whole)."""
    for path, leaf in ckpt.leaves.items():
        spec = getattr(shardings[path], "spec", ())
        order = leaf.cut_axes(layer_axis_free=len(spec) == 0 or spec[0] is None)
        for box in placement.leading_pieces(leaf.shape, leaf.dtype.itemsize, piece_bytes, order):
            yield path, box


def _read_stored(ckpt: ReleaseCheckpoint, path: str, perm: tuple[int, ...], stored_box) -> np.ndarray:
    return ckpt.read_box(path, _unpermute(perm, stored_box), stored=True)


def fp8_scale_paths(targets) -> dict[str, str]:
    """{routed-expert weight path: path of its MXFP8 exponents} for a model built with fp8_experts."""
    from m3jax.model.moe import fp8_scale_path
    return {p: s for p in targets if (s := fp8_scale_path(p)) in targets}


def check_fp8_experts(ckpt: ReleaseCheckpoint, scales: Mapping[str, str], path: str) -> None:
    """Raise unless every routed-expert weight that is to stay in FP8 is MXFP8 in the release."""
    not_fp8 = [p for p in scales if not ckpt.is_quantized(p)]
    if not_fp8:
        raise CheckpointError(f"fp8_experts needs MXFP8 experts, but {path} stores {not_fp8[0]} "
                              f"({next(iter(ckpt.leaves[not_fp8[0]].tensors.values()))}) without FP8 scales")


class _FP8Reader:
    """The raw MXFP8 bytes of one piece's boxes, read once for the weight and its exponents (two arrays)."""

    def __init__(self, ckpt: ReleaseCheckpoint, path: str, perm: tuple[int, ...]):
        self.ckpt, self.path, self.perm = ckpt, path, perm
        self.memo: dict = {}

    def _read(self, param_box):
        key = tuple(param_box)
        if key not in self.memo:
            self.memo[key] = self.ckpt.read_box_fp8(self.path, key)
        return self.memo[key]

    def weight(self, stored_box) -> np.ndarray:
        return self._read(_unpermute(self.perm, stored_box))[0]

    def scale(self, stored_box) -> np.ndarray:
        box = list(_unpermute(self.perm, stored_box))
        axis = len(box) - 2                                   # the input axis: scales have one entry per block
        box[axis] = (0, self.ckpt.leaves[self.path].shape[axis])
        return self._read(tuple(box))[1]


def _unpermute(perm, stored_box):
    box = [None] * len(perm)
    for i, axis in enumerate(perm):
        box[axis] = stored_box[i]
    return tuple(box)


def load_release(path: str, cfg: M3Config, targets: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                 shardings: Mapping[str, jax.sharding.Sharding], *, progress: bool = True,
                 piece_bytes: int | None = None) -> dict[str, jax.Array]:
    """{param path: jax.Array placed with its sharding} for every parameter in `targets`
    (piece_bytes: default `PIECE_BYTES`, read at call time). Targets of a model built with fp8_experts hold the
    routed experts as e4m3 plus uint8 exponents: those are placed as released, never dequantised."""
    scales = fp8_scale_paths(targets)
    weights_only = {p: t for p, t in targets.items() if p not in scales.values()}
    with ReleaseCheckpoint(path, weights_only, cfg) as ckpt:
        check_fp8_experts(ckpt, scales, path)
        log.info("loading %s: %s", path, describe(ckpt.tensors))
        pieces = list(release_pieces(ckpt, shardings, piece_bytes or PIECE_BYTES))
        total = sum(ckpt.source_bytes(p) for p in ckpt.leaves)
        asm = placement.Assembler(targets, shardings)
        with tqdm(total=total, unit="B", unit_scale=True, desc="loading", disable=not progress) as bar:
            for p, box in pieces:
                leaf = ckpt.leaves[p]
                perm = leaf.stored_perm                 # read in the released axis order, transpose on device
                sharding = placement.permute_sharding(placement.piece_sharding(shardings[p], leaf.shape, box), perm)
                if p in scales:
                    _place_fp8(asm, ckpt, p, scales[p], box, perm, sharding, shardings[scales[p]], targets)
                else:
                    arr = placement.make_piece(functools.partial(_read_stored, ckpt, p, perm),
                                               tuple(box[i] for i in perm), sharding)
                    asm.add(p, box, arr, perm)
                # One piece in flight: left asynchronous, a load onto an H200 kept ~the model in host RAM
                # (transfer staging) and ran at half the speed.
                jax.block_until_ready(asm.arrays[p])
                bar.update(ckpt.source_bytes(p) * placement.box_size(box) // math.prod(leaf.shape))
        return asm.result()


def _place_fp8(asm, ckpt, path, scale_path, box, perm, sharding, scale_sharding, targets) -> None:
    """One piece of an MXFP8 expert weight and the matching piece of its exponents, as released."""
    reader = _FP8Reader(ckpt, path, perm)
    asm.add(path, box, placement.make_piece(reader.weight, tuple(box[i] for i in perm), sharding), perm)
    axis = len(box) - 2
    sbox = box[:axis] + ((0, targets[scale_path][0][axis]),) + box[axis + 1:]
    ssharding = placement.permute_sharding(placement.piece_sharding(scale_sharding, targets[scale_path][0], sbox),
                                           perm)
    asm.add(scale_path, sbox, placement.make_piece(reader.scale, tuple(sbox[i] for i in perm), ssharding), perm)


VISION_FILE = "vision.safetensors"     # a converted dir's vision / projector tensors, as released


def vision_tensors(path: str) -> dict:
    """{name: TensorInfo} of the vision / projector tensors of a release dir, or of a converted dir's
    VISION_FILE ({} when there are none)."""
    from convert import orbax_io                       # orbax_io imports this module
    from convert.safetensors_io import checkpoint_tensors, read_header

    if orbax_io.is_converted(path):
        file = os.path.join(path, VISION_FILE)
        return read_header(file) if os.path.isfile(file) else {}
    return {n: info for n, info in checkpoint_tensors(path).items() if weight_map.VISION.match(n)}


class _LazyTensors(collections.abc.Mapping):
    """Memory-mapped tensors, touched one at a time by `load_vision_params`."""

    def __init__(self, infos):
        self.infos = infos

    def __getitem__(self, name):
        from convert.safetensors_io import read_tensor
        return read_tensor(self.infos[name])

    def __iter__(self):
        return iter(self.infos)

    def __len__(self):
        return len(self.infos)


def load_vision(path: str, vision_cfg, dtype, mesh=None):
    """The VisionModel of a checkpoint (tower + projector) in `dtype`, replicated on `mesh` (or on the default
    device). Raises CheckpointError when config.json has a vision_config but the checkpoint no vision tensors."""
    from flax import nnx

    from m3jax.vision import VisionModel, load_vision_params

    infos = vision_tensors(path)
    if not infos:
        raise CheckpointError(f"{path}: config.json has a vision_config but the checkpoint holds no vision / "
                              f"projector tensors (a directory converted before vision support: convert again)")
    model = nnx.eval_shape(lambda: VisionModel(vision_cfg, dtype=dtype))
    sharding = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    log.info("loading %d vision / projector tensors (replicated)", len(infos))
    return load_vision_params(model, _LazyTensors(infos), sharding)


__all__ = ["PIECE_BYTES", "VISION_FILE", "load_release", "load_vision", "release_pieces", "vision_tensors"]
