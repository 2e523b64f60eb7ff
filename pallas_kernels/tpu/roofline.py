"""Paper cost model of the TPU kernels: HBM bytes, MXU flops and roofline time per call at M3's shapes.

Mirrors the kernels' schedules (pallas_kernels/tpu/attention.py, indexer.py) and tile choices (tiling.py);
`python -m pallas_kernels.tpu.roofline` prints the tables of benchmarks/TPU_PLAN.md. No number here is a
measurement. Chip numbers are the public per-chip peaks (Cloud TPU docs: v5e, v5p, v6e pages).
"""

from __future__ import annotations

import dataclasses

from pallas_kernels.tpu import tiling


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes_per_s: float
    bf16_flops_per_s: float

    @property
    def ridge(self) -> float:
        return self.bf16_flops_per_s / self.hbm_bytes_per_s


CHIPS = (Chip("v5e", 819e9, 197e12), Chip("v5p", 2765e9, 459e12), Chip("v6e", 1638e9, 918e12))


@dataclasses.dataclass(frozen=True)
class Shapes:
    """One M3 layer on one chip, unsharded (a mesh divides heads, not the per-head work)."""
    kv_heads: int = 4
    q_per_kv: int = 16
    head_dim: int = 128
    index_dim: int = 128
    page: int = 128
    topk: int = 16
    itemsize: int = 2               # bf16 caches and activations


@dataclasses.dataclass(frozen=True)
class Cost:
    bytes: float
    flops: float                    # MXU flops the kernel issues (masked lanes included)
    useful_flops: float             # flops of the math itself

    def time(self, chip: Chip) -> float:
        return max(self.bytes / chip.hbm_bytes_per_s, self.flops / chip.bf16_flops_per_s)

    def bound(self, chip: Chip) -> str:
        return "mem" if self.bytes / chip.hbm_bytes_per_s >= self.flops / chip.bf16_flops_per_s else "mxu"


