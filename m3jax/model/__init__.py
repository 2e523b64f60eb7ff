"""Flax NNX modules of the MiniMax-M3 text model."""

from m3jax.model.attention import Attention, PagedKV, Projections
from m3jax.model.decoder import DecoderLayer, LayerStack
from m3jax.model.layers import MLP, RMSNorm, apply_rope, rope_cos_sin, swiglu_oai
from m3jax.model.moe import MoE
from m3jax.model.transformer import M3ForCausalLM

__all__ = ["Attention", "DecoderLayer", "LayerStack", "M3ForCausalLM", "MLP", "MoE", "PagedKV", "Projections",
           "RMSNorm", "apply_rope", "rope_cos_sin", "swiglu_oai"]
