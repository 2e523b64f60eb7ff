"""The public entry points: load() a checkpoint into an M3ForCausalLM."""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert.loader import load_host_params
from m3jax.config import M3Config
from m3jax.model import M3ForCausalLM
from m3jax.testing import _dotted

log = logging.getLogger(__name__)
_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}


def _dtype(dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        return jnp.dtype(_DTYPES[dtype])
    return jnp.dtype(dtype)


def load(path: str | os.PathLike, dtype="bfloat16", mesh: jax.sharding.Mesh | None = None,
         attn_impl: str | None = None, progress: bool = True) -> M3ForCausalLM:
    """Load a checkpoint directory (HF release format, BF16/FP32 or MXFP8) into an M3ForCausalLM.

    dtype: parameter and activation dtype ("bfloat16" or "float32"); the MoE router stays float32.
    mesh: parameters are placed on it (replicated; per-parameter sharding rules come with m3jax.sharding).
    attn_impl: attention implementation (see pallas_kernels.dispatch); None picks the backend's default.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    cfg = M3Config.from_pretrained(path)
    dt = _dtype(dtype)
    abstract = nnx.eval_shape(lambda: M3ForCausalLM(cfg, dtype=dt, attn_impl=attn_impl, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    targets = {_dotted(p): (tuple(v.shape), np.dtype(v.dtype)) for p, v in leaves}
    host = load_host_params(path, cfg, targets, progress=progress)
    if mesh is not None:
        log.info("load: parameters replicated over mesh %s", dict(mesh.shape))
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        arrays = [jax.device_put(host[_dotted(p)], sharding) for p, _ in leaves]
    else:
        arrays = [jnp.asarray(host[_dotted(p)]) for p, _ in leaves]
    model = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, arrays))
    return model
