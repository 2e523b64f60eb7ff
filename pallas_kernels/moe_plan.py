"""What the MoE kernels share: the routing plan (a work list of row tiles) and the in-tile MXFP8 dequantisation.

Routing plan. T tokens each choose k experts: n = T*k slots. Slots are sorted by expert (stable, so a token's
slots keep their order inside an expert) and each expert's rows are padded up to a multiple of the row tile
`block_m`. Tile i of the padded row space belongs to one expert, `tile_expert[i]`; only the first `num_used`
tiles hold rows. The number of tiles is static: at most floor((n + min(E, n) * (block_m - 1)) / block_m),
since every expert with rows wastes at most block_m - 1 padding rows. A kernel's grid runs over that bound and
the programs past `num_used` return at once: a decode step of batch 1 launches 4 row tiles (one per routed
expert) and reads those 4 experts' weights, nothing else. Unused tiles repeat the expert of the last used tile,
so that a pipeline that prefetches "the next block" (Mosaic TPU) finds it already resident and copies nothing.

Slots whose expert id lies outside [0, E) belong to no expert here (expert parallelism: another device owns
them); they get no row and contribute 0.

MXFP8 tiles. A weight tile is e4m3 [BK, BN] with uint8 E8M0 exponents [BK/32, BN] (one per 32 consecutive
inputs). `dequantize_tile` returns exactly `reference.dequantize_mxfp8` of that tile (see its docstring for the
semantics: products exact in float32, results below 2**-126 flushed to zero, exponent byte 255 NaN), using only
operations the Triton and Mosaic lowerings have: an integer shift and bitcast build 2**(s-127) for s >= 1, and
exponent byte 0 (2**-127, itself subnormal) is applied as 2**-126 * 0.5.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

f32 = jnp.float32
MXFP8_BLOCK = 32
TINY = 2.0 ** -126          # float32's smallest normal: dequantised weights below it are zero on every backend


def max_tiles(num_slots: int, num_experts: int, block_m: int) -> int:
    """The most row tiles `num_slots` rows can need when each expert's rows are padded to `block_m`."""
    return (num_slots + min(num_experts, num_slots) * (block_m - 1)) // block_m


@dataclasses.dataclass(frozen=True)
class MoEPlan:
    """Slots sorted by expert, padded to row tiles of `block_m` rows (R = num_tiles * block_m padded rows).

    tile_expert  i32[num_tiles]  expert of each tile; tiles >= num_used repeat the last used tile's expert.
    num_used     i32[1]          tiles that hold rows.
    row_token    i32[R]          source token of each padded row; -1 for padding rows.
    row_weight   f32[R]          combine weight of each padded row; 0 for padding rows.
    slot_row     i32[T, k]       padded row of each (token, choice); R where the expert is not here.
    """
    block_m: int
    tile_expert: jax.Array
    num_used: jax.Array
    row_token: jax.Array
    row_weight: jax.Array
    slot_row: jax.Array

    @property
    def num_tiles(self) -> int:
        return self.tile_expert.shape[0]

    @property
    def num_rows(self) -> int:
        return self.num_tiles * self.block_m

    def gather_rows(self, x_td):
        """[R, D] rows of x in padded order (padding rows read token 0: finite, weighted 0, never combined)."""
        return x_td[jnp.maximum(self.row_token, 0)]

    def combine(self, y_rd):
        """f32[T, D]: sum over each token's k slots of their (already weighted) rows, in choice order."""
        valid = self.slot_row < self.num_rows
        rows = y_rd[jnp.minimum(self.slot_row, self.num_rows - 1)]                 # [T, k, D]
        return jnp.sum(jnp.where(valid[..., None], rows.astype(f32), 0.0), axis=1)


def vary_together(arrays) -> list:
    """The kernel operands, each made varying (`lax.pcast`) over every manual mesh axis that any of them varies
    over. Why: inside a `shard_map` with its varying-axes check on (the MoE's expert-parallel map keeps it on
    for training gradients), the kernel body mixes its operands (the interpreters index one by another), and
    jax refuses to mix a device's own values with replicated ones unless both say so. Outside a shard_map no
    array varies and nothing changes."""
    axes = frozenset().union(*(jax.typeof(a).mat.varying for a in arrays))
    out = []
    for a in arrays:
        missing = tuple(sorted(axes - jax.typeof(a).mat.varying))
        out.append(jax.lax.pcast(a, missing, to="varying") if missing else a)
    return out


def out_struct(shape, dtype, like) -> jax.ShapeDtypeStruct:
    """A kernel output's ShapeDtypeStruct, varying over the same manual mesh axes as `like` (an operand after
    vary_together): pallas_call is told rather than left to refuse inside a checked shard_map."""
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(like).mat)


