"""Test helpers for m3jax.vision: transformers' MiniMax-M3 image/video processors and random tiny VL models.

torchvision's PyPI wheels are built against CUDA torch. Beside torch 2.13.0+cpu, `import torchvision` fails in
`torchvision/_meta_registrations.py`, which registers fake kernels for `torchvision::nms` / `qnms` whose schemas
the (missing) C++ extension would have defined. Once transformers sees torchvision installed, every
`transformers.models.*.modeling_*` import goes through `image_utils`, which imports torchvision, so the
schemas must exist before transformers is first imported: `tests/conftest.py` calls
`define_torchvision_op_schemas()`. Only the pure-Python transforms (`torchvision.transforms.v2.functional`)
are used, which is all transformers' image processors need.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIBRARY = []   # keeps the torch.library.Library alive (the definitions are dropped with it)


def define_torchvision_op_schemas() -> bool:
    """Define `torchvision::nms` / `qnms` when torchvision is installed and its C++ ops did not; True if defined.

    Does nothing (and imports nothing) when torchvision is not installed.
    """
    if importlib.util.find_spec("torchvision") is None or importlib.util.find_spec("torch") is None:
        return False
    import glob
    import os

    import torch

    # Where torchvision's C++ ops load (a matching torch build, e.g. CUDA torch on a GPU host), let them register
    # themselves: defining the schemas first would make their registration abort the process.
    tv_dir = os.path.dirname(importlib.util.find_spec("torchvision").origin)
    for lib_path in glob.glob(os.path.join(tv_dir, "_C*.so")):
        try:
            torch.ops.load_library(lib_path)
            return False
        except (OSError, RuntimeError):
            pass
    missing = [name for name in _SCHEMAS if not _has_op(torch, name)]
    if not missing:
        return False
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for name in missing:
        lib.define(_SCHEMAS[name])
    _LIBRARY.append(lib)
    return True


def _has_op(torch, name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        return True
    except RuntimeError:
        return False


def hf_processors():
    """(MiniMaxM3VLImageProcessor(), MiniMaxM3VLVideoProcessor()) with transformers' defaults."""
    define_torchvision_op_schemas()
    from transformers.models.minimax_m3_vl.image_processing_minimax_m3_vl import MiniMaxM3VLImageProcessor
    from transformers.models.minimax_m3_vl.video_processing_minimax_m3_vl import MiniMaxM3VLVideoProcessor

    return MiniMaxM3VLImageProcessor(), MiniMaxM3VLVideoProcessor()


def vision_config(**overrides) -> dict:
    """A tiny transformers vision_config: head_dim 12 (rope on 3*2*2 = 12 dims, none pass) unless overridden."""
    cfg = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               patch_size=14, temporal_patch_size=2, spatial_merge_size=2, layer_norm_eps=1e-5)
    cfg.update(overrides)
    return cfg


def randomize(model, seed: int, *, norm_scale: float = 0.2):
    """Every weight random (fan-in scaled), every 1-D tensor (biases, LayerNorm gain and shift) non-trivial."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(norm_scale * torch.randn(p.shape, generator=g))
            else:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.LayerNorm):   # gains around 1, so the signal neither dies nor explodes
                module.weight.copy_(1.0 + norm_scale * torch.randn(module.weight.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
    return model


def random_images(seed: int, sizes) -> list[np.ndarray]:
    """uint8 [H, W, 3] images with smooth structure plus noise (so resizing matters), one per (H, W)."""
    rng = np.random.default_rng(seed)
    out = []
    for h, w in sizes:
        yy, xx = np.mgrid[0:h, 0:w]
        base = 127 + 100 * np.sin(yy[..., None] / (3 + rng.random(3) * 7) + xx[..., None] / (4 + rng.random(3) * 9))
        img = np.clip(base + rng.normal(0, 25, size=(h, w, 3)), 0, 255).astype(np.uint8)
        out.append(img)
    return out
