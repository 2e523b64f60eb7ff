"""MXFP8 (OCP Microscaling v1.0, blocks of 1x32 along the input dim): E4M3 weights with E8M0 exponent scales.

W[o, i] = float(W_e4m3[o, i]) * 2 ** (S_u8[o, i // 32] - 127). The scale tensor is stored as
`<weight>_scale_inv`; despite the name it multiplies.

Special values (OCP MX spec): E8M0 byte 255 is NaN, so every weight of its block dequantises to NaN; bytes 0 and
254 are the ordinary extremes 2**-127 (a float32 subnormal, kept exactly) and 2**127. E4M3 (the "fn" variant) has
no infinities; bytes 0x7F / 0xFF are NaN. The product is computed exactly in float32 (an E4M3 value has 4
significant bits and the scale is a power of two, so the product is exact unless it overflows to inf) and rounded
once to the output dtype: the result is bit-identical to float64 math followed by one cast.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

BLOCK = 32
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
E4M3_MAX = 448.0
SCALE_NAN = 255                      # E8M0 NaN encoding

# Lookup tables: every E4M3 byte and every E8M0 byte as float32 (exact).
_E4M3_F32 = np.arange(256, dtype=np.uint8).view(E4M3).astype(np.float32)
with np.errstate(over="ignore"):
    _E8M0_F32 = np.ldexp(np.float32(1.0), np.arange(256, dtype=np.int32) - 127).astype(np.float32)
_E8M0_F32[SCALE_NAN] = np.nan


def scale_shape(shape: tuple[int, int]) -> tuple[int, int]:
    """The [O, ceil(I/32)] shape of the E8M0 scales of an [O, I] weight."""
    o, i = shape
    return (o, -(-i // BLOCK))


def dequantize(w_e4m3: np.ndarray, scale_u8: np.ndarray, out_dtype=np.float32) -> np.ndarray:
    """[O, I] e4m3 and [O, ceil(I/32)] uint8 exponents -> [O, I] out_dtype (see the module docstring)."""
    if w_e4m3.ndim != 2:
        raise ValueError(f"MXFP8 weight must be 2-D [out, in], got shape {list(w_e4m3.shape)}")
    o, i = w_e4m3.shape
    if tuple(scale_u8.shape) != scale_shape((o, i)):
        raise ValueError(f"MXFP8 scale must be {list(scale_shape((o, i)))} for a [{o}, {i}] weight, "
                         f"got {list(scale_u8.shape)}")
    nb = scale_u8.shape[1]
    w = np.zeros((o, nb * BLOCK), np.float32) if i % BLOCK else np.empty((o, i), np.float32)
    np.take(_E4M3_F32, np.asarray(w_e4m3).view(np.uint8), out=w[:, :i])
    s = np.take(_E8M0_F32, np.asarray(scale_u8, np.uint8))
    w3 = w.reshape(o, nb, BLOCK)
    with np.errstate(over="ignore", invalid="ignore"):
        w3 *= s[:, :, None]
        return w[:, :i].astype(out_dtype, copy=False)


def quantize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[O, I] float -> (e4m3 [O, I], uint8 exponents [O, I/32]): the smallest power-of-two scale per block
    that keeps the block's max magnitude within E4M3's range (what MXFP8 checkpoints store)."""
    o, i = w.shape
    if i % BLOCK:
        raise ValueError(f"MXFP8 needs the input dim to be a multiple of {BLOCK}, got {i}")
    blocks = w.astype(np.float32).reshape(o, i // BLOCK, BLOCK)
    amax = np.abs(blocks).max(-1)
    exp = np.where(amax > 0, np.ceil(np.log2(np.maximum(amax, 1e-38) / E4M3_MAX)), 0).astype(np.int32)
    exp = np.clip(exp, -127, 127)
    q = (blocks / np.ldexp(np.float32(1.0), exp)[..., None]).reshape(o, i).astype(E4M3)
    return q, (exp + 127).astype(np.uint8)
