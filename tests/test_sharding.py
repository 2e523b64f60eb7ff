"""Sharded inference on forced host devices (tests/conftest.py makes 8): same logits as one device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import m3jax
from m3jax import sharding
from m3jax.params import flat_params, shard_model
from m3jax.testing import random_model

pytestmark = pytest.mark.multi_device           # meshes of up to 8 devices (tests/conftest.py)

MESHES = [(1, 8), (2, 4), (4, 2), (8, 1)]
CFG = dict(num_attention_heads=8, num_key_value_heads=2, num_index_heads=2, num_local_experts=8)


# Trailing-axis placement of every parameter of the tiny model (layer axes stay whole); norms have ().
EXPERT = ("data", "model")
EXPECTED_SPECS = {
    "embed_vd": ("model", None), "lm_head_dv": (None, "model"),
    "q_dnh": (None, "model", None), "k_dkh": (None, "model", None), "v_dkh": (None, "model", None),
    "index_q_dki": (None, "model", None), "o_nhd": ("model", None, None), "index_k_di": (),
    "gate_df": (None, "model"), "up_df": (None, "model"), "down_fd": ("model", None),
    "gate_edf": (EXPERT, None, None), "up_edf": (EXPERT, None, None), "down_efd": (EXPERT, None, None),
    "router_de": (), "router_bias_e": (),
    "final_norm": (), "input_norm": (), "post_attention_norm": (), "q_norm": (), "k_norm": (),
    "index_q_norm": (), "index_k_norm": (),
}


@pytest.fixture(scope="module")
def single():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (forced host) devices")
    model = random_model(m3jax.M3Config.tiny(**CFG), seed=5)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 90)), jnp.int32)
    return model, ids, np.asarray(model(ids))


@pytest.mark.parametrize("data,model_axis", MESHES)
def test_sharded_logits_match_single_device(single, data, model_axis):
    model, ids, want = single
    mesh = sharding.make_mesh(data=data, model=model_axis)
    sharded = shard_model(model, mesh)
    got = np.asarray(jax.jit(lambda x: sharded(x))(ids))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


@pytest.mark.parametrize("data,model_axis", [(4, 2), (8, 1)])
def test_batch_split_over_data_matches_single_device(single, data, model_axis):
    """A batch that divides "data": each data shard pages, selects and attends over its own rows only."""
    model, _, _ = single
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 256, (8, 40)), jnp.int32)
    want = model.trace(ids)
    mesh = sharding.make_mesh(data=data, model=model_axis)
    sharded = shard_model(model, mesh)
    got = jax.jit(lambda x: sharded.trace(x))(ids)
    np.testing.assert_allclose(np.asarray(got.logits), np.asarray(want.logits), atol=2e-5, rtol=0)
    assert got.logits.sharding.spec[0] == "data"
    for layer, sel in want.block_ids.items():
        np.testing.assert_array_equal(np.sort(np.asarray(got.block_ids[layer]), -1), np.sort(np.asarray(sel), -1))


@pytest.mark.parametrize("data,model_axis", MESHES)
def test_parameter_specs_and_bytes(single, data, model_axis):
    model, _, _ = single
    mesh = sharding.make_mesh(data=data, model=model_axis)
    sharded = shard_model(model, mesh)
    params = flat_params(sharded)
    replicas = max(1, model_axis // 2)
    q = params["stacks.1.layers.attn.q_dnh"]
    assert q.sharding.spec == P(None, None, "model", None)
    k = params["stacks.1.layers.attn.k_dkh"]
    assert k.shape[-2] == 2 * replicas                           # KV heads replicated when model > 2
    assert params["stacks.1.layers.ffn.gate_edf"].sharding.spec == P(None, ("data", "model"), None, None)
    assert params["stacks.1.layers.attn.index_k_di"].sharding.spec == P()
    assert params["embed_vd"].sharding.spec == P("model", None)
    experts = params["stacks.1.layers.ffn.gate_edf"]
    per_device = {s.device: s.data.nbytes for s in experts.addressable_shards}
    assert len(per_device) == 8 and set(per_device.values()) == {experts.nbytes // 8}
    # Every parameter, against a table written out here (not the rule table under test): its placement and the
    # bytes each device holds.
    for path, arr in params.items():
        name = path.rsplit(".", 2)[-2] if path.endswith(".weight") else path.rsplit(".", 1)[-1]
        assert name in EXPECTED_SPECS, f"{path}: no expected sharding written for it"
        tail = EXPECTED_SPECS[name]
        spec = P(*((None,) * (arr.ndim - len(tail)) + tail))
        assert arr.sharding.is_equivalent_to(NamedSharding(mesh, spec), arr.ndim), f"{path}: {arr.sharding.spec}"
        split = 1
        for axis in tail:
            for a in (axis if isinstance(axis, tuple) else (axis,) if axis else ()):
                split *= mesh.shape[a]
        assert {s.data.nbytes for s in arr.addressable_shards} == {arr.nbytes // split}, path


def test_kv_replication_copies_heads(single):
    model, _, _ = single
    sharded = shard_model(model, sharding.make_mesh(data=1, model=8))
    k = np.asarray(flat_params(sharded)["stacks.0.layers.attn.k_dkh"])        # [L, D, 8, H]
    k0 = np.asarray(flat_params(model)["stacks.0.layers.attn.k_dkh"])         # [L, D, 2, H]
    np.testing.assert_array_equal(k, np.repeat(k0, 4, axis=-2))
    assert sharded.config.num_key_value_heads == 8 and sharded.config.msa.num_index_heads == 8


def test_bad_meshes():
    cfg = m3jax.M3Config.tiny(**CFG)
    with pytest.raises(ValueError, match="needs 6 devices"):
        sharding.make_mesh(data=2, model=3)
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        sharding.kv_replication(cfg, sharding.make_mesh(data=2, model=3, devices=jax.devices()[:6]))
    with pytest.raises(ValueError, match="axes must be"):
        sharding.check_mesh(jax.make_mesh((8,), ("x",)))


@pytest.mark.slow
def test_engine_greedy_tokens_match_single_device(single):
    model, _, _ = single
    prompts = [list(np.random.default_rng(i).integers(0, 256, n)) for i, n in enumerate([37, 70, 5])]
    sp = m3jax.SamplingParams(max_new_tokens=6, temperature=0.0)
    want = [r.token_ids for r in m3jax.generate(m3jax.Engine(model, max_batch_size=4, max_seq_len=128), prompts, sp,
                                                progress=False)]
    for data, model_axis in MESHES:
        mesh = sharding.make_mesh(data=data, model=model_axis)
        engine = m3jax.Engine(shard_model(model, mesh), max_batch_size=4, max_seq_len=128, mesh=mesh)
        got = [r.token_ids for r in m3jax.generate(engine, prompts, sp, progress=False)]
        assert got == want, f"mesh {data}x{model_axis}"
        # One page pool per data shard (split on the page axis), KV heads (replicated to 8 on 1x8) on "model".
        for stack, num_layers in zip(engine.cache.stacks, (1, 2)):
            heads = max(2, model_axis)
            assert stack.k_pages.shape == (heads, data * num_layers * engine.num_pages, 8, 16)
            assert stack.k_pages.sharding.is_equivalent_to(NamedSharding(mesh, P("model", "data")), 4)
            shard = stack.k_pages.addressable_shards[0].data
            assert shard.shape == (heads // model_axis, num_layers * engine.num_pages, 8, 16)
        assert engine.cache.stacks[1].ik_pages.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 3)


@pytest.mark.slow
def test_data_shards_own_their_requests_and_pages(single):
    """On a 4x2 mesh the requests spread over the data shards; each shard's allocator holds only its requests'
    pages, and a shard's rows of a step carry page ids of its own pool."""
    model, _, _ = single
    mesh = sharding.make_mesh(data=4, model=2)
    engine = m3jax.Engine(shard_model(model, mesh), max_batch_size=8, max_seq_len=64, mesh=mesh,
                          num_pages=12)
    assert engine.rows_per_shard == 2 and engine.cache.num_shards == 4
    sp = m3jax.SamplingParams(max_new_tokens=3, temperature=0.0)
    ids = [engine.add_request(list(range(1, 20 + i)), sp) for i in range(6)]
    engine.step()
    owners = [set(a.owners()) for a in engine.allocators]
    assert [len(o) for o in owners] == [2, 2, 1, 1]                   # fewest running first, 2 rows a shard
    assert set().union(*owners) == set(ids)
    for a in engine.allocators:
        a.check()
    with pytest.raises(ValueError, match="allocators"):
        engine.allocator
    with pytest.raises(ValueError, match="mesh the model was placed on"):
        m3jax.Engine(model, max_batch_size=8, max_seq_len=64, mesh=mesh)
    results = engine.run()
    assert sorted(results) == ids and all(a.num_free == a.capacity for a in engine.allocators)


