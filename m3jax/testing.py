"""Test helpers: random-weight models and tiny HF-release-format checkpoints for tests, demos and notebooks.

`make_tiny_checkpoint` writes exactly what a user downloads from `MiniMaxAI/MiniMax-M3` (VL wrapper
config.json with the released key spellings, `language_model.model.layers.N...` tensor names, per-expert
w1/w2/w3, float32 router, optional MXFP8 quantisation and sharding with an index json) plus a byte-level
tokenizer.json, for a model small enough for CPU tests with every feature live: dense and MSA layers, MoE,
blocks of 8 tokens and top-3 selection so that a 200-token prompt attends to a strict subset of blocks.
The release format itself is written by `convert.release` (imported when a checkpoint is written, so that
`import m3jax` loads no converter code).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m3jax.config import M3Config
from m3jax.model import M3ForCausalLM
from m3jax.api import bundled_tiny_checkpoint  # noqa: F401  (lives in api; kept here for tests that import it)
from m3jax.params import dotted, flat_params  # noqa: F401  (flat_params: kept here for tests that import it)
from m3jax.tokenizer import write_byte_level_tokenizer


def random_model(cfg: M3Config, seed: int = 0, dtype=jnp.float32) -> M3ForCausalLM:
    """A model with random weights, norms and router biases (all live, none at their neutral init)."""
    model = M3ForCausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(model)
    key = jax.random.key(seed + 1)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    new = []
    for i, (path, v) in enumerate(leaves):
        name = dotted(path)
        k = jax.random.fold_in(key, i)
        if name.endswith("weight"):            # norms: (1 + w) with w around 0
            v = (0.2 * jax.random.normal(k, v.shape, jnp.float32)).astype(v.dtype)
        elif name.endswith("router_bias_e"):
            v = 0.05 * jax.random.normal(k, v.shape, jnp.float32)
        elif v.ndim >= 2:                       # 1/sqrt(fan_in) so activations keep unit scale
            fan_in = v.shape[-2] if not name.endswith(("q_dnh", "k_dkh", "v_dkh", "index_q_dki")) else v.shape[-3]
            if name.endswith("o_nhd"):
                fan_in = v.shape[-3] * v.shape[-2]
            v = (jax.random.normal(k, v.shape, jnp.float32) / np.sqrt(fan_in)).astype(v.dtype)
        new.append(v)
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, new))


def make_tiny_checkpoint(path: str, seed: int = 0, quant: str | None = None, num_shards: int = 1,
                         dtype: str = "bfloat16", **config_overrides) -> str:
    """Write a tiny HF-release-format checkpoint (config, safetensors, tokenizer) to `path`; returns `path`.

    config_overrides go to `M3Config.tiny` (e.g. num_hidden_layers=4, block_size=16, topk_blocks=2).
    The directory is assembled under a temporary name and renamed when complete.
    """
    from convert import release

    if quant not in (None, "mxfp8"):
        raise ValueError(f"quant must be None or 'mxfp8', got {quant!r}")
    if dtype not in release.DTYPES:
        raise ValueError(f"dtype must be one of {sorted(release.DTYPES)}, got {dtype!r}")
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    cfg = M3Config.tiny(**config_overrides)
    if cfg.vocab_size < 259:
        raise ValueError(f"vocab_size must be >= 259 for the byte-level tokenizer, got {cfg.vocab_size}")
    model = random_model(cfg, seed)
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path), dir=parent)
    try:
        params = {k: np.asarray(v.astype(jnp.float32)) for k, v in flat_params(model).items()}
        release.write_release(tmp, cfg, params, dtype, quant, num_shards)
        write_byte_level_tokenizer(os.path.join(tmp, "tokenizer.json"))
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
