"""Routed experts kept in MXFP8 on device (load(..., fp8_experts=True)): exactly the dequantised model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import m3jax
from convert import mxfp8
from convert.safetensors_io import CheckpointError
from m3jax import sharding
from m3jax.params import flat_params
from pallas_kernels.reference import dequantize_mxfp8
from tests.backend import assert_same_sums


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    path = m3jax.testing.make_tiny_checkpoint(str(tmp_path_factory.mktemp("fp8") / "tiny"), seed=3, quant="mxfp8")
    ids = np.random.default_rng(0).integers(0, 300, (2, 45))
    dense = m3jax.load(path, dtype="float32", progress=False)
    return path, ids, dense, np.asarray(dense(ids))


@pytest.mark.parametrize("shape", [(6, 64), (3, 70)], ids=["whole-blocks", "partial-block"])
def test_dequantize_matches_the_numpy_reference(shape):
    """Every e4m3 byte and every exponent byte, the extremes 0 and 254 and the NaN byte 255 included."""
    rng = np.random.default_rng(1)
    o, i = shape
    w = rng.integers(0, 256, (o, i), dtype=np.uint8).view(mxfp8.E4M3)
    s = rng.integers(0, 256, mxfp8.scale_shape((o, i)), dtype=np.uint8)
    s[0, 0], s[1, 0], s[2, -1] = 0, 254, 255
    want = mxfp8.dequantize(w, s)
    got = np.asarray(dequantize_mxfp8(jnp.asarray(w.T), jnp.asarray(s.T), jnp.float32)).T   # [in, out] layout
    want = np.where(np.abs(want) < 2.0 ** -126, 0.0, want)     # flushed on every backend (reference semantics)
    np.testing.assert_array_equal(got, want)
    assert np.isnan(got[2, -(i % 32 or 32):]).all()


def test_fp8_experts_give_the_dequantised_logits(release):
    path, ids, dense, want = release
    model = m3jax.load(path, dtype="float32", progress=False, fp8_experts=True)
    params = flat_params(model)
    assert params["stacks.1.layers.ffn.gate_edf"].dtype == jnp.float8_e4m3fn
    assert params["stacks.1.layers.ffn.down_scale_ebd"].dtype == jnp.uint8
    # The stored bytes and exponents are the release's: dequantised they are the float32 model's experts.
    for name, scale in (("gate_edf", "gate_scale_ebf"), ("down_efd", "down_scale_ebd")):
        got = dequantize_mxfp8(params[f"stacks.1.layers.ffn.{name}"], params[f"stacks.1.layers.ffn.{scale}"],
                               jnp.float32)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(flat_params(dense)[f"stacks.1.layers.ffn.{name}"]))
    assert_same_sums(model(ids), want, what="MXFP8 vs dequantised float32 logits")
    experts = sum(v.nbytes for k, v in params.items() if ".ffn." in k and ("_e" in k.rsplit(".", 1)[1]))
    dense_experts = sum(v.nbytes for k, v in flat_params(dense).items() if k.endswith(("_edf", "_efd")))
    assert experts < 0.27 * dense_experts                  # 1 + 1/32 bytes per weight instead of 4


@pytest.mark.parametrize("tokens", [1, 3])
def test_decode_dequantises_only_the_routed_experts(release, tokens, monkeypatch):
    """Fewer routed rows (tokens x top-2) than the 8 experts: the reference dequantises only tokens x 2 expert
    slots, and the logits are the same. The reference path is the one under test (the backend's default on a GPU
    is the fused kernel, which dequantises tiles on chip and never calls reference.dequantize_mxfp8)."""
    from m3jax.params import with_impl
    from pallas_kernels import reference
    path, ids, dense, _ = release
    model = m3jax.load(path, dtype="float32", progress=False, fp8_experts=True, attn_impl="reference")
    dense = with_impl(dense, "reference")
    experts_seen = []
    inner = reference.dequantize_mxfp8

    def spy(w, scale, dtype=jnp.float32):
        experts_seen.append(w.shape[0])
        return inner(w, scale, dtype)

    monkeypatch.setattr(reference, "dequantize_mxfp8", spy)
    x = ids[:1, :tokens]
    assert_same_sums(model(x), dense(x), what="MXFP8 vs dequantised float32 logits")
    slots = tokens * model.config.num_experts_per_tok
    assert slots < model.config.num_local_experts and set(experts_seen) == {slots}
    monkeypatch.undo()
    prompts = [list(map(int, ids[0, :7])), list(map(int, ids[1, :20]))]
    sp = m3jax.SamplingParams(max_new_tokens=6, temperature=0.0)       # decode steps of 2 rows: the same path
    want = [r.token_ids for r in m3jax.generate(dense, prompts, sp, max_seq_len=64, progress=False)]
    assert [r.token_ids for r in m3jax.generate(model, prompts, sp, max_seq_len=64, progress=False)] == want


def _with_moe_impl(model, impl):
    """A copy of `model` whose MoE layers run `impl` (dispatch.moe)."""
    from flax import nnx

    from m3jax.model.moe import MoE
    graphdef, state = nnx.split(model)
    m = nnx.merge(graphdef, state)
    for _, node in nnx.iter_graph(m):
        if isinstance(node, MoE):
            node.impl = impl
    return m


@pytest.mark.parametrize("impl", ["gpu-interpret"])
def test_fp8_experts_through_the_kernel(release, impl):
    """The MoE kernel (interpreted) reads e4m3 + exponents as stored: the same logits as the kernel on the
    dequantised float32 model, bit for bit, and the reference's up to float32 summation order."""
    path, ids, dense, want = release
    model = m3jax.load(path, dtype="float32", progress=False, fp8_experts=True)
    x = ids[:, :9]
    got = np.asarray(_with_moe_impl(model, impl)(x))
    np.testing.assert_array_equal(got, np.asarray(_with_moe_impl(dense, impl)(x)))
    np.testing.assert_allclose(got, want[:, :9], atol=2e-5, rtol=0)


