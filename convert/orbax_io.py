"""The converted format: Orbax checkpoints of parameter pieces, written streaming and restored onto any mesh.

Layout of a converted directory:

    DST/config.json             the source config.json without quantization_config (weights are dequantised,
                                except routed experts kept in MXFP8 with fp8_experts)
    DST/tokenizer.json ...      tokenizer / chat-template / generation files copied from the source
    DST/m3jax_checkpoint.json   format, dtype, fp8_experts, source, and per parameter: shape, dtype, pieces
                                (group, key, box); with fp8_experts the routed experts are stored as released
                                (e4m3 + uint8 exponents as parameters of their own, see MoE), the rest dequantised
    DST/params/gNNNNN/          Orbax (StandardCheckpointer) checkpoints of {key: piece} trees

A piece is a box of one parameter cut along its leading axes (layers; then rows of the released tensors, so
reads stay contiguous; the expert axis is never cut, so expert-parallel restores read only their experts). It
is stored in the released axis order (`stored_perm`: [out, in] matrices are not transposed on the host, which
was half of the converter's CPU time) and transposed on device after the restore. The
converter reads at most `group_bytes` of pieces, saves them as one Orbax checkpoint and frees them, so host
memory stays near `group_bytes` whatever the model size; it needs no accelerator. `restore` reads each group
with the pieces' target shardings (every device reads only its slice from Orbax/TensorStore) and assembles the
full parameters on device (`convert.placement.Assembler`), on any mesh. The whole directory is written under a
temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from convert import loader, placement
from convert.safetensors_io import CheckpointError
from convert.source import ReleaseCheckpoint, describe, raise_problems
from m3jax.config import M3Config

log = logging.getLogger(__name__)
FORMAT, VERSION = "m3jax-orbax", 1
META = "m3jax_checkpoint.json"
PIECE_BYTES = 128 << 20
GROUP_BYTES = 256 << 20
EXTRA_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
               "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json", "generation_config.json",
               "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")
_DTYPES = ("bfloat16", "float32")


def is_converted(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META))


def _checkpointer():
    import orbax.checkpoint as ocp
    return ocp.StandardCheckpointer()


def _pytree_save(tree):
    import orbax.checkpoint as ocp
    return ocp.args.PyTreeSave(tree)


def _writer(compress: bool):
    """An async PyTree checkpointer: save() returns once Orbax holds its copy, the write overlaps our reads."""
    import orbax.checkpoint as ocp
    try:        # one TensorStore array per piece (no OCDBT database: 2-4x faster to write, same restore API)
        handler = ocp.PyTreeCheckpointHandler(use_compression=compress, use_ocdbt=False)
    except TypeError:                                  # an Orbax without these options
        handler = ocp.PyTreeCheckpointHandler()
    return ocp.AsyncCheckpointer(handler)


def convert_pieces(ckpt: ReleaseCheckpoint, piece_bytes: int):
    """(path, box) of every piece (see `Leaf.cut_axes`), each at most `piece_bytes` where possible."""
    for path, leaf in ckpt.leaves.items():
        for box in placement.leading_pieces(leaf.shape, leaf.dtype.itemsize, piece_bytes, leaf.cut_axes()):
            yield path, box


def _clean_config(src: str) -> dict:
    with open(os.path.join(src, "config.json")) as f:
        d = json.load(f)
    d.pop("quantization_config", None)
    if isinstance(d.get("text_config"), dict):
        d["text_config"].pop("quantization_config", None)
    return d


def convert(src: str, dst: str, dtype: str = "bfloat16", *, overwrite: bool = False, progress: bool = True,
            piece_bytes: int = PIECE_BYTES, group_bytes: int = GROUP_BYTES, compress: bool = False,
            fp8_experts: bool = False) -> dict:
    """Convert the release checkpoint `src` to the converted format at `dst`; returns a summary dict.

    piece_bytes / group_bytes bound host memory (about 2 groups + 2 pieces: one group is written while the
    next is read); compress: zstd in Orbax (~30 % smaller for bf16 weights, CPU-bound on small hosts);
    fp8_experts: keep an MXFP8 release's routed experts in MXFP8 (load with `fp8_experts=True`)."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    src, dst = os.path.abspath(os.fspath(src)), os.path.abspath(os.fspath(dst))
    if not os.path.isdir(src):
        raise FileNotFoundError(f"source checkpoint directory {src} does not exist")
    if os.path.exists(dst) and not overwrite:
        raise FileExistsError(f"destination {dst} already exists (pass --overwrite to replace it)")
    if is_converted(src):
        raise ValueError(f"{src} is already a converted m3jax checkpoint")
    t0 = time.perf_counter()
    cfg = M3Config.from_pretrained(src)
    _, _, _, targets = placement.abstract_params(cfg, jnp.dtype(dtype), fp8_experts=fp8_experts)
    scales = loader.fp8_scale_paths(targets)
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    with ReleaseCheckpoint(src, {p: t for p, t in targets.items() if p not in scales.values()}, cfg) as ckpt:
        loader.check_fp8_experts(ckpt, scales, src)
        log.info("converting %s: %s", src, describe(ckpt.tensors))
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
        try:
            meta = _write_params(ckpt, tmp, dtype, progress, piece_bytes, group_bytes, compress, scales, targets)
            meta["source"] = {"path": src, "quant_method": (cfg.quantization or {}).get("quant_method"),
                              "tensors": len(ckpt.tensors), "bytes": sum(t.nbytes for t in ckpt.tensors.values())}
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(_clean_config(src), f, indent=2)
            for name in EXTRA_FILES:
                if os.path.isfile(os.path.join(src, name)):
                    shutil.copy2(os.path.join(src, name), os.path.join(tmp, name))
            with open(os.path.join(tmp, META), "w") as f:
                json.dump(meta, f, indent=1)
            _replace_dir(tmp, dst, overwrite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    summary = dict(meta["source"], seconds=time.perf_counter() - t0, dst=dst, groups=len(meta["groups"]))
    log.info("converted %s -> %s in %.1f s", src, dst, summary["seconds"])
    return summary


def _replace_dir(tmp: str, dst: str, overwrite: bool) -> None:
    if not os.path.exists(dst):
        os.replace(tmp, dst)
        return
    if not overwrite:
        raise FileExistsError(f"destination {dst} already exists (pass --overwrite to replace it)")
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-", dir=os.path.dirname(dst))
    os.rmdir(old)
    os.replace(dst, old)
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.unlink(old)


class _NoOcdbtMergeWarning(logging.Filter):
    """Orbax warns on every non-OCDBT save ("Skipping merge of OCDBT checkpoints"); expected here."""

    def filter(self, record):
        return "Skipping merge of OCDBT" not in record.getMessage()


_ABSL_FILTER = _NoOcdbtMergeWarning()


def _write_params(ckpt: ReleaseCheckpoint, out: str, dtype: str, progress: bool, piece_bytes: int,
                  group_bytes: int, compress: bool, scales: Mapping[str, str], targets) -> dict:
    params = {p: {"shape": list(leaf.shape), "dtype": str(leaf.dtype), "stored_perm": list(leaf.stored_perm),
                  "pieces": []} for p, leaf in ckpt.leaves.items()}
    for p, sp in scales.items():
        params[sp] = {"shape": list(targets[sp][0]), "dtype": str(np.dtype(targets[sp][1])),
                      "stored_perm": list(ckpt.leaves[p].stored_perm), "pieces": []}
    groups: list[str] = []
    pending: dict[str, np.ndarray] = {}
    pending_bytes = 0
    ckptr = _writer(compress)
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:                                 # JAX_PLATFORMS without cpu: Orbax saves numpy too
        cpu = None
    logging.getLogger("absl").addFilter(_ABSL_FILTER)
    total = sum(ckpt.source_bytes(p) for p in ckpt.leaves)

    def flush():
        nonlocal pending, pending_bytes
        if pending:
            name = f"g{len(groups):05d}"
            ckptr.wait_until_finished()                  # the previous group is on disk
            ckptr.save(os.path.join(out, "params", name), args=_pytree_save(pending))
            groups.append(name)
            pending, pending_bytes = {}, 0

    os.makedirs(os.path.join(out, "params"))
    try:
        with tqdm(total=total, unit="B", unit_scale=True, desc="converting", disable=not progress) as bar:
            for path, box in convert_pieces(ckpt, piece_bytes):
                leaf = ckpt.leaves[path]
                if path in scales:                       # MXFP8 as released: the bytes and their exponents
                    w, s = ckpt.read_box_fp8(path, box)
                    axis = len(box) - 2
                    sbox = box[:axis] + ((0, targets[scales[path]][0][axis]),) + box[axis + 1:]
                    items = [(path, box, w), (scales[path], sbox, s)]
                else:
                    items = [(path, box, ckpt.read_box(path, box, stored=True))]
                for p, b, arr in items:
                    if cpu is not None:
                        arr = jax.device_put(arr, cpu)   # Orbax writes jax arrays faster than numpy
                    key = f"p{sum(len(v['pieces']) for v in params.values()):06d}"
                    params[p]["pieces"].append({"group": f"g{len(groups):05d}", "key": key,
                                                "box": [list(x) for x in b]})
                    pending[key] = arr
                    pending_bytes += arr.nbytes
                bar.update(ckpt.source_bytes(path) * placement.box_size(box) // math.prod(leaf.shape))
                if pending_bytes >= group_bytes:
                    flush()
            flush()
            ckptr.wait_until_finished()
    finally:
        ckptr.close()
    return {"format": FORMAT, "version": VERSION, "dtype": dtype, "fp8_experts": bool(scales), "params": params,
            "groups": groups}


def read_meta(path: str) -> dict:
    file = os.path.join(path, META)
    try:
        with open(file) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: not a readable m3jax checkpoint description ({e})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{file}: format {meta.get('format')!r} version {meta.get('version')!r}, expected "
                              f"{FORMAT!r} version {VERSION}")
    return meta


def _check_meta(path: str, meta: dict, targets: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> None:
    fp8 = bool(loader.fp8_scale_paths(targets))
    if meta.get("fp8_experts", False) != fp8:
        stored = "in MXFP8" if meta.get("fp8_experts") else "dequantised"
        raise CheckpointError(f"converted checkpoint {path} stores the routed experts {stored}: load it with "
                              f"fp8_experts={not fp8}")
    params, problems = meta["params"], []
    for p, (shape, _) in targets.items():
        if p not in params:
            problems.append(f"converted checkpoint {path} has no parameter {p} (expected by config.json)")
        elif tuple(params[p]["shape"]) != tuple(shape):
            problems.append(f"converted checkpoint {path}: parameter {p} has shape {params[p]['shape']}, expected "
                            f"{list(shape)} from config.json")
        elif sum(placement.box_size(tuple(map(tuple, x["box"]))) for x in params[p]["pieces"]) != math.prod(shape):
            problems.append(f"converted checkpoint {path}: the pieces of parameter {p} do not cover it")
    for p in params:
        if p not in targets:
            problems.append(f"converted checkpoint {path} has parameter {p}, which this model does not have")
    for g in meta["groups"]:
        if not os.path.isdir(os.path.join(path, "params", g)):
            problems.append(f"converted checkpoint {path} is incomplete: params/{g} does not exist")
    raise_problems(problems)


def restore(path: str, targets: Mapping[str, tuple[tuple[int, ...], np.dtype]],
            shardings: Mapping[str, jax.sharding.Sharding], *, progress: bool = True) -> dict[str, jax.Array]:
    """{param path: jax.Array with its sharding} from a converted directory; the dtype of `targets` wins."""
    meta = read_meta(path)
    _check_meta(path, meta, targets)
    by_group: dict[str, list[tuple[str, str, tuple]]] = {g: [] for g in meta["groups"]}
    for p, info in meta["params"].items():
        for piece in info["pieces"]:
            by_group[piece["group"]].append((p, piece["key"], tuple(map(tuple, piece["box"]))))
    asm = placement.Assembler(targets, shardings)
    ckptr = _checkpointer()
    try:
        for g in tqdm(meta["groups"], desc="restoring", unit="group", disable=not progress):
            abstract = {}
            for p, key, box in by_group[g]:
                perm = tuple(meta["params"][p]["stored_perm"])
                shape = tuple(box[i][1] - box[i][0] for i in perm)
                sh = placement.permute_sharding(placement.piece_sharding(shardings[p], targets[p][0], box), perm)
                abstract[key] = jax.ShapeDtypeStruct(shape, jnp.dtype(meta["params"][p]["dtype"]), sharding=sh)
            restored = ckptr.restore(os.path.join(path, "params", g), abstract)
            for p, key, box in by_group[g]:
                asm.add(p, box, restored[key], tuple(meta["params"][p]["stored_perm"]))
            del restored
            jax.block_until_ready([asm.arrays[p] for p, _, _ in by_group[g]])     # one group in flight
    finally:
        ckptr.close()
    return asm.result()


__all__ = ["FORMAT", "META", "convert", "is_converted", "read_meta", "restore"]
