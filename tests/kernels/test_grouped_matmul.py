"""MoE grouped matmul through dispatch: the reference against a per-group loop; the GPU kernel where it runs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dispatch


def _case(sizes, d=64, n=128, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    m = int(sum(sizes)) + 3                     # 3 trailing rows in no group
    lhs = rng.standard_normal((m, d)).astype(np.float32)
    rhs = rng.standard_normal((len(sizes), d, n)).astype(np.float32)
    return jnp.asarray(lhs, dtype), jnp.asarray(rhs, dtype), jnp.asarray(sizes, jnp.int32)


def _loop(lhs, rhs, sizes):
    out, at = [], 0
    for g, s in enumerate(np.asarray(sizes)):
        out.append(np.asarray(lhs[at:at + s], np.float32) @ np.asarray(rhs[g], np.float32))
        at += s
    return np.concatenate(out), at


@pytest.mark.parametrize("sizes", [[5, 0, 7, 1], [0, 0, 0, 9], [16, 16, 16, 16]])
def test_reference_matches_loop(sizes):
    lhs, rhs, gs = _case(sizes)
    want, rows = _loop(lhs, rhs, gs)
    got = np.asarray(dispatch.grouped_matmul(lhs, rhs, gs, impl="reference"))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got[:rows], want, rtol=1e-5, atol=1e-4)


def test_kernels_that_refuse_fall_back_to_xla_with_a_warning(caplog):
    lhs, rhs, gs = _case([3, 4], dtype=jnp.float32)
    got = np.asarray(dispatch.grouped_matmul(lhs, rhs, gs, impl="gpu-interpret"))
    np.testing.assert_allclose(got[:7], _loop(lhs, rhs, gs)[0], rtol=1e-5, atol=1e-4)
    assert "grouped_matmul: running reference because gpu-interpret" in caplog.text


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="Mosaic GPU kernel: Hopper only")
def test_gpu_kernel_matches_reference():
    lhs, rhs, gs = _case([300, 0, 17, 700, 5, 1], d=256, n=384, dtype=jnp.bfloat16)
    want, rows = _loop(lhs, rhs, gs)
    got = np.asarray(dispatch.grouped_matmul(lhs, rhs, gs, impl="gpu"))
    err = np.linalg.norm(got[:rows] - want) / np.linalg.norm(want)
    assert err < 1e-2
