"""VisionConfig: the typed configuration of M3's vision tower and projector.

`VisionConfig.from_hf` is the only place where the release's and transformers' vision key names appear
(`vision_config`, `img_token_compression_config`, `rope_parameters` / `rope_theta`, `projector_hidden_size`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from m3jax.config import ConfigError

_MISSING = object()


@dataclasses.dataclass(frozen=True, slots=True)
class VisionConfig:
    """The ViT, the per-patch projector and the 2x2 merge MLP. Defaults are the released model."""

    hidden_size: int = 1280               # D
    intermediate_size: int = 5120         # F
    num_hidden_layers: int = 32
    num_attention_heads: int = 16         # N; head_dim H = D / N
    num_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    layer_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    projector_hidden_size: int = 6144     # J: width of both projector MLPs
    text_hidden_size: int = 6144          # E: the text model's hidden size (the projector's output)
    image_token_index: int = 200025
    video_token_index: int = 200026

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_channels", "patch_size", "temporal_patch_size", "spatial_merge_size",
                     "projector_hidden_size", "text_hidden_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"vision_config.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"vision_config.hidden_size={self.hidden_size} must be divisible by "
                              f"num_attention_heads={self.num_attention_heads}")
        if self.rope_axis_dim < 2:
            raise ConfigError(f"vision head_dim={self.head_dim} is too small for 3D RoPE (needs >= 6)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rope_axis_dim(self) -> int:
        """Channels per axis (t, h, w) of the 3D RoPE: 2 * ((head_dim // 3) // 2); 26 for head_dim 80."""
        return 2 * ((self.head_dim // 3) // 2)

    @property
    def rotary_dim(self) -> int:
        """Rotated channels at the front of each head (78 of 80 for the release); the rest pass through."""
        return 3 * self.rope_axis_dim

    @property
    def patch_dim(self) -> int:
        """X: values per flattened patch, C * T * P * P (1176)."""
        return self.num_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merge_window(self) -> int:
        """M: patches merged into one text token (4)."""
        return self.spatial_merge_size ** 2

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> "VisionConfig":
        """From a VL config.json dict (the release's or one transformers wrote). Raises ConfigError when there
        is no `vision_config` or when its keys contradict each other."""
        v = d.get("vision_config")
        if not isinstance(v, Mapping):
            raise ConfigError("config.json has no vision_config: this checkpoint has no vision tower")
        text = d.get("text_config") or {}
        compression = v.get("img_token_compression_config") or d.get("img_token_compression_config") or {}
        rope = v.get("rope_parameters") or {}
        if rope.get("rope_type", "axial") != "axial":
            raise ConfigError(f"vision_config.rope_parameters.rope_type must be 'axial', got {rope['rope_type']!r}")
        act = v.get("hidden_act", "gelu")
        if act != "gelu":
            raise ConfigError(f"vision_config.hidden_act must be 'gelu' (exact erf GELU), got {act!r}")
        if (pos := v.get("position_embedding_type", "rope")) != "rope":
            raise ConfigError(f"vision_config.position_embedding_type must be 'rope', got {pos!r}")

        def one(name: str, *sources: tuple[Mapping, str], default):
            values = {src[key] for src, key in sources if key in src}
            if len(values) > 1:
                raise ConfigError(f"vision config: {name} is given with different values {sorted(values)}")
            return values.pop() if values else default

        f = {fl.name: fl.default for fl in dataclasses.fields(cls)}
        text_hidden = text.get("hidden_size", d.get("hidden_size", f["text_hidden_size"]))
        return cls(
            hidden_size=int(v.get("hidden_size", f["hidden_size"])),
            intermediate_size=int(v.get("intermediate_size", f["intermediate_size"])),
            num_hidden_layers=int(v.get("num_hidden_layers", f["num_hidden_layers"])),
            num_attention_heads=int(v.get("num_attention_heads", f["num_attention_heads"])),
            num_channels=int(v.get("num_channels", f["num_channels"])),
            patch_size=int(v.get("patch_size", f["patch_size"])),
            temporal_patch_size=int(one("temporal_patch_size", (v, "temporal_patch_size"),
                                        (compression, "temporal_patch_size"), default=f["temporal_patch_size"])),
            spatial_merge_size=int(one("spatial_merge_size", (v, "spatial_merge_size"),
                                       (compression, "spatial_merge_size"), default=f["spatial_merge_size"])),
            layer_norm_eps=float(v.get("layer_norm_eps", f["layer_norm_eps"])),
            rope_theta=float(one("rope_theta", (v, "rope_theta"), (rope, "rope_theta"), default=f["rope_theta"])),
            projector_hidden_size=int(d.get("projector_hidden_size", f["projector_hidden_size"])),
            text_hidden_size=int(text_hidden),
            image_token_index=int(d.get("image_token_index", d.get("image_token_id", f["image_token_index"]))),
            video_token_index=int(d.get("video_token_index", d.get("video_token_id", f["video_token_index"]))),
        )

    @classmethod
    def of_checkpoint(cls, path: str | os.PathLike) -> "VisionConfig | None":
        """The vision config of a checkpoint directory, or None when its config.json has no vision_config."""
        p = os.path.join(os.fspath(path), "config.json")
        try:
            with open(p) as fh:
                d = json.load(fh)
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read {p}: {e}") from e
        return cls.from_hf(d) if isinstance(d.get("vision_config"), Mapping) else None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | Mapping[str, Any]) -> "VisionConfig":
        """From a checkpoint directory (its config.json), a config.json path, or a dict."""
        if isinstance(path, Mapping):
            return cls.from_hf(path)
        p = os.fspath(path)
        if os.path.isdir(p):
            p = os.path.join(p, "config.json")
        try:
            with open(p) as fh:
                return cls.from_hf(json.load(fh))
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read {p}: {e}") from e