@pytest.mark.parametrize("data,model_axis", [(1, 8), (2, 4)])
def test_load_onto_mesh_uses_the_rules(single, tmp_path, data, model_axis):
    """m3jax.load(path, mesh=...) places by the rules, replicates KV heads, and gives the same logits."""
    model, ids, want = single
    from m3jax.testing import make_tiny_checkpoint
    path = make_tiny_checkpoint(tmp_path / "ck", seed=5, dtype="float32", **CFG)
    mesh = sharding.make_mesh(data=data, model=model_axis)
    loaded = m3jax.load(path, dtype="float32", mesh=mesh, progress=False)
    params = flat_params(loaded)
    assert params["stacks.1.layers.attn.k_dkh"].shape[-2] == max(2, model_axis)
    assert params["stacks.1.layers.attn.q_dnh"].sharding.spec == P(None, None, "model", None)
    assert params["stacks.1.layers.ffn.gate_edf"].sharding.spec == P(None, ("data", "model"), None, None)
    np.testing.assert_allclose(np.asarray(jax.jit(lambda x: loaded(x))(ids)), want, atol=2e-5, rtol=0)


@pytest.mark.parametrize("data,model_axis", [(2, 4), (8, 1)])
def test_cache_layout_is_what_init_cache_allocates(single, data, model_axis):
    """The layout the memory plan sizes caches with (cache_layout) is the one init_cache places on a mesh."""
    from m3jax import cache as cache_lib
    model, _, _ = single
    mesh = sharding.make_mesh(data=data, model=model_axis)
    sharded = shard_model(model, mesh)
    cache = cache_lib.init_cache(sharded, 5, mesh=mesh)
    layout = cache_lib.cache_layout(sharded.config, 5, data=data, model=model_axis)
    for got, want in zip(cache.stacks, layout):
        for arr, pool in ((got.k_pages, want.k_pages), (got.v_pages, want.v_pages), (got.ik_pages, want.ik_pages)):
            if pool is None:
                assert arr is None
                continue
            assert arr.shape == pool.shape
            assert {s.data.shape for s in arr.addressable_shards} == {pool.device_shape(dict(mesh.shape))}


