"""M3ForCausalLM: embedding, the decoder stacks, final norm and the untied lm_head."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from m3jax.config import M3Config
from m3jax.model.decoder import LayerStack
from m3jax.model.layers import RMSNorm, _init, matmul_precision, rope_cos_sin
from m3jax.vision.model import VisionModel

f32 = jnp.float32


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ForwardTrace:
    logits: jax.Array                     # f32[B, S, vocab]
    block_ids: dict[int, jax.Array]       # decoder layer -> i32[B, S, K, topk] logical block ids, -1 padded


class M3ForCausalLM(nnx.Module):
    """The MiniMax-M3 text model.

    `model(input_ids)` is the full causal forward with exact MSA semantics and no cache: int32 [B, S] ->
    float32 logits [B, S, vocab].

    attn_impl: the kernel choice, made once here and handed to every Attention and MoE at construction (see
    pallas_kernels.dispatch: None = the backend's default, or "reference", "gpu", "gpu-interpret", "tpu", ...);
    `m3jax.params.with_impl(model, impl)` gives the same weights with another choice.
    mesh (axes "data", "model"): attention runs in shard_map over it and the MoE expert-parallel; parameters are
    placed on it by `m3jax.sharding` rules at load time (`m3jax.params`). The mesh is stored in the modules (static
    graph data, not a parameter) rather than passed to every call because `model(input_ids)` is the public
    forward and must run sharded as loaded; moving a model to another mesh re-places its weights anyway
    (`m3jax.params.shard_model`). The engine takes the mesh from the model.
    fp8_experts keeps the routed experts in MXFP8 (see MoE).
    vision_config (a VL checkpoint's `m3jax.vision.VisionConfig`): the model also holds `vision`, the vision tower
    and projector (`m3jax.vision.VisionModel`, replicated); `m3jax.load` attaches it when config.json has a
    vision_config. Image / video features replace the embeddings of the placeholder tokens (positions stay 1D).
    """

    def __init__(self, cfg: M3Config, *, dtype=jnp.bfloat16, attn_impl: str | None = None, rngs: nnx.Rngs,
                 mesh: Mesh | None = None, fp8_experts: bool = False, vision_config=None):
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        self.precision = matmul_precision(dtype)     # float32 models: float32 matmuls on every backend (no TF32)
        self.attn_impl = attn_impl
        self.mesh = mesh
        self.fp8_experts = fp8_experts
        self.embed_vd = _init(rngs, (cfg.vocab_size, cfg.hidden_size), dtype)
        self.stacks = nnx.List([
            LayerStack(cfg, first, n, a, m, dtype=dtype, rngs=rngs, mesh=mesh, impl=attn_impl, fp8_experts=fp8_experts)
            for first, n, a, m in cfg.layer_groups
        ])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head_dv = _init(rngs, (cfg.hidden_size, cfg.vocab_size), dtype)
        self.vision = nnx.data(None if vision_config is None else VisionModel(vision_config, dtype=dtype, rngs=rngs))

    def embed(self, input_ids):
        return jnp.take(self.embed_vd[...], input_ids, axis=0)

    def logits(self, h_btd):
        h = self.final_norm(h_btd)
        if self.config.tie_word_embeddings:
            return jnp.einsum("btd,vd->btv", h, self.embed_vd[...], preferred_element_type=f32,
                              precision=self.precision)
        return jnp.einsum("btd,dv->btv", h, self.lm_head_dv[...], preferred_element_type=f32,
                          precision=self.precision)

    def rope(self, positions):
        return rope_cos_sin(positions, self.config.rotary_dim, self.config.rope_theta)

    def input_embeddings(self, input_ids, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
                         video_grid_thw=None, *, request: str = "request"):
        """Token embeddings [B, S, D], with image then video features scattered into the placeholder tokens
        (`m3jax.vision.merge`: as transformers' masked_scatter). Needs the vision tower for pixel inputs."""
        if pixel_values is None and pixel_values_videos is None and self.vision is None:
            return self.embed(jnp.asarray(input_ids))
        if self.vision is None:
            raise ValueError(f"{request}: image / video inputs given, but this model has no vision tower (its "
                             f"checkpoint has no vision_config)")
        from m3jax.vision.merge import embed_with_vision
        return embed_with_vision(self, input_ids, pixel_values, image_grid_thw, pixel_values_videos,
                                 video_grid_thw, vision=self.vision, request=request)

    def _inputs(self, input_ids, positions, inputs_embeds=None):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is not None:
            h = jnp.asarray(inputs_embeds)
            if h.ndim != 3 or h.shape[-1] != self.config.hidden_size:
                raise ValueError(f"inputs_embeds must be [batch, seq, {self.config.hidden_size}], got {h.shape}")
            b, s = h.shape[:2]
        else:
            input_ids = jnp.asarray(input_ids)
            if input_ids.ndim != 2:
                raise ValueError(f"input_ids must be int [batch, seq], got shape {input_ids.shape}")
            b, s = input_ids.shape
            h = self.embed(input_ids)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        return h.astype(self.dtype), jnp.asarray(positions, jnp.int32)

    def trace(self, input_ids=None, positions=None, *, inputs_embeds=None, pixel_values=None, image_grid_thw=None,
              pixel_values_videos=None, video_grid_thw=None) -> ForwardTrace:
        """The no-cache forward that also returns each MSA layer's block selection (for research).

        inputs_embeds [B, S, D] replaces input_ids; image / video pixels (from m3jax.vision's processors) are
        scattered into input_ids' placeholder embeddings first.
        """
        if pixel_values is not None or pixel_values_videos is not None:
            if input_ids is None:
                raise ValueError("image / video inputs need input_ids (their placeholder tokens)")
            inputs_embeds = self.input_embeddings(input_ids, pixel_values, image_grid_thw, pixel_values_videos,
                                                  video_grid_thw)
            input_ids = None
        h, positions = self._inputs(input_ids, positions, inputs_embeds)
        cos, sin = self.rope(positions)
        selections = {}
        for stack in self.stacks:
            h, ids = stack.forward(h, positions, cos, sin)
            if ids is not None:
                selections.update({stack.first_layer + i: ids[i] for i in range(stack.num_layers)})
        return ForwardTrace(self.logits(h), selections)

    def __call__(self, input_ids=None, positions=None, *, inputs_embeds=None, pixel_values=None, image_grid_thw=None,
                 pixel_values_videos=None, video_grid_thw=None):
        """float32 logits [B, S, vocab]; see `trace` for the inputs."""
        return self.trace(input_ids, positions, inputs_embeds=inputs_embeds, pixel_values=pixel_values,
                          image_grid_thw=image_grid_thw, pixel_values_videos=pixel_values_videos,
                          video_grid_thw=video_grid_thw).logits
