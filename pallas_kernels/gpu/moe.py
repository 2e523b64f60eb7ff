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

MXFP8: the e4m3 tile [BK, BN] and its exponents [BK/32, BN] are loaded as stored and dequantised in registers
(moe_plan.dequantize_tile: an exact float32 product, then the cast to x's dtype for the tensor cores); a
dequantised weight never goes to HBM. The e4m3 bytes are read through an int32 view (4 columns per word),
because the Triton lowering's int32 offsets overflow on a 2.4 GB e4m3 stack (an illegal address on the H200 at
expert >= 114). MoETiles.fp8_unpack picks how the words are unpacked: "interleave" (shifts, then joins and
reshapes back to [BK, BN]; measured) or "lanes" (four [BK, BN/4] column-lane tiles, four sub-dots and strided
stores; no interleave; not yet measured on a GPU). GPUs whose Triton has no e4m3 conversion (compute capability
< 8.9) refuse MXFP8 with NotImplementedError.

Tiles: decode (few rows per expert) uses BM = 16 (the smallest Triton dot) and narrow column blocks, so that a
batch-1 step still spreads the four experts' weights over a few hundred programs; prefill uses 64- (bf16) or
128-row (MXFP8) tiles of 128 columns (default_tiles: the best of an H200 sweep).
Limits (NotImplementedError): D and F multiples of the K step and of the column block (powers of two >= 16; 32
for MXFP8, whose exponent blocks must not straddle a K step).

Measured (H200, jax 0.11.2, 128 experts 6144 -> 3072, top-4; benchmarks/RESULTS.md): bf16 decode at 0.9-1.6x
the copy-rate bound of the routed experts' bytes, 1.7-27x faster than the ragged_dot path; prefill 8K at 329
TFLOP/s. MXFP8 ("interleave") is correct but slower than bf16 (decode b1 0.52 ms vs 0.23, prefill 8K 52.5 ms
vs 11.3): the in-register unpack and the per-element dequantisation dominate.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import moe_plan
from pallas_kernels.gpu import _common as cm
from pallas_kernels.gpu._compat import compiler_params, whole_array
from pallas_kernels.reference import swiglu_oai

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class MoETiles:
    """Tile sizes and Triton launch parameters of the two kernels (benchmarks/moe.py sweeps them)."""
    block_m: int            # rows per tile (a power of two >= 16)
    block_n_up: int         # F columns per gate_up program
    block_n_down: int       # D columns per down program
    block_k: int            # K step of both kernels (MXFP8: a multiple of 32)
    num_warps: int
    num_stages: int
    # MXFP8 unpack of the int32 view: "interleave" (joins + reshapes back to [BK, BN], measured) or "lanes" (four
    # [BK, BN/4] column-lane tiles, four sub-dots, strided stores: no interleave; not yet measured on a GPU)
    fp8_unpack: str = "interleave"


