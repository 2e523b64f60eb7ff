"""Mixture of experts: sigmoid router with a selection-only bias, top-k renormalised, scaled, + shared expert."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from m3jax.config import M3Config
from m3jax.model.layers import MLP, _init, swiglu_oai

f32 = jnp.float32


class MoE(nnx.Module):
    """routed(x) * routed_scaling_factor + shared(x).

    Router: s = sigmoid(x @ W_router) in float32 (the router weight and bias stay float32 whatever the model
    dtype, as in the checkpoint); experts are chosen by top-k of s + bias, but weighted by the unbiased s
    renormalised over the chosen k. Routed experts run as grouped matmuls (tokens sorted by expert,
    `jax.lax.ragged_dot`), never as a per-token gather of expert weights.
    """

    def __init__(self, cfg: M3Config, *, dtype, rngs: nnx.Rngs):
        d, f, e = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
        self.top_k = cfg.num_experts_per_tok
        self.scaling = cfg.routed_scaling_factor
        self.alpha, self.limit = cfg.swiglu_alpha, cfg.swiglu_limit
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

    def routed(self, x_td, ids_tk, w_tk):
        t, d = x_td.shape
        e = self.gate_edf.shape[0]
        flat = ids_tk.reshape(-1)                                          # [T*k]
        order = jnp.argsort(flat, stable=True)
        token = order // self.top_k                                        # source token of each sorted row
        xs = x_td[token]                                                   # [T*k, D]
        sizes = jnp.bincount(flat, length=e).astype(jnp.int32)             # rows per expert, in order
        acc = dict(preferred_element_type=f32)
        g = jax.lax.ragged_dot(xs, self.gate_edf[...], sizes, **acc)
        u = jax.lax.ragged_dot(xs, self.up_edf[...], sizes, **acc)
        a = swiglu_oai(g, u, self.alpha, self.limit).astype(x_td.dtype)
        y = jax.lax.ragged_dot(a, self.down_efd[...], sizes, **acc)        # [T*k, D]
        y = y * w_tk.reshape(-1)[order][:, None]
        return jnp.zeros((t, d), f32).at[token].add(y)

    def __call__(self, x_btd):
        b, t, d = x_btd.shape
        x = x_btd.reshape(b * t, d)
        ids, w = self.route(x)
        routed = self.routed(x, ids, w).reshape(b, t, d)
        return (routed * self.scaling).astype(x_btd.dtype) + self.shared(x_btd)
