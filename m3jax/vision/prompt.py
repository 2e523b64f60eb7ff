"""Multimodal prompts for the Engine: `{"text", "images", "videos"}` dicts and chat messages with image parts.

    {"text": "]<]image[>[ What is this?", "images": [pil_image_or_array_or_path]}
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
                                  {"type": "text", "text": "What is this?"}]}]          # with chat=True

`prepare_prompt` applies the chat template when asked (the tokenizer's `apply_chat_template`, the renderer that
`m3jax serve` uses: each image_url part becomes the image marker where it stands), runs the processors, expands
each `]<]image[>[` / `]<]video[>[` marker as transformers' MiniMaxM3VLProcessor does (`processor.expand_prompt`),
tokenizes, and checks that the prompt holds exactly one placeholder token per feature row.
`PromptVision.features` runs the tower once per request; the Engine hands the rows to the runner as
input-embedding overrides.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
from typing import Any

import numpy as np

from m3jax.chat import template_arguments
from m3jax.vision.processor import ImageInputError, ImageProcessor, VideoProcessor, expand_prompt

_PROMPT_KEYS = {"text", "images", "videos"}


@dataclasses.dataclass
class MultimodalPrompt:
    """A prepared prompt: its token ids (placeholders expanded) and the processed pixels (None without)."""

    token_ids: list[int]
    pixel_values: np.ndarray | None = None
    image_grid_thw: np.ndarray | None = None
    pixel_values_videos: np.ndarray | None = None
    video_grid_thw: np.ndarray | None = None

    @property
    def has_pixels(self) -> bool:
        return self.pixel_values is not None or self.pixel_values_videos is not None

    def content_spans(self, vision_config) -> list[tuple[int, int, str]]:
        """(first position, end position, sha256 of the pixels and grid) of each image's and each video chunk's
        run of placeholder tokens, in prompt order: what a prefix cache must mix into the key of every block
        that overlaps the run, since the placeholder ids alone are the same for every image of a size."""
        import hashlib

        ids, m, spans = np.asarray(self.token_ids), vision_config.merge_window, []
        for pv, grid, token in ((self.pixel_values, self.image_grid_thw, vision_config.image_token_index),
                                (self.pixel_values_videos, self.video_grid_thw, vision_config.video_token_index)):
            if pv is None:
                continue
            positions = np.flatnonzero(ids == token)
            rows = np.concatenate([[0], np.cumsum(np.asarray(grid).prod(axis=1))])
            tokens = rows // m
            for k, g in enumerate(np.asarray(grid)):
                digest = hashlib.sha256(np.asarray(g, np.int64).tobytes())
                digest.update(np.ascontiguousarray(pv[rows[k]:rows[k + 1]]).tobytes())
                run = positions[tokens[k]:tokens[k + 1]]
                spans.append((int(run[0]), int(run[-1]) + 1, digest.hexdigest()))
        return sorted(spans)

    def cache_salt(self, vision_config) -> bytes:
        """sha256 over `content_spans`: the prefix cache's salt for this prompt (its first block key depends on
        it), so two prompts share cached blocks only when their pixels and placeholder positions are equal."""
        import hashlib

        h = hashlib.sha256(b"m3jax vision")
        for start, end, digest in self.content_spans(vision_config):
            h.update(f"{start}:{end}:{digest};".encode())
        return h.digest()


def is_multimodal(prompt: Any) -> bool:
    """A `{"text", "images", "videos"}` dict, a list of chat messages, or an already prepared prompt."""
    if isinstance(prompt, (dict, MultimodalPrompt)):
        return True
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(isinstance(m, dict) for m in prompt)


def decode_data_url(url: str, what: str):
    """A PIL image from a `data:image/...;base64,...` URL. Remote URLs are refused (nothing is fetched)."""
    import PIL.Image

    if not isinstance(url, str) or not url.startswith("data:"):
        shown = url[:40] if isinstance(url, str) else type(url).__name__
        raise ImageInputError(f"{what}: only data URLs (data:image/...;base64,...) are accepted, got {shown!r}")
    head, sep, data = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise ImageInputError(f"{what}: a data URL must be base64-encoded (data:image/png;base64,...)")
    try:
        raw = base64.b64decode(data, validate=True)
        image = PIL.Image.open(io.BytesIO(raw))
        image.load()
    except (binascii.Error, ValueError, OSError) as e:
        raise ImageInputError(f"{what}: cannot decode the data URL's image: {e}") from e
    return image


def prepare_prompt(prompt, *, tokenizer, vision_config, image_processor: ImageProcessor | None = None,
                   video_processor: VideoProcessor | None = None, chat: bool | dict = False,
                   request: str = "request") -> MultimodalPrompt:
    """Process, expand and tokenize a multimodal prompt (see the module docstring). chat: True or a dict of
    template arguments (m3jax.chat.template_arguments) renders through the tokenizer's chat template (a dict
    prompt's text becomes one user message). Every error is a ValueError naming `request` (bad messages by their
    field; bad images: unreadable, zero-sized, wrong layout; markers and images in different numbers;
    placeholder tokens that do not match the features)."""
    what = f"request {request}"
    if isinstance(prompt, MultimodalPrompt):
        if prompt.has_pixels and vision_config is None:
            raise ValueError(f"{what}: the prompt has images or videos but the model has no vision tower")
        if vision_config is not None:
            check_placeholders(prompt, vision_config, what)
        return prompt
    if tokenizer is None:
        raise ValueError(f"{what}: a multimodal prompt needs a tokenizer (the checkpoint's tokenizer.json)")
    try:
        args = template_arguments(chat)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None
    images, videos = [], []
    try:
        if isinstance(prompt, dict):
            unknown = set(prompt) - _PROMPT_KEYS
            if unknown:
                raise ValueError(f"{what}: unknown prompt keys {sorted(unknown)}; expected {sorted(_PROMPT_KEYS)}")
            text = prompt.get("text")
            if not isinstance(text, str) or not text:
                raise ValueError(f"{what}: prompt 'text' must be a non-empty string")
            images, videos = list(prompt.get("images") or ()), list(prompt.get("videos") or ())
            messages = [{"role": "user", "content": text}] if args is not None else None
            parts = None
        else:
            if args is None:
                raise ValueError(f"{what}: a list of chat messages needs chat=True")
            messages, parts = prompt, []
        if messages is not None:
            # the whole conversation at once, so the i-th marker takes the i-th image in any message
            try:
                text = tokenizer.apply_chat_template(messages, images=parts, **args)
            except ValueError as e:
                raise ValueError(f"{what}: {e}") from None
            images += [decode_data_url(p.url, p.field) for p in parts or ()]
        if (images or videos) and vision_config is None:
            raise ValueError(f"{what}: the prompt has images or videos but the model has no vision tower")
        img = image_processor(images) if images else {}
        vid = video_processor(videos) if videos else {}
    except ImageInputError as e:
        raise ImageInputError(f"{what}: {e}") from e
    merge = vision_config.spatial_merge_size if vision_config is not None else 2
    temporal = vision_config.temporal_patch_size if vision_config is not None else 2
    text = expand_prompt(text, img.get("image_grid_thw"), vid.get("video_grid_thw"), vid.get("num_chunks_per_video"),
                         merge_size=merge, temporal_patch_size=temporal, request=what)
    ids = tokenizer.encode(text)
    out = MultimodalPrompt(ids, img.get("pixel_values"), img.get("image_grid_thw"),
                           vid.get("pixel_values_videos"), vid.get("video_grid_thw"))
    if vision_config is not None:
        check_placeholders(out, vision_config, what)
    return out


def check_placeholders(p: MultimodalPrompt, vision_config, what: str) -> None:
    """One placeholder token per feature row, for images and for videos; ValueError naming `what` otherwise."""
    ids = np.asarray(p.token_ids)
    m = vision_config.merge_window
    for kind, grid, token in (("image", p.image_grid_thw, vision_config.image_token_index),
                              ("video", p.video_grid_thw, vision_config.video_token_index)):
        features = 0 if grid is None else int(np.asarray(grid).prod(axis=1).sum()) // m
        placeholders = int((ids == token).sum())
        if placeholders != features:
            raise ValueError(f"{what}: the prompt has {placeholders} {kind} placeholder tokens (id {token}) but its "
                             f"{kind}s give {features} feature rows" +
                             ("; is the marker a single token in the tokenizer?" if placeholders < features else ""))


@dataclasses.dataclass
class PromptVision:
    """A running request's pixels; `features` runs the tower once and keeps the rows on the host."""

    prompt: MultimodalPrompt
    positions: np.ndarray | None = None       # placeholder positions, images then videos (as `values`)
    values: np.ndarray | None = None          # [n, hidden] in the model dtype

    def features(self, vision) -> tuple[np.ndarray, np.ndarray]:
        if self.values is None:
            p, cfg, ids = self.prompt, vision.config, np.asarray(self.prompt.token_ids)
            positions, values = [], []
            for pv, grid, token in ((p.pixel_values, p.image_grid_thw, cfg.image_token_index),
                                    (p.pixel_values_videos, p.video_grid_thw, cfg.video_token_index)):
                if pv is None:
                    continue
                positions.append(np.flatnonzero(ids == token))
                values.append(np.asarray(vision(pv, grid)))
            self.positions = np.concatenate(positions)
            order = np.argsort(self.positions, kind="stable")
            self.positions, self.values = self.positions[order], np.concatenate(values)[order]
        return self.positions, self.values
