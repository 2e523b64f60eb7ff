"""MXFP8 (OCP microscaling, blocks of 1x32 along the input dim): E4M3 weights with E8M0 exponent scales.

W[o, i] = float(W_e4m3[o, i]) * 2 ** (S_u8[o, i // 32] - 127). The scale tensor is stored as
`<weight>_scale_inv`; despite the name it multiplies.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

BLOCK = 32
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
E4M3_MAX = 448.0


def dequantize(w_e4m3: np.ndarray, scale_u8: np.ndarray, out_dtype=np.float32) -> np.ndarray:
    """[O, I] e4m3 and [O, I/32] uint8 exponents -> [O, I] out_dtype (exact in float32)."""
    o, i = w_e4m3.shape
    if scale_u8.shape != (o, -(-i // BLOCK)):
        raise ValueError(f"MXFP8 scale must be [{o}, {-(-i // BLOCK)}] for a [{o}, {i}] weight, got {list(scale_u8.shape)}")
    scale = np.ldexp(np.float32(1.0), scale_u8.astype(np.int32) - 127).astype(np.float32)   # exact 2**e
    w = w_e4m3.astype(np.float32)
    w = w * np.repeat(scale, BLOCK, axis=1)[:, :i]
    return w.astype(out_dtype)


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
