"""M3's vision tower (a CLIP-style ViT with 3D axial RoPE) and its projector, as Flax NNX modules.

Axis letters: L patches (tokens of all images/videos, concatenated), X values per flattened patch (C*T*P*P),
D vision width, N heads, H head dim, F MLP width, J projector width, E text hidden size, M patches per merge
window (2x2 = 4), S segments (one per image or video chunk), Q padded tokens per segment.

    pixel_values [L, X] -> patch embedding (Conv3d with stride = kernel, i.e. a matmul) -> pre-LayerNorm
    -> layers: h += out(attn(LN1(h)));  h += fc2(gelu(fc1(LN2(h))))    (no final LayerNorm)
    -> projector per patch: linear_2(gelu(linear_1(h)))                       [L, E]
    -> 2x2 merge: 4 consecutive patches (one merge window) concatenated       [L/M, M*E]
       -> merge_linear_2(gelu(merge_linear_1(.)))                             [L/M, E]

Attention is block-diagonal: a patch attends to the patches of its own image or video chunk only (transformers'
cu_seqlens with merge_temporal=True: one segment per image_grid_thw / video_grid_thw row). `attn_impl`:
  "reference"  dense [N, L, L] logits with a segment mask, float32 softmax; any backend (the CPU default);
  "xla"        segments packed into [S, Q] rows, `jax.nn.dot_product_attention(implementation="xla")` with
               query/key lengths: the same layout as cuDNN, testable on CPU;
  "cudnn"      the same packing through cuDNN flash attention (the GPU default for bf16/fp16). cuDNN takes
               bf16/fp16 only, head_dim <= 128 and a multiple of 8; it raises otherwise (float32 models default
               to "xla" on GPU).
`default_attn_impl()` says which one runs when none is given; nothing falls back silently.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m3jax.vision.config import VisionConfig

log = logging.getLogger(__name__)
f32 = jnp.float32
ATTN_IMPLS = ("reference", "xla", "cudnn")


def default_attn_impl(backend: str | None = None, dtype=None) -> str:
    """'cudnn' on GPU for bf16/fp16 models, 'xla' (packed) on GPU for float32 ones (cuDNN refuses them),
    'reference' elsewhere."""
    if (backend or jax.default_backend()) != "gpu":
        return "reference"
    return "cudnn" if dtype is None or jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla"


# ---------------------------------------------------------------------------------------------------------------
# Host-side layout of a batch of images / video chunks

@dataclasses.dataclass(frozen=True)
class VisionGrid:
    """Token layout for `grid_thw` [S, 3] rows (t, h, w) in patches; computed on the host, fixed shapes per grid.

    positions:   int32[L, 3]  (t, h, w) of each patch, h/w in merge-window order (as the processors lay rows).
    segment_ids: int32[L]     row of grid_thw the patch belongs to.
    cu_seqlens:  int32[S + 1] segment boundaries.
    pack_index:  int32[S, Q]  token index of each packed slot (0 in padding slots, masked by seq_lens).
    unpack_index:int32[L]     flat packed slot (s * Q + offset) of each token.
    """

    grid_thw: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray
    cu_seqlens: np.ndarray
    pack_index: np.ndarray
    unpack_index: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int(self.cu_seqlens[-1])

    @property
    def seq_lens(self) -> np.ndarray:
        return np.diff(self.cu_seqlens).astype(np.int32)

    @classmethod
    def from_grid_thw(cls, grid_thw, spatial_merge_size: int) -> "VisionGrid":
        g = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
        if g.shape[0] == 0:
            raise ValueError("grid_thw has no rows")
        if (g < 1).any():
            raise ValueError(f"grid_thw entries must be >= 1, got {g.tolist()}")
        m = spatial_merge_size
        if (g[:, 1] % m).any() or (g[:, 2] % m).any():
            raise ValueError(f"grid_thw h and w must be multiples of spatial_merge_size={m}, got {g.tolist()}")
        positions = []
        for t, h, w in g:
            hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
            # [h/m, m, w/m, m] -> [h/m, w/m, m, m]: the processors' merge-window-major patch order
            hh = hh.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
            ww = ww.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
            tt = np.repeat(np.arange(t), h * w)
            positions.append(np.stack([tt, np.tile(hh, t), np.tile(ww, t)], axis=-1))
        lens = g.prod(axis=1)
        cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        seg = np.repeat(np.arange(len(g)), lens).astype(np.int32)
        q = int(lens.max())
        offset = np.arange(cu[-1]) - cu[seg]
        pack = np.zeros((len(g), q), np.int32)
        pack[seg, offset] = np.arange(cu[-1])
        return cls(g, np.concatenate(positions).astype(np.int32), seg, cu, pack, (seg * q + offset).astype(np.int32))


# ---------------------------------------------------------------------------------------------------------------
# Building blocks

def _param(rngs: nnx.Rngs, shape, dtype, std: float = 0.02):
    return nnx.Param((std * jax.random.normal(rngs.params(), shape, f32)).astype(dtype))


class LayerNorm(nnx.Module):
    """torch LayerNorm (biased variance), computed in float32."""

    def __init__(self, dim: int, eps: float, *, dtype):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype))

    def __call__(self, x):
        xf = x.astype(f32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(f32) + self.bias[...].astype(f32)).astype(x.dtype)


def gelu(x):
    """Exact (erf) GELU, as torch's nn.GELU() / ACT2FN['gelu']."""
    return jax.nn.gelu(x, approximate=False)


