"""Decoder layers and stacks of consecutive layers of one kind, run with `jax.lax.scan`."""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx
from jax.sharding import Mesh

from m3jax.config import M3Config, MOE_MLP
from m3jax.model.attention import Attention
from m3jax.model.layers import MLP, RMSNorm
from m3jax.model.moe import MoE


class DecoderLayer(nnx.Module):
    """Pre-norm residual block: h += attn(norm(h)); h += ffn(norm(h))."""

    def __init__(self, cfg: M3Config, attention_type: str, mlp_type: str, *, dtype, rngs: nnx.Rngs,
                 mesh: Mesh | None = None, impl: str | None = None, fp8_experts: bool = False):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.attn = Attention(cfg, attention_type, dtype=dtype, rngs=rngs, mesh=mesh)
        self.post_attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.ffn = (MoE(cfg, dtype=dtype, rngs=rngs, mesh=mesh, impl=impl, fp8_experts=fp8_experts)
                    if mlp_type == MOE_MLP
                    else MLP(cfg, cfg.dense_intermediate_size, dtype=dtype, rngs=rngs))

    def ffn_block(self, h):
        return h + self.ffn(self.post_attention_norm(h))

    def forward(self, h, positions, cos, sin, *, impl=None):
        """(new h, MSA block ids of this layer or None)."""
        a, block_ids = self.attn.forward(self.input_norm(h), positions, cos, sin, impl=impl)
        return self.ffn_block(h + a), block_ids

    def __call__(self, h, positions, cos, sin, *, impl=None):
        return self.forward(h, positions, cos, sin, impl=impl)[0]


class LayerStack(nnx.Module):
    """`num_layers` consecutive DecoderLayers of one kind; parameters carry a leading layer axis.

    Scanning keeps compile time flat in the layer count (the released model is two stacks: 3 + 57 layers).
    """

    def __init__(self, cfg: M3Config, first_layer: int, num_layers: int, attention_type: str, mlp_type: str,
                 *, dtype, rngs: nnx.Rngs, mesh: Mesh | None = None, impl: str | None = None,
                 fp8_experts: bool = False):
        self.first_layer = first_layer
        self.num_layers = num_layers
        self.attention_type = attention_type
        self.mlp_type = mlp_type

        @nnx.split_rngs(splits=num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(r):
            return DecoderLayer(cfg, attention_type, mlp_type, dtype=dtype, rngs=r, mesh=mesh, impl=impl,
                                fp8_experts=fp8_experts)

        self.layers = make(rngs)

    def scan(self, body: Callable, carry, xs=None):
        """Run body(layer, carry, x) -> (carry, y) over the stacked layers; xs/ys have a leading layer axis."""
        graphdef, state = nnx.split(self.layers)

        def step(c, sx):
            s, x = sx
            return body(nnx.merge(graphdef, s), c, x)

        return jax.lax.scan(step, carry, (state, xs))

    def forward(self, h, positions, cos, sin, *, impl=None):
        """(h, block ids stacked over the layers [L, B, T, K, topk], or None for full-attention stacks)."""
        return self.scan(lambda layer, c, _: layer.forward(c, positions, cos, sin, impl=impl), h)

    def __call__(self, h, positions, cos, sin, *, impl=None):
        return self.forward(h, positions, cos, sin, impl=impl)[0]
