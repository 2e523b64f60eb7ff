"""The routed experts are read in place from their layer stacks ([L, E, ...]) by layer index, never sliced per step.

`LayerStack.scan` gives each step its layer's slice of every stacked parameter except the `InPlace` ones (the MoE's
routed experts and their MXFP8 exponents), which the MoE kernels read at the layer index (m3jax.model.layers.InPlace
says why: XLA copies a per-step slice that feeds a Pallas kernel). These tests check the structure of the traced
step (no value anywhere has the shape of one layer's experts; the kernels take the stacks; the layer scans close
over the stacks instead of scanning them) and that the numbers are those of a plain per-layer loop: logits, greedy
tokens and training gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import m3jax
from m3jax import sharding
from m3jax.cache import init_cache
from m3jax.config import MOE_MLP
from m3jax.model.cached import StepGroup, forward_cached
from m3jax.model.layers import MXFP8_BLOCK
from m3jax.params import flat_params, shard_model, with_impl
from m3jax.testing import random_model
from m3jax.training import losses

GPU = "gpu-interpret" if jax.default_backend() == "cpu" else "gpu"
# Expert widths distinct from every other axis of the tiny model (hidden 64), multiples of 32 (MXFP8 blocks).
CFG = dict(intermediate_size=128, topk_blocks=2)


def _sub_jaxprs(eqn):
    for v in eqn.params.values():
        for sub in v if isinstance(v, (list, tuple)) else (v,):
            if hasattr(sub, "eqns"):
                yield sub
            elif hasattr(getattr(sub, "jaxpr", None), "eqns"):
                yield sub.jaxpr


def _eqns(jaxpr):
    """Every equation of `jaxpr` and of the jaxprs nested in it (jit, scan, shard_map, pallas_call bodies, ...)."""
    for e in jaxpr.eqns:
        yield e
        for sub in _sub_jaxprs(e):
            yield from _eqns(sub)


def _shapes(jaxpr, skip=lambda eqn: False):
    """The shape of every value of `jaxpr`, nested jaxprs included (inputs, constants and equation outputs),
    except inside the equations `skip` names."""
    for v in (*jaxpr.invars, *jaxpr.constvars):
        yield tuple(v.aval.shape)
    for e in jaxpr.eqns:
        yield from (tuple(v.aval.shape) for v in e.outvars)
        if not skip(e):
            for sub in _sub_jaxprs(e):
                yield from _shapes(sub, skip)


def _expert_shapes(cfg, num_layers: int, experts_per_device: int):
    """(shapes of one layer's expert arrays, shapes of the stacked ones), for experts split `experts_per_device`."""
    e, d, f = experts_per_device, cfg.hidden_size, cfg.intermediate_size
    one = {(e, d, f), (e, f, d), (e, -(-d // MXFP8_BLOCK), f), (e, -(-f // MXFP8_BLOCK), d)}
    return one, {(num_layers, *s) for s in one}


def _decode_step_jaxpr(model, batch: int = 2):
    graphdef, state = nnx.split(model)
    cache = init_cache(model, 8)
    group = StepGroup(jnp.zeros((batch, 1), jnp.int32), jnp.full((batch, 1), 5, jnp.int32),
                      jnp.zeros((batch, 4), jnp.int32))

    def step(state, cache, group):
        return forward_cached(nnx.merge(graphdef, state), cache, [group])

    return jax.make_jaxpr(step)(state, cache, group).jaxpr


def _moe_stack_layers(cfg) -> int:
    (n,) = [n for _, n, _, mlp in cfg.layer_groups if mlp == MOE_MLP]
    return n


def _assert_experts_read_in_place(jaxpr, cfg, experts_per_device: int, is_moe_op, operands_per_op):
    """No value of the step outside the MoE ops (`is_moe_op`) has the shape of one layer's experts; the MoE ops take
    the stacks ([L, E per device, ...], `operands_per_op` stacked operands each); the layer scans close over the
    stacks (constants) rather than scanning them (xs: sliced per step)."""
    layers = _moe_stack_layers(cfg)
    one, stacked = _expert_shapes(cfg, layers, experts_per_device)          # as the MoE ops see them
    one_whole, stacked_whole = _expert_shapes(cfg, layers, cfg.num_local_experts)   # before expert parallelism
    one, stacked_any = one | one_whole, stacked | stacked_whole
    sliced = sorted({s for s in _shapes(jaxpr, skip=is_moe_op) if s in one})
    assert not sliced, f"values with the shape of one layer's experts (a per-layer slice) in the step: {sliced}"
    ops = [e for e in _eqns(jaxpr) if is_moe_op(e)]
    per_op = sorted(sum(tuple(v.aval.shape) in stacked for v in e.invars) for e in ops)
    assert per_op == sorted(operands_per_op), f"stacked expert operands per MoE op: {per_op}"
    scans = [e for e in _eqns(jaxpr) if e.primitive.name == "scan"
             and any(tuple(v.aval.shape) in stacked_any for v in e.invars)]
    assert scans
    for e in scans:
        # The body takes the scan's operands in order; a scanned one (xs) arrives with its leading axis sliced off.
        # (Read from the shapes: jax 0.10 names the operand groups with num_consts / num_carry, 0.11 does not.)
        body = e.params["jaxpr"].jaxpr
        assert len(body.invars) == len(e.invars)
        scanned = [tuple(o.aval.shape) for o, i in zip(e.invars, body.invars)
                   if tuple(o.aval.shape) in stacked_any and tuple(i.aval.shape) != tuple(o.aval.shape)]
        assert not scanned, f"stacked experts are scanned (sliced): {scanned}"


def _is_kernel_on(cfg, experts_per_device):
    """A pallas_call taking a stacked expert operand (the MoE kernels: gate_up, then down)."""
    _, stacked = _expert_shapes(cfg, _moe_stack_layers(cfg), experts_per_device)
    return lambda e: e.primitive.name == "pallas_call" and any(tuple(v.aval.shape) in stacked for v in e.invars)


@pytest.fixture(scope="module")
def model():
    return random_model(m3jax.M3Config.tiny(**CFG), seed=0)


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16-layout", "mxfp8"])
def test_decode_step_reads_the_stacked_experts_in_place(model, fp8):
    """The traced cached decode step (GPU kernels) holds no per-layer slice of the routed experts: the MoE kernels
    take the [L, E, ...] stacks, which the layer scan closes over."""
    m = with_impl(m3jax.quantize_experts(model) if fp8 else model, GPU)
    e = m.config.num_local_experts
    # gate_up takes gate and up (+ their exponents), down takes down (+ its exponents)
    per_op = [4, 2] if fp8 else [2, 1]
    _assert_experts_read_in_place(_decode_step_jaxpr(m), m.config, e, _is_kernel_on(m.config, e), per_op)


@pytest.mark.multi_device
def test_decode_step_reads_the_stacked_experts_in_place_on_a_mesh(model, monkeypatch):
    """Experts split over 4 devices: the stacks keep their layer axis whole and their expert axis split, the
    expert-parallel shard_map hands each device [L, E / 4, ...], and nothing slices out one layer before the MoE op.

    The reference MoE runs here (the GPU kernel does not trace inside the MoE's check_vma shard_map on jax 0.10.2,
    on main as well), made one opaque op by a jit named `moe` so that its own slicing of the stack (the reference
    indexes the layer with dynamic_index_in_dim, as the kernels do in place) is left out of the scan for slices."""
    from pallas_kernels import reference

    monkeypatch.setattr(reference, "moe", jax.jit(reference.moe, static_argnames=("alpha", "limit")))
    mesh = sharding.make_mesh(data=1, model=4, devices=jax.devices()[:4])
    m = with_impl(shard_model(model, mesh), "reference")
    assert flat_params(m)["stacks.1.layers.ffn.gate_edf"].sharding.spec == P(None, ("data", "model"), None, None)
    e = m.config.num_local_experts // 4
    _, stacked = _expert_shapes(m.config, _moe_stack_layers(m.config), e)

    def is_moe(eqn):
        return eqn.primitive.name in ("jit", "pjit") and eqn.params.get("name") == "moe"

    jaxpr = _decode_step_jaxpr(m)
    _assert_experts_read_in_place(jaxpr, m.config, e, is_moe, [3])
    (op,) = [eqn for eqn in _eqns(jaxpr) if is_moe(eqn)]
    assert [tuple(v.aval.shape) for v in op.invars if tuple(v.aval.shape) not in stacked][-1] == (), \
        "the layer index is the MoE op's last operand"


def test_the_gpu_kernel_gets_the_stack_and_the_layer_in_the_model(model, monkeypatch):
    """gpu.moe (interpreted on CPU) is called with the stacked experts and a layer index by the running model, and
    gives the reference's greedy tokens."""
    from pallas_kernels.gpu import moe as gpu_moe
    from tests.kernels.model_cases import greedy_cached

    calls = []
    inner = gpu_moe.moe

    def spy(x, ids, combine, gate, up, down, *scales, layer=None, **kw):
        calls.append((gate.shape, layer is None))
        return inner(x, ids, combine, gate, up, down, *scales, layer=layer, **kw)

    monkeypatch.setattr(gpu_moe, "moe", spy)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], [2, 7, 1, 8]]
    got = greedy_cached(model, GPU, prompts, 2)
    cfg = model.config
    stacked = (_moe_stack_layers(cfg), cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size)
    assert calls and set(calls) == {(stacked, False)}, set(calls)
    np.testing.assert_array_equal(got, greedy_cached(model, "reference", prompts, 2))


def _per_layer_model_forward(model, ids, layer_fn):
    """Logits by a Python loop over lone layers, each merged from its slice of EVERY stacked parameter (experts
    included, layer index None): the layout before experts were read in place."""
    b, s = ids.shape
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    cos, sin = model.rope(positions)
    h = model.embed(ids)
    for stack in model.stacks:
        graphdef, state = nnx.split(stack.layers)
        for l in range(stack.num_layers):
            h = layer_fn(nnx.merge(graphdef, jax.tree.map(lambda x: x[l], state)), h, positions, cos, sin)
    return model.logits(h)


def test_logits_equal_a_per_layer_loop(model):
    """The no-cache forward (experts read in place) against lone layers with sliced experts (layer=None), both on
    the reference kernels (the kernels against the reference: tests/kernels); float32, summation order only."""
    model = with_impl(model, "reference")
    ids = jnp.asarray(np.random.default_rng(2).integers(0, model.config.vocab_size, (2, 29)), jnp.int32)
    want = jax.jit(lambda i: _per_layer_model_forward(model, i, lambda layer, h, p, c, s: layer(h, p, c, s)))(ids)
    got = jax.jit(lambda i: model(i))(ids)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got).argmax(-1), np.asarray(want).argmax(-1))


