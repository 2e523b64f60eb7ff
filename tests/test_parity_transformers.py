"""Parity with transformers==5.23.0 MiniMaxM3SparseForConditionalGeneration (torch CPU, float32).

Random tiny configs are built and saved by transformers itself (save_pretrained writes the release naming),
loaded with m3jax.load(dtype="float32"), and compared on prompts of several lengths, including lengths that
are not multiples of the block size and prompts long enough that MSA selection is sparse.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("torch")
pytest.importorskip("transformers")

import m3jax  # noqa: E402
from convert.weight_map import layer_slot  # noqa: E402
from m3jax.model.attention import Attention  # noqa: E402
from pallas_kernels import dispatch  # noqa: E402
from tests import hf_reference as hf  # noqa: E402

# (name, text config); layers: (attention, mlp) with S = MSA / F = full, E = MoE / D = dense MLP.
CONFIGS = {
    "m3_pattern": hf.text_config(layers=[("F", "D"), ("S", "E"), ("S", "E")], heads=4, kv_heads=2, head_dim=16,
                                 block=8, topk=3),
    "mixed_order": hf.text_config(layers=[("S", "E"), ("F", "E"), ("S", "D"), ("S", "E")], heads=6, kv_heads=3,
                                  head_dim=32, block=16, topk=2, rotary=8, index_dim=16, experts=6,
                                  top_experts=3),
    "local2_gqa8": hf.text_config(layers=[("F", "D"), ("F", "D"), ("S", "E")], heads=8, kv_heads=1, head_dim=16,
                                  block=12, topk=4, local_blocks=2, hidden=96, theta=5e6),
}
LENGTHS = (1, 45, 96, 203)
TOL = 2e-5          # measured max |logit diff| 6.6e-6 over these configs and lengths (CPU, 2026-11-30)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """(transformers model, m3jax model, config name) built from one saved checkpoint."""
    name = request.param
    model = hf.random_hf_model(CONFIGS[name], seed=sorted(CONFIGS).index(name))
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    ours = m3jax.load(path, dtype="float32", progress=False)
    return model, ours, name


def _prompt(length: int, vocab: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(1, length))


def test_config_round_trip(pair):
    _, ours, name = pair
    text = CONFIGS[name]
    assert ours.config.msa.block_size == text["index_block_size"]
    assert ours.config.msa.topk_blocks == text["index_topk_blocks"]
    assert ours.config.rotary_dim == text["rotary_dim"]
    assert list(ours.config.layer_types) == text["layer_types"]


@pytest.mark.parametrize("length", LENGTHS)
def test_logits_match_transformers(pair, length):
    theirs, ours, name = pair
    ids = _prompt(length, ours.config.vocab_size, seed=length)
    want = hf.hf_logits(theirs, ids)
    got = np.asarray(ours(jnp.asarray(ids, jnp.int32)))
    err = np.abs(got - want).max()
    assert err <= TOL, f"{name} length {length}: max |logit diff| {err:.2e} > {TOL}"


def test_batched_rows_match_transformers(pair):
    """Two rows in one call, each equal to transformers on that row (no cross-row leakage)."""
    theirs, ours, _ = pair
    ids = np.concatenate([_prompt(70, ours.config.vocab_size, 1), _prompt(70, ours.config.vocab_size, 2)])
    got = np.asarray(ours(jnp.asarray(ids, jnp.int32)))
    for row in range(2):
        np.testing.assert_allclose(got[row], hf.hf_logits(theirs, ids[row:row + 1])[0], atol=TOL, rtol=0)


def test_block_selection_matches_transformers(pair):
    """Same index-branch inputs -> the same selected block set per (token, KV group)."""
    theirs, ours, name = pair
    ids = _prompt(203, ours.config.vocab_size, seed=7)
    captured = hf.capture_indexer(theirs, ids)
    assert captured, "no sparse layer ran"
    cos, sin = ours.rope(jnp.arange(ids.shape[1], dtype=jnp.int32)[None])
    positions = jnp.arange(ids.shape[1], dtype=jnp.int32)[None]
    for layer, (x, hf_ids) in captured.items():
        attn = _attention_of(ours, layer)
        p = attn.project(jnp.asarray(x), cos, sin)
        got = np.asarray(attn.select_blocks(p, attn.sequence_kv(p), positions))     # [B, T, K, C]
        want = np.transpose(hf_ids, (0, 2, 1, 3))                                    # [B, T, K, C']
        c = got.shape[-1]
        want = np.pad(want, ((0, 0),) * 3 + ((0, c - want.shape[-1]),), constant_values=-1)
        assert (np.sort(got, -1) == np.sort(want, -1)).all(), f"{name} layer {layer}: selections differ"


def test_selection_is_sparse_and_dense_attention_fails_parity(pair):
    """A 203-token prompt drops blocks; running the sparse layers densely breaks parity."""
    theirs, ours, name = pair
    cfg = ours.config
    ids = _prompt(203, cfg.vocab_size, seed=3)
    num_blocks = -(-203 // cfg.msa.block_size)
    assert num_blocks > cfg.msa.topk_blocks, "prompt too short to be sparse"
    layer = next(i for i, t in enumerate(cfg.layer_types) if t == "minimax_m3_sparse")
    x, hf_ids = hf.capture_indexer(theirs, ids)[layer]
    chosen = (hf_ids >= 0).sum(-1)                                                   # [B, K, T]
    assert chosen.max() <= cfg.msa.topk_blocks and (chosen[..., -1] < num_blocks).all()

    want = hf.hf_logits(theirs, ids)
    dense = _with_dense_sparse_layers(ours)
    err = np.abs(np.asarray(dense(jnp.asarray(ids, jnp.int32))) - want).max()
    assert err > 100 * TOL, f"{name}: dense attention on MSA layers still matches (err {err:.2e})"


def _attention_of(model, layer: int) -> Attention:
    """The Attention module of decoder layer `layer` (its slice of the stacked parameters)."""
    stack, pos = layer_slot(model.config, layer)
    graphdef, state = nnx.split(model.stacks[stack].layers)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[pos], state)).attn


def _with_dense_sparse_layers(model):
    """The same weights with every MSA layer attending densely (what a dense-fallback stack computes)."""
    class DenseEverywhere:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, ids):
            orig = Attention._attend

            def dense(self, p, kv, q_pos, impl, contiguous_chunks=False):
                o = dispatch.dense_attention(p.q_btnh, kv.k_pages, kv.v_pages, kv.page_table, q_pos, impl=impl)
                return o.astype(p.q_btnh.dtype), None

            Attention._attend = dense
            try:
                return self.inner(ids)
            finally:
                Attention._attend = orig

    return DenseEverywhere(model)


def test_dataclass_config_is_frozen(pair):
    _, ours, _ = pair
    with pytest.raises(dataclasses.FrozenInstanceError):
        ours.config.hidden_size = 1


def test_trace_exposes_the_same_selections(pair):
    """model.trace returns each MSA layer's selection; it equals transformers' on the full forward."""
    theirs, ours, name = pair
    ids = _prompt(150, ours.config.vocab_size, seed=11)
    trace = ours.trace(jnp.asarray(ids, jnp.int32))
    captured = hf.capture_indexer(theirs, ids)
    assert sorted(trace.block_ids) == sorted(captured)
    for layer, (_, hf_ids) in captured.items():
        got = np.asarray(trace.block_ids[layer])
        want = np.transpose(hf_ids, (0, 2, 1, 3))
        want = np.pad(want, ((0, 0),) * 3 + ((0, got.shape[-1] - want.shape[-1]),), constant_values=-1)
        agree = (np.sort(got, -1) == np.sort(want, -1)).all(-1).mean()
        assert agree == 1.0, f"{name} layer {layer}: {agree:.3%} of (token, group) selections agree"
