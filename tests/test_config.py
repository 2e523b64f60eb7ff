"""M3Config: the released configs, transformers' flat naming, legacy keys, and errors that name the field."""

from __future__ import annotations

import copy
import json
import os

import pytest

from m3jax.config import ConfigError, M3Config

DATA = os.path.join(os.path.dirname(__file__), "data")     # copies of the released config.json files


def _released(name="MiniMax-M3.config.json") -> dict:
    with open(os.path.join(DATA, name)) as f:
        return json.load(f)


@pytest.mark.parametrize("name", ["MiniMax-M3.config.json", "MiniMax-M3-MXFP8.config.json"])
def test_released_configs(name):
    cfg = M3Config.from_pretrained(_released(name))
    assert cfg == M3Config(quantization=cfg.quantization)    # the defaults are the released model
    assert cfg.layer_groups == ((0, 3, "full_attention", "dense"), (3, 57, "minimax_m3_sparse", "sparse"))
    assert cfg.msa.topk_blocks == 16 and cfg.msa.block_size == 128 and cfg.msa.num_index_heads == 4
    assert cfg.rotary_dim == 64 and cfg.rope_theta == 5e6 and cfg.heads_per_group == 16
    assert (cfg.quantization or {}).get("quant_method") == ("mxfp8" if "MXFP8" in name else None)


def test_text_only_and_flat_keys_match_wrapper():
    wrapper = _released()
    text_only = M3Config.from_hf(wrapper["text_config"])
    flat = M3Config.from_hf(M3Config().to_hf())
    assert text_only == M3Config.from_hf(wrapper) == flat


def test_from_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_released()))
    assert M3Config.from_pretrained(tmp_path).num_hidden_layers == 60
    assert M3Config.from_pretrained(str(tmp_path / "config.json")).hidden_size == 6144


def test_tiny_round_trip():
    cfg = M3Config.tiny(block_size=16, topk_blocks=2, num_hidden_layers=4)
    assert M3Config.from_hf(cfg.to_hf()) == cfg
    assert cfg.layer_groups == ((0, 1, "full_attention", "dense"), (1, 3, "minimax_m3_sparse", "sparse"))


def _broken(path: str, value) -> dict:
    d = copy.deepcopy(_released())
    *parents, leaf = path.split(".")
    node = d["text_config"]
    for p in parents:
        node = node[p]
    if value is _DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return d


_DELETE = object()


@pytest.mark.parametrize("path,value,field", [
    ("hidden_size", _DELETE, "hidden_size"),
    ("num_key_value_heads", _DELETE, "num_key_value_heads"),
    ("vocab_size", "200064", "vocab_size"),
    ("num_attention_heads", 63, "num_attention_heads"),
    ("rotary_dim", 130, "rotary_dim"),
    ("partial_rotary_factor", 1.5, "partial_rotary_factor"),
    ("sparse_attention_config.sparse_num_index_heads", 8, "index_n_heads"),
    ("sparse_attention_config.sparse_score_type", "mean", "sparse_score_type"),
    ("sparse_attention_config.sparse_topk_blocks", 0, "topk_blocks"),
    ("moe_layer_freq", [0, 1], "mlp_layer_types"),
    ("moe_layer_freq", _DELETE, "moe_layer_freq"),
    ("num_experts_per_tok", 200, "num_experts_per_tok"),
    ("hidden_act", "gelu", "hidden_act"),
    ("scoring_func", "softmax", "scoring_func"),
    ("use_gemma_norm", False, "use_gemma_norm"),
])
def test_bad_config_names_the_field(path, value, field):
    with pytest.raises(ConfigError, match=field):
        M3Config.from_hf(_broken(path, value))


def test_bad_layer_types_and_missing_file(tmp_path):
    d = M3Config.tiny().to_hf()
    d["layer_types"] = ["full_attention", "sliding", "minimax_m3_sparse"]
    with pytest.raises(ConfigError, match="layer_types"):
        M3Config.from_hf(d)
    with pytest.raises(ConfigError, match="config.json not found"):
        M3Config.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        M3Config.from_pretrained(tmp_path)


# Values that load without complaint but generate garbage, and wrong JSON types (issue 15, item 4) -----------------

_NAN, _INF = float("nan"), float("inf")


@pytest.mark.parametrize("path,value,field", [
    ("rms_norm_eps", -1, "rms_norm_eps"),
    ("rms_norm_eps", 0.0, "rms_norm_eps"),
    ("rms_norm_eps", True, "rms_norm_eps"),
    ("rope_theta", _NAN, "rope_theta"),
    ("rope_theta", _INF, "rope_theta"),
    ("rope_theta", "5e6", "rope_theta"),
    ("swiglu_limit", -7, "swiglu_limit"),
    ("swiglu_limit", _NAN, "swiglu_limit"),
    ("swiglu_alpha", 0, "swiglu_alpha"),
    ("routed_scaling_factor", _INF, "routed_scaling_factor"),
    ("tie_word_embeddings", "false", "tie_word_embeddings"),
    ("tie_word_embeddings", 0, "tie_word_embeddings"),
    ("num_attention_heads", True, "num_attention_heads"),
    ("max_position_embeddings", 4096.0, "max_position_embeddings"),
    ("max_position_embeddings", 0, "max_position_embeddings"),
    ("num_local_experts", "128", "num_local_experts"),
    ("num_experts_per_tok", True, "num_experts_per_tok"),
    ("rotary_dim", True, "rotary_dim"),
    ("partial_rotary_factor", True, "partial_rotary_factor"),
    ("partial_rotary_factor", _NAN, "partial_rotary_factor"),
    ("sparse_attention_config.sparse_block_size", True, "index_block_size"),
    ("sparse_attention_config.sparse_local_block", 1.0, "index_local_blocks"),
    ("eos_token_id", True, "eos_token_id"),
    ("eos_token_id", [200020, "x"], "eos_token_id"),
    ("bos_token_id", "]~!b[", "bos_token_id"),
    ("bos_token_id", -1, "bos_token_id"),
])
def test_bad_values_and_types_name_the_field(path, value, field):
    with pytest.raises(ConfigError, match=field):
        M3Config.from_hf(_broken(path, value))


def test_non_finite_values_in_a_config_file_are_refused(tmp_path):
    d = _broken("rms_norm_eps", _NAN)                         # json writes NaN, and json.load reads it back
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="rms_norm_eps must be a finite number > 0, got nan"):
        M3Config.from_pretrained(tmp_path)


@pytest.mark.parametrize("field,value", [("rms_norm_eps", -1e-6), ("swiglu_limit", _NAN), ("rope_theta", 0.0),
                                         ("tie_word_embeddings", "false"), ("head_dim", 16.0),
                                         ("block_size", True), ("topk_blocks", 2.5)])
def test_direct_construction_is_validated_too(field, value):
    with pytest.raises(ConfigError, match=field):
        M3Config.tiny(**{field: value})