def _blocks(n, r):
    return -(-n // r)


def _tokens_per_tile(heads_per_token, target_rows, num_tokens):
    return tiling.row_tile(num_tokens, heads_per_token, target_rows)


def indexer_decode(ctx: int, s: Shapes = Shapes()) -> Cost:
    """One new token of one request: stream every index-K page of the context once."""
    nb = _blocks(ctx, s.page)
    rows = tiling.round_up(s.kv_heads, 8)
    read = nb * s.page * s.index_dim * s.itemsize + s.kv_heads * s.index_dim * s.itemsize
    return Cost(read, 2 * rows * nb * s.page * s.index_dim, 2 * s.kv_heads * ctx * s.index_dim)


def indexer_prefill(ctx: int, s: Shapes = Shapes()) -> Cost:
    """A whole prompt of ctx tokens: each tile of tq tokens streams the pages up to its last position."""
    m_pad = tiling.round_up(_blocks(ctx, s.page), tiling.LANES)
    max_rows = tiling.INDEXER_SCORES_VMEM_BYTES // (m_pad * 4)
    tq = _tokens_per_tile(s.kv_heads, min(tiling.INDEXER_TARGET_ROWS, max_rows), ctx)
    rows = tq * s.kv_heads
    pages = sum(_blocks(min(t0 + tq, ctx), s.page) for t0 in range(0, ctx, tq))
    read = pages * s.page * s.index_dim * s.itemsize + ctx * s.kv_heads * s.index_dim * s.itemsize
    return Cost(read, 2 * rows * pages * s.page * s.index_dim, s.kv_heads * ctx * ctx * s.index_dim)


def sparse_decode(ctx: int, s: Shapes = Shapes()) -> Cost:
    """One new token: per KV head, its <= topk selected pages of K and V."""
    pages = min(s.topk, _blocks(ctx, s.page))
    rows = s.q_per_kv
    kv = s.kv_heads * pages * s.page * s.head_dim * s.itemsize * 2
    qo = 2 * s.kv_heads * rows * s.head_dim * s.itemsize
    flops = s.kv_heads * 4 * rows * pages * s.page * s.head_dim
    return Cost(kv + qo, flops, 4 * s.kv_heads * rows * min(ctx, pages * s.page) * s.head_dim)


def sparse_prefill(ctx: int, union_per_tile: str, s: Shapes = Shapes()) -> Cost:
    """A whole prompt. union_per_tile: 'shared' (all tq tokens of a tile chose the same topk pages: the
    floor) or 'disjoint' (min(tq*topk, visible) pages: the ceiling)."""
    tq = _tokens_per_tile(s.q_per_kv, tiling.ATTENTION_TARGET_ROWS, ctx)
    rows = tq * s.q_per_kv
    pages = 0
    for t0 in range(0, ctx, tq):
        visible = _blocks(min(t0 + tq, ctx), s.page)
        pages += min(s.topk, visible) if union_per_tile == "shared" else min(tq * s.topk, visible)
    kv = s.kv_heads * pages * s.page * s.head_dim * s.itemsize * 2
    qo = 2 * ctx * s.kv_heads * s.q_per_kv * s.head_dim * s.itemsize
    flops = s.kv_heads * 4 * rows * pages * s.page * s.head_dim
    useful = 4 * s.kv_heads * s.q_per_kv * s.head_dim * sum(min(p + 1, s.topk * s.page) for p in range(ctx))
    return Cost(kv + qo, flops, useful)


def dense_decode(ctx: int, s: Shapes = Shapes()) -> Cost:
    pages = _blocks(ctx, s.page)
    kv = s.kv_heads * pages * s.page * s.head_dim * s.itemsize * 2
    return Cost(kv, s.kv_heads * 4 * s.q_per_kv * pages * s.page * s.head_dim,
                4 * s.kv_heads * s.q_per_kv * ctx * s.head_dim)


def dense_prefill(ctx: int, s: Shapes = Shapes()) -> Cost:
    tq = _tokens_per_tile(s.q_per_kv, tiling.ATTENTION_TARGET_ROWS, ctx)
    rows = tq * s.q_per_kv
    pages = sum(_blocks(min(t0 + tq, ctx), s.page) for t0 in range(0, ctx, tq))
    kv = s.kv_heads * pages * s.page * s.head_dim * s.itemsize * 2
    qo = 2 * ctx * s.kv_heads * s.q_per_kv * s.head_dim * s.itemsize
    return Cost(kv + qo, s.kv_heads * 4 * rows * pages * s.page * s.head_dim,
                2 * s.kv_heads * s.q_per_kv * ctx * ctx * s.head_dim)


CONTEXTS = {"8K": 8192, "128K": 131072, "1M": 1048576}
KERNELS = (
    ("indexer_topk, decode (1 token)", indexer_decode),
    ("sparse_attention, decode (1 token)", sparse_decode),
    ("dense_attention, decode (1 token)", dense_decode),
    ("indexer_topk, prefill (whole prompt)", indexer_prefill),
    ("sparse_attention, prefill, tile union = topk (floor)", lambda c: sparse_prefill(c, "shared")),
    ("sparse_attention, prefill, tile union disjoint (ceiling)", lambda c: sparse_prefill(c, "disjoint")),
    ("dense_attention, prefill (whole prompt)", dense_prefill),
)


def _fmt(x, unit):
    for scale, pre in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= scale:
            return f"{x / scale:.3g} {pre}{unit}"
    return f"{x:.3g} {unit}"


def _fmt_t(t):
    if t >= 1.0:
        return f"{t:.3g} s"
    return f"{t * 1e3:.3g} ms" if t >= 1e-3 else f"{t * 1e6:.3g} us"


def table() -> str:
    head = "| kernel (one layer, B=1) | ctx | HBM bytes | MXU flops (useful) | " + " | ".join(
        f"{c.name}" for c in CHIPS) + " |"
    lines = [head, "|" + "---|" * (4 + len(CHIPS))]
    for name, fn in KERNELS:
        for label, ctx in CONTEXTS.items():
            cost = fn(ctx)
            times = " | ".join(f"{_fmt_t(cost.time(c))} ({cost.bound(c)})" for c in CHIPS)
            lines.append(f"| {name} | {label} | {_fmt(cost.bytes, 'B')} | {_fmt(cost.flops, 'F')} "
                         f"({_fmt(cost.useful_flops, 'F')}) | {times} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
