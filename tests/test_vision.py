"""m3jax.vision against transformers==5.23.0 (torch CPU, float32): processors, tower + projector, weight
loading, feature scatter, and the logits of a tiny VL model with images and a video.

Processor parity needs torchvision (transformers' image and video processors are torchvision-only); see
tests/vision_helpers.py for why importing it needs the nms/qnms schemas defined first (tests/conftest.py).
"""

from __future__ import annotations

import glob
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from m3jax.config import ConfigError  # noqa: E402
from m3jax.vision import merge, processor, weights  # noqa: E402
from m3jax.vision.config import VisionConfig  # noqa: E402
from m3jax.vision.model import VisionGrid, VisionModel, default_attn_impl  # noqa: E402
from m3jax.vision.processor import ImageProcessor, VideoProcessor, VideoTiming  # noqa: E402
from tests import vision_helpers as vh  # noqa: E402

RELEASE_CONFIG = os.path.join(os.path.dirname(__file__), "data", "MiniMax-M3.config.json")  # the release's
IMAGE_SETS = {
    "one": [(61, 83)],
    "two": [(100, 57), (480, 641)],
    "three": [(29, 300), (13, 17), (333, 257)],
}
IMAGE_TOKEN, VIDEO_TOKEN = 290, 291
FEATURE_TOL = 1e-4
LOGIT_TOL = 1e-3


def _hf_processors():
    vh.define_torchvision_op_schemas()
    pytest.importorskip("torchvision", reason="transformers' MiniMax-M3 processors need torchvision")
    return vh.hf_processors()


def _videos():
    v1 = np.stack(vh.random_images(11, [(61, 83)] * 5))     # 5 frames: padded to 6, one chunk of t=3
    v2 = np.stack(vh.random_images(12, [(40, 52)] * 10))    # t=5: chunks of 4 and 1 temporal patches
    return [v1, v2]


# ---------------------------------------------------------------------------------------------------------------
# Processors

@pytest.mark.parametrize("name", sorted(IMAGE_SETS))
def test_image_processor_matches_transformers(name):
    hf_image, _ = _hf_processors()
    images = vh.random_images(sorted(IMAGE_SETS).index(name), IMAGE_SETS[name])
    want = hf_image(images, return_tensors="np")
    got = ImageProcessor()(images)
    np.testing.assert_array_equal(got["image_grid_thw"], want["image_grid_thw"])
    assert got["pixel_values"].dtype == np.float32
    np.testing.assert_array_equal(got["pixel_values"], want["pixel_values"])


def test_image_processor_input_kinds_match_transformers():
    """PIL (RGB, RGBA, L), grey and RGBA arrays, channels-first arrays, float arrays."""
    import PIL.Image

    hf_image, _ = _hf_processors()
    rgb = vh.random_images(3, [(45, 66)])[0]
    alpha = np.random.default_rng(0).integers(0, 256, (45, 66, 1), dtype=np.uint8)
    rgba = np.concatenate([rgb, alpha], axis=-1)
    cases = {
        "pil_rgb": PIL.Image.fromarray(rgb), "pil_rgba": PIL.Image.fromarray(rgba),
        "pil_l": PIL.Image.fromarray(rgb[..., 0]), "grey_hw1": rgb[..., :1], "rgba": rgba,
        "chw": np.ascontiguousarray(rgb.transpose(2, 0, 1)),
    }
    for case, image in cases.items():
        want = hf_image([image], return_tensors="np")["pixel_values"]
        np.testing.assert_array_equal(ImageProcessor()([image])["pixel_values"], want, err_msg=case)
    # float input: transformers resizes in float32 with the same weights; equal up to summation order
    want = hf_image([rgb.astype(np.float32)], return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(ImageProcessor()([rgb.astype(np.float32)])["pixel_values"], want, atol=5e-5)


def test_video_processor_matches_transformers():
    _, hf_video = _hf_processors()
    videos = _videos()
    want = hf_video(videos, return_tensors="np")
    got = VideoProcessor()(videos)
    np.testing.assert_array_equal(got["video_grid_thw"], want["video_grid_thw"])
    assert got["video_grid_thw"].tolist() == [[3, 4, 6], [4, 4, 6], [1, 4, 6]]
    assert got["num_chunks_per_video"] == list(want["num_chunks_per_video"]) == [1, 2]
    np.testing.assert_array_equal(got["pixel_values_videos"], want["pixel_values_videos"])


def test_smart_resize_matches_transformers():
    _hf_processors()
    from transformers.models.minimax_m3_vl.image_processing_minimax_m3_vl import smart_resize

    rng = np.random.default_rng(0)
    sizes = [(1, 1), (28, 28), (14, 42), (3000, 4000), (27, 5000)] + [tuple(s) for s in rng.integers(1, 3000, (200, 2))]
    for h, w in sizes:
        if max(h, w) / min(h, w) > 200:
            continue
        for lo, hi in [(3136, 451584), (3136, 602112), (100, 5000)]:
            assert processor.smart_resize(h, w, 28, lo, hi) == smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)


