"""The GPU stacked-weight matmul (pallas_kernels/gpu/linear.py) against reference.linear.

On CPU the Triton kernel runs in the Pallas interpreter: every layer of a small stack, explicit tiles (K splits,
16- and 32-row tiles, rows that are not a multiple of the tile, one row), the layer traced inside lax.scan and
passed to jit, and the refusals (which `accepts` predicts). On a GPU: the compiled kernel at M3 widths, and a
bf16 stack of more than 2**31 elements (int64 offsets) read at its last layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dispatch, reference
from pallas_kernels.gpu import linear as gpu_linear
from pallas_kernels.gpu.linear import LinearTiles

ON_GPU = jax.default_backend() == "gpu"
TOL = {jnp.float32: dict(rtol=1e-5, atol=1e-5), jnp.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _inputs(m, k, n, layers, dtype, seed):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    w = jnp.asarray(rng.standard_normal((layers, k, n)) / np.sqrt(k), dtype)
    return x, w


def _close(got, want, dtype):
    assert got.dtype == jnp.float32 and got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL[dtype])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_every_layer_through_dispatch(dtype):
    x, w = _inputs(5, 64, 48, 3, dtype, seed=0)
    for layer in range(3):
        _close(dispatch.linear(x, w, layer=layer, impl="gpu-interpret"), reference.linear(x, w, layer=layer), dtype)


@pytest.mark.parametrize("m,tiles", [
    (1, LinearTiles(16, 16, 16, 4, 4, 4)),          # one row, K split 4 ways, 2 K steps each
    (20, LinearTiles(16, 32, 32, 2, 4, 4)),         # rows not a multiple of the tile: 2 row tiles, padded
    (33, LinearTiles(32, 64, 64, 1, 4, 4)),         # 32-row tiles, one K split
    (16, LinearTiles(16, 64, 256, 8, 4, 4)),        # tiles larger than the shape: halved to fit
], ids=["m1-split4", "m20-bm16", "m33-bm32", "fit"])
def test_explicit_tiles(m, tiles):
    x, w = _inputs(m, 128, 96, 3, jnp.float32, seed=m)
    fitted = gpu_linear.fit_tiles(128, 96, tiles)
    assert 96 % fitted.block_n == 0 and (128 // fitted.k_splits) % fitted.block_k == 0
    for layer in (0, 2):
        got = gpu_linear.linear_tuned(x, w, layer=layer, tiles=tiles, interpret=True)
        _close(got, reference.linear(x, w, layer=layer), jnp.float32)


def test_traced_layer_inside_scan():
    """The model's use: a scan over the layers with the stack closed over, the layer index traced."""
    x, w = _inputs(3, 64, 32, 3, jnp.float32, seed=1)

    def step(h, layer):
        y = dispatch.linear(x, w, layer=layer, impl="gpu-interpret")
        return h + y.sum(), y

    _, ys = jax.jit(lambda: jax.lax.scan(step, jnp.float32(0), jnp.arange(3, dtype=jnp.int32)))()
    for layer in range(3):
        _close(ys[layer], reference.linear(x, w, layer=layer), jnp.float32)


def test_layer_as_jit_argument_and_clamped():
    x, w = _inputs(2, 32, 16, 3, jnp.bfloat16, seed=2)
    fn = jax.jit(lambda x, w, layer: dispatch.linear(x, w, layer=layer, impl="gpu-interpret"))
    for layer in (1, 2):
        _close(fn(x, w, jnp.int32(layer)), reference.linear(x, w, layer=layer), jnp.bfloat16)
    # out of range is the caller's bug; both clamp like lax.dynamic_index_in_dim
    _close(fn(x, w, jnp.int32(7)), reference.linear(x, w, layer=7), jnp.bfloat16)


@pytest.mark.parametrize("case,match", [
    (dict(m=4, k=64, n=40, dtype=jnp.float32), r"multiples of 16.*w=\(3, 64, 40\)"),
    (dict(m=4, k=64, n=48, dtype=jnp.int8), r"float32/bfloat16/float16.*int8"),
    (dict(m=4, k=40, n=48, dtype=jnp.float32), r"multiples of 16"),
], ids=["n40", "int8", "k40"])
def test_refusals_name_the_shapes(case, match):
    m, k, n, dtype = case["m"], case["k"], case["n"], case["dtype"]
    x = jnp.ones((m, k), dtype)
    w = jnp.ones((3, k, n), dtype)
    assert not gpu_linear.accepts(m, k, n, dtype)
    with pytest.raises(NotImplementedError, match=match):
        gpu_linear.linear(x, w, layer=0, interpret=True)
    with pytest.raises(dispatch.NoImplementationError, match="gpu.linear"):
        dispatch.linear(x, w, layer=0, impl="gpu-interpret")
    assert dispatch.linear_path(m, k=k, n=n, dtype=dtype, impl="gpu-interpret") == "xla"


