"""The tiny model through the `tpu` dispatch path (TPU interpreter) gives the reference path's logits/tokens.

The config uses shapes the TPU kernels accept (head_dim = index_dim = 128, blocks of 16) and top-2 blocks,
so prompts of a few blocks are really sparse. The cached path (m3jax.model.cached.forward_cached: prefill
into the paged cache, then decode steps) is checked with greedy decoding; m3jax.Engine is exercised when
it exists.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import m3jax
from m3jax.testing import random_model
from tests.kernels.model_cases import greedy_cached, with_impl


@pytest.fixture
def tpu_calls(monkeypatch):
    """Counts the traces of each pallas_kernels.tpu op (dispatch looks them up at call time)."""
    import pallas_kernels.tpu as tpu_ops
    calls = {}
    for op in ("indexer_topk", "sparse_attention", "dense_attention"):
        fn = getattr(tpu_ops, op)

        def counted(*a, _fn=fn, _op=op, **kw):
            calls[_op] = calls.get(_op, 0) + 1
            return _fn(*a, **kw)
        monkeypatch.setattr(tpu_ops, op, counted)
    return calls

@pytest.fixture(scope="module")
def model():
    cfg = m3jax.M3Config.tiny(head_dim=128, index_dim=128, block_size=16, topk_blocks=2)
    return random_model(cfg, seed=0)

def test_forward_tpu_interpret_matches_reference(model, tpu_calls):
    ids = jnp.asarray(np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 53)), jnp.int32)
    want = with_impl(model, "reference")(ids)
    got = with_impl(model, "tpu-interpret")(ids)
    assert set(tpu_calls) == {"indexer_topk", "sparse_attention", "dense_attention"}
    assert not np.isnan(np.asarray(got)).any()
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(got.argmax(-1)), np.asarray(want.argmax(-1)))

@pytest.mark.gpu_long
def test_cached_greedy_tpu_interpret_matches_reference(model, tpu_calls):
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(0, 256, 21)), list(rng.integers(0, 256, 35))]   # ragged, partial pages
    want = greedy_cached(model, "reference", prompts, 4, num_pages=16)
    got = greedy_cached(model, "tpu-interpret", prompts, 4, num_pages=16)
    assert set(tpu_calls) == {"indexer_topk", "sparse_attention", "dense_attention"}
    np.testing.assert_array_equal(got, want)
    # And the cached tokens are the no-cache forward's greedy continuation.
    seq = jnp.asarray([prompts[1] + list(want[1, :-1])], jnp.int32)
    full = with_impl(model, "reference")(seq)
    np.testing.assert_array_equal(np.asarray(full.argmax(-1))[0, len(prompts[1]) - 1:], want[1])


@pytest.mark.skipif(jax.default_backend() == "gpu", reason=(
    "TPU interpret mode inside the Engine's step program fails on a GPU backend: the interpreter's host callback "
    "raises an AssertionError (jax 0.11.2, seen on an H200). The model-level TPU-interpret tests above run there; "
    "this one runs in `make test` on CPU, the backend the TPU kernels are proven on."))
def test_engine_greedy_tpu_interpret_matches_reference(model, tpu_calls):
    prompts = [[5, 9, 200, 31] * 6, [7, 8, 9]]
    params = m3jax.SamplingParams(max_new_tokens=3, temperature=0.0)
    outs = {}
    for impl in ("reference", "tpu-interpret"):
        engine = m3jax.Engine(with_impl(model, impl), max_batch_size=2, max_seq_len=64)
        outs[impl] = [r.token_ids for r in m3jax.generate(engine, prompts, params)]
    assert outs["tpu-interpret"] == outs["reference"]
    assert set(tpu_calls) == {"indexer_topk", "sparse_attention", "dense_attention"}