@pytest.mark.slow
def test_m3_head_counts_on_eight_devices():
    """M3's 4 KV heads (16 query heads here) on model=8: each KV and index-q head stored twice, same logits."""
    cfg = m3jax.M3Config.tiny(num_attention_heads=16, num_key_value_heads=4, num_index_heads=4, num_local_experts=8)
    model = random_model(cfg, seed=2)
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 256, (1, 50)), jnp.int32)
    mesh = sharding.make_mesh(data=1, model=8)
    sharded = shard_model(model, mesh)
    assert sharded.config.num_key_value_heads == 8
    for name in ("stacks.1.layers.attn.k_dkh", "stacks.1.layers.attn.v_dkh", "stacks.1.layers.attn.index_q_dki"):
        np.testing.assert_array_equal(np.asarray(flat_params(sharded)[name]),
                                      np.repeat(np.asarray(flat_params(model)[name]), 2, axis=-2))
    np.testing.assert_allclose(np.asarray(jax.jit(lambda x: sharded(x))(ids)), np.asarray(model(ids)), atol=2e-5,
                               rtol=0)
    cache = m3jax.cache.init_cache(sharded, 3, mesh=mesh)
    assert {s.data.shape[0] for s in cache.stacks[1].k_pages.addressable_shards} == {1}    # one KV head a device
