"""The stacked non-expert matmul weights (attention projections, dense MLP, shared expert) are read in place.

Inside `LayerStack.scan` these weights are `InPlace`: each step holds the stack [L, ...] and its layer index, and
`m3jax.model.layers.stacked_matmul` runs the stacked-linear kernel (dispatch.linear) on steps of at most
dispatch.LINEAR_KERNEL_MAX_ROWS rows, or the layer's slice and XLA's matmul above (dispatch.linear_path). These
tests check the traced decode step's structure (no per-layer slice of those weights outside the kernels; the
kernels take the stacks), the path rules, that the Engine states them, and the numbers: the kernels against the
reference model's greedy tokens, on one device and on a 2x4 mesh (split heads, a contraction summed over devices).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import m3jax
from m3jax import sharding
from m3jax.model.layers import stacked_matmul
from m3jax.params import shard_model, with_impl
from m3jax.testing import random_model
from pallas_kernels import dispatch, reference
from tests.test_inplace_experts import _decode_step_jaxpr, _eqns, _shapes

GPU = "gpu-interpret" if jax.default_backend() == "cpu" else "gpu"
TPU = "tpu-interpret"
# Widths chosen so that no activation of a decode step (e.g. the MoE's padded rows [64, hidden]) has the shape of a
# layer's weight (hidden 80, 8 heads x 16: q 80 -> 128), and that a 4-way "model" split leaves every block a
# multiple of 16 (the GPU kernel's smallest tile): MLP widths 128 (shared) and 192 (dense).
CFG = dict(intermediate_size=128, topk_blocks=2, hidden_size=80, num_attention_heads=8,
           shared_intermediate_size=128, dense_intermediate_size=192)
ATTENTION = ("q_dnh", "k_dkh", "v_dkh", "o_nhd", "index_q_dki", "index_k_di")
MLP = ("gate_df", "up_df", "down_fd")


@pytest.fixture(scope="module")
def model():
    return random_model(m3jax.M3Config.tiny(**CFG), seed=0)


def _stacked_weights(model):
    """{(stack index, name): stacked shape [L, ...]} of every stacked non-expert matmul weight."""
    out = {}
    for i, stack in enumerate(model.stacks):
        layers = stack.layers
        mlp = layers.ffn.shared if hasattr(layers.ffn, "shared") else layers.ffn
        for name in ATTENTION:
            if hasattr(layers.attn, name):
                out[(i, name)] = tuple(getattr(layers.attn, name).shape)
        for name in MLP:
            out[(i, name)] = tuple(getattr(mlp, name).shape)
    return out


def _in_out(name, shape):
    """(K, N) of a stacked weight's matmul: one contraction axis, two for the output projection o_nhd."""
    k_axes = 2 if name == "o_nhd" else 1
    return int(np.prod(shape[1:1 + k_axes])), int(np.prod(shape[1 + k_axes:]))


def test_decode_step_reads_every_stacked_weight_in_place(model, impl=GPU):
    """With the GPU kernels (the TPU attention kernels need head_dim 128; tests/kernels/test_tpu_model.py runs
    the TPU stacked-linear kernel in the model), the traced decode step holds no value with the shape of one layer of a stacked
    projection or MLP weight (as stored or flattened to [K, N]) outside the kernels, the kernels take the
    flattened stacks [L, K, N], and the layer scans close over the stacks instead of scanning (slicing) them."""
    m = with_impl(model, impl)
    jaxpr = _decode_step_jaxpr(m)
    weights = _stacked_weights(m)
    one = {s[1:] for s in weights.values()} | {_in_out(n, s) for (_, n), s in weights.items()}
    flat_stacks = {(s[0], *_in_out(n, s)) for (_, n), s in weights.items()}
    is_kernel = lambda e: e.primitive.name == "pallas_call"          # noqa: E731
    sliced = sorted({s for s in _shapes(jaxpr, skip=is_kernel) if s in one})
    assert not sliced, f"values with the shape of one layer's weight (a per-layer slice) in the step: {sliced}"
    taken = {tuple(v.aval.shape) for e in _eqns(jaxpr) if is_kernel(e) for v in e.invars}
    assert flat_stacks <= taken, f"stacks no kernel reads: {sorted(flat_stacks - taken)}"
    stacks = set(weights.values())
    for e in _eqns(jaxpr):
        if e.primitive.name == "scan":
            body = e.params["jaxpr"].jaxpr
            scanned = [tuple(o.aval.shape) for o, i in zip(e.invars, body.invars)
                       if tuple(o.aval.shape) in stacks and tuple(i.aval.shape) != tuple(o.aval.shape)]
            assert not scanned, f"stacked weights are scanned (sliced): {scanned}"