def test_path_input_equals_array(tmp_path):
    """A PNG file is read by PIL (transformers decodes with torchvision.io; PNG pixels are the same)."""
    import PIL.Image

    rgb = vh.random_images(5, [(50, 71)])[0]
    PIL.Image.fromarray(rgb).save(tmp_path / "x.png")
    got = ImageProcessor()([str(tmp_path / "x.png")])
    np.testing.assert_array_equal(got["pixel_values"], ImageProcessor()([rgb])["pixel_values"])


def test_bad_images_are_named():
    with pytest.raises(processor.ImageInputError, match="image 1: no such file"):
        ImageProcessor()([np.zeros((30, 30, 3), np.uint8), "/nonexistent.png"])
    with pytest.raises(processor.ImageInputError, match="image 0: image is zero-sized"):
        ImageProcessor()([np.zeros((0, 30, 3), np.uint8)])
    with pytest.raises(processor.ImageInputError, match="image 0: arrays must be uint8 or float"):
        ImageProcessor()([np.zeros((30, 30, 3), np.int32)])
    with pytest.raises(processor.ImageInputError, match="video 0: frames differ in size"):
        VideoProcessor()([[np.zeros((30, 30, 3), np.uint8), np.zeros((31, 30, 3), np.uint8)]])


def test_from_pretrained_reads_preprocessor_config(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 1000, "longest_edge": 20000}, "patch_size": 14, "merge_size": 2}))
    p = ImageProcessor.from_pretrained(tmp_path)
    assert (p.min_pixels, p.max_pixels) == (1000, 20000)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 500, "max_pixels": 9000}))
    p = ImageProcessor.from_pretrained(tmp_path)
    assert (p.min_pixels, p.max_pixels) == (500, 9000)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"resample": 2}))
    with pytest.raises(ValueError, match="resample=2 is not supported"):
        ImageProcessor.from_pretrained(tmp_path)


def test_defaults_are_transformers_defaults(tmp_path):
    """Without a preprocessor_config.json: transformers' class defaults."""
    hf_image, hf_video = _hf_processors()
    image, video = ImageProcessor.from_pretrained(tmp_path), VideoProcessor.from_pretrained(tmp_path)
    assert (image.min_pixels, image.max_pixels) == (hf_image.size["shortest_edge"], hf_image.size["longest_edge"])
    assert (image.patch_size, image.temporal_patch_size, image.merge_size) == (
        hf_image.patch_size, hf_image.temporal_patch_size, hf_image.merge_size)
    assert image.image_mean == tuple(hf_image.image_mean) and image.image_std == tuple(hf_image.image_std)
    assert image.rescale_factor == hf_image.rescale_factor
    assert (video.min_pixels, video.max_pixels, video.vision_segment_max_frames) == (
        hf_video.min_pixels, hf_video.max_pixels, hf_video.vision_segment_max_frames)


