"""The public entry points: load() a checkpoint into an M3ForCausalLM."""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
from flax import nnx

from m3jax import sharding
from m3jax.config import M3Config
from m3jax.model import M3ForCausalLM
from m3jax.params import abstract_params, flat_params, remake_model
from m3jax.vision.config import VisionConfig

log = logging.getLogger(__name__)
_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}


def _dtype(dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        return jnp.dtype(_DTYPES[dtype])
    return jnp.dtype(dtype)


def load(path: str | os.PathLike, dtype="bfloat16", mesh: jax.sharding.Mesh | None = None,
         attn_impl: str | None = None, progress: bool = True,
         shardings=None, fp8_experts: bool = False, verify: bool = True) -> M3ForCausalLM:
    """Load a checkpoint directory into an M3ForCausalLM, placed (sharded) as it is read.

    path: an HF release dir (BF16/FP32 or MXFP8 safetensors, single file or sharded with an index json) or a
        dir written by `m3jax convert` (Orbax pieces); both stream: no host ever holds the whole model.
    dtype: parameter and activation dtype ("bfloat16" or "float32"); the MoE router stays float32.
    mesh: a ("data", "model") mesh; parameters are placed on it by `m3jax.sharding` rules (heads on "model", KV
        heads replicated when "model" > num_key_value_heads, experts over every device, vocabulary split) and
        the MoE runs expert-parallel. `shardings` (param path -> NamedSharding / PartitionSpec, or a callable
        (path, shape) -> one of them or None) overrides the rules. Without a mesh, everything goes to the first
        device. The vision tower of a VL checkpoint (config.json with a vision_config) is loaded too, as
        `model.vision`, replicated (about 0.9B parameters for the release).
    attn_impl: attention implementation (see pallas_kernels.dispatch); None picks the backend's default.
    fp8_experts: keep the routed experts of an MXFP8 release in MXFP8 on the devices (about half the bytes of
        bf16), dequantised per layer inside the step (see m3jax.model.moe.MoE). A release whose experts are not
        MXFP8 raises; a converted dir must have been converted with the same choice (`m3jax convert
        --fp8-experts`).
    verify: check a converted dir's pieces against the checksums in its manifest before reading them (a changed
        byte raises CheckpointError naming the piece); False skips it (`--no-verify`). Releases are not checksummed.

    The returned model records `model.checkpoint_dir = path`, where the Engine finds the tokenizer.
    """
    from convert import loader, orbax_io, placement     # `import m3jax` loads no converter code: lazy

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"checkpoint {path} is not a directory (pass the directory holding config.json)")
    cfg = M3Config.from_pretrained(path)
    replicas = 1
    if mesh is not None:
        sharding.check_mesh(mesh)
        replicas = sharding.kv_replication(cfg, mesh)
        if replicas > 1:      # read the KV-head weights replicated, then copy each head `replicas` times
            shardings = _replicated_kv_first(shardings)
    graphdef, treedef, paths, targets = abstract_params(cfg, _dtype(dtype), attn_impl, mesh, fp8_experts)
    resolved = placement.resolve_shardings({p: s for p, (s, _) in targets.items()}, mesh, shardings)
    if orbax_io.is_converted(path):
        arrays = orbax_io.restore(path, targets, resolved, progress=progress, verify=verify)
    else:
        arrays = loader.load_release(path, cfg, targets, resolved, progress=progress)
    if replicas > 1:
        graphdef, treedef, paths, arrays = _replicate_kv_heads(cfg, replicas, arrays, mesh, _dtype(dtype), attn_impl,
                                                               fp8_experts)
    model = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, [arrays[p] for p in paths]))
    if (vision_cfg := VisionConfig.of_checkpoint(path)) is not None:     # a VL checkpoint: its vision tower too
        model.vision = loader.load_vision(path, vision_cfg, _dtype(dtype), mesh)
    model.checkpoint_dir = path          # the Engine's default tokenizer and image processor come from it
    return model