def test_linear_path_rules(model):
    """The kernel for steps up to LINEAR_KERNEL_MAX_ROWS rows on GPU / TPU, "xla" above it, for the reference
    implementation and for widths the kernel refuses; the modules report the same per weight."""
    limit = dispatch.LINEAR_KERNEL_MAX_ROWS
    for impl in (GPU, TPU):
        assert dispatch.linear_path(1, k=6144, n=8192, dtype=jnp.bfloat16, impl=impl) == impl
        assert dispatch.linear_path(limit, k=6144, n=512, dtype=jnp.bfloat16, impl=impl) == impl
        assert dispatch.linear_path(limit + 1, k=6144, n=8192, dtype=jnp.bfloat16, impl=impl) == "xla"
        assert dispatch.linear_path(1, k=6144, n=8192, dtype=jnp.int8, impl=impl) == "xla"
    assert dispatch.linear_path(1, k=6144, n=8192, dtype=jnp.bfloat16, impl="reference") == "xla"
    with pytest.raises(ValueError, match="impl must be one of"):
        dispatch.linear_path(1, k=64, n=64, dtype=jnp.float32, impl="cuda")
    m = with_impl(model, GPU)
    attn = m.stacks[1].layers.attn
    assert set(attn.matmul_paths(2).values()) == {GPU}
    assert set(attn.matmul_paths(limit + 1).values()) == {"xla"}
    assert set(with_impl(model, "reference").stacks[1].layers.attn.matmul_paths(2).values()) == {"xla"}


