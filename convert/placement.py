"""Placing parameters onto devices piece by piece: shardings, pieces, and the on-device assembler.

A parameter is placed as one or more *pieces* (boxes cut along its leading axes, e.g. a few layers of a stacked
parameter). Each piece is created with `jax.make_array_from_callback` (every device reads only its own slice)
or restored from Orbax, and written into the full sharded array with a donated `dynamic_update_slice`, so the
host holds at most one piece's local slices and the devices one piece beyond the parameters.

Shardings are pluggable: `shardings` maps a parameter path to a `NamedSharding` (or a `PartitionSpec` for the
given mesh), or is a callable `(path, shape) -> NamedSharding | PartitionSpec | None`; paths it does not cover
get `default_spec`: the partition rules of `m3jax.sharding` (heads on "model", experts over every device,
vocabulary split) on a ("data", "model") mesh, or experts-only placement on a mesh with other axis names.
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
from typing import Callable, Mapping, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from m3jax.params import abstract_params  # noqa: F401  (the converter's callers use it from here)

Box = tuple[tuple[int, int], ...]
ShardingsArg = Union[None, Mapping[str, Union[NamedSharding, P]],
                     Callable[[str, tuple[int, ...]], Union[NamedSharding, P, None]]]
EXPERT_SUFFIXES = ("gate_edf", "up_edf", "down_efd",     # [layer, expert, ...] routed-expert weights
                   "gate_scale_ebf", "up_scale_ebf", "down_scale_ebd")   # and their MXFP8 exponents


def default_spec(path: str, shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> P:
    """`m3jax.sharding.param_spec` on a ("data", "model") mesh; on other meshes routed experts over every mesh
    axis (or the largest single axis that divides) and the rest replicated."""
    from m3jax import sharding

    if tuple(mesh.axis_names) == (sharding.DATA, sharding.MODEL):
        return sharding.param_spec(path, shape, mesh)
    if path.endswith(EXPERT_SUFFIXES) and len(shape) >= 2:
        e = shape[1]
        names = tuple(n for n in mesh.axis_names if mesh.shape[n] > 1)
        if names and e % math.prod(mesh.shape[n] for n in names) == 0:
            return P(None, names if len(names) > 1 else names[0])
        for n in sorted(names, key=lambda n: -mesh.shape[n]):
            if e % mesh.shape[n] == 0:
                return P(None, n)
    return P()


def resolve_shardings(paths_shapes: Mapping[str, tuple[int, ...]], mesh: jax.sharding.Mesh | None,
                      shardings: ShardingsArg = None) -> dict[str, jax.sharding.Sharding]:
    """The sharding of every parameter: `shardings` where it says, else `default_spec` (one device if no mesh)."""
    out = {}
    for path, shape in paths_shapes.items():
        s = None
        if callable(shardings):
            s = shardings(path, shape)
        elif shardings is not None:
            s = shardings.get(path)
        if isinstance(s, P):
            if mesh is None:
                raise ValueError(f"shardings[{path!r}] is a PartitionSpec, which needs a mesh")
            s = NamedSharding(mesh, s)
        if s is None:
            s = (NamedSharding(mesh, default_spec(path, shape, mesh)) if mesh is not None
                 else jax.sharding.SingleDeviceSharding(jax.devices()[0]))
        if not isinstance(s, jax.sharding.Sharding):
            raise TypeError(f"shardings[{path!r}] must be a NamedSharding or PartitionSpec, got {type(s).__name__}")
        out[path] = s
    return out


def piece_sharding(sharding: jax.sharding.Sharding, shape: tuple[int, ...], box: Box) -> jax.sharding.Sharding:
    """The sharding of a piece: the parameter's, except that an axis the piece cuts stays sharded only if the
    piece's extent divides by its mesh size (else it is replicated; the on-device update reshards either way)."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    out = []
    for (a, b), n, s in zip(box, shape, spec):
        size = math.prod(sharding.mesh.shape[x] for x in (s if isinstance(s, tuple) else (s,))) if s else 1
        out.append(s if (b - a) == n or (b - a) % size == 0 else None)
    if out == spec:
        return sharding
    return NamedSharding(sharding.mesh, P(*out))


