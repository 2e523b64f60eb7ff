"""The one place where the TPU kernels touch version-sensitive Pallas names (jax 0.10.2 .. 0.11.x).

Every name used here exists with the same meaning in jax 0.10.2 and 0.11.x: `pl.ANY` (an operand left in
HBM for manual DMA), `pltpu.VMEM` / `pltpu.SMEM` memory spaces, `pltpu.SemaphoreType.DMA`,
`pltpu.PrefetchScalarGridSpec`, `pltpu.CompilerParams` and `pltpu.InterpretParams`.
"""

from __future__ import annotations

from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

ANY = pl.ANY
VMEM = pltpu.VMEM
SMEM = pltpu.SMEM
DMA = pltpu.SemaphoreType.DMA
PrefetchScalarGridSpec = pltpu.PrefetchScalarGridSpec
make_async_copy = pltpu.make_async_copy


def interpret_arg(interpret: bool):
    """What pallas_call's `interpret=` gets: the TPU interpreter (checks DMAs, semaphores, bounds) or off."""
    if not isinstance(interpret, bool):
        raise TypeError(f"interpret must be a bool, got {interpret!r}")
    return pltpu.InterpretParams() if interpret else False


def compiler_params(num_grid_dims: int, vmem_bytes: int, *, arbitrary: tuple[int, ...] = ()):
    """By default every grid axis is independent (each program re-initialises its scratch), so all are
    'parallel': on v4/v5p megacore the outer axes are split between the two TensorCores. The axes listed in
    `arbitrary` carry state from one step to the next (a reduction accumulating into its output block) and
    are 'arbitrary': run in order on one core."""
    semantics = tuple("arbitrary" if d in arbitrary else "parallel" for d in range(num_grid_dims))
    return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=int(vmem_bytes))
