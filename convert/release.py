"""The one writer of HF-release-format checkpoints: what a user downloads from `MiniMaxAI/MiniMax-M3`.

For every text tensor of a config it decides the released name, shape and stored dtype (float32 router, MXFP8
e4m3 + exponents for quantised 2-D weights, the checkpoint dtype otherwise) and writes the VL-wrapper
config.json with the released key spellings. Two users: `m3jax.testing.make_tiny_checkpoint` (the tensors of a
model in memory, `release_tensors`) and `convert/synthetic.py` (shapes only, `release_specs`, data streamed).
It lives in `convert/` because it needs the weight map; `m3jax` imports it lazily, only when writing.
"""

from __future__ import annotations

import json
import os
from typing import Iterator, Mapping

import numpy as np

from convert import mxfp8, weight_map
from convert.safetensors_io import write_sharded
from m3jax.config import DENSE_MLP, FULL_ATTENTION, M3Config

NOT_QUANTISED = ("embed_vd", "lm_head_dv", "router_de", "router_bias_e")   # as in the MXFP8 release
FLOAT32_LEAVES = ("router_de", "router_bias_e")                             # the release keeps the router in f32
DTYPES = {"bfloat16": "BF16", "float32": "F32", "float16": "F16"}


def stored_as(path: str, ndim: int, dtype: str, quant: str | None) -> str:
    """The safetensors dtype a parameter's released tensor is stored in: "F32", "F8_E4M3" (with a "U8" exponent
    sibling, weight_map.SCALE_SUFFIX) or DTYPES[dtype]."""
    leaf = path.rsplit(".", 1)[-1]
    if leaf in FLOAT32_LEAVES:
        return "F32"
    if quant == "mxfp8" and ndim == 2 and leaf not in NOT_QUANTISED:
        return "F8_E4M3"
    return DTYPES[dtype]


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


def release_specs(cfg: M3Config, quant: str | None, dtype: str = "bfloat16"
                  ) -> Iterator[tuple[str, str, tuple[int, ...]]]:
    """(name, safetensors dtype, shape) of every released text tensor of `cfg`, in release order."""
    import jax.numpy as jnp

    from m3jax.params import abstract_params

    _, _, _, targets = abstract_params(cfg, jnp.bfloat16)
    for p in weight_map.expected(cfg):
        shape = weight_map.torch_shape(p.rule, targets[p.path][0][len(p.index):])
        st = stored_as(p.path, len(shape), dtype, quant)
        yield p.name, st, shape
        if st == "F8_E4M3":
            yield p.name + weight_map.SCALE_SUFFIX, "U8", mxfp8.scale_shape(shape)


def release_tensors(cfg: M3Config, params: Mapping[str, np.ndarray], dtype: str = "bfloat16",
                    quant: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(released name, numpy array) of every text tensor, from {param path: float32 array} (the weight map,
    inverted), stored as `release_specs` says."""
    from convert.safetensors_io import DTYPES as ST_DTYPES

    for p in weight_map.expected(cfg):
        item = params[p.path][p.index]
        w = weight_map.from_param(p.rule, item, item.shape)
        st = stored_as(p.path, w.ndim, dtype, quant)
        if st == "F8_E4M3":
            q, s = mxfp8.quantize(w)
            yield p.name, q
            yield p.name + weight_map.SCALE_SUFFIX, s
        else:
            yield p.name, np.ascontiguousarray(w.astype(ST_DTYPES[st]))


def write_release(path: str, cfg: M3Config, params: Mapping[str, np.ndarray], dtype: str = "bfloat16",
                  quant: str | None = None, num_shards: int = 1) -> None:
    """Write the safetensors (sharded with an index json when num_shards > 1) and config.json into the existing
    directory `path` (the caller assembles it under a temporary name)."""
    if quant not in (None, "mxfp8"):
        raise ValueError(f"quant must be None or 'mxfp8', got {quant!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    write_sharded(path, release_tensors(cfg, params, dtype, quant), num_shards)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(release_config(cfg, quant), f, indent=2)
