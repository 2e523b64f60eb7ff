"""Shape checks and tile choices shared by the TPU kernels; tuned numbers live here as data.

TPU tiling facts every constraint below comes from (Mosaic TPU, v5e/v5p/v6e):
  * a vreg is 8 sublanes x 128 lanes of 32 bit; bf16 packs 16 rows per sublane tile, so a bf16 array in VMEM
    is tiled (16, 128) and a f32 one (8, 128);
  * the MXU contracts over the lane dimension of both operands: H (attention) and I (index) are the lane
    dims of q/k/v and iq/ik tiles, so they must be multiples of 128 for dense MXU feeds and unmasked
    loads/stores;
  * a DMA of one page [R, X] from HBM into a VMEM buffer writes whole sublane tiles, so R must be a
    multiple of the sublane tile of the dtype (8 for f32, 16 for bf16);
  * a block's trailing two dims must be multiples of (8, 128) or equal the array's dims: the row tiles are
    rounded to multiples of 8 and the small trailing dims (C, 1) are whole-array dims.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

LANES = 128
SUBLANES = {jnp.dtype(jnp.float32): 8, jnp.dtype(jnp.bfloat16): 16, jnp.dtype(jnp.float8_e4m3fn): 32}

# Target rows (query tokens x heads that share one KV/index stream) per program. Tuning data, not logic:
# see benchmarks/TPU_PLAN.md for why (arithmetic intensity of a page = rows flop/byte; ridge ~240 on v5e).
ATTENTION_TARGET_ROWS = 256
INDEXER_TARGET_ROWS = 256
PAGE_DMA_SLOTS = 4                      # page buffers per stream: pages prefetched = slots - 1
INDEXER_SCORES_VMEM_BYTES = 8 * 2**20   # the [rows, M] f32 block-score scratch of the indexer
VMEM_CAP_BYTES = 100 * 2**20            # never ask Mosaic for more scoped VMEM than this


def check_dtype(name, x, allowed=(jnp.float32, jnp.bfloat16)):
    if jnp.dtype(x.dtype) not in [jnp.dtype(a) for a in allowed]:
        raise NotImplementedError(f"{name}: dtype {x.dtype} not supported here (allowed: "
                                  f"{', '.join(jnp.dtype(a).name for a in allowed)})")


def check_lanes(op, name, size, shapes):
    if size % LANES:
        raise NotImplementedError(
            f"{op}: {name}={size} must be a multiple of {LANES} (TPU lane width: it is the lane dim of the "
            f"VMEM tiles and the MXU contraction dim); shapes {shapes}")


def check_page_rows(op, r, dtype, shapes):
    sub = SUBLANES[jnp.dtype(dtype)]
    if r % sub:
        raise NotImplementedError(
            f"{op}: page rows R={r} must be a multiple of {sub} for {jnp.dtype(dtype).name} (a page DMA "
            f"writes whole ({sub}, 128) VMEM tiles); shapes {shapes}")


def row_tile(num_tokens: int, heads_per_token: int, target_rows: int) -> int:
    """Tokens per program: rows = tokens * heads_per_token is a multiple of 8 and close to target_rows;
    never more tokens than needed to cover num_tokens (rounded up to the row granule)."""
    step = 8 // math.gcd(heads_per_token, 8)            # tokens per 8-row granule
    want = max(step, (target_rows // heads_per_token) // step * step)
    have = -(-num_tokens // step) * step
    return min(want, have)


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def column_block(width: int, op: str) -> int:
    """Output columns per program: the whole width when it is at most 256 (a block dim equal to the array's dim
    is always legal), else 256 or 128 dividing it (lane-dense stores, MXU-width feeds). Raises
    NotImplementedError naming `op` otherwise."""
    if width <= 256:
        return width
    for bn in (256, 128):
        if width % bn == 0:
            return bn
    raise NotImplementedError(f"{op}: output width {width} must be a multiple of {LANES} (or at most 256)")


def dot_precision(dtype):
    """HIGHEST for float32 operands (the MXU's default is one bf16 pass, which float32 tests must not get);
    the default (native) pass for bf16 / fp8."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None
