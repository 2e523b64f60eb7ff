"""Small building blocks: Gemma RMSNorm, partial NeoX RoPE, SwiGLU-OAI MLP, the stacked-weight matmul."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from m3jax.config import M3Config
from m3jax.sharding import param_spec
from pallas_kernels import dispatch

f32 = jnp.float32


def matmul_precision(dtype) -> jax.lax.Precision:
    """The precision of a model's matmuls: float32 models compute them in float32 (HIGHEST) on every backend.

    Why: XLA runs float32 dots as TF32 on NVIDIA GPUs unless asked otherwise (about 1e-3 relative error, enough
    to flip MSA block selections), so a model loaded with dtype="float32" would silently not be float32. bf16
    models keep the backend default (bf16 inputs, float32 accumulation).
    """
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == f32 else jax.lax.Precision.DEFAULT


class InPlace(nnx.Param):
    """A parameter that a layer of a `LayerStack` reads in place from the stacked array, by its layer index.

    `LayerStack.scan` hands every other parameter to the step of layer l as its slice `x[l]`; an InPlace one it
    hands whole (`[L, ...]`), with l, and the module reads layer l inside its kernel (the MoE's routed experts:
    `dispatch.moe(..., layer=l)`; every other matmul weight: `stacked_matmul`). Why: XLA materialises the
    per-step slice of a scanned weight before its matmul (a memcpy of every layer's weights on every step,
    measured on the H200: 37% of a batch-1 decode step of the scaled M3 with the experts already in place;
    XLA's dynamic-slice fusion did not remove it). A module holding InPlace parameters takes the layer index in
    its call: None means they are this layer's own (a layer outside a stack). Otherwise an ordinary nnx.Param
    (filters on nnx.Param include it; its path and sharding rule are those of its name). The norms and the
    router stay sliced: about 1% of a layer's non-expert bytes.
    """


def _device_block(stack_shape, in_axes: int, mesh: Mesh | None, rule: str | None):
    """(spec of w's axes after the layer axis, the mesh axes splitting each, K and N of the block one device
    holds) of a stacked weight [L, *K, *N] placed by sharding rule `rule` (None or no mesh: whole); None when
    the rule's axes do not divide the weight (then it was not placed by the rule, and XLA partitions it)."""
    tail = (None,) * (len(stack_shape) - 1)
    if mesh is not None and rule is not None:
        tail = tuple(param_spec(rule, stack_shape))[1:]
        tail += (None,) * (len(stack_shape) - 1 - len(tail))
    axes = [() if a is None else (a if isinstance(a, tuple) else (a,)) for a in tail]
    split = [math.prod(mesh.shape[name] for name in names) if names else 1 for names in axes]
    if any(d % s for d, s in zip(stack_shape[1:], split)):
        return None
    local = [d // s for d, s in zip(stack_shape[1:], split)]
    return tail, axes, math.prod(local[:in_axes]), math.prod(local[in_axes:])


def stacked_matmul_path(rows: int, stack, *, in_axes: int, impl=None, mesh: Mesh | None = None,
                        rule: str | None = None) -> str:
    """What `stacked_matmul` runs for `rows` rows against the stacked weight `stack` (an array or its
    ShapeDtypeStruct, [L, *K, *N]): dispatch.linear_path of the block each device holds ("gpu", "tpu", their
    "-interpret" variants: read in place; "xla": slice, then XLA's matmul)."""
    mesh = mesh if mesh is not None and mesh.size > 1 else None
    block = _device_block(stack.shape, in_axes, mesh, rule)
    if block is None:
        return "xla"
    return dispatch.linear_path(rows, k=block[2], n=block[3], dtype=stack.dtype, impl=impl)


def stacked_matmul(x, w, layer, *, in_axes: int, precision, impl=None, mesh: Mesh | None = None,
                   rule: str | None = None):
    """x [..., *K] contracted with w over K: [..., *N]. w is [*K, *N] (layer None: a lone layer's own weight) or
    the stack's [L, *K, *N] (layer: an int32 scalar, possibly traced), with in_axes = len(K).

    Rows = prod(x's leading axes). `dispatch.linear_path` decides:
      - the kernel (dispatch.linear: Pallas on GPU and TPU) reads layer `layer` of the stack where it lies, for
        steps of at most dispatch.LINEAR_KERNEL_MAX_ROWS rows (decode, small chunks: bound by the weight's
        bytes). On a mesh it runs per device on the device's block of w (shard_map; the weight's sharding rule
        `rule`, a parameter path as in m3jax.sharding.PARAM_RULES), and a contraction split over devices is
        summed in float32 (psum).
      - "xla": the layer's slice and XLA's matmul (longer prompts: the slice's copy is amortised over the rows
        and the library matmul runs at the tensor-core peak; the reference implementation; widths the kernel
        refuses). Partitioned by XLA on a mesh.
    Output in x's dtype, float32 accumulation.
    """
    out_dtype = jnp.result_type(x.dtype, w.dtype)
    if layer is None:
        return jnp.tensordot(x, w, axes=in_axes, precision=precision).astype(out_dtype)
    lead = x.shape[:x.ndim - in_axes]
    rows = math.prod(lead)
    mesh = mesh if mesh is not None and mesh.size > 1 else None
    path = stacked_matmul_path(rows, w, in_axes=in_axes, impl=impl, mesh=mesh, rule=rule)
    if path == "xla":
        w_l = jax.lax.dynamic_index_in_dim(w, jnp.asarray(layer, jnp.int32), axis=0, keepdims=False)
        return jnp.tensordot(x, w_l, axes=in_axes, precision=precision).astype(out_dtype)
    tail, axes, k, n = _device_block(w.shape, in_axes, mesh, rule)
    split_k = tuple(name for names in axes[:in_axes] for name in names)

    def local_matmul(x, w, layer):
        y = dispatch.linear(x.reshape(rows, k).astype(w.dtype), w.reshape(w.shape[0], k, n), layer=layer,
                            impl=path)
        if split_k:                       # the contraction is split over devices: sum the partial products
            y = jax.lax.psum(y, split_k)
        return y.astype(out_dtype).reshape(*lead, *w.shape[1 + in_axes:])

    layer = jnp.asarray(layer, jnp.int32)
    if mesh is None:
        return local_matmul(x, w, layer)
    rows_spec = (None,) * len(lead)
    return jax.shard_map(local_matmul, mesh=mesh, in_specs=(P(*rows_spec, *tail[:in_axes]), P(None, *tail), P()),
                         out_specs=P(*rows_spec, *tail[in_axes:]), check_vma=False)(x, w, layer)


def _init(rngs: nnx.Rngs, shape, dtype, std: float = 0.02, kind: type[nnx.Param] = nnx.Param):
    return kind(std * jax.random.normal(rngs.params(), shape, f32).astype(dtype))


class RMSNorm(nnx.Module):
    """Gemma RMSNorm: normalise in float32, scale by (1 + w), cast back. Weights are stored near 0."""

    def __init__(self, dim: int, eps: float, *, dtype=f32, rngs: nnx.Rngs | None = None):
        self.eps = eps
        self.weight = nnx.Param(jnp.zeros((dim,), dtype))

    def __call__(self, x):
        xf = x.astype(f32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * (1.0 + self.weight[...].astype(f32))).astype(x.dtype)


def rope_cos_sin(positions, rotary_dim: int, theta: float):
    """cos, sin of shape [*positions.shape, rotary_dim], NeoX layout (the frequency table repeated twice)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=f32) / rotary_dim))
    freqs = positions.astype(f32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """Partial NeoX RoPE on the first rotary_dim channels of x [B, T, heads, X]; the rest passes through.

    Channel i is paired with i + rotary_dim/2 ("rotate_half"). cos/sin: [B, T, rotary_dim].
    """
    rot = cos.shape[-1]
    if rot == 0:
        return x
    xf = x.astype(f32)
    xr, xp = xf[..., :rot], xf[..., rot:]
    x1, x2 = xr[..., : rot // 2], xr[..., rot // 2:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([xr * c + rotated * s, xp], axis=-1).astype(x.dtype)


MXFP8_BLOCK = 32


def _pow2(k):
    """2**k as float32, k int32 in [-126, 127] (bit pattern; exact)."""
    return jax.lax.bitcast_convert_type(jnp.left_shift(k + 127, 23), f32)


def quantize_mxfp8(w):
    """w [..., I, O] float -> (e4m3 [..., I, O], uint8 exponents [..., I/32, O]), blocks of 32 along I: the
    smallest power-of-two scale per block that keeps the block's largest magnitude within E4M3's 448, as MXFP8
    checkpoints store it (`convert.mxfp8.quantize`, byte for byte, for weights whose block maxima lie within
    [2**-100, 2**100]; outside, XLA's flush of subnormals and NumPy's float32 log2 can pick a neighbouring
    exponent, both valid)."""
    i = w.shape[-2]
    if i % MXFP8_BLOCK:
        raise ValueError(f"MXFP8 needs the input axis to be a multiple of {MXFP8_BLOCK}, got {i}")
    blocks = w.astype(f32).reshape(*w.shape[:-2], i // MXFP8_BLOCK, MXFP8_BLOCK, w.shape[-1])
    amax = jnp.max(jnp.abs(blocks), axis=-2)
    m, e = jnp.frexp(jnp.maximum(amax, 1e-38) / 448.0)       # x = m * 2**e, m in [0.5, 1): ceil(log2 x) exactly
    exp = jnp.clip(jnp.where(amax > 0, jnp.where(m == 0.5, e - 1, e), 0), -127, 127)
    half = jnp.right_shift(exp, 1)                            # divide by 2**exp as two normal powers of two
    q = blocks * _pow2(-half)[..., None, :] * _pow2(half - exp)[..., None, :]
    return q.reshape(w.shape).astype(jnp.float8_e4m3fn), (exp + 127).astype(jnp.uint8)


def swiglu_oai(gate, up, alpha: float, limit: float):
    """SwiGLU-OAI (non-interleaved): min(g, limit) * sigmoid(alpha * g) * (clip(u, -limit, limit) + 1)."""
    g = jnp.minimum(gate, limit)
    u = jnp.clip(up, -limit, limit)
    return g * jax.nn.sigmoid(alpha * g) * (u + 1.0)


class MLP(nnx.Module):
    """down(swiglu_oai(x @ gate, x @ up)): the dense MLP of full layers and the MoE's shared expert. Its weights
    are InPlace: in a stack, the call gets the layer index and reads them in place (stacked_matmul)."""

    def __init__(self, cfg: M3Config, width: int, *, dtype, rngs: nnx.Rngs, mesh: Mesh | None = None,
                 impl: str | None = None):
        d = cfg.hidden_size
        self.alpha, self.limit = cfg.swiglu_alpha, cfg.swiglu_limit
        self.gate_df = _init(rngs, (d, width), dtype, kind=InPlace)
        self.up_df = _init(rngs, (d, width), dtype, kind=InPlace)
        self.down_fd = _init(rngs, (width, d), dtype, kind=InPlace)
        self.precision = matmul_precision(dtype)
        self.impl = impl
        self.mesh = mesh if mesh is not None and mesh.size > 1 else None

    def _matmul(self, x, name: str, layer):
        # the dense MLP's and the shared expert's weights share one sharding rule
        return stacked_matmul(x, getattr(self, name)[...], layer, in_axes=1, precision=self.precision,
                              impl=self.impl, mesh=self.mesh, rule=f"ffn.{name}")

    def matmul_paths(self, rows: int) -> dict[str, str]:
        """{weight: what stacked_matmul runs for it at `rows` rows} (this module holding a stack's weights)."""
        return {name: stacked_matmul_path(rows, getattr(self, name)[...], in_axes=1, impl=self.impl,
                                          mesh=self.mesh, rule=f"ffn.{name}") for name in ("gate_df", "up_df", "down_fd")}

    def __call__(self, x_btd, layer=None):
        g = self._matmul(x_btd, "gate_df", layer)
        u = self._matmul(x_btd, "up_df", layer)
        return self._matmul(swiglu_oai(g, u, self.alpha, self.limit), "down_fd", layer)