def test_expand_prompt_matches_transformers():
    hf_image, hf_video = _hf_processors()
    from transformers.models.minimax_m3_vl.processing_minimax_m3_vl import MiniMaxM3VLProcessor

    hf = MiniMaxM3VLProcessor.__new__(MiniMaxM3VLProcessor)   # replace_*_token only read the sub-processors
    hf.image_processor, hf.video_processor = hf_image, hf_video
    images = ImageProcessor()(vh.random_images(0, [(61, 83), (100, 57)]))
    videos = VideoProcessor()(_videos())

    class Meta:                                  # what replace_video_token reads from VideoMetadata
        fps, frames_indices = 2.0, list(range(0, 20, 2))

    text = f"a {processor.IMAGE_TOKEN} b {processor.VIDEO_TOKEN} c {processor.IMAGE_TOKEN}{processor.VIDEO_TOKEN}"
    got = processor.expand_prompt(text, images["image_grid_thw"], videos["video_grid_thw"],
                                  videos["num_chunks_per_video"],
                                  video_timings=[None, VideoTiming(Meta.fps, Meta.frames_indices)])
    video_inputs = dict(videos, video_metadata=[None, Meta()])
    image_it, video_it = iter(range(2)), iter(range(2))
    want = re.sub(f"{re.escape(processor.IMAGE_TOKEN)}|{re.escape(processor.VIDEO_TOKEN)}",
                  lambda m: (hf.replace_image_token(images, next(image_it)) if m.group() == processor.IMAGE_TOKEN
                             else hf.replace_video_token(video_inputs, next(video_it))), text)
    assert got == want
    assert "]<]0.0 seconds[>[" in got and "]<]8.0 seconds[>[" in got
    with pytest.raises(ValueError, match="req-7: the text has 1"):
        processor.expand_prompt(f"{processor.IMAGE_TOKEN}", images["image_grid_thw"], request="req-7")


# ---------------------------------------------------------------------------------------------------------------
# Config and weights

