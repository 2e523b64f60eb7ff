"""Version-specific Pallas imports for the GPU kernels, in one place (jax 0.10.2 on CPU, 0.11.2 on GPU)."""

from __future__ import annotations

from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton


def compiler_params(num_warps: int, num_stages: int):
    """Triton compiler parameters; the class name moved between releases (TritonCompilerParams -> CompilerParams)."""
    cls = getattr(pl_triton, "CompilerParams", None) or getattr(pl_triton, "TritonCompilerParams")
    return cls(num_warps=num_warps, num_stages=num_stages)


def whole_array():
    """A BlockSpec whose ref is the whole operand (page pools, page tables: indexed inside the kernel)."""
    return getattr(pl, "no_block_spec", None) or pl.BlockSpec()


def masked_store(ref, value, mask):
    """Store where mask is true (rows of a gathered tile that exist); pl_triton.store on both releases."""
    return pl_triton.store(ref, value, mask=mask)