def leading_pieces(shape: tuple[int, ...], itemsize: int, budget: int, axis_order: tuple[int, ...]) -> list[Box]:
    """Boxes covering `shape`, each at most `budget` bytes where possible, cut along the axes of `axis_order`
    in turn (an axis is cut only when a single index of the axes before it still exceeds the budget)."""
    full = [(0, n) for n in shape]
    total = math.prod(shape) * itemsize
    if total <= budget or not axis_order:
        return [tuple(full)]
    boxes: list[Box] = []

    def rec(fixed: dict[int, tuple[int, int]], level: int):
        ax = axis_order[level]
        rest = math.prod(n for i, n in enumerate(shape) if i != ax and i not in fixed) * itemsize
        step = max(1, budget // max(rest, 1))
        for a in range(0, shape[ax], step):
            f = dict(fixed)
            f[ax] = (a, min(a + step, shape[ax]))
            if step == 1 and rest > budget and level + 1 < len(axis_order):
                rec(f, level + 1)
            else:
                boxes.append(tuple(f.get(i, full[i]) for i in range(len(shape))))

    rec({}, 0)
    return boxes


def box_size(box: Box) -> int:
    return math.prod(b - a for a, b in box)


@functools.lru_cache(maxsize=None)
def _zeros_fn(shape, dtype, sharding):
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _update_fn(sharding, inverse: tuple[int, ...]):
    def update(full, piece, starts):
        piece = jnp.transpose(piece, inverse).astype(full.dtype)
        return jax.lax.dynamic_update_slice(full, piece, tuple(starts))
    return jax.jit(update, out_shardings=sharding, donate_argnums=0)


@functools.lru_cache(maxsize=None)
def _whole_fn(sharding, inverse: tuple[int, ...], dtype):
    return jax.jit(lambda x: jnp.transpose(x, inverse).astype(dtype), out_shardings=sharding)


def permute_sharding(sharding: jax.sharding.Sharding, perm: tuple[int, ...]) -> jax.sharding.Sharding:
    """The sharding of `x.transpose(perm)` when x has `sharding`."""
    if not isinstance(sharding, NamedSharding) or list(perm) == sorted(perm):
        return sharding
    spec = list(sharding.spec) + [None] * (len(perm) - len(sharding.spec))
    return NamedSharding(sharding.mesh, P(*[spec[i] for i in perm]))


class Assembler:
    """Collects pieces into full sharded parameters; checks at the end that every element was written."""

    def __init__(self, targets: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                 shardings: Mapping[str, jax.sharding.Sharding]):
        self.targets, self.shardings = targets, shardings
        self.arrays: dict[str, jax.Array] = {}
        self.filled: dict[str, int] = {}

    def add(self, path: str, box: Box, piece: jax.Array, perm: tuple[int, ...] | None = None) -> None:
        """Write `piece` = param[box] (or, with `perm`, param[box].transpose(perm): transposed on device)."""
        shape, dtype = self.targets[path]
        sharding = self.shardings[path]
        inverse = tuple(int(i) for i in np.argsort(perm)) if perm is not None else tuple(range(len(shape)))
        if box_size(box) == math.prod(shape):
            if piece.dtype != dtype or piece.sharding != sharding or inverse != tuple(range(len(shape))):
                piece = _whole_fn(sharding, inverse, jnp.dtype(dtype))(piece)
            self.arrays[path] = piece
        else:
            if path not in self.arrays:
                self.arrays[path] = _zeros_fn(tuple(shape), jnp.dtype(dtype), sharding)()
            starts = jnp.asarray([a for a, _ in box], jnp.int32)
            self.arrays[path] = _update_fn(sharding, inverse)(self.arrays[path], piece, starts)
        self.filled[path] = self.filled.get(path, 0) + box_size(box)

    def result(self) -> dict[str, jax.Array]:
        for path, (shape, _) in self.targets.items():
            if self.filled.get(path, 0) != math.prod(shape):
                raise RuntimeError(f"parameter {path} was filled with {self.filled.get(path, 0)} of "
                                   f"{math.prod(shape)} elements")
        return self.arrays


def make_piece(read: Callable[[Box], np.ndarray], box: Box, sharding: jax.sharding.Sharding,
               max_threads: int = 8) -> jax.Array:
    """A device array of parameter[box] with `jax.make_array_from_callback`: each device's callback reads only
    its own slice; identical slices (replicated axes) are read once, distinct ones by up to `max_threads`
    threads at a time (positional reads release the GIL)."""
    offset = [a for a, _ in box]
    shape = tuple(b - a for a, b in box)

    def key(index):
        return tuple(s.indices(n)[:2] for s, n in zip(index, shape))

    def read_local(local):
        return read(tuple((o + a, o + b) for o, (a, b) in zip(offset, local)))

    slices = sorted({key(i) for i in sharding.addressable_devices_indices_map(shape).values()})
    if len(slices) > 1 and max_threads > 1:
        with concurrent.futures.ThreadPoolExecutor(min(max_threads, len(slices))) as pool:
            memo = dict(zip(slices, pool.map(read_local, slices)))
    else:
        memo = {s: read_local(s) for s in slices}
    arr = jax.make_array_from_callback(shape, sharding, lambda index: memo[key(index)])
    memo.clear()
    return arr
