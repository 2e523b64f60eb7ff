"""Test helpers: random-weight models and tiny HF-release-format checkpoints for tests, demos and notebooks.

`make_tiny_checkpoint` writes exactly what a user downloads from `MiniMaxAI/MiniMax-M3` (VL wrapper
config.json with the released key spellings, `language_model.model.layers.N...` tensor names, per-expert
w1/w2/w3, float32 router, optional MXFP8 quantisation and sharding with an index json) plus a byte-level
tokenizer.json, for a model small enough for CPU tests with every feature live: dense and MSA layers, MoE,
blocks of 8 tokens and top-3 selection so that a 200-token prompt attends to a strict subset of blocks.
The release format itself is written by `convert.release` (imported when a checkpoint is written, so that
`import m3jax` loads no converter code).
"""

from __future__ import annotations

import os
import shutil
import uuid

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m3jax.config import M3Config
from m3jax.model import M3ForCausalLM
from m3jax.params import abstract_params
from m3jax.tokenizer import BOS, EOT, ROLE, write_byte_level_tokenizer

# What make_tiny_checkpoint writes (and all it may replace with overwrite=True).
CHECKPOINT_FILES = ("config.json", "tokenizer.json", "model.safetensors.index.json", "preprocessor_config.json")


def random_params(cfg: M3Config, seed: int = 0) -> dict[str, np.ndarray]:
    """{dotted param path: float32 numpy array} of random weights, norms and router biases (all live, none at
    their neutral init). Drawn with numpy, leaf by leaf from (seed, leaf index): no jax program is compiled, so a
    tiny checkpoint takes well under a second (jax.random compiled one program per shape: 10-20 s)."""
    _, _, paths, targets = abstract_params(cfg, jnp.float32)
    out = {}
    for i, name in enumerate(paths):
        shape = targets[name][0]
        normal = np.random.default_rng([seed, i]).standard_normal(shape, dtype=np.float32)
        if name.endswith("weight"):            # norms: (1 + w) with w around 0
            v = 0.2 * normal
        elif name.endswith("router_bias_e"):
            v = 0.05 * normal
        elif len(shape) >= 2:                   # 1/sqrt(fan_in) so activations keep unit scale
            fan_in = shape[-3] if name.endswith(("q_dnh", "k_dkh", "v_dkh", "index_q_dki")) else shape[-2]
            if name.endswith("o_nhd"):
                fan_in = shape[-3] * shape[-2]
            v = normal / np.float32(np.sqrt(fan_in))
        else:
            raise ValueError(f"random_params: no initialisation rule for parameter {name} {list(shape)}")
        out[name] = v.astype(np.float32)
    return out


def random_model(cfg: M3Config, seed: int = 0, dtype=jnp.float32, attn_impl: str | None = None) -> M3ForCausalLM:
    """A model with the weights of `random_params(cfg, seed)` (the router stays float32, the rest in `dtype`);
    `make_tiny_checkpoint(path, seed)` writes the same weights. attn_impl: the kernels (default: the backend's)."""
    graphdef, treedef, paths, targets = abstract_params(cfg, dtype, attn_impl)
    params = random_params(cfg, seed)
    leaves = [jnp.asarray(params[p], dtype=targets[p][1]) for p in paths]
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves))


def _check_replaceable(path: str, overwrite: bool) -> None:
    """Refuse to write over anything but an empty directory, or (with overwrite) a checkpoint that holds only what
    make_tiny_checkpoint writes: never delete a user's other files."""
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path) or os.path.islink(path):
        raise FileExistsError(f"{path} exists and is not a directory; choose another destination")
    names = sorted(os.listdir(path))
    if not names:
        return
    if not overwrite:
        raise FileExistsError(f"{path} already exists and is not empty (pass --overwrite / overwrite=True to "
                              f"replace a checkpoint there)")
    others = [n for n in names if not os.path.isfile(os.path.join(path, n))
              or (n not in CHECKPOINT_FILES and not n.endswith(".safetensors"))]
    if "config.json" not in names or not any(n.endswith(".safetensors") for n in names) or others:
        why = f"it holds {others[0]!r}" if others else "it has no config.json and safetensors"
        raise FileExistsError(f"{path} does not look like a checkpoint ({why}); refusing to replace it")


