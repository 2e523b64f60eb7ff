"""The full-attention layers' cached prefill path as the model wires it: Attention.attend_cached promises
dense_attention contiguous chunks (m3jax.model.cached.StepGroup's contract), so on the GPU dispatch a bf16 prefill
row runs cuDNN over its own chunk + the paged kernel over its history, merged by log-sum-exp
(pallas_kernels.gpu.attention.dense_attention_chunked), and a decode row the paged kernel alone.

On CPU the GPU kernels run in the Pallas interpreter (`gpu-interpret`, a float32 jnp stand-in for cuDNN); on a GPU
backend compiled (`gpu`, cuDNN itself). The cached steps below hold every row kind: a prompt chunk spread over two
rows (the second row's history is the first row, written in the same step), chunks with history from an earlier
step, a first chunk, a 1-token chunk in a wide row, padding rows, and decode rows beside prefill rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import m3jax
import m3jax.params
from m3jax.cache import init_cache
from m3jax.config import DENSE_MLP, FULL_ATTENTION, SPARSE_ATTENTION
from m3jax.model.cached import StepGroup, dense_attention_paths, forward_cached
from m3jax.scheduler import PageAllocator
from m3jax.testing import random_model
from pallas_kernels.gpu import attention as gpu_attention
from tests.kernels.model_cases import page_table_row, with_impl

IMPL = "gpu-interpret" if jax.default_backend() == "cpu" else "gpu"
CHUNK_PATH = f"{IMPL}:cudnn-chunk+paged-history"
WIDTH = 8                 # page-table width: 64 tokens of the tiny config's 8-row pages
ROW_LEN = 10              # queries per prefill row (not a multiple of the page size)
NUM_PAGES = 32


@pytest.fixture(scope="module")
def model():
    return random_model(m3jax.M3Config.tiny(topk_blocks=2), seed=0, dtype=jnp.bfloat16)


@pytest.fixture(scope="module")
def dense_model():
    """Full attention and dense MLPs only: no block selection or expert routing downstream, where a bf16
    rounding difference of an attention output could flip a near-tie and hide (or fake) a real difference."""
    cfg = m3jax.M3Config.tiny(layer_types=(FULL_ATTENTION,) * 3, mlp_layer_types=(DENSE_MLP,) * 3)
    return random_model(cfg, seed=0, dtype=jnp.bfloat16)


def test_engine_rows_take_the_paged_kernel_by_default(model):
    """The Engine's 64-token prefill rows are below CHUNK_MIN_QUERIES (no faster through cuDNN on the H200)."""
    assert dense_attention_paths(with_impl(model, IMPL), {"prefill": 64, "long rows": 512}) == {
        "prefill": f"{IMPL}:paged", "long rows": CHUNK_PATH}


def test_dense_paths_are_stated(model, short_chunk_rows):
    """The computation per row kind is inspectable without running it, and it is what the kernel decides."""
    assert dense_attention_paths(with_impl(model, IMPL), {"decode": 1, "prefill": 8}) == {
        "decode": f"{IMPL}:paged", "prefill": CHUNK_PATH}
    assert dense_attention_paths(with_impl(model, "reference"), {"decode": 1, "prefill": 8}) == {
        "decode": "reference", "prefill": "reference"}
    f32 = random_model(m3jax.M3Config.tiny(topk_blocks=2), seed=0)           # cuDNN takes no float32
    assert dense_attention_paths(with_impl(f32, IMPL), {"prefill": 8}) == {"prefill": f"{IMPL}:paged"}
    attn = next(s.layers.attn for s in with_impl(model, IMPL).stacks if not s.layers.attn.sparse)
    assert attn.dense_path(8, jnp.bfloat16, cached=False) == f"{IMPL}:paged"  # no-cache forward: no promise
    assert dense_attention_paths(random_model(m3jax.M3Config.tiny(
        layer_types=(SPARSE_ATTENTION,) * 3), seed=0), {"prefill": 8}) == {}


def _steps():
    """Two cached steps as (decode rows, prefill rows), each row (request, first position, length)."""
    first = ([], [(0, 0, 8), (0, 8, 5), (1, 0, 6), (2, 0, 10), None])               # request 0: 2 rows
    second = ([(2, 10, 1), None], [(0, 13, 8), (1, 6, 3), (3, 0, 1), None, (0, 21, 2)])
    return first, second


def _run(model, impl, prompts):
    remade = m3jax.params.with_impl(model, impl)
    assert all(s.layers.attn.impl == impl for s in remade.stacks)
    graphdef, state = nnx.split(remade)

    @functools.partial(jax.jit, donate_argnums=1)
    def step(state, cache, groups):
        return forward_cached(nnx.merge(graphdef, state), cache, groups)

    alloc = PageAllocator(NUM_PAGES)
    r = model.config.msa.block_size
    for i, p in enumerate(prompts):
        alloc.ensure(i, len(p), r)
    cache = init_cache(model, NUM_PAGES)
    outs = []
    for step_rows in _steps():
        groups, layout = [], []
        for rows, width in zip(step_rows, (1, ROW_LEN)):
            if not rows:
                continue
            tokens = np.zeros((len(rows), width), np.int32)
            q_pos = np.full((len(rows), width), -1, np.int32)
            table = np.zeros((len(rows), WIDTH), np.int32)
            for b, row in enumerate(rows):
                if row is None:
                    continue
                req, start, n = row
                tokens[b, :n] = prompts[req][start:start + n]
                q_pos[b, :n] = np.arange(start, start + n)
                table[b] = page_table_row(alloc.pages(req), WIDTH)
            groups.append(StepGroup(jnp.asarray(tokens), jnp.asarray(q_pos), jnp.asarray(table)))
            layout.append(rows)
        logits, cache = step(state, cache, tuple(groups))
        for lg, rows in zip(logits, layout):
            for b, row in enumerate(rows):
                if row is not None:
                    outs.append(np.asarray(lg[b, :row[2]], np.float32))
    return np.concatenate(outs)


def test_cached_steps_through_the_chunk_path_match_reference(dense_model, monkeypatch, short_chunk_rows):
    """Every valid query's logits through the wired GPU path equal the reference path's to bf16 rounding of the
    attention outputs (relative L2 per query <= 2e-2 in the interpreter, 4e-2 on a GPU where cuDNN's P.V
    product is bf16 too; random weights make near-tied top logits, so argmax is
    not compared), and the chunk path really ran: once per
    traced step with prefill rows (one stack of full-attention layers, scanned)."""
    calls = [0]
    chunked = gpu_attention.dense_attention_chunked

    def spy(*a, **kw):
        calls[0] += 1
        return chunked(*a, **kw)

    monkeypatch.setattr(gpu_attention, "dense_attention_chunked", spy)
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(0, 256, n)) for n in (23, 9, 11, 1)]
    with jax.default_matmul_precision("highest"):            # GPU: no tf32 in the model's own matmuls
        want = _run(dense_model, "reference", prompts)
        got = _run(dense_model, IMPL, prompts)
    assert calls[0] == 2, calls
    assert np.isfinite(got).all()
    rel = np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)
    assert rel.max() <= (2e-2 if IMPL == "gpu-interpret" else 4e-2), rel   # CPU: 0.011 measured