def test_training_gradients_reach_the_stacked_experts(model):
    """jax.grad through the training forward (scan, remat, experts closed over and read at the layer index) equals
    the gradient through a per-layer loop over sliced weights, for every parameter (the reference kernels, as
    training runs them)."""
    model = with_impl(model, "reference")
    ids = jnp.asarray(np.random.default_rng(3).integers(0, model.config.vocab_size, (2, 24)), jnp.int32)
    graphdef, state = nnx.split(model)
    probe = jax.random.normal(jax.random.key(0), (2, 24, model.config.vocab_size), jnp.float32)

    def scanned(st):
        return jnp.sum(losses.forward(nnx.merge(graphdef, st), ids, sparse=True, remat=True).logits * probe)

    def looped(st):
        def layer_fn(layer, h, positions, cos, sin):
            return losses.layer_forward(layer, h, positions, cos, sin, sparse=True)[0]
        return jnp.sum(_per_layer_model_forward(nnx.merge(graphdef, st), ids, layer_fn) * probe)

    got, want = jax.jit(jax.grad(scanned))(state), jax.jit(jax.grad(looped))(state)
    flat_got = dict(jax.tree_util.tree_flatten_with_path(got)[0])
    flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
    experts = [p for p in flat_got if "gate_edf" in jax.tree_util.keystr(p)]
    assert experts and all(float(jnp.abs(flat_got[p]).max()) > 0 for p in experts)
    for p, g in flat_got.items():       # float32 summation order (scan + remat vs unrolled): ~1e-6 of the leaf's max
        want_p = np.asarray(flat_want[p])
        err, scale = float(np.abs(np.asarray(g) - want_p).max()), float(np.abs(want_p).max())
        assert err <= 1e-5 * scale, f"{jax.tree_util.keystr(p)}: max error {err:.3g}, max |grad| {scale:.3g}"
