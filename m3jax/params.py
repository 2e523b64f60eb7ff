"""Parameters of an M3ForCausalLM: walking and naming them, their abstract shapes, and remaking or placing a model.

A parameter is named by its dotted path in the model's nnx state, e.g. `stacks.1.layers.attn.q_dnh` (the leading
axis of a stacked parameter is the layer inside its LayerStack). These names are what the partition rules of
`m3jax.sharding`, the converter's weight map and the checkpoints use; this module is the one place that makes
them. Placement follows `m3jax.sharding.param_spec` (this module imports the model; `sharding` must not).
"""

from __future__ import annotations

from typing import Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from m3jax import sharding
from m3jax.config import M3Config
from m3jax.model import M3ForCausalLM


def dotted(path) -> str:
    """The dotted name of a jax tree path into a model's nnx state (`.value` leaves dropped)."""
    parts = []
    for k in path:
        key = getattr(k, "key", getattr(k, "idx", getattr(k, "name", None)))
        if key != "value":
            parts.append(str(key))
    return ".".join(parts)


def flat_params(model: M3ForCausalLM) -> dict[str, jax.Array]:
    """{'stacks.1.layers.attn.q_dnh': array, ...}: the model's parameters by dotted path, in tree order."""
    _, state = nnx.split(model)
    return {dotted(p): v for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def abstract_model(cfg: M3Config, dtype, attn_impl: str | None = None, mesh: Mesh | None = None,
                   fp8_experts: bool = False) -> M3ForCausalLM:
    """The model with abstract (ShapeDtypeStruct) parameters: never allocated."""
    return nnx.eval_shape(lambda: M3ForCausalLM(cfg, dtype=dtype, attn_impl=attn_impl, mesh=mesh, rngs=nnx.Rngs(0),
                                                fp8_experts=fp8_experts))


def abstract_params(cfg: M3Config, dtype, attn_impl: str | None = None, mesh: Mesh | None = None,
                    fp8_experts: bool = False):
    """(graphdef, treedef, param paths in tree order, {path: (shape, dtype)}) of the model, never allocated."""
    graphdef, state = nnx.split(abstract_model(cfg, dtype, attn_impl, mesh, fp8_experts))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    paths = [dotted(p) for p, _ in leaves]
    targets = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, (_, v) in zip(paths, leaves)}
    return graphdef, treedef, paths, targets


def remake_model(model: M3ForCausalLM, params: Mapping[str, jax.Array] | None = None, *,
                 config: M3Config | None = None, mesh: Mesh | None = None, fp8_experts: bool | None = None,
                 attn_impl: str | None = None, keep_impl: bool = True) -> M3ForCausalLM:
    """An M3ForCausalLM like `model` (its dtype; its config, mesh, fp8_experts and kernel choice unless given)
    holding `params` ({dotted path: array}, every parameter of the new model; default: the model's own, shared,
    not copied). On a mesh each parameter is placed by `m3jax.sharding.param_spec`.

    attn_impl: the kernel choice of the new model (attention and MoE alike, see M3ForCausalLM); with
    keep_impl=False, None means the backend's default rather than "the model's".
    """
    cfg = model.config if config is None else config
    mesh = model.mesh if mesh is None else mesh
    fp8 = model.fp8_experts if fp8_experts is None else fp8_experts
    impl = model.attn_impl if attn_impl is None and keep_impl else attn_impl
    params = flat_params(model) if params is None else params
    graphdef, state = nnx.split(abstract_model(cfg, model.dtype, impl, mesh, fp8))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    arrays = []
    for p, v in leaves:
        path = dotted(p)
        value = params[path]
        if mesh is not None:
            value = jax.device_put(value, NamedSharding(mesh, sharding.param_spec(path, v.shape, mesh)))
        arrays.append(value)
    new = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, arrays))
    if getattr(model, "vision", None) is not None:      # the vision tower (m3jax.vision) stays, replicated
        new.vision = model.vision if mesh is None else jax.device_put(model.vision, NamedSharding(mesh, P()))
    return new


def with_impl(model: M3ForCausalLM, attn_impl: str | None) -> M3ForCausalLM:
    """The same model (same arrays) with another kernel choice for attention and MoE (None: the backend's)."""
    return remake_model(model, attn_impl=attn_impl, keep_impl=False)


def shard_model(model: M3ForCausalLM, mesh: Mesh) -> M3ForCausalLM:
    """The same model placed on `mesh` by the partition rules (KV heads replicated when model > num_kv_heads).

    For a model already in memory (random weights, tests); `m3jax.load(path, mesh=...)` places shards as it
    reads them instead.
    """
    sharding.check_mesh(mesh)
    replicas = sharding.kv_replication(model.config, mesh)
    params = {p: sharding.replicate_kv_param(p, v, replicas) for p, v in flat_params(model).items()}
    return remake_model(model, params, config=sharding.replicate_kv(model.config, replicas), mesh=mesh)
