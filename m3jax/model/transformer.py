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
    """

    def __init__(self, cfg: M3Config, *, dtype=jnp.bfloat16, attn_impl: str | None = None, rngs: nnx.Rngs,
                 mesh: Mesh | None = None, fp8_experts: bool = False):
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

    def _inputs(self, input_ids, positions):
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be int [batch, seq], got shape {input_ids.shape}")
        b, s = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        return input_ids, jnp.asarray(positions, jnp.int32)

    def trace(self, input_ids, positions=None) -> ForwardTrace:
        """The no-cache forward that also returns each MSA layer's block selection (for research)."""
        input_ids, positions = self._inputs(input_ids, positions)
        cos, sin = self.rope(positions)
        h = self.embed(input_ids)
        selections = {}
        for stack in self.stacks:
            h, ids = stack.forward(h, positions, cos, sin)
            if ids is not None:
                selections.update({stack.first_layer + i: ids[i] for i in range(stack.num_layers)})
        return ForwardTrace(self.logits(h), selections)

    def __call__(self, input_ids, positions=None):
        return self.trace(input_ids, positions).logits
