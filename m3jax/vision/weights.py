"""The release's vision and projector tensors -> `VisionModel` parameters (a table, applied by one loader).

27 tensor names (per-layer names counted once): the Conv3d patch embedding, the pre-LayerNorm, 16 per encoder
layer, and 4 + 4 for the two projector MLPs. transformers writes the same names in save_pretrained.
Every tensor matches exactly one rule, every parameter is filled, and all errors are raised together.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m3jax.vision.config import VisionConfig
from m3jax.vision.model import VisionModel

PREFIX = re.compile(r"^(vision_tower|multi_modal_projector|patch_merge_mlp)\.")


class Rule(NamedTuple):
    target: str       # parameter path in VisionModel; "{layer}" = encoder layer (leading axis of the stack)
    layout: str       # how the torch tensor becomes the parameter (see _LAYOUTS)


_LAYER = r"vision_tower\.vision_model\.encoder\.layers\.(\d+)\."
RULES: dict[str, Rule] = {
    r"vision_tower\.vision_model\.embeddings\.patch_embedding\.weight": Rule("tower.embeddings.kernel_xd", "conv:XD"),
    r"vision_tower\.vision_model\.pre_layrnorm\.weight": Rule("tower.pre_layrnorm.weight", "copy"),
    r"vision_tower\.vision_model\.pre_layrnorm\.bias": Rule("tower.pre_layrnorm.bias", "copy"),
    _LAYER + r"layer_norm1\.weight": Rule("tower.encoder.layers.layer_norm1.weight", "copy"),
    _LAYER + r"layer_norm1\.bias": Rule("tower.encoder.layers.layer_norm1.bias", "copy"),
    _LAYER + r"layer_norm2\.weight": Rule("tower.encoder.layers.layer_norm2.weight", "copy"),
    _LAYER + r"layer_norm2\.bias": Rule("tower.encoder.layers.layer_norm2.bias", "copy"),
    _LAYER + r"self_attn\.q_proj\.weight": Rule("tower.encoder.layers.q_dnh", "heads_in:DNH"),
    _LAYER + r"self_attn\.k_proj\.weight": Rule("tower.encoder.layers.k_dnh", "heads_in:DNH"),
    _LAYER + r"self_attn\.v_proj\.weight": Rule("tower.encoder.layers.v_dnh", "heads_in:DNH"),
    _LAYER + r"self_attn\.q_proj\.bias": Rule("tower.encoder.layers.q_bias_nh", "heads:NH"),
    _LAYER + r"self_attn\.k_proj\.bias": Rule("tower.encoder.layers.k_bias_nh", "heads:NH"),
    _LAYER + r"self_attn\.v_proj\.bias": Rule("tower.encoder.layers.v_bias_nh", "heads:NH"),
    _LAYER + r"self_attn\.out_proj\.weight": Rule("tower.encoder.layers.o_nhd", "heads_out:NHD"),
    _LAYER + r"self_attn\.out_proj\.bias": Rule("tower.encoder.layers.o_bias_d", "copy"),
    _LAYER + r"mlp\.fc1\.weight": Rule("tower.encoder.layers.fc1_df", "t"),
    _LAYER + r"mlp\.fc1\.bias": Rule("tower.encoder.layers.fc1_bias_f", "copy"),
    _LAYER + r"mlp\.fc2\.weight": Rule("tower.encoder.layers.fc2_fd", "t"),
    _LAYER + r"mlp\.fc2\.bias": Rule("tower.encoder.layers.fc2_bias_d", "copy"),
    r"multi_modal_projector\.linear_1\.weight": Rule("projector.linear_1_dj", "t"),
    r"multi_modal_projector\.linear_1\.bias": Rule("projector.linear_1_bias_j", "copy"),
    r"multi_modal_projector\.linear_2\.weight": Rule("projector.linear_2_je", "t"),
    r"multi_modal_projector\.linear_2\.bias": Rule("projector.linear_2_bias_e", "copy"),
    r"patch_merge_mlp\.linear_1\.weight": Rule("projector.merge_1_mej", "merge:MEJ"),
    r"patch_merge_mlp\.linear_1\.bias": Rule("projector.merge_1_bias_j", "copy"),
    r"patch_merge_mlp\.linear_2\.weight": Rule("projector.merge_2_je", "t"),
    r"patch_merge_mlp\.linear_2\.bias": Rule("projector.merge_2_bias_e", "copy"),
}
_COMPILED = [(re.compile(k + "$"), rule) for k, rule in RULES.items()]


def _layouts(cfg: VisionConfig) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    n, h, m = cfg.num_attention_heads, cfg.head_dim, cfg.merge_window
    return {
        "copy": lambda w: w,
        "t": lambda w: w.T,                                                        # [out, in] -> [in, out]
        "conv:XD": lambda w: w.reshape(w.shape[0], -1).T,                          # [D, C, T, P, P] -> [X, D]
        "heads_in:DNH": lambda w: w.T.reshape(w.shape[1], n, h),                   # [N*H, D] -> [D, N, H]
        "heads:NH": lambda w: w.reshape(n, h),                                     # [N*H] -> [N, H]
        "heads_out:NHD": lambda w: w.T.reshape(n, h, w.shape[0]),                  # [D, N*H] -> [N, H, D]
        "merge:MEJ": lambda w: w.T.reshape(m, w.shape[1] // m, w.shape[0]),        # [J, M*E] -> [M, E, J]
    }


def _inverse_layouts(cfg: VisionConfig) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Parameter layout -> the release's torch layout (the inverse of `_layouts`)."""
    c, t, p = cfg.num_channels, cfg.temporal_patch_size, cfg.patch_size
    return {
        "copy": lambda w: w,
        "t": lambda w: w.T,
        "conv:XD": lambda w: w.T.reshape(w.shape[1], c, t, p, p),
        "heads_in:DNH": lambda w: w.reshape(w.shape[0], -1).T,
        "heads:NH": lambda w: w.reshape(-1),
        "heads_out:NHD": lambda w: w.reshape(-1, w.shape[-1]).T,
        "merge:MEJ": lambda w: w.reshape(-1, w.shape[-1]).T,
    }


