"""Sharded placement on 8 forced host devices (meshes 1x8 and 2x4), in a subprocess so the XLA flag is set
before jax starts: a converted checkpoint restores onto either mesh with the same parameters and logits as on
one device, and a release checkpoint (MXFP8) placed directly with per-device slice reads (heads, hidden and
vocab shardings that cut MXFP8 blocks; whole and in small pieces) gives the same parameters and logits too."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from convert import orbax_io
from m3jax.testing import make_tiny_checkpoint

pytestmark = pytest.mark.multi_device           # meshes of 8 devices (tests/conftest.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import m3jax.api
    from m3jax.params import flat_params

    assert jax.device_count() == 8, jax.devices()
    conv, release = sys.argv[1], sys.argv[2]
    fwd = nnx.jit(lambda m, ids: m(ids))
    ids = (jnp.arange(48, dtype=jnp.int32)[None] * 37 + 5) % 384

    def run(path, **kw):
        m = m3jax.api.load(path, "float32", progress=False, **kw)
        return m, {k: v for k, v in flat_params(m).items()}, np.asarray(fwd(m, ids))

    def same(a, b, what):
        for k in a:
            x, y = np.asarray(a[k]), np.asarray(b[k])
            if x.shape != y.shape:          # KV heads replicated for a mesh with more model devices than heads
                y = np.repeat(y, x.shape[-2] // y.shape[-2], axis=-2)
            np.testing.assert_array_equal(x, y, err_msg=f"{what}: {k}")

    def close(a, b, what):   # cross-device reductions may reorder float32 sums
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5, err_msg=what)

    _, ref_p, ref_l = run(conv)
    for shape in ((1, 8), (2, 4)):
        mesh = Mesh(np.array(jax.devices()).reshape(shape), ("data", "model"))
        _, p, l = run(conv, mesh=mesh)
        got = p["stacks.1.layers.ffn.gate_edf"].sharding         # m3jax.sharding rules: experts on every device
        assert got.spec == P(None, ("data", "model"), None, None) and got.mesh.shape == mesh.shape, (shape, got)
        assert p["stacks.1.layers.ffn.gate_edf"].addressable_shards[0].data.shape[1] == 1
        assert p["embed_vd"].sharding.spec == P("model", None)
        assert p["stacks.1.layers.attn.k_dkh"].shape[-2] == max(4, shape[1])
        same(p, ref_p, f"restore {shape}")
        close(l, ref_l, f"restore {shape}")
        print("restore", shape, "max |dlogits|", float(np.abs(l - ref_l).max()))

    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    specs = {"q_dnh": P(None, None, "model", None), "o_nhd": P(None, "model", None, None),
             "k_dkh": P(None, "model", "data", None), "index_q_dki": P(None, "model", None, None),
             "router_de": P(None, None, "model"), "down_efd": P(None, None, "model", "data"),
             "embed_vd": P("model", None), "lm_head_dv": P("data", "model")}

    def shardings(path, shape):
        leaf = path.rsplit(".", 1)[-1]
        return NamedSharding(mesh, specs[leaf]) if leaf in specs else None

    _, rel_ref_p, rel_ref_l = run(release)
    _, p, l = run(release, mesh=mesh, shardings=shardings)
    assert p["stacks.0.layers.attn.o_nhd"].sharding.spec == specs["o_nhd"]
    assert p["stacks.1.layers.attn.q_dnh"].addressable_shards[0].data.shape == (2, 64, 2, 16)
    same(p, rel_ref_p, "release on 2x4 with custom shardings")
    close(l, rel_ref_l, "release on 2x4 with custom shardings")
    print("release 2x4 max |dlogits|", float(np.abs(l - rel_ref_l).max()))

    import convert.loader
    convert.loader.PIECE_BYTES = 2048       # small pieces: layers and rows cut, some along sharded axes
    _, p, _ = run(release, mesh=mesh, shardings=shardings)
    same(p, rel_ref_p, "release on 2x4 in small pieces")
    print("OK")
""")


def test_restore_and_load_on_forced_host_meshes(tmp_path):
    heads = dict(num_attention_heads=8, num_key_value_heads=4, num_index_heads=4)    # 8 q heads split over 8
    release = make_tiny_checkpoint(str(tmp_path / "mx"), seed=3, quant="mxfp8", num_shards=3, **heads)
    bf = make_tiny_checkpoint(str(tmp_path / "bf"), seed=4, num_shards=3, **heads)
    conv = str(tmp_path / "conv")
    orbax_io.convert(bf, conv, "float32", progress=False, piece_bytes=2048, group_bytes=16384)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", CHILD, conv, release], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout[-3000:] + r.stderr[-3000:]
