"""Fused MoE kernels (GPU Triton and TPU Mosaic, in their interpreters on CPU) against reference.moe.

Routings cover empty experts, every row on one expert, ragged row counts, more experts than rows, ids of
experts held elsewhere (expert parallelism: outside [0, E)), and a layer of a stacked [L, E, ...] weight.
MXFP8: the kernels read e4m3 + E8M0 exponents as stored and must give exactly what they give on the
dequantised weights; the in-tile dequantisation equals reference.dequantize_mxfp8 for every byte pair. The GPU
kernel reads a 1-byte operand directly or through its int32 view (gpu.moe.byte_load_path, from the array's
size): both paths are run on small arrays by forcing the path, and the choice is checked on M3-sized abstract
shapes (nothing allocated) and, on a GPU, on real M3-sized arrays at offsets past 2**31.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert import mxfp8
from pallas_kernels import dispatch, moe_plan, reference
from pallas_kernels.gpu import moe as gpu_moe

ALPHA, LIMIT = 1.702, 7.0
IMPLS = ["gpu-interpret", "tpu-interpret"]
TOL = {jnp.float32: dict(rtol=2e-5, atol=2e-5), jnp.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _routing(kind, t, k, e, rng):
    if kind == "random":
        return np.stack([rng.choice(e, k, replace=False) for _ in range(t)])
    if kind == "one-expert":                       # every token's first choice is expert 3, the rest spread
        ids = np.stack([rng.choice(e, k, replace=False) for _ in range(t)])
        ids[:, 0] = 3
        ids[:, 1:] = np.where(ids[:, 1:] == 3, (ids[:, 1:] + 1) % e, ids[:, 1:])
        return ids
    if kind == "empty-experts":                    # only experts 1 and 6 get rows
        return np.stack([[1, 6][:k] for _ in range(t)])
    if kind == "elsewhere":                        # expert parallelism: ids outside [0, E) belong to no expert
        ids = np.stack([rng.choice(e + 4, k, replace=False) - 2 for _ in range(t)])
        return ids
    raise ValueError(kind)


def _case(t, k, e, d, f, dtype, kind, seed, fp8=False, layers=None):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((t, d)), dtype)
    ids = jnp.asarray(_routing(kind, t, k, e, rng), jnp.int32)
    comb = jnp.asarray(rng.uniform(0.1, 1.0, (t, k)), jnp.float32)
    lead = (layers,) if layers else ()
    shapes = {"gate": lead + (e, d, f), "up": lead + (e, d, f), "down": lead + (e, f, d)}
    if not fp8:
        w = [jnp.asarray(rng.standard_normal(s) / np.sqrt(s[-2]), dtype) for s in shapes.values()]
        return x, ids, comb, w
    w = []
    for s in shapes.values():
        q = rng.integers(0, 256, s, dtype=np.uint8).view(mxfp8.E4M3)
        q = np.where(np.isnan(q.astype(np.float32)), 0, q).astype(mxfp8.E4M3)       # no NaN bytes here
        sc = rng.integers(118, 124, s[:-2] + (s[-2] // 32, s[-1]), dtype=np.uint8)
        w.append((jnp.asarray(q), jnp.asarray(sc)))
    return x, ids, comb, w


def _run(impl, x, ids, comb, w, layer=None, fp8=False):
    if fp8:
        args = [a for a, _ in w] + [s for _, s in w]
    else:
        args = list(w)
    return np.asarray(dispatch.moe(x, ids, comb, *args, alpha=ALPHA, limit=LIMIT, layer=layer, impl=impl))


ROUTINGS = [("random", 5), ("one-expert", 9), ("empty-experts", 3), ("elsewhere", 6), ("random", 1)]
# The TPU interpreter is ~10x slower than the GPU one on CPU: it runs the routings that differ most.
CASES = [("gpu-interpret", k, t) for k, t in ROUTINGS] + [("tpu-interpret", k, t) for k, t in ROUTINGS[2:4]]


@pytest.mark.parametrize("impl,kind,t", CASES)
def test_kernel_matches_reference(impl, kind, t):
    """8 experts of 64 -> 32, top-2: t=1, 3 are fewer rows than experts; 9 rows on expert 3 span 1 tile."""
    x, ids, comb, w = _case(t, 2, 8, 64, 32, jnp.float32, kind, seed=t)
    want = _run("reference", x, ids, comb, w)
    got = _run(impl, x, ids, comb, w)
    np.testing.assert_allclose(got, want, **TOL[jnp.float32])


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_ragged_rows_over_several_tiles(impl):
    """40 tokens x top-4 over 16 experts of 128 -> 64: ragged counts, several row tiles per expert."""
    x, ids, comb, w = _case(40, 4, 16, 128, 64, jnp.bfloat16, "random", seed=7)
    want = _run("reference", x, ids, comb, w)
    np.testing.assert_allclose(_run(impl, x, ids, comb, w), want, **TOL[jnp.bfloat16])


@pytest.mark.parametrize("impl,t", [("gpu-interpret", 2), ("gpu-interpret", 17), ("tpu-interpret", 17)])
def test_mxfp8_is_exactly_the_dequantised_weights(impl, t):
    """e4m3 + exponents read as stored give bit for bit what the same kernel gives on dequantised weights."""
    x, ids, comb, w = _case(t, 2, 8, 64, 64, jnp.bfloat16, "random", seed=11, fp8=True)
    dense = [reference.dequantize_mxfp8(q, s, jnp.bfloat16) for q, s in w]
    got = _run(impl, x, ids, comb, w, fp8=True)
    np.testing.assert_array_equal(got, _run(impl, x, ids, comb, dense))
    np.testing.assert_allclose(got, _run("reference", x, ids, comb, w, fp8=True), **TOL[jnp.bfloat16])


@pytest.mark.parametrize("impl", IMPLS + ["reference"])
@pytest.mark.parametrize("fp8", [False, True], ids=["f32", "mxfp8"])
def test_layer_of_a_stacked_weight(impl, fp8):
    """layer=l on [L, E, ...] weights equals the per-layer [E, ...] call on layer l."""
    x, ids, comb, w = _case(4, 2, 8, 64, 32 if not fp8 else 64, jnp.float32, "random", seed=3, fp8=fp8, layers=3)
    per_layer = [(q[1], s[1]) for q, s in w] if fp8 else [a[1] for a in w]
    want = _run(impl, x, ids, comb, per_layer, fp8=fp8)
    np.testing.assert_array_equal(_run(impl, x, ids, comb, w, layer=jnp.int32(1), fp8=fp8), want)


def test_dequantize_tile_equals_the_reference_for_every_byte_pair():
    """All 256 e4m3 bytes x all 256 exponent bytes (0 = 2**-127, 254, 255 = NaN), blocks of 32 along K."""
    w = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 256, axis=1).view(mxfp8.E4M3)   # w[k, n] = byte k
    s = np.repeat(np.arange(256, dtype=np.uint8)[None, :], 8, axis=0)                     # s[k // 32, n] = n
    want = np.asarray(reference.dequantize_mxfp8(jnp.asarray(w), jnp.asarray(s), jnp.float32))
    got = np.asarray(jax.jit(lambda a, b: moe_plan.dequantize_tile(a, b, jnp.float32))(w, s))
    np.testing.assert_array_equal(got, want)
    # the NumPy converter (exact float64 semantics) agrees once its subnormal results are flushed
    exact = mxfp8.dequantize(w.T, s.T).T
    np.testing.assert_array_equal(want, np.where(np.abs(exact) < 2.0 ** -126, 0.0, exact))


def test_plan_pads_each_expert_to_whole_tiles():
    ids = jnp.asarray([[2, 0], [2, 5], [2, 0], [9, -1]], jnp.int32)        # experts 2 x3, 0 x2, 5 x1; 2 elsewhere
    comb = jnp.ones((4, 2), jnp.float32)
    p = moe_plan.plan(ids, comb, num_experts=8, block_m=2)
    assert p.num_tiles == moe_plan.max_tiles(8, 8, 2) == 8
    assert int(p.num_used[0]) == 4                                         # 0: 1 tile, 2: 2 tiles, 5: 1 tile
    np.testing.assert_array_equal(np.asarray(p.tile_expert), [0, 2, 2, 5, 5, 5, 5, 5])
    tok = np.asarray(p.row_token)
    np.testing.assert_array_equal(tok[:8], [0, 2, 0, 1, 2, -1, 1, -1])
    np.testing.assert_array_equal(np.asarray(p.slot_row), [[2, 0], [3, 6], [4, 1], [16, 16]])


def test_refusals_name_the_problem():
    x, ids, comb, w = _case(2, 2, 8, 64, 32, jnp.float32, "random", seed=0)
    with pytest.raises(ValueError, match="gpu.moe: weights must be"):
        dispatch.moe(x, ids, comb, *w, alpha=ALPHA, limit=LIMIT, layer=jnp.int32(0), impl="gpu-interpret")
    with pytest.raises(TypeError, match="gate must be bfloat16"):
        dispatch.moe(x.astype(jnp.bfloat16), ids, comb, *w, alpha=ALPHA, limit=LIMIT, impl="gpu-interpret")
    x, ids, comb, w = _case(2, 2, 8, 40, 24, jnp.float32, "random", seed=0)
    with pytest.raises(dispatch.NoImplementationError, match="multiples of 16"):
        dispatch.moe(x, ids, comb, *w, alpha=ALPHA, limit=LIMIT, impl="gpu-interpret")


ON_GPU = jax.default_backend() == "gpu"


@pytest.mark.skipif(not ON_GPU, reason="the Triton kernel compiled for the GPU (interpreted above on CPU)")
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "mxfp8"])
@pytest.mark.parametrize("t,e", [(1, 64), (32, 64), (700, 16)])
def test_gpu_kernel_matches_reference(t, e, fp8):
    """Compiled kernel: decode-sized (1 and 32 tokens over 64 experts) and prefill-sized (700 x top-4 over 16
    experts: 128-row tiles, ragged) routings, 1024 -> 512; MXFP8 bit for bit the dequantised weights."""
    x, ids, comb, w = _case(t, 4, e, 1024, 512, jnp.bfloat16, "random", seed=t, fp8=fp8)
    want = _run("reference", x, ids, comb, w, fp8=fp8)
    got = _run("gpu", x, ids, comb, w, fp8=fp8)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2
    if fp8:   # compiled, the MMAs of a tile dequantised in registers may be ordered differently: 1e-4 relative
        dense = _run("gpu", x, ids, comb, [reference.dequantize_mxfp8(q, s, jnp.bfloat16) for q, s in w])
        assert np.linalg.norm(got - dense) / np.linalg.norm(dense) < 1e-5


@pytest.mark.skipif(not ON_GPU, reason="the Triton kernel compiled for the GPU")
@pytest.mark.parametrize("fp8", [False, True], ids=["f32", "mxfp8"])
def test_gpu_kernel_float32_and_stacked_layer(fp8):
    """float32 runs at full precision (no TF32); a layer of [L, E, ...] weights equals the per-layer call."""
    x, ids, comb, w = _case(9, 2, 8, 64, 64, jnp.float32, "elsewhere", seed=5, fp8=fp8, layers=3)
    per_layer = [(q[2], s[2]) for q, s in w] if fp8 else [a[2] for a in w]
    got = _run("gpu", x, ids, comb, w, layer=jnp.int32(2), fp8=fp8)
    np.testing.assert_allclose(got, _run("gpu", x, ids, comb, per_layer, fp8=fp8), rtol=1e-6, atol=1e-6)
    # vs the reference, float32 sums in another order (on an H200: 7e-5 absolute on an output of 5.5, from
    # cancellation over K = 64 terms)
    np.testing.assert_allclose(got, _run("reference", x, ids, comb, per_layer, fp8=fp8), rtol=1e-5, atol=2e-4)


@pytest.mark.skipif(not ON_GPU, reason="the Triton kernel compiled for the GPU")
def test_gpu_kernel_float32_prefill_tiles_fit_shared_memory():
    """float32 at the bundled default model's widths (384 -> 128) with prefill-sized rows: 64 x 64 row tiles and
    64 x 128 weight tiles are 80 KiB a pipeline stage, which overflowed the H200's shared memory at 4 stages."""
    x, ids, comb, w = _case(300, 2, 8, 384, 128, jnp.float32, "random", seed=11)
    got, want = _run("gpu", x, ids, comb, w), _run("reference", x, ids, comb, w)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5         # float32 dots, not TF32