def default_tiles(num_slots: int, num_experts: int, fp8: bool) -> MoETiles:
    """Decode-sized inputs (<= 32 rows per expert on average) get 16-row tiles and narrow column blocks, prefill
    64- or 128-row tiles: the best of the sweep measured on an H200 (benchmarks/RESULTS.md, "Fused MoE")."""
    per_expert = -(-num_slots // max(1, min(num_experts, num_slots)))
    if per_expert <= 32:
        return MoETiles(16, 32, 32, 256, 4, 4) if fp8 else MoETiles(16, 64, 64, 128, 4, 4)
    bm = min(128 if fp8 else 64, max(16, cm.next_pow2(per_expert)))
    return MoETiles(bm, 128, 128, 32, 8, 4) if fp8 else MoETiles(bm, 128, 128, 64, 4, 4)


def _fit(block: int, size: int) -> int:
    """The largest power of two <= block dividing size (>= 16), or 0."""
    b = block
    while b >= 16 and size % b:
        b //= 2
    return b if b >= 16 else 0


def _load_w(w_ref, s_ref, lead, k0, n0, bk, bn, dtype):
    """Weight tile [bk, bn] of w_ref[*lead] at (k0, n0) in `dtype`, dequantised in registers when MXFP8 (then
    w_ref is the int32 view of the e4m3 bytes, 4 columns per word: see _pack_e4m3)."""
    if s_ref is None:
        return w_ref[(*lead, pl.ds(k0, bk), pl.ds(n0, bn))]
    w = _unpack_e4m3(w_ref[(*lead, pl.ds(k0, bk), pl.ds(n0 // 4, bn // 4))])
    s = s_ref[(*lead, pl.ds(k0 // moe_plan.MXFP8_BLOCK, bk // moe_plan.MXFP8_BLOCK), pl.ds(n0, bn))]
    return moe_plan.dequantize_tile(w, s, dtype)


def _pack_e4m3(w):
    """e4m3 [..., K, N] -> int32 [..., K, N/4], a bitcast (no copy): word c holds columns 4c..4c+3, lowest byte
    first. Why: Pallas' Triton lowering computes offsets in int32 for arrays under 2**32 bytes, and M3's e4m3
    expert stack of one layer (128 x 6144 x 3072 = 2.4e9 bytes) has element offsets past 2**31."""
    return lax.bitcast_convert_type(w.reshape(*w.shape[:-1], w.shape[-1] // 4, 4), jnp.int32)


def _interleave(a, b):
    """[K, N] x 2 -> [K, 2N] with columns a0 b0 a1 b1 ... (Triton: a join and a reshape)."""
    return jnp.stack([a, b], axis=-1).reshape(a.shape[0], 2 * a.shape[1])


def _unpack_e4m3(v):
    """int32 [K, N/4] from _pack_e4m3 -> e4m3 [K, N] in the original column order."""
    b = [lax.shift_right_logical(v, jnp.int32(8 * j)) & 0xFF for j in range(4)]
    cols = _interleave(_interleave(b[0], b[2]), _interleave(b[1], b[3]))      # column 4c + j = byte j of c
    return lax.bitcast_convert_type(cols.astype(jnp.uint8), jnp.float8_e4m3fn)


def _dot(a, b):
    return jnp.dot(a, b, preferred_element_type=f32, precision=cm.dot_precision(a.dtype))


def _lead(layer_ref, e, stacked):
    return (layer_ref[0], e) if stacked else (e,)


def _load_lanes(w_ref, s_ref, lead, k0, n0, bk, bn, dtype, lanes):
    """[tile] as _load_w, or with lanes = 4 the MXFP8 tile as 4 column lanes: lane l = columns n0 + l + 4c."""
    if lanes == 1:
        return [_load_w(w_ref, s_ref, lead, k0, n0, bk, bn, dtype)]
    v = w_ref[(*lead, pl.ds(k0, bk), pl.ds(n0 // 4, bn // 4))]                        # int32 [BK, BN/4]
    blk = moe_plan.MXFP8_BLOCK
    out = []
    for lane in range(4):
        byte = (lax.shift_right_logical(v, jnp.int32(8 * lane)) & 0xFF).astype(jnp.uint8)
        w = lax.bitcast_convert_type(byte, jnp.float8_e4m3fn)
        sc = s_ref[(*lead, pl.ds(k0 // blk, bk // blk), pl.ds(n0 + lane, bn // 4, stride=4))]
        out.append(moe_plan.dequantize_tile(w, sc, dtype))
    return out


def _store(ref, value, row0, n0, lane, lanes):
    """The [BM, BN/lanes] result of one lane: the whole output block, or columns n0 + lane + lanes*c."""
    if lanes == 1:
        ref[...] = value
    else:
        ref[pl.ds(row0, value.shape[0]), pl.ds(n0 + lane, value.shape[1], stride=lanes)] = value


def _gate_up_kernel(tile_ref, used_ref, layer_ref, x_ref, g_ref, u_ref, *rest, block_m, block_n, block_k, num_k,
                    alpha, limit, stacked, fp8, lanes):
    # tile_ref i32[tiles]; used_ref i32[1]; layer_ref i32[1]; x_ref [R, D] rows in padded order (whole)
    # g_ref, u_ref [(L,) E, D, F] as stored (whole); with fp8 int32 views [(L,) E, D, F/4] and gs_ref, us_ref
    # u8[(L,) E, D/32, F]; h_ref [BM, BN] block (i, j) of the [R, F] activations (lanes > 1: the whole [R, F])
    gs_ref, us_ref, h_ref = rest if fp8 else (None, None, rest[0])
    i, j = pl.program_id(0), pl.program_id(1)

    @pl.when(i < used_ref[0])
    def _():
        lead = _lead(layer_ref, tile_ref[i], stacked)
        row0, n0 = i * block_m, j * block_n

        def body(kk, acc):
            k0 = pl.multiple_of(kk * block_k, block_k)
            x = x_ref[pl.ds(row0, block_m), pl.ds(k0, block_k)]                      # [BM, BK]
            g = _load_lanes(g_ref, gs_ref, lead, k0, n0, block_k, block_n, x.dtype, lanes)   # [BK, BN/lanes]
            u = _load_lanes(u_ref, us_ref, lead, k0, n0, block_k, block_n, x.dtype, lanes)
            return tuple(a + _dot(x, w) for a, w in zip(acc, g + u))

        zero = jnp.zeros((block_m, block_n // lanes), f32)
        acc = lax.fori_loop(0, num_k, body, (zero,) * (2 * lanes))
        for lane in range(lanes):
            h = swiglu_oai(acc[lane], acc[lanes + lane], alpha, limit).astype(h_ref.dtype)
            _store(h_ref, h, row0, n0, lane, lanes)


def _down_kernel(tile_ref, used_ref, layer_ref, h_ref, w_ref, *rest, block_m, block_n, block_k, num_k, stacked,
                 fp8, lanes):
    # h_ref [R, F] activations (whole); w_ref [(L,) E, F, D] (whole; fp8: int32 view [(L,) E, F, D/4] and ws_ref
    # u8[(L,) E, F/32, D]); rw_ref f32[BM] combine weights of the tile's rows; y_ref f32[BM, BN] block (i, j)
    # of [R, D] (lanes > 1: the whole [R, D])
    ws_ref, rw_ref, y_ref = rest if fp8 else (None, *rest)
    i, j = pl.program_id(0), pl.program_id(1)

    @pl.when(i < used_ref[0])
    def _():
        lead = _lead(layer_ref, tile_ref[i], stacked)
        row0, n0 = i * block_m, j * block_n

        def body(kk, acc):
            k0 = pl.multiple_of(kk * block_k, block_k)
            h = h_ref[pl.ds(row0, block_m), pl.ds(k0, block_k)]                      # [BM, BK]
            w = _load_lanes(w_ref, ws_ref, lead, k0, n0, block_k, block_n, h.dtype, lanes)
            return tuple(a + _dot(h, t) for a, t in zip(acc, w))

        acc = lax.fori_loop(0, num_k, body, (jnp.zeros((block_m, block_n // lanes), f32),) * lanes)
        rw = rw_ref[...][:, None]
        for lane in range(lanes):
            _store(y_ref, acc[lane] * rw, row0, n0, lane, lanes)


def moe(x_td, ids_tk, combine_tk, gate_edf, up_edf, down_efd, gate_scale_ebf=None, up_scale_ebf=None,
        down_scale_ebd=None, *, alpha: float, limit: float, layer=None, interpret: bool = False):
    """Routed experts, float32 [T, D]; arguments and semantics as reference.moe (plus `interpret`)."""
    fp8 = gate_scale_ebf is not None
    tiles = default_tiles(ids_tk.size, gate_edf.shape[-3], fp8)
    return moe_tuned(x_td, ids_tk, combine_tk, gate_edf, up_edf, down_efd, gate_scale_ebf, up_scale_ebf,
                     down_scale_ebd, alpha=alpha, limit=limit, layer=layer, interpret=interpret, tiles=tiles)


def moe_tuned(x_td, ids_tk, combine_tk, gate_edf, up_edf, down_efd, gate_scale_ebf=None, up_scale_ebf=None,
              down_scale_ebd=None, *, alpha, limit, layer=None, interpret=False, tiles: MoETiles):
    """moe with explicit tiles (see the module docstring)."""
    weights = (gate_edf, up_edf, down_efd)
    scales = None
    if any(s is not None for s in (gate_scale_ebf, up_scale_ebf, down_scale_ebd)):
        scales = (gate_scale_ebf, up_scale_ebf, down_scale_ebd)
        if any(s is None for s in scales):
            raise ValueError("gpu.moe: MXFP8 needs all three of gate_scale_ebf, up_scale_ebf, down_scale_ebd")
    d, f, stacked, fp8 = moe_plan.check_inputs("gpu", x_td, ids_tk, combine_tk, weights, scales, layer)
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
    lanes = 4 if fp8 and tiles.fp8_unpack == "lanes" else 1
    cm.require(tiles.fp8_unpack in ("interleave", "lanes"), "moe", "fp8_unpack is interleave or lanes", shapes)
    if fp8:
        cm.require(bk % moe_plan.MXFP8_BLOCK == 0, "moe", "MXFP8 needs D and F multiples of 32", shapes)
        cm.require(min(bn_up, bn_down) % 4 == 0, "moe", "MXFP8 needs column blocks of whole int32 words", shapes)
        cm.require(min(bn_up, bn_down) // lanes >= 16, "moe", "fp8 lanes need column blocks >= 64", shapes)

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
    sc = scales or (None, None, None)

    up_kernel = functools.partial(_gate_up_kernel, block_m=bm, block_n=bn_up, block_k=bk, num_k=d // bk,
                                  alpha=alpha, limit=limit, stacked=stacked, fp8=fp8, lanes=lanes)
    if fp8:
        gate_edf, up_edf, down_efd = (_pack_e4m3(w) for w in (gate_edf, up_edf, down_efd))
    operands = (p.tile_expert, p.num_used, layer_arr, xs, gate_edf, up_edf) + ((sc[0], sc[1]) if fp8 else ())
    h = pl.pallas_call(
        up_kernel, grid=(p.num_tiles, f // bn_up),
        in_specs=[whole] * len(operands),
        out_specs=pl.BlockSpec((bm, bn_up), lambda i, j: (i, j)) if lanes == 1 else whole,
        out_shape=jax.ShapeDtypeStruct((r, f), x_td.dtype),
        compiler_params=params, interpret=interpret, name="moe_gate_up",
    )(*operands)

    down_kernel = functools.partial(_down_kernel, block_m=bm, block_n=bn_down, block_k=bk, num_k=f // bk,
                                    stacked=stacked, fp8=fp8, lanes=lanes)
    operands = (p.tile_expert, p.num_used, layer_arr, h, down_efd) + ((sc[2],) if fp8 else ())
    y = pl.pallas_call(
        down_kernel, grid=(p.num_tiles, d // bn_down),
        in_specs=[whole] * len(operands) + [pl.BlockSpec((bm,), lambda i, j: (i,))],
        out_specs=pl.BlockSpec((bm, bn_down), lambda i, j: (i, j)) if lanes == 1 else whole,
        out_shape=jax.ShapeDtypeStruct((r, d), f32),
        compiler_params=params, interpret=interpret, name="moe_down",
    )(*operands, p.row_weight)
    return p.combine(y)
