"""Mixture of experts: sigmoid router with a selection-only bias, top-k renormalised, scaled, + shared expert."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from m3jax.config import M3Config
from m3jax.model.layers import MLP, MXFP8_BLOCK, InPlace, _init
from m3jax.sharding import EXPERTS
from pallas_kernels import dispatch

f32 = jnp.float32
# With fp8_experts: routed-expert weight -> its MXFP8 exponents (blocks of 32 along the weight's input axis).
FP8_SCALES = {"gate_edf": "gate_scale_ebf", "up_edf": "up_scale_ebf", "down_efd": "down_scale_ebd"}


def fp8_scale_path(path: str) -> str | None:
    """The parameter path of the MXFP8 exponents of routed-expert weight `path` (dotted); None for others."""
    head, _, name = path.rpartition(".")
    return f"{head}.{FP8_SCALES[name]}" if name in FP8_SCALES else None


class MoE(nnx.Module):
    """routed(x) * routed_scaling_factor + shared(x).

    Router: s = sigmoid(x @ W_router) in float32 (the router weight and bias stay float32 whatever the model
    dtype, as in the checkpoint); experts are chosen by top-k of s + bias, but weighted by the unbiased s
    renormalised over the chosen k. Routed experts run as one fused op over rows sorted by expert
    (`dispatch.moe`: Pallas kernels on GPU and TPU that visit only the experts with rows, gate+up with SwiGLU-OAI
    in one pass, down with the combine weight; reference.moe elsewhere), never as a per-token gather of expert
    weights.

    With a mesh, experts are split over all its devices (expert parallelism): every device sees all tokens,
    runs only its own experts on the rows routed to them, and the partial outputs are summed (psum). This is
    exact for any imbalance of tokens per expert.

    Layer stacks: the routed experts (and their MXFP8 exponents) are `InPlace` parameters. Inside
    `LayerStack.scan` this module holds the whole stacks [L, E, ...] and gets its layer index in the call
    (`layer=`); the kernels read that layer's experts where they lie, so no step copies a layer's experts out of
    the stack (the reference slices them). Outside a stack, `layer=None` and the experts are [E, ...].

    fp8_experts: the routed experts are held as released MXFP8 (e4m3 weights + one uint8 exponent per 32 inputs,
    `*_scale_eb*`, about 1 byte per weight instead of 2). The kernels read them as stored and dequantise tiles
    on chip (reference.dequantize_mxfp8 semantics: exact, float32 subnormals flushed); no dequantised copy of an
    expert is written to memory, so the FP8 layer reads half the bytes of the bf16 one.
    """

    def __init__(self, cfg: M3Config, *, dtype, rngs: nnx.Rngs, mesh: Mesh | None = None, impl: str | None = None,
                 fp8_experts: bool = False):
        d, f, e = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
        self.top_k = cfg.num_experts_per_tok
        self.scaling = cfg.routed_scaling_factor
        self.alpha, self.limit = cfg.swiglu_alpha, cfg.swiglu_limit
        self.impl = impl                   # MoE kernel implementation (pallas_kernels.dispatch.moe)
        self.mesh = mesh if mesh is not None and mesh.size > 1 else None
        if self.mesh is not None and e % self.mesh.size:
            raise ValueError(f"num_local_experts={e} must be divisible by the {self.mesh.size} devices of the mesh "
                             f"for expert parallelism")
        self.router_de = _init(rngs, (d, e), f32)
        self.router_bias_e = nnx.Param(jnp.zeros((e,), f32))
        self.dtype = jnp.dtype(dtype)
        self.fp8_experts = fp8_experts
        stored = jnp.float8_e4m3fn if fp8_experts else dtype
        self.gate_edf = _init(rngs, (e, d, f), stored, kind=InPlace)
        self.up_edf = _init(rngs, (e, d, f), stored, kind=InPlace)
        self.down_efd = _init(rngs, (e, f, d), stored, kind=InPlace)
        if fp8_experts:                      # E8M0 exponents (127 = 2**0) per 32 inputs: the second-to-last axis
            self.gate_scale_ebf = InPlace(jnp.full((e, -(-d // MXFP8_BLOCK), f), 127, jnp.uint8))
            self.up_scale_ebf = InPlace(jnp.full((e, -(-d // MXFP8_BLOCK), f), 127, jnp.uint8))
            self.down_scale_ebd = InPlace(jnp.full((e, -(-f // MXFP8_BLOCK), d), 127, jnp.uint8))
        self.shared = MLP(cfg, cfg.shared_intermediate_size, dtype=dtype, rngs=rngs, mesh=mesh, impl=impl)

    def route(self, x_td):
        """(expert ids i32[T, k], combine weights f32[T, k]) for each token."""
        s = jax.nn.sigmoid(jnp.dot(x_td.astype(f32), self.router_de[...], precision="highest"))
        _, ids = jax.lax.top_k(s + self.router_bias_e[...], self.top_k)
        w = jnp.take_along_axis(s, ids, axis=-1)
        return ids, w / jnp.sum(w, axis=-1, keepdims=True)

    def _stored_weights(self) -> tuple:
        """(gate, up, down) as stored, then their MXFP8 exponents when fp8_experts: [E, ...], or [L, E, ...] when
        this module holds the layer stack's experts (see the class docstring)."""
        weights = (self.gate_edf[...], self.up_edf[...], self.down_efd[...])
        if self.fp8_experts:
            weights += (self.gate_scale_ebf[...], self.up_scale_ebf[...], self.down_scale_ebd[...])
        return weights

    def _local_experts(self, x_td, ids_tk, w_tk, layer, *stored):
        """sum_k w[t, k] * expert_{ids[t, k]}(x[t]), float32, over the stored experts (all, or this device's); an
        id outside [0, E) contributes 0. One fused op (dispatch.moe): rows sorted by expert, only experts with
        rows visited, weights read as stored (MXFP8 dequantised inside the kernel), layer `layer` of stacked
        weights read in place."""
        return dispatch.moe(x_td, ids_tk, w_tk, *stored, alpha=self.alpha, limit=self.limit, layer=layer,
                            impl=self.impl)

    def routed(self, x_td, ids_tk, w_tk, layer=None):
        weights = self._stored_weights()
        if self.mesh is None:
            return self._local_experts(x_td, ids_tk, w_tk, layer, *weights)
        local = self.gate_edf.shape[-3] // self.mesh.size                  # experts per device
        # Experts are split over the devices; the layer axis of stacked experts is not (m3jax.sharding rules).
        expert_spec = P(EXPERTS) if layer is None else P(None, EXPERTS)

        def shard(x, ids, w, index, *stored):
            # Mark the replicated inputs as varying before they meet this device's experts, so that their
            # cotangents are summed over the devices in the backward pass (without it, jax 0.10 gathers x by a
            # varying index yet keeps one device's partial gradient: training through EP was wrong).
            x, w = jax.lax.pcast((x, w), EXPERTS, to="varying")
            first = jax.lax.axis_index(EXPERTS) * local                    # this device's first expert
            out = self._local_experts(x, ids - first, w, None if layer is None else index, *stored)
            return jax.lax.psum(out, EXPERTS)

        index = jnp.asarray(0 if layer is None else layer, jnp.int32)      # replicated scalar operand
        return jax.shard_map(shard, mesh=self.mesh, in_specs=(P(), P(), P(), P()) + (expert_spec,) * len(weights),
                             out_specs=P())(x_td, ids_tk, w_tk, index, *weights)

    def __call__(self, x_btd, layer=None):
        """x [B, T, D] -> [B, T, D]. layer: None when the routed experts are this layer's own ([E, ...]); else
        an int32 scalar, this layer's index in the stacked experts [L, E, ...] this module holds (inside
        `LayerStack.scan`), read in place."""
        b, t, d = x_btd.shape
        x = x_btd.reshape(b * t, d)
        ids, w = self.route(x)
        routed = self.routed(x, ids, w, layer).reshape(b, t, d)
        return (routed * self.scaling).astype(x_btd.dtype) + self.shared(x_btd, layer)
