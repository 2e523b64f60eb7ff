"""Bytes per device for the full MiniMax-M3 on several slices, from the code's own sharding rules.

Parameters: `jax.eval_shape` of M3ForCausalLM (KV heads replicated as `m3jax.sharding` does for the mesh) and
`sharding.param_spec` for every parameter, divided by the mesh axes each one is split over. Weights in BF16
(router float32), or with the routed experts in MXFP8 (fp8_experts: 1 byte per weight + 1 byte of scale per 32,
the rest in BF16). KV cache: the engine's layout (K/V [K', L*P, R, H] with K' on "model" and pages
on "data"; index-K [L*P, R, I] with pages on "data", replicated over "model"), bf16, one page per 128 tokens.

    python benchmarks/memory_plan.py            # prints the table, writes benchmarks/MEMORY_PLAN.md and .json
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from m3jax import cache as cache_lib, sharding  # noqa: E402
from m3jax.config import M3Config  # noqa: E402
from m3jax.model import M3ForCausalLM  # noqa: E402
from m3jax.params import flat_params  # noqa: E402

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str
    data: int
    model: int
    hbm_gib: float          # per device, as sold (usable memory is a little lower)

    @property
    def shape(self):
        return {sharding.DATA: self.data, sharding.MODEL: self.model}

    @property
    def size(self):
        return self.data * self.model


SLICES = (
    Slice("4x H200", 1, 4, 141),
    Slice("8x H100", 1, 8, 80),
    Slice("2 hosts x 4x H200", 1, 8, 141),          # multi-host GPU (m3jax.distributed): 2 processes, 4 GPUs each
    Slice("2 hosts x 8x H100", 1, 16, 80),
    Slice("TPU v5p-16 (8 chips)", 1, 8, 95),
    Slice("TPU v5p-32 (16 chips)", 2, 8, 95),
    Slice("TPU v6e-32 (32 chips)", 2, 16, 32),
    Slice("TPU v6e-64 (64 chips)", 4, 16, 32),
)


def param_bytes_per_device(cfg: M3Config, sl: Slice, fp8_experts: bool) -> float:
    """One device's parameter bytes: the bf16 model (`fp8_experts`: routed experts in MXFP8, as
    `m3jax.load(..., fp8_experts=True)` holds them), split by `sharding.param_spec`."""
    rcfg = sharding.replicate_kv(cfg, max(1, sl.model // cfg.num_key_value_heads))
    abstract = nnx.eval_shape(lambda: M3ForCausalLM(rcfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0),
                                                    fp8_experts=fp8_experts))
    total = 0.0
    for path, v in flat_params(abstract).items():
        spec = sharding.param_spec(path, v.shape, _MeshShape(sl.shape))
        split = math.prod(_size(sl, a) for a in spec if a is not None)
        total += math.prod(v.shape) / split * jnp.dtype(v.dtype).itemsize
    return total


def kv_bytes_per_device(cfg: M3Config, sl: Slice, batch: int, context: int) -> float:
    """One device's share of the engine's cache (m3jax.cache.cache_layout, bf16) with pages for `batch` requests
    of `context` tokens, split over the data shards."""
    rcfg = sharding.replicate_kv(cfg, max(1, sl.model // cfg.num_key_value_heads))
    pages = math.ceil(batch / sl.data) * math.ceil(context / cfg.msa.block_size) + 1     # + the sink page
    return pages * cache_lib.bytes_per_page(rcfg, jnp.bfloat16, data=sl.data, model=sl.model)


class _MeshShape:
    def __init__(self, shape):
        self.shape = shape


def _size(sl: Slice, axis) -> int:
    names = axis if isinstance(axis, tuple) else (axis,)
    return math.prod(sl.shape[a] for a in names)


def plan_rows() -> list[dict]:
    """One row per (slice, weights, context, batch): bytes per device of the full M3 (MEMORY_PLAN.json's rows)."""
    cfg = M3Config()
    rows = []
    for sl in SLICES:
        for fp8 in (False, True):
            w = param_bytes_per_device(cfg, sl, fp8)
            for context in (131072, 1048576):
                for batch in (1, 8, 32):
                    kv = kv_bytes_per_device(cfg, sl, batch, context)
                    rows.append(dict(slice=sl.name, mesh=f"{sl.data}x{sl.model}",
                                     weights="BF16, FP8 experts" if fp8 else "BF16",
                                     context=context, batch=batch, weights_gib=w / GIB, kv_gib=kv / GIB,
                                     total_gib=(w + kv) / GIB, hbm_gib=sl.hbm_gib,
                                     fits=(w + kv) / GIB < 0.9 * sl.hbm_gib))
    return rows


def main() -> None:
    rows = plan_rows()
    head = "| slice | mesh | weights | context | batch | weights GiB/dev | KV GiB/dev | total GiB/dev | HBM | fits (<90%) |"
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['slice']} | {r['mesh']} | {r['weights']} | {r['context'] // 1024}K | {r['batch']} | "
                     f"{r['weights_gib']:.1f} | {r['kv_gib']:.1f} | {r['total_gib']:.1f} | {r['hbm_gib']} | "
                     f"{'yes' if r['fits'] else 'no'} |")
    table = "\n".join(lines)
    print(table)
    here = os.path.dirname(__file__)
    with open(os.path.join(here, "MEMORY_PLAN.json"), "w") as f:
        json.dump(dict(jax=jax.__version__, rows=rows), f, indent=1)
    with open(os.path.join(here, "MEMORY_PLAN.md"), "w") as f:
        f.write("# Memory plan: full MiniMax-M3 per device\n\nGenerated by `python benchmarks/memory_plan.py` "
                "from `m3jax.sharding.param_spec` applied to `jax.eval_shape` of the model (KV heads replicated "
                "to the model axis when it is larger than 4) and the engine's cache layout (bf16 KV + index-K, "
                "pages on `data`, KV heads on `model`). Computed, not measured; activations and the step "
                "workspace are not included.\n\n**BF16, FP8 experts** rows: `m3jax.load(mxfp8_release, "
                "fp8_experts=True)`: routed experts kept as released (e4m3 + one exponent byte per 32 inputs), "
                "every other weight in bf16 (router float32). The experts are dequantised one layer at a time "
                "inside the step, so the step workspace also holds one layer's local experts in bf16.\n\n"
                + table + "\n")


if __name__ == "__main__":
    main()
