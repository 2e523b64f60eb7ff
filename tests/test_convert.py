"""The converter: release checkpoints (BF16, FP32, MXFP8; single file and sharded) -> params / Orbax -> params.

Exactness: a BF16 or FP32 checkpoint loads to exactly the released values; an MXFP8 checkpoint loads to exactly
its dequantised values (checked against a model loaded from a float32 checkpoint of those values, written
with a float64 NumPy dequantisation); convert -> restore is bit-exact. BF16 vs its MXFP8 quantisation is
checked on the weights (E4M3 rounding bound) and on the logits of a non-chaotic variant of the tiny model
(every expert and every block selected, so no discrete choice can flip).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import NamedTuple

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import m3jax.api
from m3jax import cli
from convert import loader, mxfp8, orbax_io, placement, weight_map
from convert.safetensors_io import CheckpointError, checkpoint_tensors, read_tensor, write_file, write_sharded
from convert.source import ReleaseCheckpoint
from m3jax.config import M3Config
from m3jax.params import flat_params
from m3jax.testing import make_tiny_checkpoint, random_model

_FWD = nnx.jit(lambda m, ids: m(ids))
IDS = (jnp.arange(48, dtype=jnp.int32)[None] * 37 + 5) % 384          # 6 blocks of 8: MSA really sparse
ROUTER = ("router_de", "router_bias_e")


def _logits(model) -> np.ndarray:
    return np.asarray(_FWD(model, IDS))


def _params(path, dtype="float32", **kw) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in flat_params(m3jax.api.load(path, dtype, progress=False, **kw)).items()}


def _assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k].view(np.uint8), b[k].view(np.uint8), err_msg=k)


# MXFP8 ---------------------------------------------------------------------------------------------------------

def _dequant_f64(w_e4m3: np.ndarray, s_u8: np.ndarray) -> np.ndarray:
    """Reference: float64 math, E8M0 255 = NaN."""
    scale = np.where(s_u8 == 255, np.nan, np.ldexp(1.0, s_u8.astype(np.int64) - 127))
    cols = np.arange(w_e4m3.shape[1]) // 32
    return w_e4m3.astype(np.float64) * scale[:, cols]


def _same_bits_or_both_nan(a: np.ndarray, b: np.ndarray) -> bool:
    nan = np.isnan(a.astype(np.float32)) & np.isnan(b.astype(np.float32))
    ints = {2: np.uint16, 4: np.uint32}[a.dtype.itemsize]
    return bool(np.all((a.view(ints) == b.view(ints)) | nan))


@pytest.mark.parametrize("shape", [(7, 96), (3, 40), (1, 32)])
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16])
def test_mxfp8_dequant_bit_exact_on_random_bytes(shape, dtype):
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    w = rng.integers(0, 256, shape, dtype=np.uint8).view(mxfp8.E4M3)      # includes 0x7F / 0xFF (NaN)
    s = rng.integers(0, 256, mxfp8.scale_shape(shape), dtype=np.uint8)
    s[0, 0], s[-1, -1] = 0, 254                                              # extreme exponents
    if s.shape[0] > 1:
        s[1, 0] = 255                                                        # E8M0 NaN
    got = mxfp8.dequantize(w, s, dtype)
    with np.errstate(over="ignore"):
        want = _dequant_f64(w, s).astype(dtype)
    assert got.dtype == np.dtype(dtype)
    assert _same_bits_or_both_nan(got, want)
    if s.shape[0] > 1:
        assert np.isnan(got[1, :32].astype(np.float32)).all()


def test_mxfp8_extreme_exponents_exact_values():
    w = np.array([[1.0, -448.0, 2.0 ** -9] + [0.0] * 29], np.float32).astype(mxfp8.E4M3)
    lo = mxfp8.dequantize(w, np.array([[0]], np.uint8))
    hi = mxfp8.dequantize(w, np.array([[254]], np.uint8))
    assert lo[0, 0] == np.float32(2.0 ** -127) and lo[0, 2] == np.float32(2.0 ** -136)   # float32 subnormals
    assert hi[0, 0] == np.float32(2.0 ** 127) and hi[0, 1] == -np.inf                       # overflow -> inf


def test_mxfp8_scale_shape_checked():
    with pytest.raises(ValueError, match=r"scale must be \[2, 2\] for a \[2, 64\] weight, got \[2, 3\]"):
        mxfp8.dequantize(np.zeros((2, 64), mxfp8.E4M3), np.zeros((2, 3), np.uint8))


# Checkpoints ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    out = {}
    for dtype, quant in (("bfloat16", None), ("float32", None), ("bfloat16", "mxfp8")):
        for shards in (1, 4):
            name = f"{quant or dtype}-{shards}"
            out[name] = make_tiny_checkpoint(str(root / name), seed=0, quant=quant, num_shards=shards, dtype=dtype)
    out["root"] = str(root)
    return out


def test_sharded_checkpoints_split_one_layers_experts_across_files(ckpts):
    for name in ("bfloat16-4", "float32-4", "mxfp8-4"):
        with open(os.path.join(ckpts[name], "model.safetensors.index.json")) as f:
            wm = json.load(f)["weight_map"]
        assert len(set(wm.values())) == 4
        files = {wm[k] for k in wm if ".layers.1.block_sparse_moe.experts." in k}
        assert len(files) >= 2, name


@pytest.fixture(scope="module")
def loaded(ckpts):
    return {name: _params(path) for name, path in ckpts.items() if name != "root"}


def test_single_and_sharded_load_identically(ckpts, loaded):
    for kind in ("bfloat16", "float32", "mxfp8"):
        _assert_same_params(loaded[f"{kind}-1"], loaded[f"{kind}-4"])
    for kind in ("bfloat16", "float32"):           # (mxfp8: see the dequantised-weights test)
        a, b = (_logits(m3jax.api.load(ckpts[f"{kind}-{n}"], "float32", progress=False)) for n in (1, 4))
        np.testing.assert_array_equal(a, b)


def test_release_values_are_loaded_exactly(loaded):
    ref = flat_params(random_model(M3Config.tiny(), 0))
    for kind, dt in (("bfloat16", jnp.bfloat16), ("float32", jnp.float32)):
        for k, v in ref.items():
            want = np.asarray(v if k.endswith(ROUTER) else v.astype(dt).astype(jnp.float32))
            np.testing.assert_array_equal(loaded[f"{kind}-1"][k], want, err_msg=f"{kind}: {k}")


def test_bfloat16_load_keeps_router_float32(ckpts):
    p = _params(ckpts["bfloat16-4"], "bfloat16")
    assert p["stacks.1.layers.ffn.router_de"].dtype == np.float32
    assert p["stacks.1.layers.ffn.gate_edf"].dtype == jnp.bfloat16
    assert p["embed_vd"].dtype == jnp.bfloat16


def _dequantised_fp32_copy(src: str, dst: str) -> str:
    """The MXFP8 checkpoint with every weight replaced by its float64-reference dequantisation (exact in f32)."""
    tensors = checkpoint_tensors(src)
    out = {}
    for name, info in tensors.items():
        if name.endswith(weight_map.SCALE_SUFFIX):
            continue
        a = np.asarray(read_tensor(info))
        if name + weight_map.SCALE_SUFFIX in tensors:
            a = _dequant_f64(a, np.asarray(read_tensor(tensors[name + weight_map.SCALE_SUFFIX])))
        out[name] = a.astype(np.float32)
    os.makedirs(dst)
    write_sharded(dst, out.items(), 1)
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg.pop("quantization_config")
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    return dst


def test_mxfp8_loads_to_exactly_dequantised_weights_and_logits(ckpts, loaded):
    ref = _dequantised_fp32_copy(ckpts["mxfp8-1"], os.path.join(ckpts["root"], "mxfp8-dequantised"))
    want = _params(ref)
    _assert_same_params(loaded["mxfp8-4"], want)
    a = _logits(m3jax.api.load(ckpts["mxfp8-4"], "float32", progress=False))
    b = _logits(m3jax.api.load(ref, "float32", progress=False))
    np.testing.assert_array_equal(a, b)


def test_mxfp8_weights_within_e4m3_rounding_of_the_originals(loaded):
    """|W_mxfp8 - W| <= 2**-4 |W| (3 mantissa bits) + half an E4M3 subnormal step (<= 2**-17.8 max|W|)."""
    ref = {k: np.asarray(v) for k, v in flat_params(random_model(M3Config.tiny(), 0)).items()}
    quantised = [k for k in ref if ref[k].ndim >= 3 and not k.endswith(ROUTER)]
    assert any(k.endswith("gate_edf") for k in quantised) and any(k.endswith("q_dnh") for k in quantised)
    for k in quantised:
        w, q = ref[k], loaded["mxfp8-1"][k]
        bound = 2.0 ** -4 * np.abs(w) + 4.5e-6 * np.abs(w).max()
        assert np.all(np.abs(q - w) <= bound), k
        assert not np.array_equal(q, w), k


def test_bf16_vs_mxfp8_logits_on_a_non_chaotic_model(tmp_path):
    """All 8 experts per token and every block selected (48 tokens <= 8 blocks of 8): no routing or block
    choice can flip, so the logits move smoothly with the weights. Against the float32 original, measured
    (seeds 1, 2): BF16 rms relative error 0.6-0.9 %, MXFP8 8-10 % (E4M3 keeps 3 mantissa bits to BF16's 7:
    ~16x the rounding error). Tolerance: MXFP8 <= 15 % and <= 32x the BF16 error. (The default tiny model is
    chaotic: there even BF16 rounding moves logits by up to 17 % rms through flipped top-k choices.)"""
    over = dict(num_experts_per_tok=8, topk_blocks=8)
    logits = {}
    for quant, dtype in ((None, "float32"), (None, "bfloat16"), ("mxfp8", "bfloat16")):
        path = make_tiny_checkpoint(str(tmp_path / f"{quant}-{dtype}"), seed=1, quant=quant, dtype=dtype, **over)
        logits[quant or dtype] = _logits(m3jax.api.load(path, "float32", progress=False))
    ref = logits["float32"]

    def rms_rel(x):
        return float(np.sqrt(np.mean((x - ref) ** 2) / np.mean(ref ** 2)))

    assert rms_rel(logits["mxfp8"]) < 0.15
    assert rms_rel(logits["mxfp8"]) < 32 * rms_rel(logits["bfloat16"])
    assert rms_rel(logits["bfloat16"]) < 0.02


# Reading boxes (device slices) ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mxfp8-4", "bfloat16-1"])
def test_read_box_equals_slice_of_the_whole_parameter(ckpts, loaded, name):
    cfg = M3Config.from_pretrained(ckpts[name])
    _, _, _, targets = placement.abstract_params(cfg, jnp.float32)
    rng = np.random.default_rng(0)
    with ReleaseCheckpoint(ckpts[name], targets, cfg) as ck:
        for path, (shape, _) in targets.items():
            for _ in range(3):
                box = []
                for n in shape:
                    a = int(rng.integers(0, n))
                    box.append((a, int(rng.integers(a + 1, n + 1))))
                got = ck.read_box(path, tuple(box), np.float32)
                want = loaded[name][path][tuple(slice(a, b) for a, b in box)]
                np.testing.assert_array_equal(got, want, err_msg=f"{path} {box}")
                stored = ck.read_box(path, tuple(box), np.float32, stored=True)       # released axis order
                np.testing.assert_array_equal(stored, want.transpose(ck.leaves[path].stored_perm))


def test_fp8_boxes_are_the_raw_bytes_of_the_dequantised_boxes(ckpts):
    """The hook for keeping experts in FP8: raw E4M3 + E8M0 boxes dequantise to exactly what read_box gives."""
    cfg = M3Config.from_pretrained(ckpts["mxfp8-4"])
    _, _, _, targets = placement.abstract_params(cfg, jnp.float32)
    with ReleaseCheckpoint(ckpts["mxfp8-4"], targets, cfg) as ck:
        for path, box in (("stacks.1.layers.ffn.gate_edf", ((0, 2), (3, 7), (32, 64), (0, 32))),
                          ("stacks.1.layers.ffn.down_efd", ((1, 2), (0, 8), (0, 32), (10, 20))),
                          ("stacks.0.layers.attn.o_nhd", ((0, 1), (2, 4), (0, 16), (0, 64)))):
            w, s = ck.read_box_fp8(path, box)
            want = ck.read_box(path, box, np.float32, stored=True)
            got = np.stack([mxfp8.dequantize(wi, si) for wi, si in zip(w.reshape(-1, *w.shape[-2:]),
                                                                      s.reshape(-1, *s.shape[-2:]))])
            np.testing.assert_array_equal(got.reshape(want.shape), want, err_msg=path)
        with pytest.raises(ValueError, match="whole 32-input blocks"):
            ck.read_box_fp8("stacks.1.layers.ffn.gate_edf", ((0, 1), (0, 1), (16, 48), (0, 32)))
        with pytest.raises(ValueError, match="not an MXFP8 matrix"):
            ck.read_box_fp8("embed_vd", ((0, 1), (0, 64)))


def test_pieces_placed_layer_by_layer_equal_whole_load(ckpts, loaded):
    cfg = M3Config.from_pretrained(ckpts["mxfp8-4"])
    _, _, paths, targets = placement.abstract_params(cfg, jnp.float32)
    sh = placement.resolve_shardings({p: s for p, (s, _) in targets.items()}, None)
    with ReleaseCheckpoint(ckpts["mxfp8-4"], targets, cfg) as ck:
        pieces = list(loader.release_pieces(ck, sh, piece_bytes=4096))
    assert len(pieces) > len(targets)                                  # stacked params really split
    got = loader.load_release(ckpts["mxfp8-4"], cfg, targets, sh, progress=False, piece_bytes=4096)
    _assert_same_params({k: np.asarray(v) for k, v in got.items()}, loaded["mxfp8-4"])


# Orbax ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,dtype", [("mxfp8-4", "float32"), ("bfloat16-4", "bfloat16")])
def test_convert_restore_round_trip_is_exact(ckpts, name, dtype, tmp_path):
    dst = str(tmp_path / "conv")
    orbax_io.convert(ckpts[name], dst, dtype, progress=False, piece_bytes=2048, group_bytes=8192)
    meta = orbax_io.read_meta(dst)
    assert len(meta["groups"]) > 3 and meta["dtype"] == dtype
    assert any(len(v["pieces"]) > 1 for v in meta["params"].values())
    assert sorted(os.listdir(dst)) == ["config.json", "m3jax_checkpoint.json", "params", "tokenizer.json"]
    assert "quantization_config" not in json.load(open(os.path.join(dst, "config.json")))
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]          # no temporary left behind
    _assert_same_params(_params(dst, dtype), _params(ckpts[name], dtype))
    a = _logits(m3jax.api.load(dst, "float32", progress=False))
    b = _logits(m3jax.api.load(ckpts[name], "float32", progress=False))
    np.testing.assert_array_equal(a, b)


def test_cli_convert_refuses_existing_dst_and_overwrites(ckpts, tmp_path, capsys):
    dst = str(tmp_path / "out")
    assert cli.main(["convert", ckpts["bfloat16-1"], dst, "--no-progress"]) == 0
    assert capsys.readouterr().out.count("\n") == 1
    assert cli.main(["convert", ckpts["bfloat16-1"], dst, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err and "--overwrite" in err and "Traceback" not in err
    assert cli.main(["convert", ckpts["float32-1"], dst, "--no-progress", "--dtype", "float32", "--overwrite"]) == 0
    assert orbax_io.read_meta(dst)["dtype"] == "float32"
    assert [f for f in os.listdir(tmp_path)] == ["out"]


# Errors --------------------------------------------------------------------------------------------------------

def _edited(src: str, dst: str, edit=None, config=None) -> str:
    """A single-file copy of `src` with edit(tensors dict) and config(dict) applied."""
    tensors = {n: np.array(read_tensor(i)) for n, i in checkpoint_tensors(src).items()}
    if edit:
        edit(tensors)
    os.makedirs(dst)
    write_file(os.path.join(dst, "model.safetensors"), tensors)
    cfg = json.load(open(os.path.join(src, "config.json")))
    if config:
        config(cfg)
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    return dst


Q = "language_model.model.layers.1.self_attn.q_proj.weight"


def _error(path) -> str:
    with pytest.raises(CheckpointError) as e:
        m3jax.api.load(path, "float32", progress=False)
    return str(e.value)


def test_error_missing_tensor(ckpts, tmp_path):
    msg = _error(_edited(ckpts["bfloat16-1"], str(tmp_path / "x"), lambda t: t.pop(Q)))
    assert f"missing tensor {Q}" in msg and "expected by config.json" in msg


def test_error_unexpected_tensor(ckpts, tmp_path):
    bogus = "language_model.model.layers.1.self_attn.bogus_proj.weight"
    msg = _error(_edited(ckpts["bfloat16-1"], str(tmp_path / "x"),
                         lambda t: t.__setitem__(bogus, np.zeros((4, 4), np.float32))))
    assert f"unexpected tensor {bogus} in model.safetensors" in msg


def test_error_shape_mismatch(ckpts, tmp_path):
    msg = _error(_edited(ckpts["bfloat16-1"], str(tmp_path / "x"), lambda t: t.__setitem__(Q, t[Q][:, :32])))
    assert f"tensor {Q} in model.safetensors has shape [64, 32], expected [64, 64]" in msg


def test_error_dtype_mismatch(ckpts, tmp_path):
    msg = _error(_edited(ckpts["bfloat16-1"], str(tmp_path / "x"),
                         lambda t: t.__setitem__(Q, t[Q].astype(np.int32))))
    assert f"tensor {Q} in model.safetensors has dtype I32, expected one of ['BF16', 'F16', 'F32']" in msg


def test_error_fp8_weight_without_scale(ckpts, tmp_path):
    msg = _error(_edited(ckpts["mxfp8-1"], str(tmp_path / "x"), lambda t: t.pop(Q + "_scale_inv")))
    assert f"tensor {Q} in model.safetensors has dtype F8_E4M3 without a {Q}_scale_inv tensor" in msg


def test_error_scale_shape(ckpts, tmp_path):
    s = Q + "_scale_inv"
    msg = _error(_edited(ckpts["mxfp8-1"], str(tmp_path / "x"), lambda t: t.__setitem__(s, t[s][:, :1])))
    assert f"tensor {s} in model.safetensors has shape [64, 1], expected [64, 2]" in msg


def test_error_truncated_shard(ckpts, tmp_path):
    dst = str(tmp_path / "x")
    shutil.copytree(ckpts["bfloat16-4"], dst)
    f = os.path.join(dst, "model-00003-of-00004.safetensors")
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.truncate(size - 100)
    msg = _error(dst)
    assert "model-00003-of-00004.safetensors: truncated: tensor" in msg and f"file has {size - 100}" in msg


def test_error_corrupt_header(ckpts, tmp_path):
    dst = str(tmp_path / "x")
    shutil.copytree(ckpts["bfloat16-4"], dst)
    with open(os.path.join(dst, "model-00002-of-00004.safetensors"), "r+b") as fh:
        fh.seek(8)
        fh.write(b"#garbage#")
    assert "model-00002-of-00004.safetensors: corrupt safetensors header" in _error(dst)


def test_error_index_points_at_missing_file(ckpts, tmp_path):
    dst = str(tmp_path / "x")
    shutil.copytree(ckpts["bfloat16-4"], dst)
    os.unlink(os.path.join(dst, "model-00004-of-00004.safetensors"))
    msg = _error(dst)
    assert "model.safetensors.index.json maps tensor" in msg and "model-00004-of-00004.safetensors, which does not exist" in msg


def test_error_config_disagrees_on_expert_count(ckpts, tmp_path):
    def fewer(cfg):
        cfg["text_config"]["num_local_experts"] = 4
    msg = _error(_edited(ckpts["bfloat16-1"], str(tmp_path / "x"), config=fewer))
    assert "config/checkpoint disagreement: config.json has num_local_experts=4, the checkpoint has 8 experts" in msg


def test_error_config_disagrees_on_layer_count(ckpts, tmp_path):
    def more(cfg):
        t = cfg["text_config"]
        t["num_hidden_layers"] = 4
        for k in ("sparse_attention_freq", "sparse_disable_index_value"):
            t["sparse_attention_config"][k].append(1)
        t["moe_layer_freq"].append(1)
    msg = _error(_edited(ckpts["bfloat16-1"], str(tmp_path / "x"), config=more))
    assert "config.json has num_hidden_layers=4, the checkpoint has layers 0..2" in msg


def test_error_unknown_quant_method(ckpts, tmp_path):
    def q(cfg):
        cfg["quantization_config"]["quant_method"] = "fp8"
    msg = _error(_edited(ckpts["mxfp8-1"], str(tmp_path / "x"), config=q))
    assert "quantization_config.quant_method 'fp8' is not supported; expected one of ['mxfp8']" in msg


def test_error_incomplete_converted_checkpoint(ckpts, tmp_path):
    dst = str(tmp_path / "conv")
    orbax_io.convert(ckpts["bfloat16-1"], dst, progress=False, piece_bytes=2048, group_bytes=8192)
    shutil.rmtree(os.path.join(dst, "params", "g00001"))
    assert f"converted checkpoint {dst} is incomplete: params/g00001 does not exist" in _error(dst)


def test_errors_are_collected(ckpts, tmp_path):
    def two(t):
        t.pop(Q)
        t["language_model.model.layers.2.self_attn.k_proj.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(CheckpointError) as e:
        m3jax.api.load(_edited(ckpts["bfloat16-1"], str(tmp_path / "x"), two), progress=False)
    assert "(and 1 more problems)" in str(e.value) and len(e.value.problems) == 2


def test_cli_prints_one_line_for_bad_checkpoints(ckpts, tmp_path, capsys):
    bad = _edited(ckpts["bfloat16-1"], str(tmp_path / "x"), lambda t: t.pop(Q))
    assert cli.main(["convert", bad, str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("m3jax convert: error: missing tensor") and err.count("\n") == 1
    assert cli.main(["convert", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


# The full release, without its 854 GB ---------------------------------------------------------------------------

class _Spec(NamedTuple):          # release_pieces only reads `.spec` (no 8-device mesh in this process)
    spec: object


@pytest.mark.parametrize("quant,count", [(None, 23_416 - 523), ("mxfp8", 45_838 - 523)])
def test_full_size_release_validates_and_plans_bounded_pieces(tmp_path, quant, count):
    """Headers of the real 60-layer / 128-expert checkpoint over sparse files: the weight map takes exactly the
    released text tensors (the tensor counts of the releases' model.safetensors.index.json minus the 515 vision
    and 8 projector tensors), and the piece plans bound host memory: converter pieces <= 128 MiB, direct-load
    pieces <= 256 MiB (experts spread over 8 devices, never cut)."""
    from convert.synthetic import write_release
    from jax.sharding import PartitionSpec as P

    cfg = M3Config()
    src = str(tmp_path / "m3")
    total = write_release(src, cfg, quant, shard_bytes=15 << 30, sparse=True)
    assert total > (4e11 if quant else 8.5e11)
    _, _, _, targets = placement.abstract_params(cfg, jnp.bfloat16)
    with ReleaseCheckpoint(src, targets) as ck:
        assert len(ck.tensors) == count
        assert ck.leaves["stacks.1.layers.ffn.gate_edf"].shape == (57, 128, 6144, 3072)
        conv = list(orbax_io.convert_pieces(ck, orbax_io.PIECE_BYTES))
        assert max(placement.box_size(b) * 2 for _, b in conv) <= orbax_io.PIECE_BYTES
        assert all(b[1] == (0, 128) for p, b in conv if p.endswith("gate_edf"))          # experts never cut
        assert sum(placement.box_size(b) for _, b in conv) == sum(np.prod(s) for s, _ in targets.values())
        ep = {p: _Spec(P(None, "model") if p.endswith(placement.EXPERT_SUFFIXES) else P()) for p in targets}
        direct = list(loader.release_pieces(ck, ep))
        assert max(placement.box_size(b) * 2 for _, b in direct) <= loader.PIECE_BYTES
        assert all(b[1] == (0, 128) for p, b in direct if p.endswith("gate_edf"))
        box = ((56, 57), (127, 128), (6000, 6144), (3000, 3072))               # far into a 15 GB sparse shard
        np.testing.assert_array_equal(ck.read_box("stacks.1.layers.ffn.gate_edf", box), 0)
