"""TPU (Mosaic) stacked linear (pallas_kernels/tpu/linear.py) against reference.linear: in the TPU interpreter on
CPU/GPU hosts, compiled on a TPU host. Small widths keep the interpreter fast (each call ~0.5-1 s on CPU); K = 256,
N = 384 gives 3 column blocks (BN = 128), and forced block_k = 128 gives 2 K steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dispatch, reference
from pallas_kernels.tpu import linear as tpu_linear

INTERPRET = jax.default_backend() != "tpu"
IMPL = "tpu-interpret" if INTERPRET else "tpu"
TOL = {jnp.float32: dict(rtol=1e-5, atol=1e-5), jnp.bfloat16: dict(rtol=2e-2, atol=2e-2)}
L = 3


def _inputs(m, k, n, dtype, seed, num_layers=L):
    kx, kw = jax.random.split(jax.random.PRNGKey(seed))
    x = (jax.random.normal(kx, (m, k), jnp.float32) / np.sqrt(k)).astype(dtype)
    w = jax.random.normal(kw, (num_layers, k, n), jnp.float32).astype(dtype)
    return x, w


def _check(got, x, w, layer, dtype):
    want = reference.linear(x, w, layer=layer)
    assert got.dtype == jnp.float32 and got.shape == want.shape
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL[dtype])


@pytest.mark.parametrize("dtype,m", [(jnp.float32, 1), (jnp.bfloat16, 5)])
def test_every_layer_matches_reference(dtype, m):
    """Each layer of an L = 3 stack; M = 1 (decode) and M = 5 (not a multiple of the sublane tile)."""
    x, w = _inputs(m, 256, 384, dtype, seed=m)
    for layer in range(L):
        _check(dispatch.linear(x, w, layer=layer, impl=IMPL), x, w, layer, dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_k_steps_and_column_blocks(dtype):
    """Forced BK = 128, BN = 128: grid (1, 3, 2), the output block accumulated over 2 K steps."""
    x, w = _inputs(13, 256, 384, dtype, seed=3)
    got = tpu_linear.linear(x, w, layer=2, interpret=INTERPRET, block_k=128, block_n=128)
    _check(got, x, w, 2, dtype)


def test_reads_only_its_layer():
    """Every other layer holds NaN: a block read from the wrong layer would poison the output."""
    x, w = _inputs(4, 256, 256, jnp.float32, seed=4)
    poisoned = jnp.full_like(w, jnp.nan).at[1].set(w[1])
    got = tpu_linear.linear(x, poisoned, layer=1, interpret=INTERPRET, block_k=128)
    _check(got, x, w, 1, jnp.float32)


def test_traced_layer_in_scan():
    """The layer index is a scan carry's element (traced): one compiled body, every layer."""
    x, w = _inputs(2, 256, 384, jnp.bfloat16, seed=5)

    @jax.jit
    def run(x, w):
        return jax.lax.scan(lambda c, l: (c, dispatch.linear(x, w, layer=l, impl=IMPL)), 0,
                            jnp.arange(L, dtype=jnp.int32))[1]

    ys = run(x, w)
    for layer in range(L):
        _check(ys[layer], x, w, layer, jnp.bfloat16)


def test_layer_resolved_like_reference():
    """Out-of-range layers: clamped (L + 4, -7); negative ones count from the end first (-2), as in the reference."""
    x, w = _inputs(1, 128, 128, jnp.float32, seed=6)
    for layer in (L + 4, -2, -7):
        _check(dispatch.linear(x, w, layer=layer, impl=IMPL), x, w, layer, jnp.float32)


def test_row_tiles_small_widths_and_mixed_dtypes():
    """M = 300 > 256: two balanced row tiles; K = 100, N = 200: whole-K, whole-N blocks (not lane multiples);
    x float32 with a bfloat16 stack: multiplied in float32."""
    x, w = _inputs(300, 128, 128, jnp.float32, seed=7, num_layers=2)
    _check(dispatch.linear(x, w, layer=1, impl=IMPL), x, w, 1, jnp.float32)
    x, w = _inputs(3, 100, 200, jnp.float32, seed=8, num_layers=2)
    _check(dispatch.linear(x, w, layer=0, impl=IMPL), x, w, 0, jnp.float32)
    x, w = _inputs(3, 128, 128, jnp.float32, seed=9, num_layers=2)
    w = w.astype(jnp.bfloat16)
    _check(tpu_linear.linear(x, w, layer=1, interpret=INTERPRET), x, w, 1, jnp.float32)


@pytest.mark.parametrize("m,k,n,dtype,ok", [
    (1, 256, 384, jnp.bfloat16, True),
    (1, 100, 200, jnp.float32, True),
    (1, 256, 300, jnp.bfloat16, False),      # N > 256 and not a multiple of 128
    (1, 256, 384, jnp.int8, False),          # dtype
])
def test_accepts_agrees_with_raising(m, k, n, dtype, ok):
    assert tpu_linear.accepts(m, k, n, dtype) is ok
    x = jnp.ones((m, k), dtype)
    w = jnp.ones((L, k, n), dtype)
    if ok:
        assert dispatch.linear_path(m, k=k, n=n, dtype=dtype, impl=IMPL) == IMPL
        return
    assert dispatch.linear_path(m, k=k, n=n, dtype=dtype, impl=IMPL) == "xla"
    with pytest.raises(NotImplementedError, match="tpu.linear"):
        tpu_linear.linear(x, w, layer=0, interpret=INTERPRET)
    with pytest.raises(dispatch.NoImplementationError):
        dispatch.linear(x, w, layer=0, impl=IMPL)


def test_refuses_whole_k_over_vmem_budget():
    """K not a multiple of 128 must fit whole: f32, K = 12345, N = 256 at M = 256 does not (48.5 MiB of buffers > 24 MiB)."""
    assert not tpu_linear.accepts(256, 12345, 256, jnp.float32)
    assert tpu_linear.accepts(256, 12288, 256, jnp.float32)        # a multiple of 128: BK shrinks
    with pytest.raises(NotImplementedError, match="VMEM"):
        tpu_linear.linear(jax.ShapeDtypeStruct((256, 12345), jnp.float32),
                          jax.ShapeDtypeStruct((1, 12345, 256), jnp.float32), layer=0)
