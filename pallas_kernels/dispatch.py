"""One entry point per kernel op (MSA, MoE); picks the implementation from the backend or an explicit `impl`.

    impl=None         the default for jax.default_backend(): "gpu" on GPU, "tpu" on TPU, "reference" on CPU
    impl="reference"  the float32 jnp reference (reference.py)
    impl="gpu"        Pallas GPU kernels;   impl="gpu-interpret": the same kernels in the Pallas interpreter
    impl="tpu"        Pallas TPU kernels;   impl="tpu-interpret": the same kernels in the TPU interpreter

On GPU and TPU the default list does not end with the reference: an input the kernel refuses raises an error
naming every implementation tried, instead of silently running a 100x slower path. `impl` is a static
Python value chosen by the caller (the model holds it); nothing here reads the environment.
"""

from __future__ import annotations

import importlib
import logging
from typing import Callable, Sequence

import jax

from pallas_kernels import reference

log = logging.getLogger(__name__)

IMPLS = ("reference", "gpu", "gpu-interpret", "tpu", "tpu-interpret")
_DEFAULT = {"gpu": ("gpu",), "cuda": ("gpu",), "tpu": ("tpu",), "cpu": ("reference",)}
_BACKEND_MODULE = {"gpu": "pallas_kernels.gpu", "tpu": "pallas_kernels.tpu"}
# The MoE grouped matmul's reference is XLA's ragged_dot, a real (if slow on GPU) implementation: where a
# kernel refuses an input, that path runs, with a warning that names it.
_DEFAULT_FOR_OP = {"grouped_matmul": {"gpu": ("gpu",), "cuda": ("gpu",)}}


class NoImplementationError(RuntimeError):
    """No implementation in the requested list accepts these inputs."""


def default_impls() -> tuple[str, ...]:
    return _DEFAULT.get(jax.default_backend(), ("reference",))


def _resolve(op: str, name: str) -> Callable:
    """The function implementing `op` for `name`, with `interpret` bound for the interpreter variants."""
    if name not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS} or None, got {name!r}")
    if name == "reference":
        return getattr(reference, op)
    backend, _, mode = name.partition("-")
    try:
        module = importlib.import_module(_BACKEND_MODULE[backend])
    except ImportError as e:
        raise NotImplementedError(f"{name}: kernels for {backend} are not available ({e})") from None
    fn = getattr(module, op, None)
    if not callable(fn):                # a kernel may live in a submodule named after its op
        try:
            fn = getattr(importlib.import_module(f"{_BACKEND_MODULE[backend]}.{op}"), op, None)
        except ImportError:
            fn = None
    if not callable(fn):
        raise NotImplementedError(f"{name}: no {backend} kernel for {op}")
    if mode == "interpret":
        return lambda *a, **kw: fn(*a, interpret=True, **kw)
    return fn


def _first_impl(impl) -> str:
    """The implementation an op runs first for `impl` (None: the backend's default); the *_path functions name it,
    since the kernel ops have no fallback on GPU and TPU."""
    order = default_impls() if impl is None else ((impl,) if isinstance(impl, str) else tuple(impl))
    if order[0] not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS} or None, got {order[0]!r}")
    return order[0]


def _call(op: str, impl: str | Sequence[str] | None, *args, **kwargs):
    order = default_impls() if impl is None else ((impl,) if isinstance(impl, str) else tuple(impl))
    errors = []
    for name in order:
        try:
            out = _resolve(op, name)(*args, **kwargs)
            if errors:
                log.warning("%s: running %s because %s", op, name, "; ".join(errors))
            return out
        except NotImplementedError as e:
            errors.append(f"{name}: {e}")
    raise NoImplementationError(f"{op}: no implementation in {order} accepts these inputs: " + "; ".join(errors))


def indexer_topk(iq_btki, ik_pages, page_table, q_pos, *, topk: int, local_blocks: int = 1, ik_scale=None,
                 impl=None):
    """MSA block selection; see reference.indexer_topk for layouts and semantics. FP8 index-K cache: ik_pages
    float8_e4m3fn [P, R, I] with ik_scale f32[P, R] (layout.quantize_index_k)."""
    kw = {} if ik_scale is None else {"ik_scale": ik_scale}
    return _call("indexer_topk", impl, iq_btki, ik_pages, page_table, q_pos, topk=topk, local_blocks=local_blocks,
                 **kw)


def sparse_attention(q_btnh, k_pages, v_pages, page_table, q_pos, block_ids, *, scale=None, impl=None):
    """MSA main branch over the chosen blocks; see reference.sparse_attention."""
    return _call("sparse_attention", impl, q_btnh, k_pages, v_pages, page_table, q_pos, block_ids, scale=scale)


def msa(q_btnh, k_pages, v_pages, page_table, q_pos, iq_btki, ik_pages, *, topk: int, local_blocks: int = 1,
        ik_scale=None, scale=None, impl=None):
    """MSA, both branches in one call: (attention output, the selection i32[B, T, K, topk]); see reference.msa.
    Kernels may join the index and attention steps (gpu/msa.py)."""
    kw = {} if ik_scale is None else {"ik_scale": ik_scale}
    return _call("msa", impl, q_btnh, k_pages, v_pages, page_table, q_pos, iq_btki, ik_pages, topk=topk,
                 local_blocks=local_blocks, scale=scale, **kw)


