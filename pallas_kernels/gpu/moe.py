"""Fused MoE experts on NVIDIA GPUs (Triton-lowered Pallas): bf16 or MXFP8 weights read as stored.

moe: out[t] = sum_j combine[t, j] * down_e(swiglu_oai(x[t] @ gate_e, x[t] @ up_e)), e = ids[t, j]
(reference.moe has the exact contract and layouts).

Schedule. The routing plan (pallas_kernels/moe_plan.py) sorts the T*k slots by expert and pads each expert's
rows to the row tile BM; tile i belongs to expert tile_expert[i] and only the first num_used tiles hold rows.
Two kernels, each with the grid (row tiles, output column blocks), row tiles fastest so that the tiles of one
expert run side by side and share its weight columns in L2:
  1. gate_up: program (i, j) streams gate[e][:, j-block] and up[e][:, j-block] over D in BK steps, keeps both
     [BM, BN] accumulators in registers and writes swiglu_oai(g, u) in x's dtype ([R, F] rows).
  2. down: program (i, j) streams down[e][:, j-block] over F and writes the rows times their combine weight
     (float32 [R, D]); the k rows of each token are summed by a gather (MoEPlan.combine), not by atomics, so
     the result is deterministic.
Programs of tiles past num_used return at once: a decode step reads only the routed experts' weights (batch 1:
4 experts of 128). Weights are whole-array operands indexed in the kernel by (layer, expert) scalars read
from the plan, so a stacked [L, E, ...] weight is read in place for layer `layer` and nothing is copied.

MXFP8: the e4m3 tile [BK, BN] and its E8M0 exponents [BK/32, BN] are loaded as stored and dequantised in
registers (moe_plan.dequantize_tile: an exact float32 product, then the cast to x's dtype for the tensor cores);
a dequantised weight never goes to HBM. GPUs whose Triton has no e4m3 conversion (compute capability < 8.9)
refuse MXFP8 with NotImplementedError.

How a 1-byte operand (e4m3 weights, uint8 exponents) is read: `byte_load_path(array)`, from its static shape.
Pallas' Triton lowering (`_compute_offsets_from_indices`: the same code in jax 0.10.2, 0.11.0 and the 0.11.1
development tree; tests/kernels/test_moe.py checks it on the GPU at offsets past 2**31) computes element offsets
in int64 only when the whole operand has more than 2**32 bytes, else in signed int32. A 1-byte operand with more
than 2**31 elements but at most 2**32 bytes therefore gets offsets past 2**31 - 1 that wrap: one layer's e4m3
experts at M3 widths, [128, 6144, 3072] = 2.4e9 bytes, gave an illegal address on the H200 at expert >= 114.
  - "direct" (at most 2**31 elements: int32 offsets fit; or more than 2**32 bytes: int64 offsets): the bytes
    are loaded as stored. A layer stack [L >= 2, 128, 6144, 3072] read in place at (layer, expert) is here, and
    so are experts split over devices (4-way: [32, 6144, 3072]). The model hands the kernels its stacks
    (m3jax.model.layers.InPlace); one layer of 128 experts on its own (a per-layer slice) would not be here.
  - "int32 view" (only the window 2**31 < elements <= 2**32): the operand is read through its int32 view (a
    bitcast, 4 columns per word, 2**29..2**30 words: int32 offsets fit) and the words are unpacked in registers
    (shifts, then joins and reshapes back to [rows, cols]). Correct, but the unpack makes the kernel ALU-bound
    (H200, M3 widths, unstacked: decode 5.6-7.3x the copy-rate bound, prefill 8K 71 TFLOP/s vs bf16's 329).
Wider dtypes never need it (2**32 bytes of a 2-byte dtype are 2**31 elements).

MoETiles.scaled_dot (MXFP8, opt-in): instead of dequantising the weight tile, each 32-row exponent block's e4m3
rows convert exactly to x's dtype and the block's power of two scales its [BM, BN] product (_scaled_dot). That
trades ~6 ALU ops per weight for BM x BN / 32 per weight: cheaper when BM < 32, i.e. decode. Not yet run on a GPU:
benchmarks/moe.py sweeps it beside the dequantising tiles, and default_tiles changes only on that measurement.

Tiles: decode (few rows per expert) uses BM = 16 (the smallest Triton dot) and narrow column blocks, so that a
batch-1 step still spreads the four experts' weights over a few hundred programs; prefill uses 64-row (bf16) or
up to 256-row (MXFP8) tiles (default_tiles: the best of H200 sweeps; MXFP8 swept with direct loads).
Limits (NotImplementedError): D and F multiples of the K step and of the column block (powers of two >= 16; 32
for MXFP8, whose exponent blocks must not straddle a K step).

Measured (H200, jax 0.11.2, 128 experts 6144 -> 3072, top-4; benchmarks/RESULTS.md): bf16 decode at 0.9-1.6x
the copy-rate bound of the routed experts' bytes, 1.7-27x faster than the ragged_dot path; prefill 8K at 329
TFLOP/s. MXFP8 (2026-12-01, default tiles): direct loads decode b1 / b32 in 0.33 / 3.22 ms and prefill 8K in
22.5 ms (165 TFLOP/s), the int32 view 0.53 / 8.50 / 30.7 ms; bf16 in the same run 0.26 / 2.38 / 11.2 ms. The
in-register dequantisation, not the bytes, bounds MXFP8.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import moe_plan
from pallas_kernels.gpu import _common as cm
from pallas_kernels.gpu._compat import compiler_params, whole_array
from pallas_kernels.reference import swiglu_oai

f32 = jnp.float32
BYTE_LOAD_PATHS = ("direct", "int32 view")


@dataclasses.dataclass(frozen=True)
class MoETiles:
    """Tile sizes and Triton launch parameters of the two kernels (benchmarks/moe.py sweeps them)."""
    block_m: int            # rows per tile (a power of two >= 16)
    block_n_up: int         # F columns per gate_up program
    block_n_down: int       # D columns per down program
    block_k: int            # K step of both kernels (MXFP8: a multiple of 32)
    num_warps: int
    num_stages: int
    # MXFP8 only: each K step as 32-row exponent blocks, the e4m3 rows converted exactly to x's dtype and each
    # block's 2**(s - 127) applied to its [BM, BN] product instead of to the weights (_scaled_dot): BM x BN
    # multiplies per 32 x BN weights instead of ~6 ALU ops per weight, so it is cheaper when BM < 32 (decode).
    scaled_dot: bool = False


def default_tiles(num_slots: int, num_experts: int, fp8: bool) -> MoETiles:
    """Decode-sized inputs (<= 32 rows per expert on average) get 16-row tiles and narrow column blocks, prefill
    64- (bf16) or up to 256-row (MXFP8: each dequantised weight tile then feeds more rows) tiles: the best of the
    sweeps measured on an H200 (benchmarks/RESULTS.md, "Fused MoE"; MXFP8 with direct e4m3 loads, 2026-12-01:
    batch 1 (4 slots) is fastest with 32-column blocks and K steps of 256, batches 8 and 32 with 64 and 128)."""
    per_expert = -(-num_slots // max(1, min(num_experts, num_slots)))
    if per_expert <= 32:
        if fp8:
            return MoETiles(16, 32, 32, 256, 4, 4) if num_slots <= 8 else MoETiles(16, 64, 64, 128, 4, 4)
        return MoETiles(16, 64, 64, 128, 4, 4)
    if fp8:
        return MoETiles(min(256, max(16, cm.next_pow2(per_expert))), 64, 128, 64, 8, 3)
    return MoETiles(min(64, max(16, cm.next_pow2(per_expert))), 128, 128, 64, 4, 4)


def byte_load_path(a) -> str:
    """How the kernels read operand `a` (an array or jax.ShapeDtypeStruct; the e4m3 weights and uint8 exponents
    are the 1-byte ones): "int32 view" when the Triton lowering's int32 element offsets would wrap (more than
    2**31 elements in at most 2**32 bytes), else "direct" (module docstring)."""
    size = math.prod(a.shape)
    wraps = size > 2 ** 31 and size * jnp.dtype(a.dtype).itemsize <= 2 ** 32
    return "int32 view" if wraps else "direct"


def _fit(block: int, size: int) -> int:
    """The largest power of two <= block dividing size (>= 16), or 0."""
    b = block
    while b >= 16 and size % b:
        b //= 2
    return b if b >= 16 else 0


def _int32_view(a):
    """1-byte [..., N] -> int32 [..., N/4], a bitcast (no copy): word c holds columns 4c..4c+3, lowest byte
    first."""
    return lax.bitcast_convert_type(a.reshape(*a.shape[:-1], a.shape[-1] // 4, 4), jnp.int32)


def _interleave(a, b):
    """[K, N] x 2 -> [K, 2N] with columns a0 b0 a1 b1 ... (Triton: a join and a reshape)."""
    return jnp.stack([a, b], axis=-1).reshape(a.shape[0], 2 * a.shape[1])


def _from_int32_view(v, dtype):
    """int32 [K, N/4] from _int32_view -> 1-byte `dtype` [K, N] in the original column order."""
    b = [lax.shift_right_logical(v, jnp.int32(8 * j)) & 0xFF for j in range(4)]
    cols = _interleave(_interleave(b[0], b[2]), _interleave(b[1], b[3])).astype(jnp.uint8)   # column 4c + j
    return cols if dtype == jnp.uint8 else lax.bitcast_convert_type(cols, dtype)


def _load_bytes(ref, lead, r0, nr, c0, nc, view: bool, dtype):
    """Tile [nr, nc] at (r0, c0) of the 1-byte operand ref[*lead] (stored as `dtype`), read as stored or, with
    view, through its int32 view (then ref is the view)."""
    if not view:
        return ref[(*lead, pl.ds(r0, nr), pl.ds(c0, nc))]
    return _from_int32_view(ref[(*lead, pl.ds(r0, nr), pl.ds(c0 // 4, nc // 4))], dtype)


def _load_w(w_ref, s_ref, lead, k0, n0, bk, bn, dtype, views):
    """Weight tile [bk, bn] of w_ref[*lead] at (k0, n0) in `dtype`; MXFP8 (s_ref given) dequantised in registers,
    views = (weight, exponents) read through their int32 views."""
    if s_ref is None:
        return w_ref[(*lead, pl.ds(k0, bk), pl.ds(n0, bn))]
    blk = moe_plan.MXFP8_BLOCK
    w = _load_bytes(w_ref, lead, k0, bk, n0, bn, views[0], jnp.float8_e4m3fn)
    s = _load_bytes(s_ref, lead, k0 // blk, bk // blk, n0, bn, views[1], jnp.uint8)
    return moe_plan.dequantize_tile(w, s, dtype)


def _dot(a, b):
    return jnp.dot(a, b, preferred_element_type=f32, precision=cm.dot_precision(a.dtype))


def _scaled_dot(x_ref, w_ref, s_ref, lead, row0, block_m, k0, n0, block_k, block_n, views):
    """f32 [BM, BN]: x[rows, k0:k0+BK] @ W[k0:k0+BK, n0:n0+BN] for MXFP8 W (MoETiles.scaled_dot), as the sum over
    the step's 32-row exponent blocks c of (x[:, c] @ e4m3[c]) * 2**(s[c] - 127). e4m3 converts exactly to x's
    dtype and the scale is a power of two, so this equals the dequantised weights' product up to float32
    summation order; the one difference: weights whose dequantised value is below 2**-126 (exponent bytes
    below ~10, never in a released checkpoint) contribute their tiny products, where dequantize_mxfp8 flushes
    them to zero."""
    blk = moe_plan.MXFP8_BLOCK
    acc = None
    for c in range(block_k // blk):
        kc = pl.multiple_of(k0 + c * blk, blk)
        x = x_ref[pl.ds(row0, block_m), pl.ds(kc, blk)]                              # [BM, 32]
        w = _load_bytes(w_ref, lead, kc, blk, n0, block_n, views[0], jnp.float8_e4m3fn).astype(x.dtype)
        scale, fix = moe_plan.e8m0_factors(_load_bytes(s_ref, lead, kc // blk, 1, n0, block_n, views[1],
                                                       jnp.uint8))                  # [1, BN] each
        part = _dot(x, w) * scale * fix
        acc = part if acc is None else acc + part
    return acc


def _lead(layer_ref, e, stacked):
    return (layer_ref[0], e) if stacked else (e,)


def _gate_up_kernel(tile_ref, used_ref, layer_ref, x_ref, g_ref, u_ref, *rest, block_m, block_n, block_k, num_k,
                    alpha, limit, stacked, views, scaled):
    # tile_ref i32[tiles]; used_ref i32[1]; layer_ref i32[1]; x_ref [R, D] rows in padded order (whole)
    # g_ref, u_ref [(L,) E, D, F] as stored (whole); MXFP8: gs_ref, us_ref u8[(L,) E, D/32, F], and views =
    # ((gate, its exponents), (up, its exponents)): which are int32 views [..., cols/4]; h_ref [BM, BN] block
    # (i, j) of the [R, F] activations
    gs_ref, us_ref, h_ref = rest if views else (None, None, rest[0])
    vg, vu = views or (None, None)
    i, j = pl.program_id(0), pl.program_id(1)

    @pl.when(i < used_ref[0])
    def _():
        lead = _lead(layer_ref, tile_ref[i], stacked)
        row0, n0 = i * block_m, j * block_n

        def body(kk, acc):
            k0 = pl.multiple_of(kk * block_k, block_k)
            if scaled:
                tile = (lead, row0, block_m, k0, n0, block_k, block_n)
                return (acc[0] + _scaled_dot(x_ref, g_ref, gs_ref, *tile, vg),
                        acc[1] + _scaled_dot(x_ref, u_ref, us_ref, *tile, vu))
            x = x_ref[pl.ds(row0, block_m), pl.ds(k0, block_k)]                      # [BM, BK]
            g = _load_w(g_ref, gs_ref, lead, k0, n0, block_k, block_n, x.dtype, vg)   # [BK, BN]
            u = _load_w(u_ref, us_ref, lead, k0, n0, block_k, block_n, x.dtype, vu)
            return acc[0] + _dot(x, g), acc[1] + _dot(x, u)

        zero = jnp.zeros((block_m, block_n), f32)
        g, u = lax.fori_loop(0, num_k, body, (zero, zero))
        h_ref[...] = swiglu_oai(g, u, alpha, limit).astype(h_ref.dtype)


def _down_kernel(tile_ref, used_ref, layer_ref, h_ref, w_ref, *rest, block_m, block_n, block_k, num_k, stacked,
                 views, scaled):
    # h_ref [R, F] activations (whole); w_ref [(L,) E, F, D] (whole; MXFP8: ws_ref u8[(L,) E, F/32, D] and
    # views = (down, its exponents): which are int32 views); rw_ref f32[BM] combine weights of the tile's rows;
    # y_ref f32[BM, BN] block (i, j) of [R, D]
    ws_ref, rw_ref, y_ref = rest if views else (None, *rest)
    i, j = pl.program_id(0), pl.program_id(1)

    @pl.when(i < used_ref[0])
    def _():
        lead = _lead(layer_ref, tile_ref[i], stacked)
        row0, n0 = i * block_m, j * block_n

        def body(kk, acc):
            k0 = pl.multiple_of(kk * block_k, block_k)
            if scaled:
                return acc + _scaled_dot(h_ref, w_ref, ws_ref, lead, row0, block_m, k0, n0, block_k, block_n, views)
            h = h_ref[pl.ds(row0, block_m), pl.ds(k0, block_k)]                      # [BM, BK]
            return acc + _dot(h, _load_w(w_ref, ws_ref, lead, k0, n0, block_k, block_n, h.dtype, views))

        acc = lax.fori_loop(0, num_k, body, jnp.zeros((block_m, block_n), f32))
        y_ref[...] = acc * rw_ref[...][:, None]


def moe(x_td, ids_tk, combine_tk, gate_edf, up_edf, down_efd, gate_scale_ebf=None, up_scale_ebf=None,
        down_scale_ebd=None, *, alpha: float, limit: float, layer=None, interpret: bool = False):
    """Routed experts, float32 [T, D]; arguments and semantics as reference.moe (plus `interpret`)."""
    fp8 = gate_scale_ebf is not None
    tiles = default_tiles(ids_tk.size, gate_edf.shape[-3], fp8)
    return moe_tuned(x_td, ids_tk, combine_tk, gate_edf, up_edf, down_efd, gate_scale_ebf, up_scale_ebf,
                     down_scale_ebd, alpha=alpha, limit=limit, layer=layer, interpret=interpret, tiles=tiles)


def moe_tuned(x_td, ids_tk, combine_tk, gate_edf, up_edf, down_efd, gate_scale_ebf=None, up_scale_ebf=None,
              down_scale_ebd=None, *, alpha, limit, layer=None, interpret=False, tiles: MoETiles,
              force_byte_path: str | None = None):
    """moe with explicit tiles (see the module docstring). force_byte_path (tests only): read every 1-byte
    operand by this path ("direct" or "int32 view") instead of byte_load_path's choice, so that small arrays
    exercise the int32 view."""
    weights = (gate_edf, up_edf, down_efd)
    scales = None
    if any(s is not None for s in (gate_scale_ebf, up_scale_ebf, down_scale_ebd)):
        scales = (gate_scale_ebf, up_scale_ebf, down_scale_ebd)
        if any(s is None for s in scales):
            raise ValueError("gpu.moe: MXFP8 needs all three of gate_scale_ebf, up_scale_ebf, down_scale_ebd")
    d, f, stacked, fp8 = moe_plan.check_inputs("gpu", x_td, ids_tk, combine_tk, weights, scales, layer)
    if force_byte_path not in (None, *BYTE_LOAD_PATHS):
        raise ValueError(f"gpu.moe: force_byte_path must be one of {BYTE_LOAD_PATHS} or None, got "
                         f"{force_byte_path!r}")
    if fp8 and not interpret:
        dev = jax.devices()[0]
        cc = str(getattr(dev, "compute_capability", "0"))
        major, _, minor = cc.partition(".")
        ok = dev.platform == "gpu" and (int(major), int(minor or 0)) >= (8, 9)
        cm.require(ok, "moe", "MXFP8 needs e4m3 conversion (sm_89+)",
                   {"device": dev.device_kind, "compute_capability": cc})
    bm = tiles.block_m
    bk = min(tiles.block_k, _fit(tiles.block_k, d), _fit(tiles.block_k, f)) or 0
    bn_up, bn_down = _fit(tiles.block_n_up, f), _fit(tiles.block_n_down, d)
    shapes = {"D": d, "F": f, "tiles": tiles}
    cm.require(cm.is_pow2(bm) and bm >= 16, "moe", "block_m must be a power of two >= 16", shapes)
    cm.require(bk >= 16 and bn_up and bn_down, "moe", "D and F must be multiples of 16 (Triton tiles)", shapes)
    views = ()
    if tiles.scaled_dot and not fp8:
        raise ValueError(f"gpu.moe: scaled_dot applies to MXFP8 weights only, got {gate_edf.dtype} and tiles {tiles}")
    if fp8:
        cm.require(bk % moe_plan.MXFP8_BLOCK == 0, "moe", "MXFP8 needs D and F multiples of 32", shapes)
        # order: gate, up, down, then their exponents; column blocks (powers of two >= 16) are whole words
        stored = (*weights, *scales)
        views = tuple((force_byte_path or byte_load_path(a)) == "int32 view" for a in stored)
        stored = tuple(_int32_view(a) if v else a for a, v in zip(stored, views))
        (gate_edf, up_edf, down_efd), scales = stored[:3], stored[3:]

    num_experts = gate_edf.shape[-3]
    p = moe_plan.plan(ids_tk, combine_tk, num_experts, bm)
    xs = p.gather_rows(x_td)                                                   # [R, D]
    layer_arr = jnp.asarray(0 if layer is None else layer, jnp.int32).reshape(1)
    # The software pipeline holds a row tile and the weight tile(s) per stage: float32 prefill tiles (64 x 64 rows,
    # two 64 x 128 weight tiles: 80 KiB a stage) overflow Hopper's shared memory at 4 stages, so fewer stages.
    x_bytes, w_bytes = jnp.dtype(x_td.dtype).itemsize, 1 if fp8 else jnp.dtype(gate_edf.dtype).itemsize
    stages = min(cm.pipeline_stages(tiles.num_stages, per_stage=bm * bk * x_bytes + 2 * bk * bn_up * w_bytes,
                                    fixed=0),
                 cm.pipeline_stages(tiles.num_stages, per_stage=bm * bk * x_bytes + bk * bn_down * w_bytes,
                                    fixed=0))
    params = compiler_params(num_warps=tiles.num_warps, num_stages=stages)
    whole = whole_array()
    r = p.num_rows

    up_kernel = functools.partial(_gate_up_kernel, block_m=bm, block_n=bn_up, block_k=bk, num_k=d // bk,
                                  alpha=alpha, limit=limit, stacked=stacked, scaled=tiles.scaled_dot,
                                  views=((views[0], views[3]), (views[1], views[4])) if fp8 else ())
    operands = moe_plan.vary_together(
        (p.tile_expert, p.num_used, layer_arr, xs, gate_edf, up_edf) + (scales[:2] if fp8 else ()))
    h = pl.pallas_call(
        up_kernel, grid=(p.num_tiles, f // bn_up),
        in_specs=[whole] * len(operands),
        out_specs=pl.BlockSpec((bm, bn_up), lambda i, j: (i, j)),
        out_shape=moe_plan.out_struct((r, f), x_td.dtype, operands[3]),
        compiler_params=params, interpret=interpret, name="moe_gate_up",
    )(*operands)

    down_kernel = functools.partial(_down_kernel, block_m=bm, block_n=bn_down, block_k=bk, num_k=f // bk,
                                    stacked=stacked, scaled=tiles.scaled_dot,
                                    views=(views[2], views[5]) if fp8 else ())
    operands = moe_plan.vary_together(
        (p.tile_expert, p.num_used, layer_arr, h, down_efd) + (scales[2:] if fp8 else ()) + (p.row_weight,))
    y = pl.pallas_call(
        down_kernel, grid=(p.num_tiles, d // bn_down),
        in_specs=[whole] * (len(operands) - 1) + [pl.BlockSpec((bm,), lambda i, j: (i,))],
        out_specs=pl.BlockSpec((bm, bn_down), lambda i, j: (i, j)),
        out_shape=moe_plan.out_struct((r, d), f32, operands[3]),
        compiler_params=params, interpret=interpret, name="moe_down",
    )(*operands)
    return p.combine(y)
