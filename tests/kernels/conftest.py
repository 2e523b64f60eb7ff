"""Fixtures shared by the kernel tests."""

import jax
import pytest


@pytest.fixture
def short_chunk_rows(monkeypatch):
    """Let dense_attention's chunk path (cuDNN on the chunk + paged history) take rows of 2+ queries, so that
    tiny cases exercise it; by default only rows of CHUNK_MIN_QUERIES (512) take it, where it is faster on the
    GPU. The decision is made at trace time: compiled programs are dropped before and after."""
    from pallas_kernels.gpu import attention
    jax.clear_caches()
    monkeypatch.setattr(attention, "CHUNK_MIN_QUERIES", 2)
    yield
    jax.clear_caches()
