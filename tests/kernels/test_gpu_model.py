"""The tiny model through the `gpu` dispatch path gives the reference path's logits and greedy tokens.

On CPU the GPU kernels run in the Pallas interpreter (`gpu-interpret`); on a GPU backend compiled (`gpu`). The
default tiny config (pages of 8 rows, head dim 16) exercises the kernels' padding to triton tiles; top-2 blocks
make prompts of a few blocks really sparse. The cached path (prefill into the paged cache, then decode steps)
is checked with greedy decoding through m3jax.model.cached.forward_cached.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import m3jax
import pallas_kernels.gpu  # noqa: F401  (loads pallas_kernels.gpu.msa)
from m3jax.testing import random_model
from tests.kernels.model_cases import greedy_cached, with_impl

IMPL = "gpu-interpret" if jax.default_backend() == "cpu" else "gpu"


@pytest.fixture(scope="module")
def model():
    return random_model(m3jax.M3Config.tiny(topk_blocks=2), seed=0)


def test_forward_gpu_matches_reference(model):
    ids = jnp.asarray(np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 37)), jnp.int32)
    with jax.default_matmul_precision("highest"):          # GPU: no tf32 in the model's own f32 matmuls
        want = with_impl(model, "reference")(ids)
        got = with_impl(model, IMPL)(ids)
    assert not np.isnan(np.asarray(got)).any()
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-4)
    np.testing.assert_array_equal(np.asarray(got.argmax(-1)), np.asarray(want.argmax(-1)))


def test_cached_greedy_gpu_matches_reference(model):
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(0, 256, 21)), list(rng.integers(0, 256, 35))]   # ragged, partial pages
    with jax.default_matmul_precision("highest"):
        want = greedy_cached(model, "reference", prompts, 3)
        got = greedy_cached(model, IMPL, prompts, 3)
    np.testing.assert_array_equal(got, want)


def test_cached_greedy_with_the_fused_topk_schedule(model, monkeypatch):
    """With "fused-topk" as gpu.msa's default (what a measurement would flip), the model's decode steps (the
    attention kernel merging the indexer's candidates itself) give the reference's greedy tokens; prefill rows
    longer than FUSED_MAX_QUERIES keep the two-step schedule."""
    # sys.modules: the package attribute pallas_kernels.gpu.msa is the msa function, not its module
    monkeypatch.setattr(sys.modules["pallas_kernels.gpu.msa"], "DEFAULT_SCHEDULE", "fused-topk")
    rng = np.random.default_rng(2)
    prompts = [list(rng.integers(0, 256, 29)), list(rng.integers(0, 256, 12))]
    with jax.default_matmul_precision("highest"):
        want = greedy_cached(model, "reference", prompts, 4)
        got = greedy_cached(model, IMPL, prompts, 4)
    np.testing.assert_array_equal(got, want)


def test_msa_paths_say_which_schedule_runs(model, monkeypatch):
    """Runner.msa_paths / m3jax.model.cached.msa_paths state the MSA computation per group without running it:
    the two-step default, fused-topk for decode rows when it is the default (prompt rows keep two-step), the
    reference on the reference path; an Engine logs them."""
    from m3jax.model.cached import msa_paths
    from tests.kernels.model_cases import with_impl
    groups = {"decode": 1, "prefill": 64}
    assert msa_paths(with_impl(model, IMPL), groups) == {"decode": f"{IMPL}:two-step", "prefill": f"{IMPL}:two-step"}
    assert msa_paths(with_impl(model, "reference"), groups) == {"decode": "reference", "prefill": "reference"}
    assert msa_paths(with_impl(model, "tpu-interpret"), {"decode": 1}) == {"decode": "tpu-interpret:two-step"}
    monkeypatch.setattr(sys.modules["pallas_kernels.gpu.msa"], "DEFAULT_SCHEDULE", "fused-topk")
    assert msa_paths(with_impl(model, IMPL), groups) == {"decode": f"{IMPL}:fused-topk", "prefill": f"{IMPL}:two-step"}
    engine = m3jax.Engine(with_impl(model, IMPL), max_batch_size=2, max_seq_len=64, compile_cache=False)
    assert engine.runner.msa_paths == {"decode": f"{IMPL}:fused-topk", "prefill": f"{IMPL}:two-step"}
