"""Image and video preprocessing for M3's vision tower, numpy/PIL only, equal to transformers 5.23.0.

`ImageProcessor` mirrors `MiniMaxM3VLImageProcessor` and `VideoProcessor` mirrors `MiniMaxM3VLVideoProcessor`:
  1. RGB (alpha composited onto white, grey expanded), channels first, uint8;
  2. `smart_resize` to multiples of patch*merge (28) within [min_pixels, max_pixels];
  3. antialiased bicubic resize. transformers calls torchvision, which on CPU runs torch's uint8 kernel
     (Pillow-SIMD's algorithm: double weights, Keys a=-0.5, rounded to int16 with a per-axis precision, a
     horizontal then a vertical integer pass, each rounded and clipped to uint8). `_resize_uint8` repeats
     that integer arithmetic, so the resized pixels are bit-equal; PIL's own `resize` is not (22-bit weights);
  4. (x - 255 mean) / (255 std) in float32 (transformers fuses the 1/255 rescale into mean and std);
  5. patches flattened in merge-window order: rows [(t,) h/m, w/m, m, m] x values [C, T, P, P]; a still image
     is repeated along the temporal patch, a video is padded with its last frame to a multiple of T.

`expand_prompt` expands `]<]image[>[` / `]<]video[>[` in a prompt as `MiniMaxM3VLProcessor` does.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Sequence

import numpy as np

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

IMAGE_TOKEN = "]<]image[>["
VIDEO_TOKEN = "]<]video[>["
VISION_START_TOKEN = "]<]start of image[>["
VISION_END_TOKEN = "]<]end of image[>["


class ImageInputError(ValueError):
    """An image or video that cannot be processed (unreadable, zero-sized, wrong layout or dtype)."""


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """(height, width) rounded to multiples of `factor`, rescaled into [min_pixels, max_pixels], aspect kept.

    Python's round (half to even) as in transformers, so boundary sizes land on the same grid.
    """
    if min(height, width) < 1:
        raise ImageInputError(f"image is zero-sized: height={height}, width={width}")
    if max(height, width) / min(height, width) > 200:
        raise ImageInputError(f"absolute aspect ratio must be smaller than 200, got "
                              f"{max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# ---------------------------------------------------------------------------------------------------------------
# Antialiased bicubic resize (torch's CPU kernel for uint8, and its float formula for float input)

def _cubic_aa(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution with a = -0.5 (PIL's and torch's antialias filter), float64."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@dataclasses.dataclass(frozen=True)
class _AxisWeights:
    """Per output index o: input window [start[o], start[o] + size[o]) and normalised weights[o, :size[o]]."""

    start: np.ndarray      # int64[out]
    size: np.ndarray       # int64[out]
    weights: np.ndarray    # float64[out, taps], zero past size[o]


def _axis_weights(in_size: int, out_size: int) -> _AxisWeights:
    """torch `_compute_indices_min_size_weights_aa` for bicubic (interp_size 4), align_corners=False, in double."""
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    taps = int(math.ceil(support)) * 2 + 1
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    center = scale * (np.arange(out_size, dtype=np.float64) + 0.5)
    start = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    stop = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size)
    size = np.clip(stop - start, 0, taps)
    j = np.arange(taps)
    w = _cubic_aa((j[None, :] + start[:, None] - center[:, None] + 0.5) * invscale)
    w = np.where(j[None, :] < size[:, None], w, 0.0)
    total = w.sum(axis=1, keepdims=True)
    w = np.divide(w, total, out=np.zeros_like(w), where=total != 0.0)
    return _AxisWeights(start, size, w)


def _int16_weights(aw: _AxisWeights) -> tuple[np.ndarray, int]:
    """Weights in fixed point: the largest precision (< 22 bits) whose largest weight still fits int16."""
    wt_max = float(aw.weights.max()) if aw.weights.size else 0.0
    precision = 0
    while precision < 22 and int(0.5 + wt_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    v = aw.weights * (1 << precision)
    wi = np.where(v < 0, np.trunc(v - 0.5), np.trunc(v + 0.5)).astype(np.int64)
    return wi, precision


def _band_matmul(x: np.ndarray, aw: _AxisWeights, w: np.ndarray, block: int = 16) -> np.ndarray:
    """out[..., o] = sum_j x[..., start[o] + j] * w[o, j] along the last axis, in float64.

    Each block of `block` consecutive outputs reads one contiguous input span, so the sum is a small dense
    matmul (BLAS) instead of a gather per tap. Integer weights and uint8 pixels stay exact: every partial sum
    is an integer far below 2**53. Rows are processed in chunks to bound the float64 copy.
    """
    n_out = aw.start.shape[0]
    lead, n_in = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, n_in)
    out = np.empty((rows.shape[0], n_out), np.float64)
    mats = []
    for b0 in range(0, n_out, block):
        b1 = min(b0 + block, n_out)
        st, sz = aw.start[b0:b1], aw.size[b0:b1]
        lo, hi = int(st.min()), int((st + sz).max())
        mat = np.zeros((max(hi - lo, 1), b1 - b0), np.float64)
        j = np.arange(w.shape[1])
        col, tap = np.nonzero(j[None, :] < sz[:, None])
        mat[st[col] - lo + tap, col] = w[b0 + col, tap]
        mats.append((b0, b1, lo, lo + mat.shape[0], mat))
    chunk = max(1, (1 << 22) // max(n_in, 1))
    for r0 in range(0, rows.shape[0], chunk):
        xt = np.ascontiguousarray(rows[r0:r0 + chunk].T, dtype=np.float64)    # [in, rows]: spans are contiguous
        out_t = np.empty((n_out, xt.shape[1]), np.float64)
        for b0, b1, lo, hi, mat in mats:
            np.matmul(mat.T, xt[lo:hi], out=out_t[b0:b1])
        out[r0:r0 + chunk] = out_t.T
    return out.reshape(*lead, n_out)


def _resize_last_axis_uint8(x: np.ndarray, out_size: int) -> np.ndarray:
    aw = _axis_weights(x.shape[-1], out_size)
    wi, precision = _int16_weights(aw)
    acc = _band_matmul(x, aw, wi.astype(np.float64)) + (1 << (precision - 1))
    return np.clip(np.floor(acc / (1 << precision)), 0, 255).astype(np.uint8)   # arithmetic >> precision


def _resize_last_axis_float(x: np.ndarray, out_size: int) -> np.ndarray:
    aw = _axis_weights(x.shape[-1], out_size)
    return _band_matmul(x, aw, aw.weights).astype(x.dtype)


def resize_bicubic_aa(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """Antialiased bicubic resize of [..., C, H, W] as transformers' torchvision backend on CPU.

    uint8: bit-equal to torch's uint8 kernel (integer passes, width first). float32/float64: the same weights
    summed in float64, returned in the input's dtype (equal to torch up to float rounding). Returns the input itself when the size is
    unchanged, as torchvision does.
    """
    if images.shape[-2:] == (height, width):
        return images
    resize = _resize_last_axis_uint8 if images.dtype == np.uint8 else _resize_last_axis_float
    out = images
    if out.shape[-1] != width:
        out = resize(out, width)
    if out.shape[-2] != height:
        out = np.ascontiguousarray(resize(np.ascontiguousarray(out.swapaxes(-1, -2)), height).swapaxes(-1, -2))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Inputs -> uint8 [C, H, W] RGB

def _pil():
    try:
        import PIL.Image
        import PIL.ImageOps
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("m3jax.vision needs Pillow to read image files and PIL images: pip install pillow") from e
    return PIL


def _pil_to_rgb(image) -> np.ndarray:
    """PIL image -> uint8 [H, W, 3]; transparency composited onto white (transformers' convert_to_rgb)."""
    PIL = _pil()
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.array(PIL.Image.alpha_composite(background, rgba).convert("RGB"))
    return np.array(image.convert("RGB"))


def _array_to_chw(array: np.ndarray, what: str) -> np.ndarray:
    """[H, W], [H, W, C] or [C, H, W] with C in (1, 3, 4) -> [3, H, W]; grey repeated, alpha onto white."""
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ImageInputError(f"{what}: expected an image of shape [H, W], [H, W, C] or [C, H, W], "
                              f"got {array.shape}")
    if array.shape[0] in (1, 3, 4):          # channels first, as transformers infers it (first axis wins)
        chw = array
    elif array.shape[-1] in (1, 3, 4):
        chw = np.moveaxis(array, -1, 0)
    else:
        raise ImageInputError(f"{what}: cannot find a channel axis of size 1, 3 or 4 in shape {array.shape}")
    if chw.shape[1] == 0 or chw.shape[2] == 0:
        raise ImageInputError(f"{what}: image is zero-sized, shape {array.shape}")
    if chw.shape[0] == 1:
        chw = np.repeat(chw, 3, axis=0)
    elif chw.shape[0] == 4:
        chw = _composite_on_white(chw, what)
    return np.ascontiguousarray(chw)


def _composite_on_white(chw: np.ndarray, what: str) -> np.ndarray:
    """RGBA -> RGB over white in float32, as transformers' torchvision convert_to_rgb (scale, blend, back)."""
    if np.issubdtype(chw.dtype, np.floating):
        if chw.min() < 0.0 or chw.max() > 1.0:
            raise ImageInputError(f"{what}: a float RGBA image must lie in [0, 1]")
        f = chw.astype(np.float32)
        return (f[:3] * f[3:] + (1 - f[3:])).astype(chw.dtype)
    if chw.dtype != np.uint8:
        raise ImageInputError(f"{what}: RGBA arrays must be uint8 or float, got {chw.dtype}")
    f = chw.astype(np.float32) / np.float32(255)
    blended = f[:3] * f[3:] + (1 - f[3:])
    # torchvision's float -> uint8 conversion: multiply by 255 + 1 - eps and truncate
    return (blended * np.float32(255 + 1.0 - 1e-3)).astype(np.uint8)


def load_image(image: Any, what: str = "image") -> np.ndarray:
    """A PIL image, a numpy array or a path -> [3, H, W] (uint8 for files and PIL images; arrays keep dtype)."""
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        PIL = _pil()
        if not os.path.isfile(path):
            raise ImageInputError(f"{what}: no such file: {path!r}")
        try:
            with PIL.Image.open(path) as f:
                f.load()
                upright = PIL.ImageOps.exif_transpose(f)
                array = _pil_to_rgb(upright)
        except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
            raise ImageInputError(f"{what}: cannot read {path!r}: {e}") from e
        return _array_to_chw(array, what)
    if type(image).__module__.startswith("PIL.") and hasattr(image, "getbands"):
        return _array_to_chw(_pil_to_rgb(image), what)
    if isinstance(image, np.ndarray):
        if image.dtype == np.bool_ or not (image.dtype == np.uint8 or np.issubdtype(image.dtype, np.floating)):
            raise ImageInputError(f"{what}: arrays must be uint8 or float, got {image.dtype}")
        return _array_to_chw(image, what)
    raise ImageInputError(f"{what}: expected a PIL image, a numpy array or a path, got {type(image).__name__}")


# ---------------------------------------------------------------------------------------------------------------
# Processors

def _normalize(images: np.ndarray, mean, std, rescale_factor: float) -> np.ndarray:
    """(x - mean/rescale) / (std/rescale) in float32: transformers fuses rescale into mean and std."""
    m = np.asarray(mean, np.float32) * np.float32(1.0 / rescale_factor)
    s = np.asarray(std, np.float32) * np.float32(1.0 / rescale_factor)
    shape = (-1, 1, 1)
    return (images.astype(np.float32) - m.reshape(shape)) / s.reshape(shape)


def _patchify(frames: np.ndarray, patch: int, merge: int, temporal: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    """float32 [T', C, H, W] (T' a multiple of `temporal`) -> rows [t, h/m, w/m, m, m] x [C, T, P, P]."""
    tt, c, h, w = frames.shape
    gt, gh, gw = tt // temporal, h // patch, w // patch
    x = frames.reshape(gt, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)   # t, h/m, w/m, m_h, m_w, C, T, P_h, P_w
    return x.reshape(gt * gh * gw, c * temporal * patch * patch), (gt, gh, gw)


@dataclasses.dataclass
class ImageProcessor:
    """`MiniMaxM3VLImageProcessor` without torch: `proc(images)` -> {"pixel_values", "image_grid_thw"}.

    pixel_values: float32 [sum of patches, C*T*P*P]; image_grid_thw: int64 [num_images, 3] (t is 1).
    `min_pixels` / `max_pixels` bound the resized area (transformers' size.shortest_edge / longest_edge).
    """

    min_pixels: int = 4 * 28 * 28
    max_pixels: int = 451584
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    def __post_init__(self):
        for name in ("patch_size", "temporal_patch_size", "merge_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")

    @classmethod
    def from_dict(cls, d: dict) -> "ImageProcessor":
        """From a `preprocessor_config.json` dict, keys as transformers reads them (unknown keys are ignored)."""
        kw = {}
        size = d.get("size")
        if isinstance(size, dict):  # a list (the old [672, 672]) is ignored, as transformers does
            if "shortest_edge" in size:
                kw["min_pixels"] = int(size["shortest_edge"])
            if "longest_edge" in size:
                kw["max_pixels"] = int(size["longest_edge"])
        if d.get("min_pixels") is not None:
            kw["min_pixels"] = int(d["min_pixels"])
        if d.get("max_pixels") is not None:
            kw["max_pixels"] = int(d["max_pixels"])
        for key in ("patch_size", "temporal_patch_size", "merge_size"):
            if key in d:
                kw[key] = int(d[key])
        for key in ("image_mean", "image_std"):
            if key in d:
                kw[key] = tuple(float(v) for v in d[key])
        for key in ("rescale_factor",):
            if key in d:
                kw[key] = float(d[key])
        for key in ("do_resize", "do_rescale", "do_normalize"):
            if key in d:
                kw[key] = bool(d[key])
        resample = d.get("resample", 3)
        if resample != 3:
            raise ValueError(f"preprocessor_config.json: resample={resample} is not supported (only 3, bicubic)")
        return cls(**kw)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ImageProcessor":
        """Read `preprocessor_config.json` in a checkpoint directory; transformers' defaults when it is absent."""
        return cls.from_dict(_read_preprocessor_config(path))

    def num_patches(self, height: int, width: int) -> int:
        h, w = smart_resize(height, width, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels)
        return (h // self.patch_size) * (w // self.patch_size)

    def _frames(self, chw: np.ndarray) -> np.ndarray:
        if self.do_resize:
            h, w = smart_resize(chw.shape[-2], chw.shape[-1], self.patch_size * self.merge_size,
                                self.min_pixels, self.max_pixels)
            chw = resize_bicubic_aa(chw, h, w)
        return self._scale(chw)

    def _scale(self, x: np.ndarray) -> np.ndarray:
        if self.do_normalize:
            scale = self.rescale_factor if self.do_rescale else 1.0
            return _normalize(x, self.image_mean, self.image_std, scale)
        x = x.astype(np.float32)
        return x * np.float32(self.rescale_factor) if self.do_rescale else x

    def __call__(self, images: Sequence[Any] | Any) -> dict[str, np.ndarray]:
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise ImageInputError("no images given")
        rows, grids = [], []
        for i, image in enumerate(images):
            frame = self._frames(load_image(image, what=f"image {i}"))
            _check_divisible(frame.shape[-2:], self.patch_size * self.merge_size, f"image {i}")
            frames = np.repeat(frame[None], self.temporal_patch_size, axis=0)
            patches, (_, gh, gw) = _patchify(frames, self.patch_size, self.merge_size, self.temporal_patch_size)
            rows.append(patches)
            grids.append((1, gh, gw))
        return {"pixel_values": np.concatenate(rows, axis=0), "image_grid_thw": np.asarray(grids, np.int64)}


@dataclasses.dataclass
class VideoProcessor(ImageProcessor):
    """`MiniMaxM3VLVideoProcessor` without torch: `proc(videos)` -> {"pixel_values_videos", "video_grid_thw",
    "num_chunks_per_video"}.

    A video is an array [F, H, W, C] / [F, C, H, W] or a list of frames (PIL images, arrays or paths); frames are
    taken as given (no sampling). Each video is cut into chunks of at most `vision_segment_max_frames` temporal
    patches; each chunk is one row of video_grid_thw and attends only to itself in the tower.
    """

    min_pixels: int = 4 * 28 * 28
    max_pixels: int = 768 * 28 * 28
    vision_segment_max_frames: int | None = 4

    @classmethod
    def from_dict(cls, d: dict) -> "VideoProcessor":
        base = ImageProcessor.from_dict({k: v for k, v in d.items() if k not in ("size", "min_pixels",
                                                                                  "max_pixels")})
        kw = dataclasses.asdict(base)
        kw["min_pixels"] = int(d.get("min_pixels", cls.min_pixels))
        kw["max_pixels"] = int(d.get("max_pixels", cls.max_pixels))
        if "vision_segment_max_frames" in d:
            v = d["vision_segment_max_frames"]
            kw["vision_segment_max_frames"] = None if v is None else int(v)
        return cls(**kw)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "VideoProcessor":
        """Read `video_preprocessor_config.json` (else `preprocessor_config.json`'s video keys, else defaults)."""
        p = os.path.join(os.fspath(path), "video_preprocessor_config.json")
        if os.path.isfile(p):
            return cls.from_dict(_read_json(p))
        return cls.from_dict({})

    def _video(self, video: Any, what: str) -> np.ndarray:
        if isinstance(video, np.ndarray):
            if video.ndim != 4:
                raise ImageInputError(f"{what}: expected [frames, H, W, C] or [frames, C, H, W], got {video.shape}")
            frames = [load_image(f, what=f"{what} frame {j}") for j, f in enumerate(video)]
        elif isinstance(video, (list, tuple)):
            frames = [load_image(f, what=f"{what} frame {j}") for j, f in enumerate(video)]
        else:
            raise ImageInputError(f"{what}: expected an array of frames or a list of frames, got "
                                  f"{type(video).__name__}")
        if not frames:
            raise ImageInputError(f"{what}: has no frames")
        if len({f.shape for f in frames}) != 1:
            raise ImageInputError(f"{what}: frames differ in size: {sorted({f.shape for f in frames})}")
        return np.stack(frames)

    def __call__(self, videos: Sequence[Any]) -> dict[str, Any]:
        if isinstance(videos, np.ndarray):
            videos = [videos]
        if not videos:
            raise ImageInputError("no videos given")
        rows, grids, chunks_per_video = [], [], []
        for i, video in enumerate(videos):
            frames = self._video(video, f"video {i}")
            if self.do_resize:
                h, w = smart_resize(frames.shape[-2], frames.shape[-1], self.patch_size * self.merge_size,
                                    self.min_pixels, self.max_pixels)
                frames = resize_bicubic_aa(frames, h, w)
            _check_divisible(frames.shape[-2:], self.patch_size * self.merge_size, f"video {i}")
            frames = self._scale(frames)
            if pad := -frames.shape[0] % self.temporal_patch_size:
                frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
            patches, (gt, gh, gw) = _patchify(frames, self.patch_size, self.merge_size, self.temporal_patch_size)
            rows.append(patches)
            step = gt if self.vision_segment_max_frames is None else self.vision_segment_max_frames
            chunks = [(min(step, gt - s), gh, gw) for s in range(0, gt, step)]
            grids.extend(chunks)
            chunks_per_video.append(len(chunks))
        return {"pixel_values_videos": np.concatenate(rows, axis=0),
                "video_grid_thw": np.asarray(grids, np.int64), "num_chunks_per_video": chunks_per_video}


def _check_divisible(hw, factor: int, what: str):
    if hw[0] % factor or hw[1] % factor:
        raise ImageInputError(f"{what}: size {tuple(hw)} is not a multiple of patch_size*merge_size={factor} "
                              f"(resizing is off)")


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e


def _read_preprocessor_config(path: str | os.PathLike) -> dict:
    p = os.fspath(path)
    if os.path.isfile(p):
        return _read_json(p)
    if not os.path.isdir(p):
        raise FileNotFoundError(f"no checkpoint directory or preprocessor_config.json at {p!r}")
    cfg = os.path.join(p, "preprocessor_config.json")
    return _read_json(cfg) if os.path.isfile(cfg) else {}


# ---------------------------------------------------------------------------------------------------------------
# Prompt expansion

@dataclasses.dataclass(frozen=True)
class VideoTiming:
    """Where a video's frames came from: frame_indices[k] is the source frame of input frame k, at `fps`."""

    fps: float
    frame_indices: Sequence[int]


def image_placeholder(grid_thw: Sequence[int], merge_size: int = 2) -> str:
    """Start marker, one `]<]image[>[` per merged patch (t*h*w / merge^2), end marker."""
    t, h, w = (int(v) for v in grid_thw)
    return VISION_START_TOKEN + IMAGE_TOKEN * (t * h * w // merge_size**2) + VISION_END_TOKEN


def video_placeholder(chunk_grids: Sequence[Sequence[int]], merge_size: int = 2, temporal_patch_size: int = 2,
                      timing: VideoTiming | None = None) -> str:
    """Per temporal patch: a `]<]{s:.1f} seconds[>[` marker (when timing is known), then the start marker, one
    `]<]video[>[` per merged patch of the frame, the end marker. `chunk_grids`: the video's video_grid_thw rows."""
    grid_t = sum(int(g[0]) for g in chunk_grids)
    frame_tokens = int(chunk_grids[0][1]) * int(chunk_grids[0][2]) // merge_size**2
    out = []
    for frame in range(grid_t):
        if timing is not None:
            idx = timing.frame_indices[min(frame * temporal_patch_size, len(timing.frame_indices) - 1)]
            out.append(f"]<]{idx / timing.fps:.1f} seconds[>[")
        out.append(VISION_START_TOKEN + VIDEO_TOKEN * frame_tokens + VISION_END_TOKEN)
    return "".join(out)


_MARKERS = re.compile(f"(?P<image>{re.escape(IMAGE_TOKEN)})|(?P<video>{re.escape(VIDEO_TOKEN)})")


def expand_prompt(text: str, image_grid_thw=None, video_grid_thw=None, num_chunks_per_video=None, *,
                  merge_size: int = 2, temporal_patch_size: int = 2,
                  video_timings: Sequence[VideoTiming | None] | None = None, request: str = "prompt") -> str:
    """Replace the i-th `]<]image[>[` / `]<]video[>[` in `text` by the i-th image's / video's placeholders.

    Grids come from the processors; a video spans `num_chunks_per_video[v]` consecutive video_grid_thw rows
    (one row per video when omitted). Raises ValueError naming `request` when markers and inputs differ in
    number.
    """
    images = [] if image_grid_thw is None else [tuple(int(v) for v in g) for g in np.asarray(image_grid_thw)]
    vrows = [] if video_grid_thw is None else [tuple(int(v) for v in g) for g in np.asarray(video_grid_thw)]
    chunks = list(num_chunks_per_video) if num_chunks_per_video is not None else [1] * len(vrows)
    if sum(chunks) != len(vrows):
        raise ValueError(f"{request}: num_chunks_per_video sums to {sum(chunks)} but video_grid_thw has "
                         f"{len(vrows)} rows")
    starts = np.concatenate([[0], np.cumsum(chunks)]).astype(int)
    videos = [vrows[starts[v]:starts[v + 1]] for v in range(len(chunks))]
    timings = list(video_timings) if video_timings is not None else [None] * len(videos)
    if len(timings) != len(videos):
        raise ValueError(f"{request}: {len(timings)} video timings for {len(videos)} videos")
    n_img = sum(1 for m in _MARKERS.finditer(text) if m.lastgroup == "image")
    n_vid = sum(1 for m in _MARKERS.finditer(text) if m.lastgroup == "video")
    if n_img != len(images) or n_vid != len(videos):
        raise ValueError(f"{request}: the text has {n_img} {IMAGE_TOKEN} and {n_vid} {VIDEO_TOKEN} markers, but "
                         f"{len(images)} images and {len(videos)} videos were given")
    it_img, it_vid = iter(range(len(images))), iter(range(len(videos)))

    def replace(m: re.Match) -> str:
        if m.lastgroup == "image":
            return image_placeholder(images[next(it_img)], merge_size)
        v = next(it_vid)
        return video_placeholder(videos[v], merge_size, temporal_patch_size, timings[v])

    return _MARKERS.sub(replace, text)