def test_release_vision_config():
    with open(RELEASE_CONFIG) as f:
        cfg = VisionConfig.from_hf(json.load(f))
    assert (cfg.hidden_size, cfg.head_dim, cfg.rope_axis_dim, cfg.rotary_dim, cfg.patch_dim) == (1280, 80, 26, 78, 1176)
    assert (cfg.num_hidden_layers, cfg.projector_hidden_size, cfg.text_hidden_size, cfg.merge_window) == (32, 6144,
                                                                                                          6144, 4)
    assert (cfg.image_token_index, cfg.video_token_index) == (200025, 200026)
    model = nnx.eval_shape(lambda: VisionModel(cfg, dtype=jnp.bfloat16, attn_impl="reference"))
    n_params = sum(math.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    d, f, j, e = 1280, 5120, 6144, 6144
    want = (d * 1176 + 2 * d + 32 * (4 * d + 4 * (d * d + d) + 2 * d * f + f + d)
            + (j * d + j) + (j * j + j) + (j * 4 * e + j) + (j * e + e))
    assert n_params == want
    assert len(weights.RULES) == 27
    assert len(weights.expected_tensor_names(cfg)) == 3 + 32 * 16 + 8   # 515 vision + 8 projector tensors


def test_config_contradiction_is_named():
    with pytest.raises(ConfigError, match="spatial_merge_size"):
        VisionConfig.from_hf({"vision_config": {"spatial_merge_size": 2,
                                                "img_token_compression_config": {"spatial_merge_size": 3}}})
    with pytest.raises(ConfigError, match="no vision_config"):
        VisionConfig.from_hf({"text_config": {}})


# ---------------------------------------------------------------------------------------------------------------
# The tower against transformers

def _hf_vl_model(seed: int, vision: dict, text: dict):
    from transformers.models.minimax_m3_vl import configuration_minimax_m3_vl as hf_config
    from transformers.models.minimax_m3_vl import modeling_minimax_m3_vl as hf_modeling

    torch.manual_seed(seed)
    cfg = hf_config.MiniMaxM3VLConfig(text_config=text, vision_config=vision, projector_hidden_size=36,
                                      image_token_index=IMAGE_TOKEN, video_token_index=VIDEO_TOKEN)
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = "eager"
    model = hf_modeling.MiniMaxM3SparseForConditionalGeneration(cfg).eval()
    return vh.randomize(model, seed)


def _text_config():
    from tests import hf_reference as hf

    return hf.text_config(layers=[("F", "D"), ("S", "E")], heads=4, kv_heads=2, head_dim=16, block=8, topk=2,
                          hidden=40)


@pytest.fixture(scope="module")
def vl_pair(tmp_path_factory):
    """(transformers model, checkpoint dir, its tensors): head_dim 20, so 18 channels rotate and 2 pass."""
    model = _hf_vl_model(0, vh.vision_config(hidden_size=60, num_attention_heads=3), _text_config())
    path = tmp_path_factory.mktemp("vl")
    model.save_pretrained(path)
    from safetensors.numpy import load_file

    tensors = {}
    for f in glob.glob(str(path / "*.safetensors")):
        tensors.update(load_file(f))
    return model, path, tensors


def _ours(path, tensors, impl):
    cfg = VisionConfig.from_pretrained(path)
    return weights.load_vision_params(VisionModel(cfg, dtype=jnp.float32, attn_impl=impl), tensors)


def _inputs():
    images = ImageProcessor()(vh.random_images(4, [(61, 83), (100, 57), (29, 300)]))
    videos = VideoProcessor()(_videos())
    return images, videos


def test_checkpoint_names_are_the_rules(vl_pair):
    _, path, tensors = vl_pair
    cfg = VisionConfig.from_pretrained(path)
    assert sorted(n for n in tensors if weights.is_vision_tensor(n)) == sorted(weights.expected_tensor_names(cfg))


@pytest.mark.gpu_long
@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_features_match_transformers(vl_pair, impl):
    theirs, path, tensors = vl_pair
    ours = _ours(path, tensors, impl)
    images, videos = _inputs()
    with jax.default_matmul_precision("highest"):
        for pv, grid in ((images["pixel_values"], images["image_grid_thw"]),
                         (videos["pixel_values_videos"], videos["video_grid_thw"])):
            with torch.no_grad():
                hidden = theirs.model.vision_tower(pixel_values=torch.from_numpy(pv), grid_thw=torch.from_numpy(grid))
                feats = theirs.model.get_image_features(torch.from_numpy(pv), torch.from_numpy(grid)).pooler_output
            want_h = hidden.last_hidden_state[0].numpy()
            want = torch.cat(feats).numpy()
            got_h = np.asarray(ours.hidden_states(pv, grid))
            got = np.asarray(ours(pv, grid))
            assert got.shape == want.shape == (int(grid.prod(axis=1).sum()) // 4, 40)
            err_h, err = np.abs(got_h - want_h).max(), np.abs(got - want).max()
            assert err_h <= FEATURE_TOL, f"{impl}: hidden states max |diff| {err_h:.2e}"
            assert err <= FEATURE_TOL, f"{impl}: features max |diff| {err:.2e}"


def test_segments_do_not_leak(vl_pair):
    """Features of an image alone equal its rows when processed with other images (block-diagonal attention)."""
    _, path, tensors = vl_pair
    ours = _ours(path, tensors, "reference")
    imgs = vh.random_images(4, [(61, 83), (100, 57)])
    both = ImageProcessor()(imgs)
    alone = ImageProcessor()(imgs[1:])
    with jax.default_matmul_precision("highest"):
        got_both = np.asarray(ours(both["pixel_values"], both["image_grid_thw"]))
        got_alone = np.asarray(ours(alone["pixel_values"], alone["image_grid_thw"]))
    n0 = int(both["image_grid_thw"][0].prod()) // 4
    np.testing.assert_allclose(got_both[n0:], got_alone, atol=1e-5)


def test_vision_grid_layout():
    g = VisionGrid.from_grid_thw([[1, 2, 4], [2, 2, 2]], 2)
    assert g.cu_seqlens.tolist() == [0, 8, 16]
    assert g.positions[:8, 1:].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]
    assert g.positions[8:, 0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert g.pack_index.shape == (2, 8) and (g.pack_index.reshape(-1)[g.unpack_index] == np.arange(16)).all()
    with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
        VisionGrid.from_grid_thw([[1, 3, 4]], 2)
    assert default_attn_impl("gpu", jnp.bfloat16) == "cudnn" and default_attn_impl("gpu", jnp.float32) == "xla"
    assert default_attn_impl("cpu", jnp.bfloat16) == "reference"


def test_weight_errors_are_collected(vl_pair):
    _, path, tensors = vl_pair
    cfg = VisionConfig.from_pretrained(path)
    bad = {k: v for k, v in tensors.items() if k != "vision_tower.vision_model.encoder.layers.1.mlp.fc1.bias"}
    bad["patch_merge_mlp.linear_2.weight"] = np.zeros((3, 3), np.float32)
    bad["vision_tower.vision_model.encoder.layers.0.self_attn.extra.weight"] = np.zeros((3,), np.float32)
    with pytest.raises(ValueError) as e:
        weights.load_vision_params(VisionModel(cfg, dtype=jnp.float32, attn_impl="reference"), bad)
    msg = str(e.value)
    assert "fc1_bias_f not filled for layers [1]" in msg
    assert "patch_merge_mlp.linear_2.weight: shape (3, 3)" in msg
    assert "self_attn.extra.weight: matches 0 vision weight rules" in msg


# ---------------------------------------------------------------------------------------------------------------
# Scatter and logits

def test_scatter_matches_masked_scatter():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, size=(2, 30))
    ids[0, [3, 4, 9]] = IMAGE_TOKEN
    ids[1, [0, 29]] = IMAGE_TOKEN
    embeds = rng.normal(size=(2, 30, 8)).astype(np.float32)
    feats = rng.normal(size=(5, 8)).astype(np.float32)
    want = torch.from_numpy(embeds).masked_scatter(torch.from_numpy(ids == IMAGE_TOKEN)[..., None].expand(2, 30, 8),
                                                   torch.from_numpy(feats)).numpy()
    got = np.asarray(merge.scatter_features(jnp.asarray(embeds), ids, feats, IMAGE_TOKEN))
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="req-3: image features and image tokens do not match: 5 placeholder"):
        merge.scatter_features(jnp.asarray(embeds), ids, feats[:4], IMAGE_TOKEN, request="req-3")


