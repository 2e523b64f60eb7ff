"""Device meshes and the partition rules for parameters, activations and caches.

One `jax.sharding.Mesh` with axes ("data", "model"). Attention heads are split on "model"; the 4 KV heads are
replicated at load time when "model" is larger (each device then holds the KV head its query heads use, and
the cache shards on the replicated head axis); `index_q` follows the KV heads and `index_k` is replicated,
so MSA top-k needs no collective; experts are spread over all devices (expert parallelism); embedding and
lm_head are split on the vocabulary; batch and page pools go on "data".
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from m3jax.config import M3Config

DATA, MODEL = "data", "model"          # the only place the mesh axis names are spelled
EXPERTS = (DATA, MODEL)                # experts over every device


def make_mesh(data: int = 1, model: int | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "model") mesh over `devices` (default: all); `model` defaults to the devices left over."""
    devices = list(jax.devices() if devices is None else devices)
    if model is None:
        if len(devices) % data:
            raise ValueError(f"data={data} does not divide the {len(devices)} devices")
        model = len(devices) // data
    if data < 1 or model < 1 or data * model != len(devices):
        raise ValueError(f"mesh data={data} x model={model} needs {data * model} devices, have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(data, model), (DATA, MODEL))


def parse_mesh(text: str, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """make_mesh from "DATAxMODEL" (e.g. "2x4"), as the command line spells it, over the first DATA x MODEL of
    `devices` (default: all), so "1x1" runs on one device of eight; ValueError names the problem."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"mesh must be DATAxMODEL with positive integers (e.g. 2x4), got {text!r}")
    data, model = int(parts[0]), int(parts[1])
    devices = list(jax.devices() if devices is None else devices)
    if data * model > len(devices):
        raise ValueError(f"mesh {text} needs {data * model} devices, have {len(devices)}")
    return make_mesh(data=data, model=model, devices=devices[:data * model])


def check_mesh(mesh: Mesh) -> Mesh:
    if tuple(mesh.axis_names) != (DATA, MODEL):
        raise ValueError(f"mesh axes must be ('data', 'model'), got {tuple(mesh.axis_names)}")
    return mesh


def kv_replication(cfg: M3Config, mesh: Mesh | None) -> int:
    """How many copies of each KV head the mesh needs: model // num_kv_heads when model > num_kv_heads."""
    if mesh is None:
        return 1
    m, k = mesh.shape[MODEL], cfg.num_key_value_heads
    if m <= k:
        if k % m:
            raise ValueError(f"mesh model={m} must divide num_key_value_heads={k}")
        return 1
    if m % k:
        raise ValueError(f"mesh model={m} must be a multiple of num_key_value_heads={k}")
    return m // k


def replicate_kv(cfg: M3Config, replicas: int) -> M3Config:
    """The config of the same model with each KV head (and its index head) stored `replicas` times.

    Query head n of the replicated model uses KV head n // (G / replicas), a copy of original head n // G, so
    outputs are unchanged; each copy selects the same MSA blocks as the original (same weights, same index-K).
    """
    if replicas == 1:
        return cfg
    if cfg.heads_per_group % replicas:
        raise ValueError(f"cannot replicate {cfg.num_key_value_heads} KV heads {replicas} times: heads per group "
                         f"({cfg.heads_per_group}) is not divisible by {replicas}")
    k = cfg.num_key_value_heads * replicas
    return dataclasses.replace(cfg, num_key_value_heads=k, msa=dataclasses.replace(cfg.msa, num_index_heads=k))


# Parameter path (dotted, as in m3jax.params.flat_params) -> spec of its trailing axes; leading layer axes
# of stacked parameters are never split. Anything unmatched (norms, router, index_k) is replicated.
PARAM_RULES: tuple[tuple[str, tuple], ...] = (
    (r"embed_vd$", (MODEL, None)),
    (r"lm_head_dv$", (None, MODEL)),
    (r"attn\.q_dnh$", (None, MODEL, None)),
    (r"attn\.[kv]_dkh$", (None, MODEL, None)),
    (r"attn\.index_q_dki$", (None, MODEL, None)),
    (r"attn\.o_nhd$", (MODEL, None, None)),
    (r"ffn\.(shared\.)?(gate|up)_df$", (None, MODEL)),
    (r"ffn\.(shared\.)?down_fd$", (MODEL, None)),
    (r"ffn\.(gate|up)_edf$", (EXPERTS, None, None)),
    (r"ffn\.down_efd$", (EXPERTS, None, None)),
    (r"ffn\.(gate|up)_scale_ebf$", (EXPERTS, None, None)),          # MXFP8 exponents follow their experts
    (r"ffn\.down_scale_ebd$", (EXPERTS, None, None)),
)


def _axis_size(mesh: Mesh, axis) -> int:
    names = axis if isinstance(axis, tuple) else (axis,)
    return int(np.prod([mesh.shape[a] for a in names]))


def param_spec(path: str, shape: tuple[int, ...], mesh: Mesh | None = None) -> P:
    """The PartitionSpec of parameter `path`; checks divisibility on `mesh` when given."""
    for pattern, tail in PARAM_RULES:
        if re.search(pattern, path):
            spec = (None,) * (len(shape) - len(tail)) + tail
            break
    else:
        return P()
    if mesh is not None:
        for dim, axis in zip(shape, spec):
            if axis is not None and dim % _axis_size(mesh, axis):
                raise ValueError(f"parameter {path} {list(shape)}: axis of size {dim} cannot be split over mesh "
                                 f"axis {axis} of size {_axis_size(mesh, axis)}")
    return P(*spec)


def param_shardings(shapes: Mapping[str, tuple[int, ...]], mesh: Mesh) -> dict[str, NamedSharding]:
    """{path: NamedSharding} for every parameter of a model with these shapes."""
    check_mesh(mesh)
    return {path: NamedSharding(mesh, param_spec(path, shape, mesh)) for path, shape in shapes.items()}


# Parameters whose head axis (the second to last) holds KV heads: replicated with them.
KV_HEAD_PARAMS = re.compile(r"attn\.([kv]_dkh|index_q_dki)$")


def replicate_kv_param(path: str, value, replicas: int):
    """Repeat each KV head of a KV-head parameter `replicas` times (copies adjacent); others unchanged."""
    if replicas == 1 or not KV_HEAD_PARAMS.search(path):
        return value
    return value.repeat(replicas, axis=-2)

