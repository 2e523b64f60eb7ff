"""M3's vision tower, projector and image/video processors (numpy/PIL at run time, no torch).

    proc = m3jax.vision.ImageProcessor.from_pretrained(path)        # proc(images) -> pixel_values, image_grid_thw
    vision = m3jax.vision.VisionModel(VisionConfig.from_pretrained(path), dtype=...)
    m3jax.vision.load_vision_params(vision, tensors)                # release-named tensors
    features = vision(pixel_values, image_grid_thw)                 # [placeholders, text hidden]
    prompt = m3jax.vision.expand_prompt(text, image_grid_thw)       # ]<]image[>[ -> start, placeholders, end
    m3jax.vision.prompt.prepare_prompt({"text": ..., "images": [...]}, tokenizer=..., vision_config=...)
                                                                    # the Engine's multimodal prompts
"""

from m3jax.vision.config import VisionConfig
from m3jax.vision.merge import embed_with_vision, scatter_features
from m3jax.vision.model import VisionGrid, VisionModel, default_attn_impl
from m3jax.vision.prompt import MultimodalPrompt, prepare_prompt
from m3jax.vision.processor import (ImageInputError, ImageProcessor, VideoProcessor, VideoTiming, expand_prompt,
                                    smart_resize)
from m3jax.vision.weights import convert_tensor, expected_tensor_names, is_vision_tensor, load_vision_params

__all__ = ["VisionConfig", "VisionModel", "VisionGrid", "default_attn_impl", "ImageProcessor", "VideoProcessor",
           "VideoTiming", "ImageInputError", "expand_prompt", "smart_resize", "scatter_features",
           "embed_with_vision", "load_vision_params", "convert_tensor", "expected_tensor_names",
           "is_vision_tensor", "MultimodalPrompt", "prepare_prompt"]