def rope_cos_sin(positions, cfg: VisionConfig):
    """cos, sin float32 [L, rotary_dim] for positions int32 [L, 3].

    Each axis gets the same rope_axis_dim/2 frequencies; the table is [t freqs, h freqs, w freqs] repeated twice
    (NeoX pairing of channel i with i + rotary_dim/2), transformers' `MiniMaxM3VLVisionRotaryEmbedding`.
    """
    a = cfg.rope_axis_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, a, 2, dtype=f32) / a))
    freqs = (positions.astype(f32)[:, :, None] * inv_freq).reshape(positions.shape[0], -1)   # [L, 3 * a/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """Rotate the first rotary_dim channels of x [L, N, H]; the remaining channels pass through."""
    rot = cos.shape[-1]
    xf = x.astype(f32)
    xr, xp = xf[..., :rot], xf[..., rot:]
    x1, x2 = xr[..., : rot // 2], xr[..., rot // 2:]
    c, s = cos[:, None, :], sin[:, None, :]
    out = xr * c + jnp.concatenate([-x2, x1], axis=-1) * s
    return jnp.concatenate([out, xp], axis=-1).astype(x.dtype)


def attention_reference(q, k, v, segment_ids, scale: float):
    """Block-diagonal softmax attention, dense and masked. q, k, v [L, N, H]; segment_ids int32[L]."""
    logits = jnp.einsum("LNH,SNH->NLS", q.astype(f32), k.astype(f32)) * scale
    same = segment_ids[:, None] == segment_ids[None, :]
    logits = jnp.where(same[None], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("NLS,SNH->LNH", probs, v.astype(f32)).astype(q.dtype)


def attention_packed(q, k, v, pack_index, unpack_index, seq_lens, scale: float, implementation: str):
    """Block-diagonal attention with each segment packed into one row [S, Q] and its length masking the rest."""
    s, qlen = pack_index.shape

    def pack(x):
        return x[pack_index]                                     # [S, Q, N, H]

    out = jax.nn.dot_product_attention(pack(q), pack(k), pack(v), scale=scale, query_seq_lengths=seq_lens,
                                       key_value_seq_lengths=seq_lens, implementation=implementation)
    return out.reshape(s * qlen, *out.shape[2:])[unpack_index]   # [L, N, H]


# ---------------------------------------------------------------------------------------------------------------
# Modules

class PatchEmbed(nnx.Module):
    """Conv3d with kernel = stride = (T, P, P) and no bias, as a matmul over flattened [C, T, P, P] patches."""

    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.kernel_xd = _param(rngs, (cfg.patch_dim, cfg.hidden_size), dtype)

    def __call__(self, pixel_values_lx):
        w = self.kernel_xd[...]
        return jnp.einsum("LX,XD->LD", pixel_values_lx.astype(w.dtype), w)


class EncoderLayer(nnx.Module):
    """Pre-LayerNorm block: h += out(attn(LN1(h))); h += fc2(gelu(fc1(LN2(h)))). Biases everywhere."""

    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        d, n, h, f = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.intermediate_size
        self.scale = h ** -0.5
        self.layer_norm1 = LayerNorm(d, cfg.layer_norm_eps, dtype=dtype)
        self.q_dnh = _param(rngs, (d, n, h), dtype)
        self.k_dnh = _param(rngs, (d, n, h), dtype)
        self.v_dnh = _param(rngs, (d, n, h), dtype)
        self.q_bias_nh = nnx.Param(jnp.zeros((n, h), dtype))
        self.k_bias_nh = nnx.Param(jnp.zeros((n, h), dtype))
        self.v_bias_nh = nnx.Param(jnp.zeros((n, h), dtype))
        self.o_nhd = _param(rngs, (n, h, d), dtype)
        self.o_bias_d = nnx.Param(jnp.zeros((d,), dtype))
        self.layer_norm2 = LayerNorm(d, cfg.layer_norm_eps, dtype=dtype)
        self.fc1_df = _param(rngs, (d, f), dtype)
        self.fc1_bias_f = nnx.Param(jnp.zeros((f,), dtype))
        self.fc2_fd = _param(rngs, (f, d), dtype)
        self.fc2_bias_d = nnx.Param(jnp.zeros((d,), dtype))

    def attention(self, x_ld, cos, sin, grid: dict, impl: str):
        q = jnp.einsum("LD,DNH->LNH", x_ld, self.q_dnh[...]) + self.q_bias_nh[...]
        k = jnp.einsum("LD,DNH->LNH", x_ld, self.k_dnh[...]) + self.k_bias_nh[...]
        v = jnp.einsum("LD,DNH->LNH", x_ld, self.v_dnh[...]) + self.v_bias_nh[...]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if impl == "reference":
            o = attention_reference(q, k, v, grid["segment_ids"], self.scale)
        else:
            o = attention_packed(q, k, v, grid["pack_index"], grid["unpack_index"], grid["seq_lens"], self.scale,
                                 implementation=impl)
        return jnp.einsum("LNH,NHD->LD", o, self.o_nhd[...]) + self.o_bias_d[...]

    def mlp(self, x_ld):
        a = gelu(jnp.einsum("LD,DF->LF", x_ld, self.fc1_df[...]) + self.fc1_bias_f[...])
        return jnp.einsum("LF,FD->LD", a, self.fc2_fd[...]) + self.fc2_bias_d[...]

    def __call__(self, h_ld, cos, sin, grid: dict, impl: str):
        h_ld = h_ld + self.attention(self.layer_norm1(h_ld), cos, sin, grid, impl)
        return h_ld + self.mlp(self.layer_norm2(h_ld))


class Encoder(nnx.Module):
    """`num_hidden_layers` EncoderLayers with a leading layer axis on every parameter, run with `lax.scan`."""

    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.num_layers = cfg.num_hidden_layers

        @nnx.split_rngs(splits=cfg.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(r):
            return EncoderLayer(cfg, dtype=dtype, rngs=r)

        self.layers = make(rngs)

    def __call__(self, h_ld, cos, sin, grid: dict, impl: str):
        graphdef, state = nnx.split(self.layers)

        def step(h, s):
            return nnx.merge(graphdef, s)(h, cos, sin, grid, impl), None

        return jax.lax.scan(step, h_ld, state)[0]


class VisionTower(nnx.Module):
    """Patch embedding, pre-LayerNorm and the encoder: pixel_values [L, X] -> hidden states [L, D]."""

    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.config = cfg
        self.embeddings = PatchEmbed(cfg, dtype=dtype, rngs=rngs)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype)
        self.encoder = Encoder(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, pixel_values_lx, grid: dict, impl: str):
        h = self.pre_layrnorm(self.embeddings(pixel_values_lx))
        cos, sin = rope_cos_sin(grid["positions"], self.config)
        return self.encoder(h, cos, sin, grid, impl)


class Projector(nnx.Module):
    """Per patch D -> J -> E (GELU MLP), then M = merge^2 consecutive patches -> one text token (GELU MLP)."""

    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        d, j, e, m = cfg.hidden_size, cfg.projector_hidden_size, cfg.text_hidden_size, cfg.merge_window
        self.merge_window = m
        self.linear_1_dj = _param(rngs, (d, j), dtype)
        self.linear_1_bias_j = nnx.Param(jnp.zeros((j,), dtype))
        self.linear_2_je = _param(rngs, (j, e), dtype)
        self.linear_2_bias_e = nnx.Param(jnp.zeros((e,), dtype))
        self.merge_1_mej = _param(rngs, (m, e, j), dtype)
        self.merge_1_bias_j = nnx.Param(jnp.zeros((j,), dtype))
        self.merge_2_je = _param(rngs, (j, e), dtype)
        self.merge_2_bias_e = nnx.Param(jnp.zeros((e,), dtype))

    def __call__(self, h_ld):
        a = gelu(jnp.einsum("LD,DJ->LJ", h_ld, self.linear_1_dj[...]) + self.linear_1_bias_j[...])
        p = jnp.einsum("LJ,JE->LE", a, self.linear_2_je[...]) + self.linear_2_bias_e[...]
        p = p.reshape(-1, self.merge_window, p.shape[-1])                  # [L/M, M, E]: one merge window a row
        b = gelu(jnp.einsum("LME,MEJ->LJ", p, self.merge_1_mej[...]) + self.merge_1_bias_j[...])
        return jnp.einsum("LJ,JE->LE", b, self.merge_2_je[...]) + self.merge_2_bias_e[...]


class VisionModel(nnx.Module):
    """The tower and the projector: `model(pixel_values, grid_thw)` -> features [L / M, E] in the model dtype,
    one row per placeholder token, images (or video chunks) in grid_thw order."""

    def __init__(self, cfg: VisionConfig, *, dtype=jnp.bfloat16, attn_impl: str | None = None,
                 rngs: nnx.Rngs | None = None):
        impl = attn_impl or default_attn_impl(dtype=dtype)
        if impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        self.attn_impl = impl
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.tower = VisionTower(cfg, dtype=dtype, rngs=rngs)
        self.projector = Projector(cfg, dtype=dtype, rngs=rngs)
        log.info("vision attention: %s", impl)

    def grid(self, grid_thw) -> VisionGrid:
        return VisionGrid.from_grid_thw(grid_thw, self.config.spatial_merge_size)

    def check_inputs(self, pixel_values, grid: VisionGrid, what: str = "pixel_values"):
        if pixel_values.ndim != 2 or pixel_values.shape[1] != self.config.patch_dim:
            raise ValueError(f"{what} must be [patches, {self.config.patch_dim}] (C*T*P*P), got "
                             f"{tuple(pixel_values.shape)}")
        if pixel_values.shape[0] != grid.num_tokens:
            raise ValueError(f"{what} has {pixel_values.shape[0]} patches but its grid_thw "
                             f"{grid.grid_thw.tolist()} describes {grid.num_tokens}")

    def hidden_states(self, pixel_values, grid_thw):
        """The tower's last hidden states [L, D] (transformers' vision_tower(...).last_hidden_state[0])."""
        grid = self.grid(grid_thw)
        self.check_inputs(pixel_values, grid)
        return _tower(self.tower, jnp.asarray(pixel_values), _grid_arrays(grid), self.attn_impl)

    def __call__(self, pixel_values, grid_thw):
        grid = self.grid(grid_thw)
        self.check_inputs(pixel_values, grid)
        return _features(self.tower, self.projector, jnp.asarray(pixel_values), _grid_arrays(grid),
                         self.attn_impl).astype(self.dtype)


def _grid_arrays(grid: VisionGrid) -> dict:
    return {"positions": jnp.asarray(grid.positions), "segment_ids": jnp.asarray(grid.segment_ids),
            "pack_index": jnp.asarray(grid.pack_index), "unpack_index": jnp.asarray(grid.unpack_index),
            "seq_lens": jnp.asarray(grid.seq_lens)}


@nnx.jit(static_argnums=(3,))
def _tower(tower, pixel_values, grid, impl):
    return tower(pixel_values, grid, impl)


@nnx.jit(static_argnums=(4,))
def _features(tower, projector, pixel_values, grid, impl):
    return projector(tower(pixel_values, grid, impl))