def _replicated_kv_first(shardings):
    """Shardings that read KV-head parameters whole (replicated) and leave the rest to `shardings`."""
    def pick(path, shape):
        if sharding.KV_HEAD_PARAMS.search(path):
            return jax.sharding.PartitionSpec()
        if callable(shardings):
            return shardings(path, shape)
        return None if shardings is None else shardings.get(path)
    return pick


def _replicate_kv_heads(cfg: M3Config, replicas: int, arrays, mesh, dtype, attn_impl, fp8_experts: bool):
    """Each KV head copied `replicas` times along its head axis, then split over "model" by the rules.

    The KV-head weights are small (k, v and index-q projections: D x K x H per layer), so they are read whole
    and expanded on device; the model becomes the same model with K * replicas KV heads (sharding.replicate_kv).
    """
    rcfg = sharding.replicate_kv(cfg, replicas)
    graphdef, treedef, paths, targets = abstract_params(rcfg, dtype, attn_impl, mesh, fp8_experts)
    out = dict(arrays)
    for path, (shape, _) in targets.items():
        if sharding.KV_HEAD_PARAMS.search(path):
            target = jax.sharding.NamedSharding(mesh, sharding.param_spec(path, shape, mesh))
            out[path] = jax.jit(lambda a: sharding.replicate_kv_param(path, a, replicas),
                                out_shardings=target)(arrays[path])
    return graphdef, treedef, paths, out


def quantize_experts(model: M3ForCausalLM) -> M3ForCausalLM:
    """The same model with its routed experts quantised to MXFP8 and held that way (`fp8_experts=True`), on the
    devices and shardings the model has.

    Lossy (E4M3 with one power-of-two scale per 32 inputs, `m3jax.model.layers.quantize_mxfp8`): for a BF16
    checkpoint or for benchmarks. An MXFP8 release loads exactly with `load(path, fp8_experts=True)` instead.
    """
    from m3jax.model.layers import quantize_mxfp8
    from m3jax.model.moe import fp8_scale_path

    if model.fp8_experts:
        return model
    params = flat_params(model)
    quantize = jax.jit(quantize_mxfp8)
    for path in list(params):
        if (scale := fp8_scale_path(path)) is not None:
            params[path], params[scale] = quantize(params[path])
    return remake_model(model, params, fp8_experts=True)


def default_model_path() -> str:
    """The bundled trained model, shipped inside the package (m3jax/data/default_model, release layout: bf16
    safetensors, config.json, tokenizer.json): a 15.9M-parameter M3 (MSA + MoE) trained on the Python standard
    library by benchmarks/train_default.py (quality: benchmarks/RESULTS.md). `m3jax generate`, `m3jax serve`
    and `make demo` use it when no --model is given."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "default_model")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"the bundled default model is missing from {path} (an install without the "
                                f"package data?): pass --model, or reinstall m3jax")
    return path


def bundled_tiny_checkpoint() -> str:
    """A tiny random-weight test model (seed 0, bfloat16; not trained), written in the release format under
    $M3JAX_CACHE or ~/.cache/m3jax on first use: the tests' model (the default model is default_model_path())."""
    from m3jax.testing import make_tiny_checkpoint

    path = bundled_tiny_path()
    if not os.path.exists(os.path.join(path, "config.json")):
        # Several processes may ask at once (pytest workers, servers): each writes its own copy beside the cache
        # dir and renames it into place; the first rename wins and the others drop theirs.
        tmp = f"{path}.tmp-{os.getpid()}"
        if os.path.exists(tmp):
            import shutil
            shutil.rmtree(tmp)
        make_tiny_checkpoint(tmp, seed=0)
        try:
            os.rename(tmp, path)
        except OSError:
            if not os.path.exists(os.path.join(path, "config.json")):
                raise
            import shutil
            shutil.rmtree(tmp)
    return path


def bundled_tiny_path() -> str:
    """Where bundled_tiny_checkpoint() keeps the demo model (it may not be written yet)."""
    root = os.environ.get("M3JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "m3jax"))
    return os.path.join(root, "tiny-seed0-v2")           # v2: weights drawn with numpy (testing.random_params)