def release_tensors(model: VisionModel):
    """(release name, float32 numpy array) of every vision / projector tensor of `model` (for writers of
    checkpoints; `load_vision_params` reads them back exactly)."""
    cfg = model.config
    flat = {".".join(str(p) for p in path): v for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    inverse = _inverse_layouts(cfg)
    for name in expected_tensor_names(cfg):
        rule, layer = match(name)
        value = np.asarray(jnp.asarray(flat[rule.target][...], jnp.float32))
        yield name, np.ascontiguousarray(inverse[rule.layout](value if layer is None else value[layer]))


def is_vision_tensor(name: str) -> bool:
    return PREFIX.match(name) is not None


def match(name: str) -> tuple[Rule, int | None]:
    """(rule, encoder layer or None) for a release tensor name; KeyError when no rule matches."""
    hits = [(rule, m) for pattern, rule in _COMPILED if (m := pattern.match(name))]
    if len(hits) != 1:
        raise KeyError(f"{name}: matches {len(hits)} vision weight rules (expected exactly 1)")
    rule, m = hits[0]
    return rule, (int(m.group(1)) if m.groups() else None)


def expected_tensor_names(cfg: VisionConfig) -> list[str]:
    """Every vision / projector tensor name a checkpoint for `cfg` holds."""
    names = []
    for pattern in RULES:
        if pattern.startswith(_LAYER):
            tail = pattern[len(_LAYER):].replace("\\", "")
            names += [f"vision_tower.vision_model.encoder.layers.{i}.{tail}" for i in range(cfg.num_hidden_layers)]
        else:
            names.append(pattern.replace("\\", ""))
    return names


class Placement(NamedTuple):
    target: str             # parameter path in VisionModel
    layer: int | None       # slot on the stacked encoder's leading axis, None for unstacked parameters
    value: np.ndarray       # float32, the parameter's layout (one layer's slice when `layer` is set)


def convert_tensor(cfg: VisionConfig, name: str, tensor) -> Placement:
    """One release tensor -> where it goes and its value in the module's layout (float32), for streaming
    loaders. Raises ValueError naming the tensor when no rule matches, the layout does not fit, or the layer
    is out of range; the shape against the parameter is checked by the caller (`load_vision_params`)."""
    try:
        rule, layer = match(name)
    except KeyError as e:
        raise ValueError(str(e).strip("'\"")) from None
    if layer is not None and not 0 <= layer < cfg.num_hidden_layers:
        raise ValueError(f"{name}: layer {layer} out of range (num_hidden_layers={cfg.num_hidden_layers})")
    try:
        value = _layouts(cfg)[rule.layout](np.asarray(tensor, dtype=np.float32))
    except ValueError as e:
        raise ValueError(f"{name}: shape {np.shape(tensor)} does not fit layout {rule.layout}: {e}") from None
    return Placement(rule.target, layer, value)


def load_vision_params(model: VisionModel, tensors: Mapping[str, np.ndarray], sharding=None) -> VisionModel:
    """Fill `model`'s parameters from release-named tensors (numpy, any float dtype), in the model dtype.

    `model` may be abstract (`nnx.eval_shape`); tensors are read one at a time (a lazy mapping streams) and
    staged on the host in the model dtype. sharding: where the parameters go (e.g. replicated on a mesh);
    None: the default device.

    Non-vision names in `tensors` are ignored. Raises ValueError listing every problem: an unmatched vision
    name, a shape that does not fit, a layer out of range, or a parameter (or layer slot) never filled.
    """
    cfg = model.config
    state = nnx.state(model, nnx.Param)
    flat = {".".join(str(p) for p in path): v for path, v in nnx.to_flat_state(state)}
    staged: dict[str, np.ndarray] = {}
    filled: dict[str, set] = {}
    errors: list[str] = []
    for name, tensor in tensors.items():
        if not is_vision_tensor(name):
            continue
        try:
            target, layer, value = convert_tensor(cfg, name, tensor)
        except ValueError as e:
            errors.append(str(e))
            continue
        param = flat.get(target)
        if param is None:
            errors.append(f"{name}: target {target} is not a parameter of VisionModel")
            continue
        want = param.shape[1:] if layer is not None else param.shape
        if value.shape != tuple(want):
            errors.append(f"{name}: shape {np.shape(tensor)} -> {value.shape}, expected {tuple(want)} for {target}")
            continue
        if layer is not None:
            staged.setdefault(target, np.full(param.shape, np.nan, np.dtype(model.dtype)))[layer] = value
            filled.setdefault(target, set()).add(layer)
        else:
            staged[target] = value.astype(np.dtype(model.dtype))
            filled[target] = {None}
    for target, param in flat.items():
        stacked = target.startswith("tower.encoder.layers.")
        want = set(range(cfg.num_hidden_layers)) if stacked else {None}
        missing = want - filled.get(target, set())
        if missing:
            errors.append(f"parameter {target} not filled" + (f" for layers {sorted(missing)}" if stacked else ""))
    if errors:
        raise ValueError("vision weights: " + "; ".join(errors))
    for target, value in staged.items():
        flat[target].set_value(jnp.asarray(value, dtype=model.dtype) if sharding is None
                               else jax.device_put(value, sharding))
        del value
    return model