@pytest.mark.gpu_long
@pytest.mark.slow
def test_logits_with_images_and_video_match_transformers(vl_pair):
    """m3jax.load attaches the checkpoint's vision tower; model(input_ids, pixel_values=...) equals transformers."""
    import m3jax

    theirs, path, tensors = vl_pair
    # The text model's kernels are the reference ones on every backend: this tiny text width (40) is no multiple
    # of the GPU MoE kernel's 16-wide tiles, which refuses it (the kernels have their own tests).
    text = m3jax.load(path, dtype="float32", attn_impl="reference", progress=False)
    assert isinstance(text.vision, VisionModel) and text.vision.dtype == jnp.float32
    vision = text.vision
    images = ImageProcessor()(vh.random_images(7, [(61, 83), (40, 40)]))
    videos = VideoProcessor()(_videos()[:1])
    n_img = [int(g.prod()) // 4 for g in images["image_grid_thw"]]
    n_vid = int(videos["video_grid_thw"].prod(axis=1).sum()) // 4
    rng = np.random.default_rng(0)
    ids = np.concatenate([rng.integers(0, 280, 5), [IMAGE_TOKEN] * n_img[0], rng.integers(0, 280, 7),
                          [VIDEO_TOKEN] * n_vid, rng.integers(0, 280, 3), [IMAGE_TOKEN] * n_img[1],
                          rng.integers(0, 280, 4)])[None]
    with torch.no_grad():
        want = theirs(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(images["pixel_values"]),
                      image_grid_thw=torch.from_numpy(images["image_grid_thw"]),
                      pixel_values_videos=torch.from_numpy(videos["pixel_values_videos"]),
                      video_grid_thw=torch.from_numpy(videos["video_grid_thw"]), use_cache=False).logits.numpy()
    with jax.default_matmul_precision("highest"):
        got = np.asarray(text(ids, pixel_values=images["pixel_values"], image_grid_thw=images["image_grid_thw"],
                              pixel_values_videos=videos["pixel_values_videos"],
                              video_grid_thw=videos["video_grid_thw"]))
        h = merge.embed_with_vision(text, ids, images["pixel_values"], images["image_grid_thw"],
                                    videos["pixel_values_videos"], videos["video_grid_thw"], vision=vision)
        np.testing.assert_array_equal(np.asarray(text(inputs_embeds=h)), got)
    err = np.abs(got - want).max()
    assert err <= LOGIT_TOL, f"max |logit diff| {err:.2e}"
    with pytest.raises(ValueError, match="req-9: input_ids hold video placeholder tokens"):
        merge.embed_with_vision(text, ids, images["pixel_values"], images["image_grid_thw"], vision=vision,
                                request="req-9")


# ---------------------------------------------------------------------------------------------------------------
# The Engine with images, loading a tiny VL checkpoint

def _vl_tokenizer(path):
    """A byte-level tokenizer whose image / video markers are the config's ids 290..293 (fillers before)."""
    from m3jax.tokenizer import BOS, EOT, ROLE, write_byte_level_tokenizer

    fillers = [f"]<]unused{i}[>[" for i in range(IMAGE_TOKEN - 256 - 3)]
    ids = write_byte_level_tokenizer(str(path / "tokenizer.json"), [BOS, EOT, ROLE, *fillers, processor.IMAGE_TOKEN,
                                                                    processor.VIDEO_TOKEN,
                                                                    processor.VISION_START_TOKEN,
                                                                    processor.VISION_END_TOKEN])
    assert (ids[processor.IMAGE_TOKEN], ids[processor.VIDEO_TOKEN]) == (IMAGE_TOKEN, VIDEO_TOKEN)


@pytest.mark.gpu_long
@pytest.mark.slow
def test_engine_greedy_with_image_matches_transformers(vl_pair):
    import m3jax

    theirs, path, _ = vl_pair
    _vl_tokenizer(path)
    model = m3jax.load(path, dtype="float32", attn_impl="reference", progress=False)    # see the test above
    image = vh.random_images(21, [(61, 83)])[0]
    prompt = {"text": f"ab{processor.IMAGE_TOKEN}cd", "images": [image]}
    steps = 4
    with jax.default_matmul_precision("highest"):
        (out,) = m3jax.generate(model, [prompt], m3jax.SamplingParams(max_new_tokens=steps), max_seq_len=128,
                                prefill_chunk=8)     # the image's 6 placeholders span two chunks
    ids = list(out.prompt_token_ids)
    assert ids.count(IMAGE_TOKEN) == 6
    px = ImageProcessor()([image])
    with torch.no_grad():
        for _ in range(steps):
            logits = theirs(input_ids=torch.tensor([ids]), pixel_values=torch.from_numpy(px["pixel_values"]),
                            image_grid_thw=torch.from_numpy(px["image_grid_thw"]), use_cache=False).logits
            ids.append(int(logits[0, -1].argmax()))
    assert out.token_ids == ids[len(out.prompt_token_ids):]


@pytest.fixture(scope="module")
def tiny_vl(tmp_path_factory):
    import m3jax

    path = m3jax.testing.make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny") / "vl"), seed=0, vision=True,
                                              dtype="float32")
    return path, m3jax.load(path, dtype="float32", progress=False)