def make_tiny_checkpoint(path: str | os.PathLike, seed: int = 0, quant: str | None = None, num_shards: int = 1,
                         dtype: str = "bfloat16", vision: bool = False, *, overwrite: bool = False,
                         **config_overrides) -> str:
    """Write a tiny HF-release-format checkpoint (config, safetensors, tokenizer) to `path`; returns `path`.

    vision: also a tiny vision tower and projector (`write_tiny_vision`), as a VL release holds them.
    config_overrides go to `M3Config.tiny` (e.g. num_hidden_layers=4, block_size=16, topk_blocks=2).
    `path` must not exist or be an empty directory; overwrite=True also replaces a checkpoint there (a directory
    holding only config.json, safetensors and tokenizer files; anything else is refused). The directory is
    assembled under a temporary name and renamed when complete; files and directories get the umask's mode.
    """
    from convert import release

    if quant not in (None, "mxfp8"):
        raise ValueError(f"quant must be None or 'mxfp8', got {quant!r}")
    if dtype not in release.DTYPES:
        raise ValueError(f"dtype must be one of {sorted(release.DTYPES)}, got {dtype!r}")
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    cfg = M3Config.tiny(**config_overrides)
    if cfg.vocab_size < 259:
        raise ValueError(f"vocab_size must be >= 259 for the byte-level tokenizer, got {cfg.vocab_size}")
    path = os.path.abspath(os.fspath(path))
    _check_replaceable(path, overwrite)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{tag}")
    old = os.path.join(parent, f".{os.path.basename(path)}.old-{tag}")
    try:
        os.mkdir(tmp)                           # mode 0o777 & ~umask (mkdtemp would make it 0700)
        release.write_release(tmp, cfg, random_params(cfg, seed), dtype, quant, num_shards)
        write_byte_level_tokenizer(os.path.join(tmp, "tokenizer.json"))
        if vision:
            write_tiny_vision(tmp, cfg, seed, dtype)
        if os.path.isdir(path):                 # checked above: empty, or a checkpoint we may replace
            os.rename(path, old)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.isdir(old) and not os.path.exists(path):
            os.rename(old, path)                # put the old checkpoint back
        raise
    shutil.rmtree(old, ignore_errors=True)
    return path


TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   projector_hidden_size=48)
# Small images stay small: at most 16 placeholder tokens per image (64 patches of 14 x 14).
TINY_PREPROCESSOR = {"min_pixels": 4 * 28 * 28, "max_pixels": 16 * 28 * 28, "patch_size": 14,
                     "temporal_patch_size": 2, "merge_size": 2, "resample": 3}


def random_vision_model(vision_cfg, seed: int = 0, dtype=jnp.float32):
    """A VisionModel with random weights: matrices 1/sqrt(fan_in), LayerNorm gains around 1, biases around 0."""
    from m3jax.vision import VisionModel

    model = VisionModel(vision_cfg, dtype=dtype, rngs=nnx.Rngs(seed))
    key = jax.random.key(seed + 7)
    for i, (path, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.Param))):
        name, k, v = ".".join(map(str, path)), jax.random.fold_in(key, i), var[...]
        noise = jax.random.normal(k, v.shape, jnp.float32)
        if "layer_norm" in name or "layrnorm" in name:
            v = (1.0 if name.endswith("weight") else 0.0) + 0.2 * noise
        elif "bias" in name:
            v = 0.2 * noise
        else:   # the input axes: all but the last (head-major outputs: the first only)
            fan_in = int(np.prod(v.shape[:-1])) if name.endswith(("_nhd", "_mej", "_xd", "_df", "_fd", "_dj",
                                                                     "_je")) else v.shape[-3]
            fan_in = v.shape[-3] if name.endswith("_dnh") else fan_in
            v = noise / np.sqrt(fan_in)
        var.set_value(jnp.asarray(v, dtype))
    return model


def write_tiny_vision(path: str, cfg: M3Config, seed: int = 0, dtype: str = "bfloat16") -> None:
    """Add a tiny vision tower to the release-format checkpoint being assembled in `path`: its tensors (one
    more safetensors file, listed in the index when there is one), vision_config and the image / video token
    ids in config.json, the image markers as special tokens in tokenizer.json, and a preprocessor_config.json."""
    import json

    from convert import release
    from convert.safetensors_io import DTYPES as ST_DTYPES, write_file
    from m3jax.vision import VisionConfig, processor
    from m3jax.vision.weights import release_tensors

    specials = [BOS, EOT, ROLE, processor.IMAGE_TOKEN, processor.VIDEO_TOKEN, processor.VISION_START_TOKEN,
                processor.VISION_END_TOKEN]
    ids = write_byte_level_tokenizer(os.path.join(path, "tokenizer.json"), specials)
    image_id, video_id = ids[processor.IMAGE_TOKEN], ids[processor.VIDEO_TOKEN]
    if max(ids.values()) >= cfg.vocab_size:
        raise ValueError(f"vocab_size must be > {max(ids.values())} for the vision special tokens")
    vision_json = dict(TINY_VISION, patch_size=14, temporal_patch_size=2, spatial_merge_size=2, hidden_act="gelu",
                       layer_norm_eps=1e-5, num_channels=3)
    wrapper = {"vision_config": {k: v for k, v in vision_json.items() if k != "projector_hidden_size"},
               "projector_hidden_size": TINY_VISION["projector_hidden_size"], "image_token_index": image_id,
               "video_token_index": video_id, "text_config": {"hidden_size": cfg.hidden_size}}
    vision = random_vision_model(VisionConfig.from_hf(wrapper), seed)
    st = ST_DTYPES[release.DTYPES[dtype]]
    tensors = {name: w.astype(st) for name, w in release_tensors(vision)}
    write_file(os.path.join(path, "model-vision.safetensors"), tensors, {"format": "pt"})
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            d = json.load(f)
        d["weight_map"].update({name: "model-vision.safetensors" for name in tensors})
        d["metadata"]["total_size"] += sum(a.nbytes for a in tensors.values())
        with open(index, "w") as f:
            json.dump(d, f)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config.update({k: v for k, v in wrapper.items() if k != "text_config"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump(TINY_PREPROCESSOR, f, indent=2)
