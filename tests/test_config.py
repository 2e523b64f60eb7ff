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