@pytest.mark.multi_device
def test_fp8_experts_on_a_mesh_and_in_the_engine(release):
    path, ids, dense, want = release
    mesh = sharding.make_mesh(data=2, model=4)
    model = m3jax.load(path, dtype="float32", progress=False, fp8_experts=True, mesh=mesh)
    params = flat_params(model)
    assert params["stacks.1.layers.ffn.gate_scale_ebf"].sharding.spec == P(None, ("data", "model"), None, None)
    np.testing.assert_allclose(np.asarray(jax.jit(lambda x: model(x))(ids)), want, atol=2e-5, rtol=0)
    prompts = [list(map(int, ids[0, :30])), list(map(int, ids[1, :11]))]
    sp = m3jax.SamplingParams(max_new_tokens=5, temperature=0.0)
    expect = [r.token_ids for r in m3jax.generate(dense, prompts, sp, max_seq_len=64, progress=False)]
    got = [r.token_ids for r in m3jax.generate(model, prompts, sp, max_seq_len=64, progress=False)]
    assert got == expect


def test_fp8_experts_need_an_mxfp8_release(tmp_path):
    path = m3jax.testing.make_tiny_checkpoint(str(tmp_path / "bf16"), seed=0)
    msg = r"fp8_experts needs MXFP8 experts.*ffn\.(gate_edf|up_edf|down_efd) .*without FP8 scales"
    with pytest.raises(CheckpointError, match=msg):
        m3jax.load(path, progress=False, fp8_experts=True)


@pytest.mark.multi_device
def test_converted_checkpoint_keeps_fp8_experts(release, tmp_path):
    """`m3jax convert --fp8-experts`: the experts stay MXFP8 in the Orbax pieces; restored on a mesh, the model
    is the release's. A converted dir must be loaded with the fp8_experts it was converted with."""
    from convert import orbax_io
    path, ids, _, want = release
    fp8_dir, plain_dir = str(tmp_path / "fp8"), str(tmp_path / "plain")
    orbax_io.convert(path, fp8_dir, dtype="float32", progress=False, fp8_experts=True)
    mesh = sharding.make_mesh(data=2, model=4)
    model = m3jax.load(fp8_dir, dtype="float32", progress=False, fp8_experts=True, mesh=mesh)
    assert flat_params(model)["stacks.1.layers.ffn.up_edf"].dtype == jnp.float8_e4m3fn
    np.testing.assert_allclose(np.asarray(jax.jit(lambda x: model(x))(ids)), want, atol=2e-5, rtol=0)
    with pytest.raises(CheckpointError, match="routed experts in MXFP8: load it with fp8_experts=True"):
        m3jax.load(fp8_dir, progress=False)
    orbax_io.convert(path, plain_dir, dtype="float32", progress=False)
    with pytest.raises(CheckpointError, match="routed experts dequantised: load it with fp8_experts=False"):
        m3jax.load(plain_dir, progress=False, fp8_experts=True)


@pytest.mark.multi_device
def test_quantize_experts_holds_the_quantised_model():
    """quantize_experts(model) computes exactly the model whose experts are dequantize(quantize(w)), and keeps
    the mesh placement; quantize_mxfp8 writes the bytes convert.mxfp8.quantize writes."""
    from flax import nnx

    from m3jax.model.layers import quantize_mxfp8
    from m3jax.testing import random_model
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((16, 128)) * np.exp(rng.uniform(-30, 30, (16, 1)))).astype(np.float32)
    w[0, :32] = 0.0
    q, s = quantize_mxfp8(jnp.asarray(w.T))
    qn, sn = mxfp8.quantize(w)
    np.testing.assert_array_equal(np.asarray(s).T, sn)
    np.testing.assert_array_equal(np.asarray(q).T.view(np.uint8), qn.view(np.uint8))

    model = random_model(m3jax.M3Config.tiny(), seed=4)
    graphdef, state = nnx.split(model)
    experts = ("gate_edf", "up_edf", "down_efd")
    state = jax.tree_util.tree_map_with_path(
        lambda p, x: dequantize_mxfp8(*quantize_mxfp8(x), x.dtype) if jax.tree_util.keystr(p).split("'")[-2] in experts
        else x, state)
    ids = np.random.default_rng(5).integers(0, 300, (2, 33))
    want = np.asarray(nnx.merge(graphdef, state)(ids))
    assert_same_sums(m3jax.quantize_experts(model)(ids), want, what="quantize_experts vs dequantised weights")
    mesh = sharding.make_mesh(data=2, model=4)
    placed = m3jax.quantize_experts(m3jax.params.shard_model(model, mesh))
    assert flat_params(placed)["stacks.1.layers.ffn.down_scale_ebd"].sharding.spec == P(None, ("data", "model"),
                                                                                        None, None)
    np.testing.assert_allclose(np.asarray(jax.jit(lambda x: placed(x))(ids)), want, atol=2e-5, rtol=0)