def test_tiny_vl_checkpoint_loads_and_converts(tiny_vl, tmp_path):
    """make_tiny_checkpoint(vision=True): the release's layout (tensor names, config keys, preprocessor config);
    loading gives the tower it wrote, converting keeps it."""
    import m3jax
    from convert import orbax_io
    from convert.safetensors_io import checkpoint_tensors, read_tensor

    path, model = tiny_vl
    cfg = VisionConfig.from_pretrained(path)
    assert (cfg.image_token_index, cfg.video_token_index, cfg.text_hidden_size) == (259, 260, 64)
    stored = {n: read_tensor(t) for n, t in checkpoint_tensors(path).items() if weights.is_vision_tensor(n)}
    assert sorted(stored) == sorted(weights.expected_tensor_names(cfg))
    for name, w in weights.release_tensors(model.vision):
        np.testing.assert_array_equal(w, stored[name], err_msg=name)
    assert ImageProcessor.from_pretrained(path).max_pixels == 16 * 28 * 28
    conv = orbax_io.convert(path, str(tmp_path / "conv"), "float32", progress=False)["dst"]
    again = m3jax.load(conv, dtype="bfloat16", progress=False)
    assert again.vision.dtype == jnp.bfloat16
    for (name, a), (_, b) in zip(weights.release_tensors(model.vision), weights.release_tensors(again.vision)):
        np.testing.assert_allclose(b, a, rtol=1e-2, atol=1e-2, err_msg=name)


