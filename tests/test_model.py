"""The NNX model: full-size shapes without allocation, dtypes, layer patterns, tiny checkpoints."""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import m3jax
from convert.safetensors_io import checkpoint_tensors
from m3jax.params import flat_params
from m3jax.testing import make_tiny_checkpoint, random_model


def _m3_text_params(cfg: m3jax.M3Config) -> int:
    """Parameter count of the text model, layer by layer (the project's shared M3 spec, §2.2)."""
    d, h, n, k = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    total = 2 * cfg.vocab_size * d + d
    for attn, mlp in cfg.layer_kinds:
        total += 2 * d + d * n * h + 2 * d * k * h + n * h * d + 2 * h
        if attn == "minimax_m3_sparse":
            total += d * cfg.msa.num_index_heads * cfg.msa.index_dim + d * cfg.msa.index_dim + 2 * cfg.msa.index_dim
        if mlp == "dense":
            total += 3 * d * cfg.dense_intermediate_size
        else:
            e = cfg.num_local_experts
            total += d * e + e + 3 * e * d * cfg.intermediate_size + 3 * d * cfg.shared_intermediate_size
    return total


def test_full_size_model_shapes_without_allocation():
    cfg = m3jax.M3Config()
    abstract = nnx.eval_shape(lambda: m3jax.M3ForCausalLM(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    params = flat_params(abstract)
    count = sum(math.prod(v.shape) for v in params.values())
    assert count == _m3_text_params(cfg)
    assert 426e9 < count < 427.1e9          # the release: 427.04 B including a 0.6 B vision tower
    assert params["stacks.1.layers.ffn.gate_edf"].shape == (57, 128, 6144, 3072)
    assert params["stacks.1.layers.attn.q_dnh"].shape == (57, 6144, 64, 128)
    assert params["stacks.1.layers.ffn.router_de"].dtype == jnp.float32
    assert params["stacks.0.layers.attn.o_nhd"].dtype == jnp.bfloat16


@pytest.mark.parametrize("pattern", [
    (("full_attention", "dense"), ("minimax_m3_sparse", "sparse")) * 2,     # alternating: four stacks
    (("minimax_m3_sparse", "dense"),) * 3,                                  # one stack, MSA + dense MLP
    (("full_attention", "sparse"), ("full_attention", "sparse")),           # no MSA at all
])
def test_any_layer_pattern_runs(pattern):
    attn, mlp = zip(*pattern)
    cfg = m3jax.M3Config.tiny(num_hidden_layers=len(pattern), layer_types=attn, mlp_layer_types=mlp)
    model = random_model(cfg, seed=1)
    # The stacks hold the pattern's layers in order, each stack one kind.
    kinds = [(s.attention_type, s.mlp_type) for s in model.stacks for _ in range(s.num_layers)]
    assert kinds == list(pattern)
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 256, (2, 30)), jnp.int32)
    logits = jax.jit(lambda x: model(x))(ids)
    assert logits.shape == (2, 30, cfg.vocab_size) and logits.dtype == jnp.float32
    # The scanned stacks compute what the layers do one after another, written out by hand.
    by_hand = jax.jit(lambda x: _layer_by_layer(model, x))(ids)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(by_hand), rtol=1e-5, atol=1e-5)


def _layer_by_layer(model, ids):
    """The forward written out: embed, every decoder layer in order (sliced out of its stack), norm, lm_head."""
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
    cos, sin = model.rope(positions)
    h = model.embed(ids)
    for stack in model.stacks:
        graphdef, state = nnx.split(stack.layers)
        for l in range(stack.num_layers):
            h = nnx.merge(graphdef, jax.tree.map(lambda a: a[l], state))(h, positions, cos, sin)
    return model.logits(h)


def test_bfloat16_model_tracks_float32():
    cfg = m3jax.M3Config.tiny()
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 40)), jnp.int32)
    f32 = random_model(cfg, seed=2)
    bf16 = random_model(cfg, seed=2, dtype=jnp.bfloat16)
    a, b = np.asarray(f32(ids)), np.asarray(bf16(ids))
    assert b.dtype == np.float32 and np.isfinite(b).all()
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95


def test_causality_and_jit():
    model = random_model(m3jax.M3Config.tiny(), seed=3)
    ids = np.random.default_rng(1).integers(0, 256, (1, 50))
    full = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids, jnp.int32)))
    prefix = np.asarray(model(jnp.asarray(ids[:, :33], jnp.int32)))
    np.testing.assert_allclose(full[:, :33], prefix, atol=1e-5)


def test_bad_input_ids_shape():
    model = random_model(m3jax.M3Config.tiny(), seed=0)
    with pytest.raises(ValueError, match="input_ids"):
        model(jnp.arange(5))


def test_tiny_checkpoint_release_format(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "ck", seed=0, num_shards=3, quant="mxfp8")
    files = sorted(os.listdir(path))
    assert files == ["config.json", "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                     "model-00003-of-00003.safetensors", "model.safetensors.index.json", "tokenizer.json"]
    cfg = json.load(open(os.path.join(path, "config.json")))
    assert cfg["model_type"] == "minimax_m3_vl" and "sparse_attention_config" in cfg["text_config"]
    assert cfg["quantization_config"]["quant_method"] == "mxfp8"
    tensors = checkpoint_tensors(path)
    w1 = "language_model.model.layers.1.block_sparse_moe.experts.3.w1.weight"
    assert tensors[w1].dtype == "F8_E4M3" and tensors[w1 + "_scale_inv"].dtype == "U8"
    assert tensors[w1 + "_scale_inv"].shape == (tensors[w1].shape[0], tensors[w1].shape[1] // 32)
    assert tensors["language_model.model.layers.1.block_sparse_moe.gate.weight"].dtype == "F32"
    assert tensors["language_model.model.embed_tokens.weight"].dtype == "BF16"
    assert "language_model.model.layers.2.self_attn.index_q_proj.weight" in tensors
    assert "language_model.model.layers.0.self_attn.index_q_proj.weight" not in tensors
    assert "language_model.model.layers.0.mlp.gate_proj.weight" in tensors
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_tiny_checkpoint_loads_exactly_and_is_sparse(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "ck", seed=4, dtype="float32")
    model = m3jax.load(path, dtype="float32", progress=False)
    ref = random_model(model.config, seed=4)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, 200)), jnp.int32)
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(ref(ids)))
    cfg = model.config
    assert cfg.msa.block_size in range(8, 17) and 2 <= cfg.msa.topk_blocks <= 4
    assert -(-200 // cfg.msa.block_size) > cfg.msa.topk_blocks      # 200 tokens: strict subset of blocks
    assert "full_attention" in cfg.layer_types and cfg.layer_types.count("minimax_m3_sparse") >= 2


def test_tokenizer_round_trip(tmp_path):
    from m3jax.tokenizer import M3Tokenizer
    path = make_tiny_checkpoint(tmp_path / "ck")
    tok = M3Tokenizer.from_pretrained(path)
    text = "MSA picks 16 blocks — per group."
    assert tok.decode(tok.encode(text)) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}])         # the built-in M3 layout
    assert chat.startswith("]~!b[]~b]system\n") and chat.endswith("]~b]user\nhi[e~[\n]~b]ai\n")
    assert tok.encode(chat)[0] == tok.token_id("]~!b[")