def plan(ids_tk, combine_tk, num_experts: int, block_m: int) -> MoEPlan:
    """The routing plan of expert ids i32[T, k] with combine weights [T, k] (see the module docstring)."""
    t, k = ids_tk.shape
    n, e = t * k, num_experts
    num_tiles = max(1, max_tiles(n, e, block_m))
    here = (ids_tk >= 0) & (ids_tk < e)
    eid = jnp.where(here, ids_tk, e).reshape(n).astype(jnp.int32)             # e = "not here", sorted last
    sizes = jnp.bincount(eid, length=e + 1)[:e].astype(jnp.int32)
    tiles = -(-sizes // block_m)
    cum_tiles = jnp.cumsum(tiles)                                              # inclusive
    num_used = cum_tiles[-1]
    i = jnp.arange(num_tiles, dtype=jnp.int32)
    tile_expert = jnp.searchsorted(cum_tiles, i, side="right").astype(jnp.int32)
    last = tile_expert[jnp.maximum(num_used - 1, 0)]
    tile_expert = jnp.where(i < num_used, tile_expert, jnp.where(num_used > 0, last, 0))

    order = jnp.argsort(eid, stable=True)
    sorted_e = eid[order]
    first_row = jnp.concatenate([(cum_tiles - tiles) * block_m, jnp.array([num_tiles * block_m], jnp.int32)])
    group_start = jnp.concatenate([jnp.cumsum(sizes) - sizes, jnp.array([n], jnp.int32)])
    rank = jnp.arange(n, dtype=jnp.int32) - group_start[sorted_e]
    row_sorted = jnp.where(sorted_e < e, first_row[sorted_e] + rank, num_tiles * block_m)
    slot_row = jnp.zeros((n,), jnp.int32).at[order].set(row_sorted)
    r = num_tiles * block_m
    row_token = jnp.full((r,), -1, jnp.int32).at[slot_row].set(jnp.arange(n, dtype=jnp.int32) // k, mode="drop")
    row_weight = jnp.zeros((r,), f32).at[slot_row].set(combine_tk.reshape(n).astype(f32), mode="drop")
    return MoEPlan(block_m, tile_expert, num_used.reshape(1).astype(jnp.int32), row_token, row_weight,
                   slot_row.reshape(t, k))


def check_inputs(backend: str, x_td, ids_tk, combine_tk, weights, scales, layer):
    """Static shape and dtype checks of a kernel's moe arguments -> (D, F, stacked, fp8); ValueError/TypeError
    name the tensor."""
    op = f"{backend}.moe"
    gate, up, down = weights
    stacked = layer is not None
    lead = 2 if stacked else 1
    shapes = {"x": x_td.shape, "ids": ids_tk.shape, "combine": combine_tk.shape, "gate": gate.shape,
              "up": up.shape, "down": down.shape}
    if gate.ndim != lead + 2 or up.shape != gate.shape or down.shape[:lead] != gate.shape[:lead]:
        raise ValueError(f"{op}: weights must be gate/up [{'L, ' * stacked}E, D, F], down "
                         f"[{'L, ' * stacked}E, F, D] (layer={'given' if stacked else 'None'}), got {shapes}")
    d, f = gate.shape[-2:]
    if down.shape[-2:] != (f, d) or x_td.shape[-1] != d or x_td.ndim != 2:
        raise ValueError(f"{op}: inconsistent shapes {shapes}")
    if ids_tk.shape != combine_tk.shape or ids_tk.shape[0] != x_td.shape[0]:
        raise ValueError(f"{op}: ids and combine must both be [T={x_td.shape[0]}, k], got {shapes}")
    if x_td.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise NotImplementedError(f"{op}: x must be float32/bfloat16/float16, got {x_td.dtype}")
    fp8 = scales is not None
    want = jnp.float8_e4m3fn if fp8 else x_td.dtype
    for name, w in zip(("gate", "up", "down"), weights):
        if w.dtype != want:
            raise TypeError(f"{op}: {name} must be {jnp.dtype(want).name} (x's dtype, or e4m3 with scales), "
                            f"got {w.dtype}")
    if fp8:
        blk = MXFP8_BLOCK
        for name, w, s in zip(("gate", "up", "down"), weights, scales):
            k_in = w.shape[-2]
            want_s = (*w.shape[:-2], -(-k_in // blk), w.shape[-1])
            if s.dtype != jnp.uint8 or s.shape != want_s:
                raise ValueError(f"{op}: {name} scales must be uint8 {want_s}, got {s.dtype} {s.shape}")
    return d, f, stacked, fp8


def e8m0_factors(s_u8):
    """uint8 E8M0 exponents -> (scale, fix) float32 with scale * fix = 2**(s - 127) applied in two exact steps:
    scale = 2**(max(s, 1) - 127) from its bit pattern; fix = 0.5 for s = 0, NaN for s = 255, else 1."""
    s = s_u8.astype(jnp.int32)
    scale = jax.lax.bitcast_convert_type(jnp.left_shift(jnp.maximum(s, 1), 23), f32)
    fix = jnp.where(s == 0, 0.5, jnp.where(s == 255, jnp.nan, 1.0)).astype(f32)
    return scale, fix


def dequantize_tile(w, s, dtype):
    """e4m3 [BK, BN] with uint8 exponents [BK/32, BN] -> [BK, BN] `dtype`, as reference.dequantize_mxfp8."""
    bk, bn = w.shape
    nb = s.shape[0]
    scale, fix = e8m0_factors(s)
    wf = w.astype(f32)
    if nb == 1:
        y = wf * scale * fix
    else:
        y = (wf.reshape(nb, bk // nb, bn) * scale[:, None, :] * fix[:, None, :]).reshape(bk, bn)
    return jnp.where(jnp.abs(y) < TINY, 0.0, y).astype(dtype)