def dense_attention(q_btnh, k_pages, v_pages, page_table, q_pos, *, scale=None, impl=None,
                    contiguous_chunks: bool = False):
    """Causal GQA over the paged cache; see reference.dense_attention. contiguous_chunks=True promises that
    each request's valid rows are consecutive positions then -1 padding (prompt chunks): on GPU the chunk then
    runs through cuDNN, its history through the paged kernel (gpu.attention.dense_attention_chunked)."""
    return _call("dense_attention", impl, q_btnh, k_pages, v_pages, page_table, q_pos, scale=scale,
                 contiguous_chunks=contiguous_chunks)


def dense_attention_path(dtype, num_queries: int, *, contiguous_chunks: bool = False, impl=None) -> str:
    """Which computation dense_attention(..., contiguous_chunks=..., impl=impl) runs for queries of `dtype`, T =
    num_queries per row, stated without running it: "reference", "gpu:paged", "gpu:cudnn-chunk+paged-history"
    (gpu.attention.dense_schedule decides), "tpu:paged" (the promise changes nothing there), with "-interpret"
    in the name for the interpreter variants. The first implementation of the order is named: dense_attention
    has no fallback on GPU and TPU (an input it refuses raises)."""
    name = _first_impl(impl)
    if name == "reference":
        return name
    if name.startswith("gpu"):
        from pallas_kernels.gpu.attention import dense_schedule
        return f"{name}:{dense_schedule(num_queries, dtype, contiguous_chunks)}"
    return f"{name}:paged"


def msa_path(num_queries: int, *, impl=None) -> str:
    """Which computation msa(..., impl=impl) runs for rows of T = num_queries queries, stated without running it:
    "reference", "gpu:two-step" / "gpu:fused-topk" (gpu.msa.schedule_for decides), "tpu:two-step", with
    "-interpret" in the name for the interpreter variants. The first implementation of the order is named: msa
    has no fallback on GPU and TPU."""
    name = _first_impl(impl)
    if name == "reference":
        return name
    if name.startswith("gpu"):
        gpu_msa = importlib.import_module("pallas_kernels.gpu.msa")
        return f"{name}:{gpu_msa.schedule_for(num_queries, gpu_msa.DEFAULT_SCHEDULE)}"
    return f"{name}:two-step"


def grouped_matmul(lhs_md, rhs_gdn, group_sizes, *, impl=None):
    """MoE grouped matmul, float32 [M, N]; see reference.grouped_matmul. The requested (or default)
    implementation, then XLA's ragged_dot where it refuses the input (logged with the reason)."""
    if impl is None:
        order = _DEFAULT_FOR_OP["grouped_matmul"].get(jax.default_backend(), default_impls())
    else:
        order = (impl,) if isinstance(impl, str) else tuple(impl)
    order = order + ("reference",) * ("reference" not in order)
    return _call("grouped_matmul", order, lhs_md, rhs_gdn, group_sizes)


def moe(x_td, ids_tk, combine_tk, gate_edf, up_edf, down_efd, gate_scale_ebf=None, up_scale_ebf=None,
        down_scale_ebd=None, *, alpha: float, limit: float, layer=None, impl=None):
    """Routed experts of an MoE layer (bf16/f32 or MXFP8 weights, optionally a layer of a stacked [L, E, ...]
    weight), float32 [T, D]; see reference.moe. No fallback: an input the kernel refuses raises."""
    return _call("moe", impl, x_td, ids_tk, combine_tk, gate_edf, up_edf, down_efd, gate_scale_ebf, up_scale_ebf,
                 down_scale_ebd, alpha=alpha, limit=limit, layer=layer)


# Above this many rows the stacked matmul slices its layer and runs XLA's matmul: the per-step copy of the
# slice is then amortised over the rows, and cuBLAS / the MXU run at the matmul peak. At or below it (decode
# steps, small prompt chunks) the step is bound by reading the weight, and the kernel reads it in place.
LINEAR_KERNEL_MAX_ROWS = 256


def linear(x_mk, w_lkn, *, layer, impl=None):
    """x [M, K] @ w_lkn[layer] of a stacked weight [L, K, N] read in place, float32 [M, N]; see
    reference.linear. No fallback: an input the kernel refuses raises (linear_path says which inputs run)."""
    return _call("linear", impl, x_mk, w_lkn, layer=layer)


def linear_path(rows: int, *, k: int, n: int, dtype, impl=None) -> str:
    """How a stacked matmul of `rows` rows, K = k, N = n in `dtype` runs, stated without running it:
    "xla" (the layer's slice, then XLA's matmul) or the kernel implementation that reads the weight in place
    ("gpu", "tpu", or their "-interpret" variants). The reference implementation is "xla" (it is a slice and a
    matmul); so are rows above LINEAR_KERNEL_MAX_ROWS and shapes the kernel does not accept (its `accepts`)."""
    name = _first_impl(impl)
    if name == "reference" or rows > LINEAR_KERNEL_MAX_ROWS:
        return "xla"
    backend = name.partition("-")[0]
    module = importlib.import_module(f"{_BACKEND_MODULE[backend]}.linear")
    return name if module.accepts(rows, k, n, dtype) else "xla"