@pytest.mark.skipif(not ON_GPU, reason="GPU only")
def test_gpu_dequantisation_flushes_like_the_cpu():
    """issue 20: the GPU keeps float32 subnormals unless told; both dequantisations flush them."""
    w = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 256, axis=1).view(mxfp8.E4M3)
    s = np.repeat(np.arange(256, dtype=np.uint8)[None, :], 8, axis=0)
    exact = mxfp8.dequantize(w.T, s.T).T
    want = np.where(np.abs(exact) < 2.0 ** -126, 0.0, exact)
    np.testing.assert_array_equal(np.asarray(reference.dequantize_mxfp8(jnp.asarray(w), jnp.asarray(s))), want)
    got = jax.jit(lambda a, b: moe_plan.dequantize_tile(a, b, jnp.float32))(w, s)
    np.testing.assert_array_equal(np.asarray(got), want)


E4M3 = jnp.float8_e4m3fn
BYTE_PATH_CASES = [   # (shape, dtype, path): what Pallas' Triton lowering addresses with int32 / int64 offsets
    ((128, 6144, 3072), E4M3, "int32 view"),     # one layer of M3's experts: 2.4e9 bytes, int32 offsets wrap
    ((2, 128, 6144, 3072), E4M3, "direct"),      # a stack of 2 layers: 4.8e9 bytes > 2**32, int64 offsets
    ((57, 32, 6144, 3072), E4M3, "direct"),      # 57 layers, 32 experts per device (EP over 4)
    ((32, 6144, 3072), E4M3, "direct"),          # one layer's 32 local experts: 6.0e8 elements
    ((128, 192, 3072), jnp.uint8, "direct"),     # exponents of one layer
    ((30, 128, 192, 3072), jnp.uint8, "int32 view"),   # exponents of a 30-layer stack: 2.3e9 bytes
    ((2 ** 31,), E4M3, "direct"),                # largest offset 2**31 - 1: fits int32
    ((2 ** 31 + 1,), E4M3, "int32 view"),
    ((2 ** 32,), jnp.uint8, "int32 view"),       # 2**32 bytes is still the int32 branch
    ((2 ** 32 + 1,), jnp.uint8, "direct"),
    ((128, 6144, 3072), jnp.bfloat16, "direct"),  # 2-byte: at most 2**31 elements below 2**32 bytes
    ((2 ** 31,), jnp.bfloat16, "direct"),
]


