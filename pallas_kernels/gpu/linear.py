"""One layer's matmul with a stacked weight, read in place, on NVIDIA GPUs (Triton-lowered Pallas).

linear: y = x @ w[layer], float32 [M, N], with x [M, K] and the stack w [L, K, N] (reference.linear has the
contract). `layer` is an int32 scalar, possibly traced (the step of a lax.scan over the layer stack).

Why. Under lax.scan XLA materialises the step's slice w[l] of every scanned weight before its matmul: a memcpy of
each layer's weights on every step (37% of a batch-1 decode step of the scaled M3 on the H200). Here the whole
stack is one operand (whole_array(): no BlockSpec, so XLA slices nothing) and the kernel indexes
w_ref[layer, k-range, n-range] with the layer read from an int32[1] operand: nothing is copied, and each weight
byte of the layer is read once.

Schedule. Grid (row tiles, column blocks, K splits), row tiles fastest (the row tiles of one column block share
its weight tile in L2). x's rows are zero-padded outside the kernel to a multiple of BM. Program (i, j, s) takes
rows [i BM, (i+1) BM), columns [j BN, (j+1) BN) and split s of K (K/S contiguous inputs); it streams x and
w[layer] over its K range in BK steps (a fori_loop; Triton pipelines the loads over num_stages), accumulates
[BM, BN] in float32 registers and writes its partial product to block (s, i, j) of a float32 [S, Mpad, N]
output. The S partials are summed by XLA afterwards (deterministic: no atomics) and the padded rows dropped.
Decode steps (M <= 64) are bound by the weight's bytes: K splits and narrow column blocks make enough programs
(about 4/3 per SM, cm.NUM_SMS_HINT) that a batch-1 step still streams the layer at the copy rate.

Layer: must lie in [0, L); out of range is the caller's bug. It is clamped (jnp.clip) outside the kernel so that
the kernel never reads outside the stack and agrees with the reference (lax.dynamic_index_in_dim clamps too).

Limits (NotImplementedError via cm.require, naming the shapes; `accepts` says the same without running):
  - x and w of one dtype, float32 / bfloat16 / float16 (float32 dots at HIGHEST precision, never TF32); w 3-D,
    x 2-D with x.shape[1] == K; M >= 1.
  - K and N multiples of 16: Triton's dot needs tiles >= 16 along every dimension. The requested tiles are
    halved until they divide the shape (_fit: BN divides N, S divides K into multiples of 16, BK divides K/S),
    so every such K, N is accepted; BM a power of two >= 16.
  - shared memory: the pipeline stages are cut (cm.pipeline_stages) so that stages x (BM x BK + BK x BN) tiles
    fit Hopper's 227 KiB.
Offsets: Pallas' Triton lowering computes element offsets in int64 only when the whole operand has more than
2**32 bytes, else in signed int32 (gpu/moe.py's docstring has the details). A 2- or 4-byte stack with more than
2**31 elements has more than 2**32 bytes, so its offsets are int64 (M3: 45 x 6144 x 8192 bf16 = 4.5 GB), and
one with at most 2**31 elements fits int32: no wrap. Only 1-byte dtypes could wrap, and they are refused.

Tiles: default_tiles, from H200 sweeps (`benchmarks/stacked_linear.py --sweep`; default_tiles' docstring).
Measured (H200, bf16, per layer inside a lax.scan over an 8-layer stack): a batch-1 decode step's q / o / dense
MLP matmuls in 1.0-1.1x the copy-rate bound of the layer's weight bytes, against 3.0-3.2x for XLA's slice then
dot, and 0.9-1.0x for XLA on a separate per-layer array (no copy).
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import moe_plan
from pallas_kernels.gpu import _common as cm
from pallas_kernels.gpu._compat import compiler_params, whole_array

f32 = jnp.float32
MIN_SPLIT_K = 256           # default_tiles splits K no finer than this many inputs per program
MAX_SPLIT_K = 4096          # ... and no coarser (H200: one 6144-long K loop per program was 10-30% slower)
MAX_SPLITS = 32


@dataclasses.dataclass(frozen=True)
class LinearTiles:
    """Tile sizes and Triton launch parameters (benchmarks/stacked_linear.py --sweep tunes them)."""
    block_m: int            # rows per tile (a power of two >= 16; x is padded to a multiple)
    block_n: int            # output columns per program
    block_k: int            # K step of the loop
    k_splits: int           # programs along K (partials summed outside the kernel)
    num_warps: int
    num_stages: int


def _fit(block: int, size: int) -> int:
    """The largest power of two <= block dividing size (>= 16), or 0."""
    b = block
    while b >= 16 and size % b:
        b //= 2
    return b if b >= 16 else 0


def _fit_splits(splits: int, k: int) -> int:
    """The largest power of two <= splits that cuts K into pieces that are multiples of 16 (at least 1)."""
    s = 1 << (max(1, splits).bit_length() - 1)
    while s > 1 and k % (16 * s):
        s //= 2
    return s


def fit_tiles(k: int, n: int, tiles: LinearTiles) -> LinearTiles | None:
    """The tiles linear_tuned runs for K = k, N = n when asked for `tiles` (halved until they divide the shape),
    or None when no tile fits (K or N not a multiple of 16, or block_m not a power of two >= 16)."""
    if not (cm.is_pow2(tiles.block_m) and tiles.block_m >= 16) or k % 16 or n % 16 or k <= 0 or n <= 0:
        return None
    bn = _fit(tiles.block_n, n)
    s = _fit_splits(tiles.k_splits, k)
    bk = _fit(tiles.block_k, k // s)
    if not (bn and bk):
        return None
    return dataclasses.replace(tiles, block_n=bn, block_k=bk, k_splits=s)


def default_tiles(m: int, k: int, n: int, dtype) -> LinearTiles:
    """Tiles from H200 sweeps of benchmarks/stacked_linear.py --sweep (q, o, k/v at rows 1..256, shared expert at
    32 / 64; 2026-12-01); widths not swept (index k, dense MLP) follow the same rules and are first guesses.

    M <= 64 (decode, small chunks): the weight's bytes bound the step. BM = the rows rounded up to a power of two,
    at least 16 (the smallest Triton dot) and at most 64, so each weight tile is read by one program. BM 16: BN 64,
    BK 128; BM 32 / 64: BN 128, BK 64 (float32: BK 64). Then K splits (powers of two) until each program's K
    range is at most MAX_SPLIT_K and the launch has >= 176 programs (4/3 per SM; 128-256 were best), each split
    at least MIN_SPLIT_K long, and narrower column blocks (down to 32) where that is not enough. At M3 widths,
    bf16, M = 1: q 6144 -> 8192: 128 column blocks x 2 splits; o 8192 -> 6144: 96 x 2; k / v / index q
    6144 -> 512: 16 x 16 (BN 32); shared expert 6144 -> 3072: 48 x 4; M = 32: q 64 x 4, o 48 x 4, shared
    gate / up 24 x 8.
    64 < M <= 256: BM 64 (M <= 128) or 128 (8 warps, 3 stages), BN 128 (down to 64), BK 64, splits as above
    (sweeps at 128 / 256 rows: within 5% of the best), capped so that the float32 partials (S x Mpad x N) stay
    under a quarter of the weight's bytes (M = 256, K = 6144: 2).
    Measured (H200, bf16, L = 8, per layer inside a scan; benchmarks/stacked_linear.py): q / o / dense MLP at
    1-64 rows in 1.0-1.2x the copy-rate bound (XLA's slice + dot: 3.0-3.2x; XLA on a separate per-layer array:
    0.9-1.1x), 256 rows 1.7-1.8x (XLA slice 3.2x); the 38 MB shared-expert matrices 1.6-1.8x (noisy run to run);
    the 6 MB and smaller matrices (k, v, index) are bound by fixed costs (10-35 us), as are both XLA paths."""
    itemsize = jnp.dtype(dtype).itemsize
    if m <= 64:
        bm = min(64, max(16, cm.next_pow2(m)))
        tiles = LinearTiles(bm, 64, 128, 1, 4, 4) if bm == 16 else LinearTiles(bm, 128, 64, 1, 4, 4)
        if itemsize > 2:
            tiles = dataclasses.replace(tiles, block_k=64)
    elif m <= 128:
        tiles = LinearTiles(64, 128, 64, 1, 4, 4)
    else:
        tiles = LinearTiles(128, 128, 64, 1, 8, 3)
    target = cm.NUM_SMS_HINT * 4 // 3          # programs: 176 on 132 SMs (H200 sweeps: 128-256 were best)
    rows = cm.cdiv(max(m, 1), tiles.block_m)
    mpad = rows * tiles.block_m
    # the float32 partials (S x Mpad x N, written then summed) stay under a quarter of the weight's bytes
    max_splits = min(MAX_SPLITS, max(1, k * itemsize // (16 * mpad)))
    min_bn = 32 if m <= 64 else 64
    bn = _fit(tiles.block_n, n) or tiles.block_n
    while True:
        cols = max(1, n // bn)
        s = 1
        while ((rows * cols * s < target or k // s > MAX_SPLIT_K) and 2 * s <= max_splits
               and k % (2 * s * 16) == 0 and k // (2 * s) >= MIN_SPLIT_K):
            s *= 2
        narrower = _fit(bn // 2, n)
        if rows * cols * s >= target or narrower < min_bn:
            break
        bn = narrower
    return dataclasses.replace(tiles, block_n=bn, k_splits=s)


def _plan(op_shapes: dict, m: int, k: int, n: int, dtype, tiles: LinearTiles | None) -> LinearTiles:
    """The fitted tiles for these inputs, or NotImplementedError naming the shapes."""
    cm.require(any(jnp.dtype(dtype) == d for d in cm.SUPPORTED_DTYPES), "linear",
               "x and w must be float32/bfloat16/float16", op_shapes)
    cm.require(m >= 1, "linear", "x needs at least one row", op_shapes)
    cm.require(k % 16 == 0 and n % 16 == 0 and k > 0 and n > 0, "linear",
               "K and N must be multiples of 16 (Triton tiles)", op_shapes)
    tiles = tiles or default_tiles(m, k, n, dtype)
    fitted = fit_tiles(k, n, tiles)
    cm.require(fitted is not None, "linear", "block_m must be a power of two >= 16",
               dict(op_shapes, tiles=tiles))
    return fitted


def accepts(m: int, k: int, n: int, dtype) -> bool:
    """Whether linear runs x [m, k] @ w[layer] of a stack [L, k, n] of `dtype` (else it raises
    NotImplementedError)."""
    try:
        _plan({"M": m, "K": k, "N": n, "dtype": jnp.dtype(dtype)}, m, k, n, dtype, None)
    except (NotImplementedError, TypeError):
        return False
    return True


def _kernel(layer_ref, x_ref, w_ref, o_ref, *, block_m, block_n, block_k, num_k, split_k):
    # layer_ref i32[1]; x_ref [Mpad, K] (whole); w_ref [L, K, N] (whole: the stack, read in place);
    # o_ref f32[BM, BN]: block (s, i, j) of the [S, Mpad, N] partial products
    i, j, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layer = layer_ref[0]
    row0, n0, k_base = i * block_m, j * block_n, s * split_k

    def body(kk, acc):
        k0 = pl.multiple_of(k_base + kk * block_k, block_k)
        x = x_ref[pl.ds(row0, block_m), pl.ds(k0, block_k)]                       # [BM, BK]
        w = w_ref[layer, pl.ds(k0, block_k), pl.ds(n0, block_n)]                  # [BK, BN]
        return acc + jnp.dot(x, w, preferred_element_type=f32, precision=cm.dot_precision(x.dtype))

    o_ref[...] = lax.fori_loop(0, num_k, body, jnp.zeros((block_m, block_n), f32))


def linear(x_mk, w_lkn, *, layer, interpret: bool = False):
    """x @ w_lkn[layer], float32 [M, N] (reference.linear), with default_tiles."""
    m = x_mk.shape[0] if x_mk.ndim else 0
    k, n = (w_lkn.shape[-2], w_lkn.shape[-1]) if w_lkn.ndim >= 2 else (0, 0)
    return linear_tuned(x_mk, w_lkn, layer=layer, tiles=default_tiles(m, k, n, w_lkn.dtype), interpret=interpret)


def linear_tuned(x_mk, w_lkn, *, layer, tiles: LinearTiles, interpret: bool = False):
    """linear with explicit tiles (fitted to the shape: fit_tiles); see the module docstring."""
    shapes = {"x": tuple(x_mk.shape), "w": tuple(w_lkn.shape), "x.dtype": jnp.dtype(x_mk.dtype),
              "w.dtype": jnp.dtype(w_lkn.dtype)}
    cm.require(w_lkn.ndim == 3, "linear", "w must be a stack [L, K, N]", shapes)
    cm.require(x_mk.ndim == 2 and x_mk.shape[1] == w_lkn.shape[1], "linear", "x must be [M, K] with w's K",
               shapes)
    cm.require(x_mk.dtype == w_lkn.dtype, "linear", "x and w must have the same dtype", shapes)
    num_layers, k, n = w_lkn.shape
    m = x_mk.shape[0]
    tl = _plan(shapes, m, k, n, w_lkn.dtype, tiles)
    bm, bn, bk, s = tl.block_m, tl.block_n, tl.block_k, tl.k_splits
    mpad = cm.cdiv(m, bm) * bm
    x = jnp.pad(x_mk, ((0, mpad - m), (0, 0))) if mpad != m else x_mk
    layer_arr = jnp.clip(jnp.asarray(layer, jnp.int32), 0, num_layers - 1).reshape(1)
    itemsize = jnp.dtype(w_lkn.dtype).itemsize
    stages = cm.pipeline_stages(tl.num_stages, per_stage=(bm * bk + bk * bn) * itemsize, fixed=0)
    kernel = functools.partial(_kernel, block_m=bm, block_n=bn, block_k=bk, num_k=k // s // bk, split_k=k // s)
    # inside a shard_map with its varying-axes check on, the operands must say that they vary together
    operands = moe_plan.vary_together((layer_arr, x, w_lkn))
    whole = whole_array()
    out = pl.pallas_call(
        kernel, grid=(mpad // bm, n // bn, s),
        in_specs=[whole] * 3,
        out_specs=pl.BlockSpec((None, bm, bn), lambda i, j, kk: (kk, i, j)),
        out_shape=moe_plan.out_struct((s, mpad, n), f32, operands[1]),
        compiler_params=compiler_params(num_warps=tl.num_warps, num_stages=stages),
        interpret=interpret, name="stacked_linear",
    )(*operands)
    y = out[0] if s == 1 else out.sum(0)
    return y[:m] if mpad != m else y
