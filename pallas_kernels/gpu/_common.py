"""Shape checks and small helpers shared by the GPU kernels."""

from __future__ import annotations

import jax.numpy as jnp

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
NUM_SMS_HINT = 132          # H100 / H200; only used to size split-K so that a launch fills the chip


def is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def require(cond: bool, op: str, what: str, shapes: dict) -> None:
    """Raise NotImplementedError naming the op, the limit and every shape when `cond` is false."""
    if not cond:
        desc = ", ".join(f"{k}={v}" for k, v in shapes.items())
        raise NotImplementedError(f"gpu.{op}: {what} (got {desc})")


def check_dtype(op: str, x, name: str) -> None:
    require(any(x.dtype == d for d in SUPPORTED_DTYPES), op, f"{name} must be float32/bfloat16/float16",
            {f"{name}.dtype": x.dtype})


def check_tile(op: str, size: int, name: str, interpret: bool, shapes: dict) -> None:
    """Triton tiles must be powers of two, and dot operands at least 16 wide on the GPU."""
    require(is_pow2(size), op, f"{name} must be a power of two", shapes)
    require(interpret or size >= 16, op, f"{name} must be >= 16 on the GPU (triton dot)", shapes)


def dot_precision(dtype):
    """float32 inputs get full-precision dots (triton would otherwise use tf32)."""
    import jax
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
