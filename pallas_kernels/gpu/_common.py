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


MIN_TILE = 16               # triton's dot needs >= 16 along every dimension


def tile(size: int) -> int:
    """The triton tile for a dimension: the next power of two, at least MIN_TILE (operands are zero-padded)."""
    return max(MIN_TILE, next_pow2(size))


def dot_precision(dtype):
    """float32 inputs get full-precision dots (triton would otherwise use tf32)."""
    import jax
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


SMEM_BYTES = 232448         # Hopper: the most shared memory one program may use (the limit triton reports)


def pipeline_stages(wanted: int, *, per_stage: int, fixed: int) -> int:
    """The most software-pipeline stages (<= wanted, >= 1) whose buffers fit shared memory.

    per_stage: bytes one stage of streamed operands takes (e.g. a K and a V page); fixed: bytes resident for the
    whole program (the query tile). float32 pages of 128 x 128 need two 64 KiB buffers per stage: two stages
    plus a 128-row query tile (327,680 bytes) exceed the limit, which bf16 does not.
    """
    stages = wanted
    while stages > 1 and fixed + stages * per_stage > SMEM_BYTES:
        stages -= 1
    return stages
