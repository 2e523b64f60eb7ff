"""Load a released (HF-format) checkpoint onto devices, streaming.

Every parameter is placed in pieces of at most `piece_bytes` (cut along layers, then rows) with
`jax.make_array_from_callback`: each device's callback reads only its own slice of the released tensors
(dequantising MXFP8 block-aligned; distinct slices read by several threads), so peak host memory is about one
piece's local slices (at most `piece_bytes`), never a shard file and never the model; device memory holds the
parameters plus one piece. Slices are read in the released axis order (no host transpose) and transposed on device.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Mapping

import jax
import numpy as np
from tqdm.auto import tqdm

from convert import placement
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
    box = [None] * len(perm)
    for i, axis in enumerate(perm):
        box[axis] = stored_box[i]
    return ckpt.read_box(path, tuple(box), stored=True)


def load_release(path: str, cfg: M3Config, targets: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                 shardings: Mapping[str, jax.sharding.Sharding], *, progress: bool = True,
                 piece_bytes: int | None = None) -> dict[str, jax.Array]:
    """{param path: jax.Array placed with its sharding} for every parameter in `targets`
    (piece_bytes: default `PIECE_BYTES`, read at call time)."""
    with ReleaseCheckpoint(path, targets, cfg) as ckpt:
        log.info("loading %s: %s", path, describe(ckpt.tensors))
        pieces = list(release_pieces(ckpt, shardings, piece_bytes or PIECE_BYTES))
        total = sum(ckpt.source_bytes(p) for p in ckpt.leaves)
        asm = placement.Assembler(targets, shardings)
        with tqdm(total=total, unit="B", unit_scale=True, desc="loading", disable=not progress) as bar:
            for p, box in pieces:
                leaf = ckpt.leaves[p]
                perm = leaf.stored_perm                 # read in the released axis order, transpose on device
                sharding = placement.permute_sharding(placement.piece_sharding(shardings[p], leaf.shape, box), perm)
                arr = placement.make_piece(functools.partial(_read_stored, ckpt, p, perm),
                                           tuple(box[i] for i in perm), sharding)
                asm.add(p, box, arr, perm)
                # One piece in flight: left asynchronous, a load onto an H200 kept ~the model in host RAM
                # (transfer staging) and ran at half the speed.
                jax.block_until_ready(asm.arrays[p])
                bar.update(ckpt.source_bytes(p) * placement.box_size(box) // math.prod(leaf.shape))
        return asm.result()


__all__ = ["PIECE_BYTES", "load_release", "release_pieces"]
