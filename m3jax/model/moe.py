"""Mixture of experts: sigmoid router with a selection-only bias, top-k renormalised, scaled, + shared expert."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from m3jax.config import M3Config
from m3jax.model.layers import MLP, _init, swiglu_oai
from m3jax.sharding import EXPERTS
from pallas_kernels import dispatch

f32 = jnp.float32


class MoE(nnx.Module):
    """routed(x) * routed_scaling_factor + shared(x).

    Router: s = sigmoid(x @ W_router) in float32 (the router weight and bias stay float32 whatever the model
    dtype, as in the checkpoint); experts are chosen by top-k of s + bias, but weighted by the unbiased s
    renormalised over the chosen k. Routed experts run as grouped matmuls over rows sorted by expert
    (`dispatch.grouped_matmul`: a Mosaic GPU kernel on Hopper, XLA's ragged_dot elsewhere), never as a
    per-token gather of expert weights.

    With a mesh, experts are split over all its devices (expert parallelism): every device sees all tokens,
    runs only its own experts on the rows routed to them, and the partial outputs are summed (psum). This is
    exact for any imbalance of tokens per expert.
    """

    def __init__(self, cfg: M3Config, *, dtype, rngs: nnx.Rngs, mesh: Mesh | None = None, impl: str | None = None):
        d, f, e = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
        self.top_k = cfg.num_experts_per_tok
        self.scaling = cfg.routed_scaling_factor
        self.alpha, self.limit = cfg.swiglu_alpha, cfg.swiglu_limit
        self.impl = impl                   # grouped-matmul implementation (pallas_kernels.dispatch)
        self.mesh = mesh if mesh is not None and mesh.size > 1 else None
        if self.mesh is not None and e % self.mesh.size:
            raise ValueError(f"num_local_experts={e} must be divisible by the {self.mesh.size} devices of the mesh "
                             f"for expert parallelism")
        self.router_de = _init(rngs, (d, e), f32)
        self.router_bias_e = nnx.Param(jnp.zeros((e,), f32))
        self.gate_edf = _init(rngs, (e, d, f), dtype)
        self.up_edf = _init(rngs, (e, d, f), dtype)
        self.down_efd = _init(rngs, (e, f, d), dtype)
        self.shared = MLP(cfg, cfg.shared_intermediate_size, dtype=dtype, rngs=rngs)

    def route(self, x_td):
        """(expert ids i32[T, k], combine weights f32[T, k]) for each token."""
        s = jax.nn.sigmoid(jnp.dot(x_td.astype(f32), self.router_de[...], precision="highest"))
        _, ids = jax.lax.top_k(s + self.router_bias_e[...], self.top_k)
        w = jnp.take_along_axis(s, ids, axis=-1)
        return ids, w / jnp.sum(w, axis=-1, keepdims=True)

    def _experts(self, x_td, group_tk, w_tk, gate_edf, up_edf, down_efd):
        """sum_k w[t, k] * expert_{group[t, k]}(x[t]) in float32 over the experts of gate_edf; a group id
        outside [0, E) means "not here" (the row is computed by nobody and contributes 0)."""
        t, d = x_td.shape
        e = gate_edf.shape[0]
        here = (group_tk >= 0) & (group_tk < e)
        flat = jnp.where(here, group_tk, e).reshape(-1)                    # [T*k]; e = overflow, sorted last
        order = jnp.argsort(flat, stable=True)
        token = order // self.top_k                                        # source token of each sorted row
        xs = x_td[token]                                                   # [T*k, D]
        sizes = jnp.bincount(flat, length=e + 1)[:e].astype(jnp.int32)     # rows per expert, in order
        g = dispatch.grouped_matmul(xs, gate_edf, sizes, impl=self.impl)
        u = dispatch.grouped_matmul(xs, up_edf, sizes, impl=self.impl)
        a = swiglu_oai(g, u, self.alpha, self.limit).astype(x_td.dtype)
        y = dispatch.grouped_matmul(a, down_efd, sizes, impl=self.impl)    # [T*k, D]; overflow rows unused
        keep = here.reshape(-1)[order]
        y = jnp.where(keep[:, None], y * w_tk.reshape(-1)[order][:, None], 0.0)
        return jnp.zeros((t, d), f32).at[token].add(y)

    def routed(self, x_td, ids_tk, w_tk):
        weights = (self.gate_edf[...], self.up_edf[...], self.down_efd[...])
        if self.mesh is None:
            return self._experts(x_td, ids_tk, w_tk, *weights)
        local = self.gate_edf.shape[0] // self.mesh.size

        def shard(x, ids, w, gate, up, down):
            first = jax.lax.axis_index(EXPERTS) * local                    # this device's first expert
            return jax.lax.psum(self._experts(x, ids - first, w, gate, up, down), EXPERTS)

        experts = P(EXPERTS)
        return jax.shard_map(shard, mesh=self.mesh, in_specs=(P(), P(), P(), experts, experts, experts),
                             out_specs=P())(x_td, ids_tk, w_tk, *weights)

    def __call__(self, x_btd):
        b, t, d = x_btd.shape
        x = x_btd.reshape(b * t, d)
        ids, w = self.route(x)
        routed = self.routed(x, ids, w).reshape(b, t, d)
        return (routed * self.scaling).astype(x_btd.dtype) + self.shared(x_btd)