@pytest.mark.multi_device
def test_tiny_vl_on_a_mesh_is_the_single_device_model(tiny_vl):
    """On a 2x2 mesh the tower is replicated and the forward with an image is the single-device one."""
    import m3jax

    path, model = tiny_vl
    mesh = m3jax.sharding.make_mesh(data=2, model=2, devices=jax.devices()[:4])
    sharded = m3jax.load(path, dtype="float32", mesh=mesh, progress=False)
    w = sharded.vision.tower.encoder.layers.q_dnh[...]
    assert w.sharding.is_fully_replicated and len(w.sharding.device_set) == 4
    px = ImageProcessor.from_pretrained(path)(vh.random_images(40, [(50, 60)]))
    ids = np.asarray([[1, 261] + [259] * (int(px["image_grid_thw"].prod()) // 4) + [262, 7, 8]])
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(np.asarray(sharded(ids, pixel_values=px["pixel_values"],
                                                      image_grid_thw=px["image_grid_thw"])),
                                   np.asarray(model(ids, **px)), atol=1e-5)


def _data_url(image) -> str:
    import base64
    import io

    import PIL.Image

    buf = io.BytesIO()
    PIL.Image.fromarray(image).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_engine_prompts_and_bad_images(tiny_vl, tmp_path):
    """Chat image_url parts equal a dict prompt; bad images name the request and leave the engine usable."""
    import m3jax
    from m3jax.vision.prompt import MultimodalPrompt

    path, model = tiny_vl
    engine = m3jax.Engine(model, max_batch_size=2, max_seq_len=512, prefill_chunk=16)    # chat: ~300 tokens
    image = vh.random_images(30, [(45, 66)])[0]
    a, _ = engine.prepare({"text": f"{processor.IMAGE_TOKEN}hi", "images": [image]}, chat=True)
    b, _ = engine.prepare([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(image)}},
                                                        {"type": "text", "text": "hi"}]}], chat=True)
    assert a.token_ids == b.token_ids and a.token_ids.count(259) == int(a.image_grid_thw.prod()) // 4
    np.testing.assert_array_equal(a.pixel_values, b.pixel_values)

    marker = processor.IMAGE_TOKEN
    bad = {
        "no such file": {"text": marker, "images": [str(tmp_path / "missing.png")]},
        "zero-sized": {"text": marker, "images": [np.zeros((0, 9, 3), np.uint8)]},
        "cannot read": {"text": marker, "images": [str(tmp_path / "junk.png")]},
        "markers, but 2 images": {"text": marker, "images": [image, image]},
        "cannot decode": [{"role": "user", "content": [{"type": "image_url",
                                                        "image_url": {"url": "data:image/png;base64,AAAA"}}]}],
        "but its images give 4 feature rows": MultimodalPrompt([1, 259, 259, 259, 259, 259, 2],
                                                               *ImageProcessor.from_pretrained(path)(
                                                                   [np.zeros((28, 28, 3), np.uint8)]).values()),
    }
    (tmp_path / "junk.png").write_bytes(b"not a png")
    for message, prompt in bad.items():
        with pytest.raises(ValueError, match=f"request bad-.*{message}"):
            engine.add_request(prompt, request_id=f"bad-{message}", chat=isinstance(prompt, list))
    assert not engine.has_work()
    video = np.stack(vh.random_images(31, [(30, 40)] * 3))
    prompt = {"text": f"x{processor.VIDEO_TOKEN}y{marker}", "images": [image], "videos": [video]}
    mm, _ = engine.prepare(prompt)
    cfg = model.vision.config
    spans = mm.content_spans(cfg)
    assert [mm.token_ids[s] for s, _, _ in spans] == [260, 259] and len({d for _, _, d in spans}) == 2
    other, _ = engine.prepare({"text": prompt["text"], "images": [255 - image], "videos": [video]})
    assert other.token_ids == mm.token_ids and other.content_spans(cfg)[1][2] != spans[1][2]
    # the same image and video through the no-cache forward: the engine's tokens
    ids = list(mm.token_ids)
    with jax.default_matmul_precision("highest"):
        for _ in range(2):
            logits = model(np.asarray([ids]), pixel_values=mm.pixel_values, image_grid_thw=mm.image_grid_thw,
                           pixel_values_videos=mm.pixel_values_videos, video_grid_thw=mm.video_grid_thw)
            ids.append(int(np.argmax(logits[0, -1])))
    with jax.default_matmul_precision("highest"):
        rid = engine.add_request(prompt, m3jax.SamplingParams(max_new_tokens=2))
        assert engine.run()[rid].token_ids == ids[len(mm.token_ids):]
        assert rid not in engine._pixels and not engine.has_work()
        # prefix cache: the same pixels hit (same tokens), other pixels of the same size (same ids) do not
        again = engine.add_request(prompt, m3jax.SamplingParams(max_new_tokens=2))
        other_rid = engine.add_request(dict(prompt, images=[255 - image]), m3jax.SamplingParams(max_new_tokens=2))
        results = engine.run()
    assert results[again].token_ids == ids[len(mm.token_ids):] and results[again].num_cached_tokens > 0
    assert results[other_rid].num_cached_tokens == 0
    assert mm.cache_salt(cfg) != other.cache_salt(cfg)


@pytest.mark.slow
def test_vision_benchmark_small(tmp_path, monkeypatch):
    """benchmarks/vision.py --small (float32, CPU): runs, and m3jax's features equal transformers'."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(
        "bench_vision", os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "vision.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(sys, "argv", ["vision.py", "--small", "--dtype", "float32", "--out", str(tmp_path)])
    bench.main()
    with open(tmp_path / "vision.json") as f:
        rows = json.load(f)["rows"]
    assert [r["impl"] for r in rows] == ["transformers (sdpa)", "m3jax xla", "m3jax reference"]   # float32: no cuDNN
    assert all(r["ms"] > 0 and r["err"] <= FEATURE_TOL for r in rows[1:]), rows
