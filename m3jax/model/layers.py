"""Small building blocks: Gemma RMSNorm, partial NeoX RoPE, SwiGLU-OAI MLP."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from m3jax.config import M3Config

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
    `dispatch.moe(..., layer=l)`). Why: XLA materialises a per-step slice of a stacked weight that feeds a custom
    call (a Pallas kernel), so a scanned weight is copied every layer of every step; the routed experts are
    almost all of M3's bytes (57 layers x 128 x 3 x 6144 x 3072). A module holding InPlace parameters takes the
    layer index in its call: None means they are this layer's own (a layer outside a stack). Otherwise an
    ordinary nnx.Param (filters on nnx.Param include it; its path and sharding rule are those of its name).
    """


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
    """down(swiglu_oai(x @ gate, x @ up)): the dense MLP of full layers and the MoE's shared expert."""

    def __init__(self, cfg: M3Config, width: int, *, dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.alpha, self.limit = cfg.swiglu_alpha, cfg.swiglu_limit
        self.gate_df = _init(rngs, (d, width), dtype)
        self.up_df = _init(rngs, (d, width), dtype)
        self.down_fd = _init(rngs, (width, d), dtype)
        self.precision = matmul_precision(dtype)

    def __call__(self, x_btd):
        g = jnp.einsum("btd,df->btf", x_btd, self.gate_df[...], precision=self.precision)
        u = jnp.einsum("btd,df->btf", x_btd, self.up_df[...], precision=self.precision)
        return jnp.einsum("btf,fd->btd", swiglu_oai(g, u, self.alpha, self.limit), self.down_fd[...],
                          precision=self.precision)