def test_engine_states_the_stacked_matmul_paths(model, caplog):
    """The runner names what the stacked matmuls run for its decode and prompt-chunk steps, and logs it."""
    with caplog.at_level(logging.INFO, logger="m3jax.runner"):
        eng = m3jax.Engine(with_impl(model, GPU), max_batch_size=4, max_seq_len=512, num_pages=80,
                           prefill_chunk=512, max_tokens_per_step=516, prefill_row_len=64)
    paths = eng.runner.stacked_matmul_paths
    assert paths == {"decode": GPU, "prefill": "xla"}, paths
    assert any("stacked matmuls" in r.getMessage() and GPU in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("impl", [GPU, TPU])
def test_stacked_matmul_kernel_equals_the_slice(impl):
    """stacked_matmul through the kernel equals the layer's slice times x (float32, HIGHEST) for each layer of a
    stack, one and two contraction axes, a traced layer."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 3, 4, 32)), jnp.float32)
    for in_axes, w_shape in ((1, (3, 32, 4, 32)), (2, (3, 4, 32, 128))):
        w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)
        xx = x if in_axes == 2 else x[:, :, 0]
        run = jax.jit(lambda x, w, l: stacked_matmul(x, w, l, in_axes=in_axes, precision="highest", impl=impl))
        for layer in range(3):
            want = jnp.tensordot(xx, w[layer], axes=in_axes, precision="highest")
            np.testing.assert_allclose(np.asarray(run(xx, w, jnp.int32(layer))), np.asarray(want), rtol=1e-5,
                                       atol=1e-5)


@pytest.mark.multi_device
@pytest.mark.parametrize("impl", [GPU, TPU])
def test_stacked_matmul_on_a_mesh(impl):
    """On a 2x4 mesh the kernel runs per device on its block: heads split over "model" for a column-split
    projection (q), the contraction split for the output projection (o: partial products summed in float32),
    against the unsharded reference."""
    mesh = sharding.make_mesh(data=2, model=4, devices=jax.devices()[:8])
    rng = np.random.default_rng(1)
    d, n, h = 64, 8, 16
    x = jnp.asarray(rng.standard_normal((2, 3, d)), jnp.float32)
    o = jnp.asarray(rng.standard_normal((2, 3, n, h)), jnp.float32)
    wq = jnp.asarray(rng.standard_normal((3, d, n, h)), jnp.float32)
    wo = jnp.asarray(rng.standard_normal((3, n, h, d)), jnp.float32)
    place = lambda w, rule: jax.device_put(w, jax.sharding.NamedSharding(   # noqa: E731
        mesh, sharding.param_spec(rule, w.shape, mesh)))
    wq_s, wo_s = place(wq, "attn.q_dnh"), place(wo, "attn.o_nhd")
    assert wq_s.sharding.spec == P(None, None, "model", None) and wo_s.sharding.spec == P(None, "model", None, None)
    for layer in (0, 2):
        q = jax.jit(lambda x, w, l: stacked_matmul(x, w, l, in_axes=1, precision="highest", impl=impl, mesh=mesh,
                                                   rule="attn.q_dnh"))(x, wq_s, jnp.int32(layer))
        np.testing.assert_allclose(np.asarray(q), np.asarray(reference.linear(
            x.reshape(6, d), wq.reshape(3, d, n * h), layer=layer)).reshape(2, 3, n, h), rtol=1e-5, atol=1e-5)
        y = jax.jit(lambda o, w, l: stacked_matmul(o, w, l, in_axes=2, precision="highest", impl=impl, mesh=mesh,
                                                   rule="attn.o_nhd"))(o, wo_s, jnp.int32(layer))
        np.testing.assert_allclose(np.asarray(y), np.asarray(reference.linear(
            o.reshape(6, n * h), wo.reshape(3, n * h, d), layer=layer)).reshape(2, 3, d), rtol=1e-5, atol=1e-5)


@pytest.mark.multi_device
def test_engine_on_a_mesh_keeps_the_greedy_tokens(model, monkeypatch):
    """An Engine on a 2x4 mesh whose stacked matmuls run the GPU kernels (interpreted on CPU) per device gives the
    greedy tokens of the single-device reference Engine (float32). The MoE runs the reference in both (its
    expert-parallel kernel is tested in tests/kernels), so the stacked matmuls are what differs."""
    from m3jax.model.moe import MoE

    real = MoE._local_experts
    monkeypatch.setattr(MoE, "_local_experts", lambda self, *a: real(_with(self, "reference"), *a))
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], [2, 7, 1, 8], [1, 4, 1, 4, 2], [9, 9, 8]]
    want = _greedy(with_impl(model, "reference"), prompts)
    mesh = sharding.make_mesh(data=2, model=4, devices=jax.devices()[:8])
    sharded = with_impl(shard_model(model, mesh), GPU)
    eng_paths = _greedy(sharded, prompts, paths=True)
    assert eng_paths[1]["decode"] == GPU, eng_paths[1]
    assert eng_paths[0] == want


def _with(module, impl):
    clone = object.__new__(type(module))
    clone.__dict__.update(module.__dict__)
    clone.__dict__["impl"] = impl
    return clone


def _greedy(model, prompts, paths=False):
    eng = m3jax.Engine(model, max_batch_size=4, max_seq_len=64, num_pages=32, prefill_chunk=16,
                       max_tokens_per_step=20, prefill_row_len=8)
    out = [r.token_ids for r in m3jax.generate(eng, prompts, m3jax.SamplingParams(max_new_tokens=4, temperature=0.0))]
    return (out, eng.runner.stacked_matmul_paths) if paths else out
