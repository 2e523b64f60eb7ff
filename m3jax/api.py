"""The public entry points: load() a checkpoint into an M3ForCausalLM."""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
from flax import nnx

from m3jax.config import M3Config
from m3jax.model import M3ForCausalLM

log = logging.getLogger(__name__)
_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}


def _dtype(dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        return jnp.dtype(_DTYPES[dtype])
    return jnp.dtype(dtype)


def load(path: str | os.PathLike, dtype="bfloat16", mesh: jax.sharding.Mesh | None = None,
         attn_impl: str | None = None, progress: bool = True,
         shardings=None) -> M3ForCausalLM:
    """Load a checkpoint directory into an M3ForCausalLM, placed (sharded) as it is read.

    path: an HF release dir (BF16/FP32 or MXFP8 safetensors, single file or sharded with an index json) or a
        dir written by `m3jax convert` (Orbax pieces); both stream: no host ever holds the whole model.
    dtype: parameter and activation dtype ("bfloat16" or "float32"); the MoE router stays float32.
    mesh: parameters are placed on it; `shardings` (param path -> NamedSharding / PartitionSpec, or a callable
        (path, shape) -> one of them or None) overrides the default (routed experts over the mesh, the rest
        replicated; see convert.placement). Without a mesh, everything goes to the first device.
    attn_impl: attention implementation (see pallas_kernels.dispatch); None picks the backend's default.
    """
    from convert import loader, orbax_io, placement     # convert imports m3jax.config: keep the import lazy

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    cfg = M3Config.from_pretrained(path)
    graphdef, treedef, paths, targets = placement.abstract_params(cfg, _dtype(dtype), attn_impl)
    resolved = placement.resolve_shardings({p: s for p, (s, _) in targets.items()}, mesh, shardings)
    if orbax_io.is_converted(path):
        arrays = orbax_io.restore(path, targets, resolved, progress=progress)
    else:
        arrays = loader.load_release(path, cfg, targets, resolved, progress=progress)
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, [arrays[p] for p in paths]))
