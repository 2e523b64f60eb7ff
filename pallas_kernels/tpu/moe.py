"""Fused MoE experts on TPU (Pallas Mosaic TPU): the GPU kernel's algorithm with scalar-prefetched expert ids.

moe: out[t] = sum_j combine[t, j] * down_e(swiglu_oai(x[t] @ gate_e, x[t] @ up_e)), e = ids[t, j]
(reference.moe has the contract and layouts).

Schedule. The routing plan (pallas_kernels/moe_plan.py) pads each expert's rows to the row tile BM and lists
the expert of every tile. tile_expert, num_used and the layer index are scalar-prefetched into SMEM, and the
weight BlockSpecs' index maps read them: program (i, j) gets block j of the columns of expert tile_expert[i]
of layer `layer` (a stacked [L, E, ...] weight is read in place). Tiles past num_used repeat the last used
tile's expert, so the pipeline sees an unchanged block index and issues no DMA for them, and their body is
skipped: a decode step copies exactly the routed experts' weights from HBM.
  1. gate_up, grid (tiles, F / BN): x rows [BM, D], gate and up blocks [D, BN] (the whole contraction in one
     block: no reduction axis, every grid axis parallel), swiglu_oai fused, activations [BM, BN] in x's dtype.
  2. down, grid (tiles, D / BN): activations [BM, F], down block [F, BN], times the rows' combine weights,
     float32 [BM, BN]. The k rows of each token are summed by a gather (MoEPlan.combine).
MXFP8: the e4m3 block and its exponent block [D/32, BN] (the whole exponent axis, so Mosaic's 8-bit (32, 128)
tiling holds for any D) are copied as stored and dequantised in VMEM (moe_plan.dequantize_tile).

Limits (NotImplementedError): BN is 256 or 128 dividing the output width, or the whole width when it is at most
256; BM is a multiple of 16 (bf16 sublane packing). VMEM per program: 2 buffers x (x rows + 2 weight blocks +
output), 14 MiB for M3 in bf16 at BM = 16, BN = 256.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import moe_plan
from pallas_kernels.gpu.moe import default_tiles
from pallas_kernels.reference import swiglu_oai
from pallas_kernels.tpu import _compat as tc
from pallas_kernels.tpu import tiling

f32 = jnp.float32


def _dot(a, b):
    precision = jax.lax.Precision.HIGHEST if a.dtype == f32 else None
    return jnp.dot(a, b, preferred_element_type=f32, precision=precision)


def _weight(w_ref, s_ref, dtype):
    return w_ref[...] if s_ref is None else moe_plan.dequantize_tile(w_ref[...], s_ref[...], dtype)


def _gate_up_kernel(te_ref, used_ref, layer_ref, x_ref, g_ref, u_ref, *rest, alpha, limit, fp8):
    # te_ref i32[tiles], used_ref i32[1], layer_ref i32[1] (SMEM); x_ref [BM, D]; g_ref, u_ref [D, BN]
    # (fp8: e4m3, with gs_ref, us_ref u8[D/32, BN]); h_ref [BM, BN]
    gs_ref, us_ref, h_ref = rest if fp8 else (None, None, rest[0])

    @pl.when(pl.program_id(0) < used_ref[0])
    def _():
        x = x_ref[...]
        g = _dot(x, _weight(g_ref, gs_ref, x.dtype))
        u = _dot(x, _weight(u_ref, us_ref, x.dtype))
        h_ref[...] = swiglu_oai(g, u, alpha, limit).astype(h_ref.dtype)


def _down_kernel(te_ref, used_ref, layer_ref, h_ref, w_ref, *rest, fp8):
    # h_ref [BM, F]; w_ref [F, BN] (fp8: + ws_ref u8[F/32, BN]); rw_ref f32[BM, 1]; y_ref f32[BM, BN]
    ws_ref, rw_ref, y_ref = rest if fp8 else (None, *rest)

    @pl.when(pl.program_id(0) < used_ref[0])
    def _():
        h = h_ref[...]
        y_ref[...] = _dot(h, _weight(w_ref, ws_ref, h.dtype)) * rw_ref[...]


def _weight_spec(block, stacked):
    """BlockSpec of block j of the columns of expert te[i] (of layer ly[0] when stacked)."""
    if stacked:
        return pl.BlockSpec((None, None, *block), lambda i, j, te, nu, ly: (ly[0], te[i], 0, j))
    return pl.BlockSpec((None, *block), lambda i, j, te, nu, ly: (te[i], 0, j))


def moe(x_td, ids_tk, combine_tk, gate_edf, up_edf, down_efd, gate_scale_ebf=None, up_scale_ebf=None,
        down_scale_ebd=None, *, alpha: float, limit: float, layer=None, interpret: bool = False):
    """Routed experts, float32 [T, D]; arguments and semantics as reference.moe (plus `interpret`)."""
    weights = (gate_edf, up_edf, down_efd)
    scales = None
    if any(s is not None for s in (gate_scale_ebf, up_scale_ebf, down_scale_ebd)):
        scales = (gate_scale_ebf, up_scale_ebf, down_scale_ebd)
        if any(s is None for s in scales):
            raise ValueError("tpu.moe: MXFP8 needs all three of gate_scale_ebf, up_scale_ebf, down_scale_ebd")
    d, f, stacked, fp8 = moe_plan.check_inputs("tpu", x_td, ids_tk, combine_tk, weights, scales, layer)
    if fp8 and (d % moe_plan.MXFP8_BLOCK or f % moe_plan.MXFP8_BLOCK):
        raise NotImplementedError(f"tpu.moe: MXFP8 needs D and F multiples of 32, got D={d}, F={f}")
    num_experts = gate_edf.shape[-3]
    bm = default_tiles(ids_tk.size, num_experts, fp8).block_m
    bn_up, bn_down = tiling.column_block(f, "tpu.moe"), tiling.column_block(d, "tpu.moe")
    p = moe_plan.plan(ids_tk, combine_tk, num_experts, bm)
    xs = p.gather_rows(x_td)
    layer_arr = jnp.asarray(0 if layer is None else layer, jnp.int32).reshape(1)
    blk = moe_plan.MXFP8_BLOCK
    itemsize = jnp.dtype(x_td.dtype).itemsize
    vmem = 2 * (bm * max(d, f) * itemsize + 2 * max(d, f) * max(bn_up, bn_down) * 4 + bm * max(bn_up, bn_down) * 4)
    params = tc.compiler_params(2, max(vmem + (8 << 20), 32 << 20))

    specs = [pl.BlockSpec((bm, d), lambda i, j, te, nu, ly: (i, 0)),
             _weight_spec((d, bn_up), stacked), _weight_spec((d, bn_up), stacked)]
    operands = [xs, gate_edf, up_edf]
    if fp8:
        specs += [_weight_spec((d // blk, bn_up), stacked)] * 2
        operands += [scales[0], scales[1]]
    args = moe_plan.vary_together([p.tile_expert, p.num_used, layer_arr, *operands])
    h = pl.pallas_call(
        functools.partial(_gate_up_kernel, alpha=alpha, limit=limit, fp8=fp8),
        grid_spec=tc.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(p.num_tiles, f // bn_up), in_specs=specs,
            out_specs=pl.BlockSpec((bm, bn_up), lambda i, j, te, nu, ly: (i, j))),
        out_shape=moe_plan.out_struct((p.num_rows, f), x_td.dtype, args[3]),
        compiler_params=params, interpret=tc.interpret_arg(interpret), name="moe_gate_up",
    )(*args)

    specs = [pl.BlockSpec((bm, f), lambda i, j, te, nu, ly: (i, 0)), _weight_spec((f, bn_down), stacked)]
    operands = [h, down_efd]
    if fp8:
        specs.append(_weight_spec((f // blk, bn_down), stacked))
        operands.append(scales[2])
    specs.append(pl.BlockSpec((bm, 1), lambda i, j, te, nu, ly: (i, 0)))
    args = moe_plan.vary_together([p.tile_expert, p.num_used, layer_arr, *operands, p.row_weight.reshape(-1, 1)])
    y = pl.pallas_call(
        functools.partial(_down_kernel, fp8=fp8),
        grid_spec=tc.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(p.num_tiles, d // bn_down), in_specs=specs,
            out_specs=pl.BlockSpec((bm, bn_down), lambda i, j, te, nu, ly: (i, j))),
        out_shape=moe_plan.out_struct((p.num_rows, d), f32, args[3]),
        compiler_params=params, interpret=tc.interpret_arg(interpret), name="moe_down",
    )(*args)
    return p.combine(y)
