"""Tiny HF-release-format checkpoints for tests, demos and notebooks.

`make_tiny_checkpoint` writes exactly what a user downloads from `MiniMaxAI/MiniMax-M3` (VL wrapper
config.json with the released key spellings, `language_model.model.layers.N...` tensor names, per-expert
w1/w2/w3, float32 router, optional MXFP8 quantisation and sharding with an index json) plus a byte-level
tokenizer.json, for a model small enough for CPU tests with every feature live: dense and MSA layers, MoE,
blocks of 8 tokens and top-3 selection so that a 200-token prompt attends to a strict subset of blocks.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert import mxfp8, weight_map
from convert.safetensors_io import write_sharded
from m3jax.config import DENSE_MLP, FULL_ATTENTION, M3Config
from m3jax.model import M3ForCausalLM
from m3jax.tokenizer import write_byte_level_tokenizer

_NOT_QUANTISED = ("embed_vd", "lm_head_dv", "router_de", "router_bias_e")   # as in the MXFP8 release
_DTYPES = {"bfloat16": jnp.bfloat16, "float32": np.float32, "float16": np.float16}


def flat_params(model: M3ForCausalLM) -> dict[str, jax.Array]:
    """{'stacks.1.layers.attn.q_dnh': array, ...}: the model's parameters by dotted path."""
    _, state = nnx.split(model)
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {_dotted(p): v for p, v in leaves}


def _dotted(path) -> str:
    parts = []
    for k in path:
        key = getattr(k, "key", getattr(k, "idx", getattr(k, "name", None)))
        if key != "value":
            parts.append(str(key))
    return ".".join(parts)


def random_model(cfg: M3Config, seed: int = 0, dtype=jnp.float32) -> M3ForCausalLM:
    """A model with random weights, norms and router biases (all live, none at their neutral init)."""
    model = M3ForCausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(model)
    key = jax.random.key(seed + 1)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    new = []
    for i, (path, v) in enumerate(leaves):
        name = _dotted(path)
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


def release_config(cfg: M3Config, quant: str | None) -> dict:
    """The VL-wrapper config.json of the release, with the legacy MSA/MoE key spellings."""
    n = cfg.num_hidden_layers
    sparse = [int(t != FULL_ATTENTION) for t in cfg.layer_types]
    text = {
        "architectures": ["MiniMaxM3SparseForCausalLM"],
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size, "num_hidden_layers": n,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
        "use_gemma_norm": True, "attention_output_gate": False, "rope_theta": cfg.rope_theta,
        "rotary_dim": cfg.rotary_dim, "partial_rotary_factor": cfg.rotary_dim / cfg.head_dim,
        "hidden_act": "swigluoai", "use_qk_norm": True, "tie_word_embeddings": cfg.tie_word_embeddings,
        "dense_intermediate_size": cfg.dense_intermediate_size,
        "shared_intermediate_size": cfg.shared_intermediate_size, "num_local_experts": cfg.num_local_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok, "n_shared_experts": 1, "scoring_func": "sigmoid",
        "use_routing_bias": True, "moe_layer_freq": [int(m != DENSE_MLP) for m in cfg.mlp_layer_types],
        "qk_norm_type": "per_head", "num_mtp_modules": 1, "swiglu_alpha": cfg.swiglu_alpha,
        "swiglu_limit": cfg.swiglu_limit, "routed_scaling_factor": cfg.routed_scaling_factor,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_id),
        "sparse_attention_config": {
            "use_sparse_attention": True, "sparse_index_dim": cfg.msa.index_dim,
            "sparse_num_index_heads": cfg.msa.num_index_heads, "sparse_topk_blocks": cfg.msa.topk_blocks,
            "sparse_block_size": cfg.msa.block_size, "sparse_disable_index_value": sparse,
            "sparse_score_type": "max", "sparse_init_block": 0, "sparse_local_block": cfg.msa.local_blocks,
            "sparse_attention_freq": sparse,
        },
    }
    d = {"architectures": ["MiniMaxM3SparseForConditionalGeneration"], "model_type": "minimax_m3_vl",
         "text_config": text, "torch_dtype": "bfloat16", "transformers_version": "4.52.4"}
    if quant == "mxfp8":
        d["quantization_config"] = {"quant_method": "mxfp8", "activation_scheme": "dynamic",
                                    "weight_block_size": [1, 32],
                                    "ignored_layers": ["lm_head", "model.embed_tokens", "vision_tower",
                                                       "multi_modal_projector", "patch_merge_mlp"]}
    return d


def release_tensors(model: M3ForCausalLM, dtype: str = "bfloat16", quant: str | None = None):
    """Yield (released name, numpy array) for every text tensor of `model` (the weight map, inverted)."""
    cfg = model.config
    params = {k: np.asarray(v.astype(jnp.float32)) for k, v in flat_params(model).items()}
    np_dtype = np.dtype(_DTYPES[dtype])
    for p in weight_map.expected(cfg):
        arr = params[p.path]
        item = arr[p.index]
        w = weight_map.from_param(p.rule, item, item.shape)
        leaf = p.path.rsplit(".", 1)[-1]
        if leaf in ("router_de", "router_bias_e"):
            yield p.name, np.ascontiguousarray(w, np.float32)     # the release keeps the router in float32
        elif quant == "mxfp8" and w.ndim == 2 and leaf not in _NOT_QUANTISED:
            q, s = mxfp8.quantize(w)
            yield p.name, q
            yield p.name + weight_map.SCALE_SUFFIX, s
        else:
            yield p.name, np.ascontiguousarray(w.astype(np_dtype))


def make_tiny_checkpoint(path: str, seed: int = 0, quant: str | None = None, num_shards: int = 1,
                         dtype: str = "bfloat16", **config_overrides) -> str:
    """Write a tiny HF-release-format checkpoint (config, safetensors, tokenizer) to `path`; returns `path`.

    config_overrides go to `M3Config.tiny` (e.g. num_hidden_layers=4, block_size=16, topk_blocks=2).
    The directory is assembled under a temporary name and renamed when complete.
    """
    if quant not in (None, "mxfp8"):
        raise ValueError(f"quant must be None or 'mxfp8', got {quant!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
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
        write_sharded(tmp, release_tensors(model, dtype, quant), num_shards)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(release_config(cfg, quant), f, indent=2)
        write_byte_level_tokenizer(os.path.join(tmp, "tokenizer.json"))
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def bundled_tiny_checkpoint() -> str:
    """The bundled tiny model (seed 0, bfloat16), written under ~/.cache/m3jax on first use."""
    root = os.environ.get("M3JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "m3jax"))
    path = os.path.join(root, "tiny-seed0-v1")
    if not os.path.exists(os.path.join(path, "config.json")):
        make_tiny_checkpoint(path, seed=0)
    return path
