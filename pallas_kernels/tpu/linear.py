"""One layer's matmul with a stacked weight, read in place (Pallas Mosaic TPU): x [M, K] @ w[layer], w [L, K, N].

Contract: reference.linear (float32 [M, N]; `layer` an int32 scalar, possibly traced, resolved as the reference's
lax.dynamic_index_in_dim resolves it: a negative index counts from the end, then it is clamped into [0, L)).

Why. Under lax.scan over a layer stack, a weight slice w[l] that feeds a custom call is materialised by XLA: each
step copies the layer's K x N weight (read + write) before the kernel reads it again. Here the kernel takes the
whole [L, K, N] stack; `layer` is scalar-prefetched into SMEM and the weight BlockSpec's index map reads it, so the
pipeline DMAs only layer l's blocks from HBM: a decode step reads layer l's bytes exactly once.

Layout and schedule. x is padded (outside the kernel) to Mp rows, a multiple of the row tile BM. Grid
(Mp / BM, N / BN, K / BK), the K steps last:
  x block [BM, BK] at (i, k);  w block (None, BK, BN) at (layer_ref[0], k, j);  out block f32 [BM, BN] at (i, j).
The output block index does not change along k, so it stays in VMEM and is the accumulator: zeroed at k == 0,
`+= x_blk @ w_blk` (float32 accumulation) at every k; it is written back once per (i, j). Semantics: i and j
"parallel" (megacore splits them), k "arbitrary" (a reduction carried across steps).
  BM: rows rounded up to x's sublane tile (16 bf16, 8 f32), at most 256 (more rows: ceil(M / 256) balanced tiles).
  BN: the whole N when N <= 256, else 256 or 128 dividing N (tiling.column_block).
  BK: the whole K, or the largest multiple of 128 dividing K, such that the pipeline buffers
      2 x (x block + w block + out block) fit VMEM_BUDGET_BYTES (24 MiB).
Operands of different dtypes are multiplied in the wider one (cast in VMEM); float32 dots use HIGHEST precision
(tiling.dot_precision), bf16 the MXU's native pass.

Limits (NotImplementedError naming op, limit and shapes; `accepts` says the same without raising): x and w
float32 or bfloat16; N a multiple of 128 or at most 256; K a multiple of 128, or any K whose whole-K blocks fit
the VMEM budget (M3 has no such K: its widths are multiples of 128).

VMEM at M3 widths (K, N in 6144, 8192, 512, 128), 2 x (x + w + out), bf16 (float32 is a test dtype):
  K = 6144 (q: N = 8192; k, v, index_q: N = 512; BN = 256): BK = 6144, w block 3 MiB; 6.4 MiB of buffers at
      decode (BM = 16), 12.5 MiB at BM = 256. index_k (N = 128, BN = 128): w block 1.5 MiB; 3.4 / 9.3 MiB.
  K = 8192 (o: N = 6144): BK = 8192, w block 4 MiB; 8.5 MiB at BM = 16, 16.5 MiB at BM = 256.
  K = 512 / 128: under 1.5 MiB.
  float32 at BM = 8: 12.4 MiB (K = 6144), 16.5 MiB (K = 8192); at BM = 256 BK drops to 3072 / 4096 (12.5 / 16.5).
The scoped-VMEM limit asked of Mosaic is the buffers + 8 MiB (at most 24.5 MiB: fits v5e/v5p/v6e and v7x).

Roofline at batch 1, planned on paper (no TPU has run this kernel; benchmarks/TPU_PLAN.md): the step reads
K * N * itemsize bytes of weight (x and the output are < 0.1% of that); the MXU work is 2 * BM * K * N with
BM = 16 padded rows, 16 flop per weight byte in bf16, far under every chip's ridge (166-560): HBM-bound.
q (6144 x 8192 bf16, 100.7 MB): 123 us on v5e (819 GB/s), 36 us on v5p (2765 GB/s), 61.5 us on v6e (1638 GB/s);
o the same; k / v / index_q (6.3 MB): 7.7 / 2.3 / 3.8 us. Grid steps: N / BN (K whole), 32 for q, each a 3 MiB
DMA (3.8 us on v5e), so the fixed per-step cost (~0.35 us) stays small. The sliced alternative copies the layer (one read, one
write) and then reads the copy: ~3x these bytes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.tpu import _compat as tc
from pallas_kernels.tpu import tiling

f32 = jnp.float32
OP = "tpu.linear"
MAX_BLOCK_M = 256
VMEM_BUDGET_BYTES = 24 * 2**20      # pipeline buffers: 2 x (x block + w block + out block)
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def _itemsize(dtype) -> int:
    return jnp.dtype(dtype).itemsize


def _block_m(m: int, dtype) -> int:
    """Rows per program: ceil(M / 256) balanced tiles, each rounded up to the sublane tile of x's dtype."""
    sub = tiling.SUBLANES[jnp.dtype(dtype)]
    tiles = max(1, -(-m // MAX_BLOCK_M))
    return min(tiling.round_up(-(-max(m, 1) // tiles), sub), MAX_BLOCK_M)


def _vmem_bytes(bm: int, bk: int, bn: int, x_dtype, w_dtype) -> int:
    return 2 * (bm * bk * _itemsize(x_dtype) + bk * bn * _itemsize(w_dtype) + bm * bn * 4)


def _block_k(k: int, bm: int, bn: int, x_dtype, w_dtype) -> int | None:
    """The whole K, else the largest multiple of 128 dividing K, whose buffers fit the budget (None: none)."""
    candidates = [k] + [bk for bk in range(k - k % tiling.LANES, 0, -tiling.LANES) if k % bk == 0 and bk != k]
    for bk in candidates:
        if _vmem_bytes(bm, bk, bn, x_dtype, w_dtype) <= VMEM_BUDGET_BYTES:
            return bk
    return None


def _tiles(m: int, k: int, n: int, x_dtype, w_dtype, shapes) -> tuple[int, int, int]:
    """(BM, BK, BN), or NotImplementedError naming the limit."""
    for name, dt in (("x", x_dtype), ("w", w_dtype)):
        if jnp.dtype(dt) not in _DTYPES:
            raise NotImplementedError(f"{OP}: {name} dtype {jnp.dtype(dt).name} not supported (allowed: float32, "
                                      f"bfloat16); shapes {shapes}")
    try:
        bn = tiling.column_block(n, OP)
    except NotImplementedError as e:
        raise NotImplementedError(f"{e}; shapes {shapes}") from None
    bm = _block_m(m, x_dtype)
    bk = _block_k(k, bm, bn, x_dtype, w_dtype)
    if bk is None:
        raise NotImplementedError(
            f"{OP}: K={k} is not a multiple of {tiling.LANES} and whole-K blocks need "
            f"{_vmem_bytes(bm, k, bn, x_dtype, w_dtype)} bytes of VMEM > {VMEM_BUDGET_BYTES}; shapes {shapes}")
    return bm, bk, bn


def accepts(m: int, k: int, n: int, dtype) -> bool:
    """Whether linear runs x [m, k] @ w[l] with w [L, k, n] and x, w of `dtype` (it raises exactly when not)."""
    try:
        _tiles(m, k, n, dtype, dtype, None)
    except NotImplementedError:
        return False
    return True


def _check_forced(name, forced, size, shapes):
    if forced is None:
        return
    if size % forced or (forced != size and forced % tiling.LANES):
        raise NotImplementedError(f"{OP}: {name}={forced} must divide {size} and be a multiple of "
                                  f"{tiling.LANES} (or the whole {size}); shapes {shapes}")


def _kernel(layer_ref, x_ref, w_ref, o_ref, *, compute_dtype):
    # layer_ref i32[1] (SMEM, used by the index maps); x_ref [BM, BK]; w_ref [BK, BN]; o_ref f32[BM, BN]
    del layer_ref

    @pl.when(pl.program_id(2) == 0)
    def _():
        o_ref[...] = jnp.zeros(o_ref.shape, f32)

    x = x_ref[...].astype(compute_dtype)
    w = w_ref[...].astype(compute_dtype)
    o_ref[...] += jnp.dot(x, w, preferred_element_type=f32, precision=tiling.dot_precision(compute_dtype))


def linear(x_mk, w_lkn, *, layer, interpret: bool = False, block_k: int | None = None,
           block_n: int | None = None):
    """x [M, K] @ w_lkn[layer] (w [L, K, N] read in place), float32 [M, N]; see reference.linear.

    block_k / block_n override the tile choice (each must divide its width and be a multiple of 128 or the whole
    width); for tests and tuning."""
    if x_mk.ndim != 2 or w_lkn.ndim != 3 or x_mk.shape[1] != w_lkn.shape[1] or w_lkn.shape[0] < 1:
        raise ValueError(f"{OP}: expected x [M, K] and w [L >= 1, K, N], got {x_mk.shape} and {w_lkn.shape}")
    m, k = x_mk.shape
    num_layers, _, n = w_lkn.shape
    shapes = f"x {x_mk.dtype.name}{list(x_mk.shape)}, w {w_lkn.dtype.name}{list(w_lkn.shape)}"
    bm, bk, bn = _tiles(m, k, n, x_mk.dtype, w_lkn.dtype, shapes)
    _check_forced("block_k", block_k, k, shapes)
    _check_forced("block_n", block_n, n, shapes)
    bk, bn = block_k or bk, block_n or bn
    if m == 0:
        return jnp.zeros((0, n), f32)
    tiles_m = -(-m // bm)
    xp = jnp.pad(x_mk, ((0, tiles_m * bm - m), (0, 0))) if tiles_m * bm != m else x_mk
    layer = jnp.asarray(layer, jnp.int32)
    layer = jnp.where(layer < 0, layer + num_layers, layer)             # as lax.dynamic_index_in_dim: a negative
    layer_arr = jnp.clip(layer, 0, num_layers - 1).reshape(1)          # index counts from the end, then clamps
    compute_dtype = jnp.promote_types(x_mk.dtype, w_lkn.dtype)
    vmem = _vmem_bytes(bm, bk, bn, x_mk.dtype, w_lkn.dtype)
    out = pl.pallas_call(
        functools.partial(_kernel, compute_dtype=compute_dtype),
        grid_spec=tc.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(tiles_m, n // bn, k // bk),
            in_specs=[pl.BlockSpec((bm, bk), lambda i, j, kk, ly: (i, kk)),
                      pl.BlockSpec((None, bk, bn), lambda i, j, kk, ly: (ly[0], kk, j))],
            out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk, ly: (i, j))),
        out_shape=jax.ShapeDtypeStruct((tiles_m * bm, n), f32),
        compiler_params=tc.compiler_params(3, min(tiling.VMEM_CAP_BYTES, vmem + 8 * 2**20), arbitrary=(2,)),
        interpret=tc.interpret_arg(interpret), name="stacked_linear",
    )(layer_arr, xp, w_lkn)
    return out[:m] if tiles_m * bm != m else out