def test_refusals_of_mismatched_operands():
    x, w = _inputs(4, 64, 48, 3, jnp.float32, seed=3)
    with pytest.raises(NotImplementedError, match=r"w's K.*x=\(4, 32\).*w=\(3, 64, 48\)"):
        gpu_linear.linear(x[:, :32], w, layer=0, interpret=True)
    with pytest.raises(NotImplementedError, match=r"stack \[L, K, N\].*w=\(64, 48\)"):
        gpu_linear.linear(x, w[0], layer=0, interpret=True)
    with pytest.raises(NotImplementedError, match="same dtype.*bfloat16"):
        gpu_linear.linear(x.astype(jnp.bfloat16), w, layer=0, interpret=True)


@pytest.mark.parametrize("m,k,n,dtype", [(1, 64, 48, jnp.float32), (7, 16, 16, jnp.bfloat16),
                                         (300, 6144, 8192, jnp.bfloat16), (1, 6144, 128, jnp.float16),
                                         (1, 64, 40, jnp.float32), (1, 24, 48, jnp.float32),
                                         (1, 64, 48, jnp.int8), (1, 64, 48, jnp.float8_e4m3fn),
                                         (0, 64, 48, jnp.float32)])
def test_accepts_agrees_with_linear(m, k, n, dtype):
    """accepts(m, k, n, dtype) is True exactly when linear runs (traced only: nothing is computed)."""
    x = jax.ShapeDtypeStruct((m, k), dtype)
    w = jax.ShapeDtypeStruct((2, k, n), dtype)
    try:
        jax.eval_shape(lambda x, w: gpu_linear.linear(x, w, layer=1, interpret=True), x, w)
        runs = True
    except NotImplementedError:
        runs = False
    assert gpu_linear.accepts(m, k, n, dtype) == runs
    if runs:
        assert dispatch.linear_path(m, k=k, n=n, dtype=dtype, impl="gpu") == ("gpu" if m <= 256 else "xla")


def test_default_tiles_fill_the_chip_at_m3_widths():
    """Decode at M3 widths: the default tiles fit the shape, make a program for most SMs and loop over at most
    MAX_SPLIT_K inputs each."""
    for k, n in [(6144, 8192), (8192, 6144), (6144, 12288), (12288, 6144), (6144, 3072), (3072, 6144),
                 (6144, 512)]:
        for m in (1, 32):
            t = gpu_linear.default_tiles(m, k, n, jnp.bfloat16)
            assert gpu_linear.fit_tiles(k, n, t) == t
            programs = -(-m // t.block_m) * (n // t.block_n) * t.k_splits
            assert programs >= 88 and k // t.k_splits <= gpu_linear.MAX_SPLIT_K, (m, k, n, t, programs)


# ----------------------------------------------------------------------------------------------- compiled

@pytest.mark.skipif(not ON_GPU, reason="the Triton kernel compiled for the GPU (interpreted above on CPU)")
@pytest.mark.parametrize("m", [1, 32])
def test_gpu_m3_widths(m):
    x, w = _inputs(m, 6144, 8192, 4, jnp.bfloat16, seed=m)
    for layer in (0, 3):
        got = jax.jit(lambda x, w, l: dispatch.linear(x, w, layer=l, impl="gpu"))(x, w, jnp.int32(layer))
        want = reference.linear(x, w, layer=layer)
        assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 1e-2


@pytest.mark.skipif(not ON_GPU, reason="the Triton kernel compiled for the GPU")
def test_gpu_float32_is_full_precision():
    x, w = _inputs(9, 1024, 256, 3, jnp.float32, seed=4)
    got = dispatch.linear(x, w, layer=2, impl="gpu")
    want = reference.linear(x, w, layer=2)
    assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 1e-5     # not TF32 (~1e-3)


@pytest.mark.skipif(not ON_GPU, reason="the Triton kernel compiled for the GPU; allocates ~5 GB")
def test_gpu_stack_past_2_31_elements():
    """[45, 6144, 8192] bf16 = 2.26e9 elements (4.5 GB): offsets of the last layer are past 2**31 (int64)."""
    layers, k, n = 45, 6144, 8192
    assert layers * k * n > 2 ** 31
    w = jax.jit(lambda key: jax.random.normal(key, (layers, k, n), jnp.bfloat16))(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (3, k), jnp.bfloat16)
    for layer in (layers - 1, 20):
        got = dispatch.linear(x, w, layer=layer, impl="gpu")
        want = jnp.dot(x.astype(jnp.float32), w[layer].astype(jnp.float32), precision="highest")
        assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 1e-2