@pytest.mark.parametrize("shape,dtype,path", BYTE_PATH_CASES)
def test_byte_load_path_follows_the_lowerings_offset_width(shape, dtype, path):
    assert gpu_moe.byte_load_path(jax.ShapeDtypeStruct(shape, dtype)) == path


def _expert_operands(fn, *args):
    """Dtype names of the expert operands (weights, exponents: >= 3 axes) of each pallas_call in fn's jaxpr
    (traced on abstract values: nothing allocated)."""
    jaxpr = jax.make_jaxpr(fn)(*args)
    return [[v.aval.dtype.name for v in eq.invars if v.aval.ndim >= 3]
            for eq in jaxpr.jaxpr.eqns if eq.primitive.name == "pallas_call"]


@pytest.mark.parametrize("layers,path", [(None, "int32 view"), (2, "direct")], ids=["one-layer", "stack-of-2"])
def test_m3_sized_mxfp8_experts_take_the_chosen_path(layers, path):
    """At M3 widths (128 experts, 6144 -> 3072) one layer's e4m3 experts go through the int32 view and a stack of
    two layers, read at layer 1, is loaded directly: the kernels' operands are int32 words or the e4m3 bytes."""
    e, d, f, t = 128, 6144, 3072, 8
    lead = (layers,) if layers else ()
    sds = jax.ShapeDtypeStruct
    weights = [sds(lead + s, E4M3) for s in ((e, d, f), (e, d, f), (e, f, d))]
    scales = [sds(lead + (e, s[0] // 32, s[1]), jnp.uint8) for s in ((d, f), (d, f), (f, d))]
    assert {gpu_moe.byte_load_path(w) for w in weights} == {path}
    assert {gpu_moe.byte_load_path(s) for s in scales} == {"direct"}
    fn = lambda x, i, c, *w: gpu_moe.moe(x, i, c, *w, alpha=ALPHA, limit=LIMIT, interpret=True,
                                         layer=1 if layers else None)
    ops = _expert_operands(fn, sds((t, d), jnp.bfloat16), sds((t, 4), jnp.int32), sds((t, 4), jnp.float32),
                           *weights, *scales)
    w = "int32" if path == "int32 view" else "float8_e4m3fn"
    assert ops == [[w, w, "uint8", "uint8"], [w, "uint8"]]      # gate, up, their exponents; down, its exponents


class _FakeH200:
    platform, compute_capability, device_kind = "gpu", "9.0", "NVIDIA H200 (lowering only)"


@pytest.mark.parametrize("layers,force", [(None, None), (2, None), (None, "direct")],
                         ids=["one-layer", "stack-of-2", "one-layer-forced-direct"])
def test_triton_offsets_are_int64_where_the_direct_path_relies_on_it(layers, force, monkeypatch):
    """byte_load_path's premise, read from the installed jax: the M3-sized kernels exported for CUDA (on any host,
    nothing allocated) address the e4m3 bytes of a 2-layer stack with int64 offsets, and one layer alone as int32
    words with int32 offsets (the 1-byte exponents, < 2**31 elements, with int32). Loaded directly, one layer's
    2.4e9 bytes would get int32 offsets: the wrap the int32 view avoids."""
    from jax import export
    lowering = pytest.importorskip("jax._src.pallas.triton.lowering")
    registration = pytest.importorskip("jax._src.pallas.triton.pallas_call_registration")
    modules = []
    real = lowering.lower_jaxpr_to_triton_module

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        modules.append(str(out.module.operation))
        return out

    monkeypatch.setattr(registration.lowering, "lower_jaxpr_to_triton_module", spy)
    if jax.default_backend() != "gpu":
        monkeypatch.setattr(jax, "devices", lambda *a: [_FakeH200()])    # gpu.moe's sm_89+ check
    e, d, f, t = 128, 6144, 3072, 8
    lead = (layers,) if layers else ()
    sds = jax.ShapeDtypeStruct
    weights = [sds(lead + s, E4M3) for s in ((e, d, f), (e, d, f), (e, f, d))]
    scales = [sds(lead + (e, s[0] // 32, s[1]), jnp.uint8) for s in ((d, f), (d, f), (f, d))]
    tiles = gpu_moe.default_tiles(t * 4, e, True)
    fn = jax.jit(lambda x, i, c, *w: gpu_moe.moe_tuned(x, i, c, *w, alpha=ALPHA, limit=LIMIT, tiles=tiles,
                                                       layer=1 if layers else None, force_byte_path=force))
    try:
        export.export(fn, platforms=["cuda"],
                      disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
            sds((t, d), jnp.bfloat16), sds((t, 4), jnp.int32), sds((t, 4), jnp.float32), *weights, *scales)
    except RuntimeError as exc:          # jax >= 0.11 lowers Triton only for a (real or abstract) GPU device
        if "No supported GPU devices" not in str(exc):
            raise
        pytest.skip(f"this jax lowers Pallas Triton only beside a GPU: {exc}")
    assert len(modules) == 2                                                 # gate_up, down
    # (pointee, offset type) of every tile load's address computation
    offsets = set(re.findall(r"tt\.addptr \S+, \S+ : tensor<[\dx]+!tt\.ptr<(\w+)>>, tensor<[\dx]+(i\d+)>",
                             "\n".join(modules)))
    assert ("i8", "i32") in offsets                                          # the exponents
    if layers:
        assert ("f8E4M3FN", "i64") in offsets and not {o for o in offsets if o[0] == "i32"}
    elif force:
        assert ("f8E4M3FN", "i32") in offsets
    else:
        assert ("i32", "i32") in offsets and not {o for o in offsets if o[0] == "f8E4M3FN"}


FORCED_TILES = [gpu_moe.MoETiles(16, 32, 32, 32, 4, 4), gpu_moe.MoETiles(32, 64, 32, 64, 4, 4)]


@pytest.mark.parametrize("path", gpu_moe.BYTE_LOAD_PATHS)
@pytest.mark.parametrize("layers", [None, 3], ids=["per-layer", "stacked"])
@pytest.mark.parametrize("tiles", FORCED_TILES, ids=["bk32", "bk64"])
def test_mxfp8_byte_paths_are_exactly_the_dequantised_weights(path, layers, tiles):
    """Both ways of reading the e4m3 bytes and exponents (forced here; chosen by size in use) give bit for bit
    what the kernel gives on the dequantised weights: several column blocks and K steps (one or two exponent
    rows per step), per layer and at layer 1 of a stack."""
    x, ids, comb, w = _case(6, 2, 8, 64, 128, jnp.bfloat16, "elsewhere", seed=13, fp8=True, layers=layers)
    layer = None if layers is None else jnp.int32(1)
    stored = [q for q, _ in w] + [s for _, s in w]
    dense = [reference.dequantize_mxfp8(q, s, jnp.bfloat16) for q, s in w]
    run = lambda *ws, **kw: np.asarray(gpu_moe.moe_tuned(x, ids, comb, *ws, alpha=ALPHA, limit=LIMIT, layer=layer,
                                                         interpret=True, tiles=tiles, **kw))
    got = run(*stored, force_byte_path=path)
    np.testing.assert_array_equal(got, run(*dense))
    per_layer = [(q[1], s[1]) for q, s in w] if layers else w
    np.testing.assert_allclose(got, _run("reference", x, ids, comb, per_layer, fp8=True), **TOL[jnp.bfloat16])
    ops = _expert_operands(lambda *a: gpu_moe.moe_tuned(*a, alpha=ALPHA, limit=LIMIT, layer=layer, interpret=True,
                                                        tiles=tiles, force_byte_path=path), x, ids, comb, *stored)
    w, sc = ("int32", "int32") if path == "int32 view" else ("float8_e4m3fn", "uint8")
    assert ops == [[w, w, sc, sc], [w, sc]]


SCALED_TILES = [gpu_moe.MoETiles(16, 32, 32, 64, 4, 4, True), gpu_moe.MoETiles(16, 64, 32, 32, 4, 4, True)]


@pytest.mark.parametrize("dtype,path,layers,kind,t", [
    (jnp.float32, "direct", None, "elsewhere", 6),
    (jnp.bfloat16, "int32 view", None, "elsewhere", 6),
    (jnp.bfloat16, "direct", 3, "random", 1),
    (jnp.float32, "int32 view", None, "one-expert", 9),
], ids=["f32-direct-per-layer", "bf16-view-per-layer", "bf16-direct-stacked-b1", "f32-view-one-expert"])
def test_mxfp8_scaled_dot_is_the_dequantised_weights(dtype, path, layers, kind, t):
    """MoETiles.scaled_dot (the exponents applied to each 32-row block's product): the dequantised weights'
    result up to float32 summation order (bit for bit with one exponent block per K step), on both byte paths,
    per layer and at layer 1 of a stack; and the reference's result."""
    x, ids, comb, w = _case(t, 2, 8, 64, 128, dtype, kind, seed=17 + t, fp8=True, layers=layers)
    layer = None if layers is None else jnp.int32(1)
    stored = [q for q, _ in w] + [s for _, s in w]
    dense = [reference.dequantize_mxfp8(q, s, dtype) for q, s in w]
    run = lambda tiles, *ws, **kw: np.asarray(gpu_moe.moe_tuned(x, ids, comb, *ws, alpha=ALPHA, limit=LIMIT,
                                                                layer=layer, interpret=True, tiles=tiles, **kw))
    for tiles in SCALED_TILES:
        got = run(tiles, *stored, force_byte_path=path)
        want = run(dataclasses.replace(tiles, scaled_dot=False), *dense)
        if tiles.block_k == moe_plan.MXFP8_BLOCK:
            np.testing.assert_array_equal(got, want)
        else:
            assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()
    per_layer = [(q[1], s[1]) for q, s in w] if layers else w
    np.testing.assert_allclose(got, _run("reference", x, ids, comb, per_layer, fp8=True), **TOL[dtype])


def test_scaled_dot_is_refused_for_bf16_weights():
    x, ids, comb, w = _case(3, 2, 8, 64, 32, jnp.bfloat16, "random", seed=5)
    with pytest.raises(ValueError, match="scaled_dot applies to MXFP8"):
        gpu_moe.moe_tuned(x, ids, comb, *w, alpha=ALPHA, limit=LIMIT, interpret=True, tiles=SCALED_TILES[0])


@pytest.mark.skipif(not ON_GPU, reason="the Triton kernel compiled for the GPU; allocates ~22 GB")
def test_gpu_mxfp8_offsets_past_2_31_on_both_paths():
    """Real M3-sized e4m3 arrays, experts whose bytes start past 2**31 (114 x 4096 x 4608 = 2.15e9): a
    [2, 128, 4096, 4608] stack at layer 1 (4.8e9 bytes: direct, int64 offsets) and its layer 1 alone (2.4e9
    bytes: int32 view) give what the same path gives on only the routed experts. Wrapped offsets would read other
    experts (zeros here) or fault."""
    e, d, f = 128, 4096, 4608
    used = jnp.asarray([127, 126, 114, 0], jnp.int32)
    x, ids, comb, w = _case(3, 4, 4, d, f, jnp.bfloat16, "random", seed=21, fp8=True)
    tiles = gpu_moe.default_tiles(ids.size, e, True)
    small = [q for q, _ in w] + [s for _, s in w]

    @jax.jit
    def embed(a):                                  # a [4, ...] -> [2, e, ...], a at layer 1, experts `used`
        u8 = jax.lax.bitcast_convert_type(a, jnp.uint8) if a.dtype != jnp.uint8 else a
        big = jnp.zeros((2, e) + a.shape[1:], jnp.uint8).at[1, used].set(u8)
        return big if a.dtype == jnp.uint8 else jax.lax.bitcast_convert_type(big, a.dtype)

    run = lambda i, ws, **kw: np.asarray(gpu_moe.moe_tuned(x, i, comb, *ws, alpha=ALPHA, limit=LIMIT, tiles=tiles,
                                                           **kw))
    stack = [embed(a) for a in small]
    assert [gpu_moe.byte_load_path(a) for a in stack[:3]] == ["direct"] * 3
    got = run(used[ids], stack, layer=jnp.int32(1))
    np.testing.assert_array_equal(got, run(ids, small, force_byte_path="direct"))
    one = [a[1] for a in stack]
    del stack
    assert [gpu_moe.byte_load_path(a) for a in one[:3]] == ["int32 view"] * 3
    got = run(used[ids], one)                      # the exponents (small) are loaded directly here, so the
    want = run(ids, small, force_byte_path="int32 view")   # compiled code differs a little: 1e-6 relative
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-6


def _expert_parallel(impl, devices, fp8=False):
    """dispatch.moe inside a shard_map that keeps its varying-axes check (as m3jax.model.moe's expert-parallel
    map does): experts split over `devices`, rows replicated, the partial outputs summed."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    mesh = jax.sharding.Mesh(np.asarray(devices), ("e",))
    n, e = len(devices), 8
    x, ids, comb, w = _case(6, 2, e, 64, 32, jnp.float32 if not fp8 else jnp.bfloat16, "random", seed=21, fp8=fp8)
    args = ([a for a, _ in w] + [s for _, s in w]) if fp8 else list(w)
    rep = lambda a: jax.device_put(a, NamedSharding(mesh, P()))                  # noqa: E731
    split = lambda a: jax.device_put(a, NamedSharding(mesh, P("e")))             # noqa: E731

    def shard(x, ids, comb, *stored):
        x, comb = jax.lax.pcast((x, comb), "e", to="varying")
        first = jax.lax.axis_index("e") * (e // n)
        out = dispatch.moe(x, ids - first, comb, *stored, alpha=ALPHA, limit=LIMIT, impl=impl)
        return jax.lax.psum(out, "e")

    fn = jax.jit(jax.shard_map(shard, mesh=mesh, in_specs=(P(),) * 3 + (P("e"),) * len(args), out_specs=P()))
    got = np.asarray(fn(rep(x), rep(ids), rep(comb), *map(split, args)))
    return got, _run("reference", x, ids, comb, w, fp8=fp8)


@pytest.mark.multi_device
def test_tpu_kernel_runs_expert_parallel_in_a_checked_shard_map():
    """The kernel's operands and outputs carry the mesh axes they vary over (moe_plan.vary_together /
    out_struct), so it runs inside a shard_map with check_vma on. (The GPU kernel's interpreter cannot: jax's HLO
    interpreter indexes the varying buffers by its invariant grid index; the compiled GPU kernel is checked on a
    multi-GPU host below.)"""
    got, want = _expert_parallel("tpu-interpret", jax.devices()[:4])
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.skipif(not ON_GPU or jax.device_count() < 2, reason="the compiled GPU kernel on 2 or more GPUs")
@pytest.mark.parametrize("fp8", [False, True], ids=["f32", "mxfp8"])
def test_gpu_kernel_runs_expert_parallel_in_a_checked_shard_map(fp8):
    got, want = _expert_parallel("gpu", jax.devices()[:2], fp8=fp8)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < (1e-2 if fp8 else 1e-5)
