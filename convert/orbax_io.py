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

Integrity: the manifest records the size and CRC-32 of every file of every piece (`checksums`); `restore`
checks each group's files before Orbax reads them (the hash reads them into the page cache, so Orbax's read
is served from memory) and names the parameter and box of a piece whose bytes changed. `verify=False` skips it.

Ownership: before it creates anything next to DST, a convert writes a claim `.DST.convert-HOST-PID-ID.json` that
names its temporary `.DST.tmp-ID` and the `.DST.old-ID` that a replaced DST is moved to. A later convert of the
same DST finishes or undoes the work of a claim whose process is dead on this host (and only that: a hidden
directory without a claim is never deleted), and says so in a log line.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import json
import logging
import math
import os
import secrets
import shutil
import socket
import time
import zlib
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from convert import loader, placement, weight_map
from convert.safetensors_io import CheckpointError, read_tensor, write_file
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
    fp8_experts: keep an MXFP8 release's routed experts in MXFP8 (load with `fp8_experts=True`).
    What is written gets the umask's permissions (readable by others of a shared checkpoint directory)."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    src, dst = os.path.abspath(os.fspath(src)), os.path.abspath(os.fspath(dst))
    if not os.path.isdir(src):
        raise FileNotFoundError(f"source checkpoint directory {src} does not exist")
    _check_apart(src, dst)
    parent = os.path.dirname(dst)
    if os.path.isdir(parent):
        recover_interrupted(dst)
    if os.path.exists(dst) and not overwrite:
        raise FileExistsError(f"destination {dst} already exists (pass --overwrite to replace it)")
    if is_converted(src):
        raise ValueError(f"{src} is already a converted m3jax checkpoint")
    t0 = time.perf_counter()
    cfg = M3Config.from_pretrained(src)
    _, _, _, targets = placement.abstract_params(cfg, jnp.dtype(dtype), fp8_experts=fp8_experts)
    scales = loader.fp8_scale_paths(targets)
    os.makedirs(parent, exist_ok=True)
    with ReleaseCheckpoint(src, {p: t for p, t in targets.items() if p not in scales.values()}, cfg) as ckpt:
        loader.check_fp8_experts(ckpt, scales, src)
        log.info("converting %s: %s", src, describe(ckpt.tensors))
        claim = _Claim.create(dst)
        try:
            os.mkdir(claim.tmp)                          # mode 0o777 & ~umask (mkdtemp would make it 0700)
            meta = _write_params(ckpt, claim.tmp, dtype, progress, piece_bytes, group_bytes, compress, scales,
                                 targets)
            meta["source"] = {"path": src, "quant_method": (cfg.quantization or {}).get("quant_method"),
                              "tensors": len(ckpt.tensors), "bytes": sum(t.nbytes for t in ckpt.tensors.values())}
            with open(os.path.join(claim.tmp, "config.json"), "w") as f:
                json.dump(_clean_config(src), f, indent=2)
            vision = {n: read_tensor(t) for n, t in ckpt.tensors.items() if weight_map.VISION.match(n)}
            if vision:                       # the vision tower and projector, as released (memory-mapped)
                write_file(os.path.join(claim.tmp, loader.VISION_FILE), vision)
            for name in EXTRA_FILES:
                if os.path.isfile(os.path.join(src, name)):  # copyfile, not copy2: the umask's mode, not the source's
                    shutil.copyfile(os.path.join(src, name), os.path.join(claim.tmp, name))
            with open(os.path.join(claim.tmp, META), "w") as f:
                json.dump(meta, f, indent=1)
            _replace_dir(claim, dst, overwrite)
        except BaseException:
            shutil.rmtree(claim.tmp, ignore_errors=True)
            if not os.path.exists(claim.old):            # else the next convert removes it (see recover_interrupted)
                claim.release()
            raise
        claim.release()
    summary = dict(meta["source"], seconds=time.perf_counter() - t0, dst=dst, groups=len(meta["groups"]))
    log.info("converted %s -> %s in %.1f s", src, dst, summary["seconds"])
    return summary


def _check_apart(src: str, dst: str) -> None:
    """Refuse a DST that is SRC, inside it, or holds it: replacing DST would delete the release."""
    a, b = os.path.realpath(src), os.path.realpath(dst)
    if a == b or b.startswith(a.rstrip(os.sep) + os.sep) or a.startswith(b.rstrip(os.sep) + os.sep):
        how = "is" if a == b else ("is inside" if b.startswith(a) else "contains")
        raise ValueError(f"destination {dst} {how} the source {src}: the conversion would delete the release; "
                         f"choose a destination outside it")


def _replace_dir(claim: "_Claim", dst: str, overwrite: bool) -> None:
    if not os.path.exists(dst):
        os.replace(claim.tmp, dst)
        return
    if not overwrite:
        raise FileExistsError(f"destination {dst} already exists (pass --overwrite to replace it)")
    os.replace(dst, claim.old)
    try:
        os.replace(claim.tmp, dst)
    except BaseException:
        os.replace(claim.old, dst)                       # put the user's checkpoint back
        raise
    shutil.rmtree(claim.old, ignore_errors=True) if os.path.isdir(claim.old) else os.unlink(claim.old)


class _Claim:
    """`.DST.convert-HOST-PID-ID.json` beside DST: this process owns `.DST.tmp-ID` and `.DST.old-ID`.

    Written before either exists and removed after both are gone, so every such directory that a dead
    process left is named by a claim; `recover_interrupted` trusts nothing else."""

    def __init__(self, file: str, tmp: str, old: str, host: str, pid: int):
        self.file, self.tmp, self.old, self.host, self.pid = file, tmp, old, host, pid

    @classmethod
    def create(cls, dst: str) -> "_Claim":
        parent, base = os.path.split(dst)
        ident, host, pid = secrets.token_hex(4), socket.gethostname(), os.getpid()
        claim = cls(os.path.join(parent, f".{base}.convert-{host}-{pid}-{ident}.json"),
                    os.path.join(parent, f".{base}.tmp-{ident}"), os.path.join(parent, f".{base}.old-{ident}"),
                    host, pid)
        with open(claim.file, "x") as f:
            json.dump({"owner": "m3jax convert", "host": host, "pid": pid, "dst": dst,
                       "tmp": os.path.basename(claim.tmp), "old": os.path.basename(claim.old)}, f)
        return claim

    @classmethod
    def read(cls, file: str) -> "_Claim | None":
        try:
            with open(file) as f:
                d = json.load(f)
            parent = os.path.dirname(file)
            if d.get("owner") != "m3jax convert" or any("/" in d[k] or os.sep in d[k] for k in ("tmp", "old")):
                return None
            return cls(file, os.path.join(parent, d["tmp"]), os.path.join(parent, d["old"]), d["host"],
                       int(d["pid"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def owner_is_dead(self) -> bool:
        if self.host != socket.gethostname():
            return False                                  # cannot tell: another machine may be converting
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:                           # alive, another user's
            return False
        return False

    def release(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.file)


def recover_interrupted(dst: str) -> list[str]:
    """Finish or undo converts of `dst` that were killed; returns what was done (also logged as warnings).

    For each claim whose process is dead on this host: a `.old` beside a `.tmp` means the kill came between
    moving DST away and moving the new one in, so the old DST is put back (if DST is still free); a `.old`
    alone means the new DST is in place and the old one is removed; a `.tmp` is removed. Hidden directories
    of DST that no such claim names are reported and left alone."""
    dst = os.path.abspath(dst)
    parent, base = os.path.split(dst)
    done, owned = [], set()
    names = os.listdir(parent)
    for name in sorted(n for n in names if n.startswith(f".{base}.convert-") and n.endswith(".json")):
        claim = _Claim.read(os.path.join(parent, name))
        if claim is None:
            log.warning("%s: not an m3jax convert claim I can read; left alone", os.path.join(parent, name))
            continue
        owned |= {os.path.basename(claim.tmp), os.path.basename(claim.old)}
        if not claim.owner_is_dead():
            continue
        who = f"convert of {dst} by pid {claim.pid} on {claim.host}, which is no longer running"
        if os.path.exists(claim.old):
            if os.path.exists(claim.tmp) and not os.path.exists(dst):
                os.replace(claim.old, dst)
                done.append(f"put the previous {dst} back from {claim.old} (interrupted {who})")
            elif not os.path.exists(claim.tmp) and is_converted(dst):
                shutil.rmtree(claim.old)
                done.append(f"removed {claim.old}, the {dst} that the interrupted {who} had replaced")
            else:
                log.warning("%s (from an interrupted %s) left alone: %s was changed since", claim.old, who, dst)
                continue
        if os.path.exists(claim.tmp):
            shutil.rmtree(claim.tmp)
            done.append(f"removed {claim.tmp}, the partial output of an interrupted {who}")
        claim.release()
    for name in names:
        if name.startswith((f".{base}.tmp-", f".{base}.old-")) and name not in owned:
            log.warning("%s looks like the leftover of an interrupted convert, but no claim proves whose it is: "
                        "left alone (remove it by hand if no convert of %s is running)", os.path.join(parent, name),
                        dst)
    for line in done:
        log.warning("m3jax convert: %s", line)
    return done


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

    def finished():
        with _saving(out, groups[-1] if groups else "g00000"):
            ckptr.wait_until_finished()                  # the last group saved is on disk: hash its files while
        if len(groups) > len(hashing):                   # the next group is read and written
            hashing.append(runner.submit(_checksums, out, groups[-1], pool))

    def flush():
        nonlocal pending, pending_bytes
        if pending:
            name = f"g{len(groups):05d}"
            finished()
            with _saving(out, name):
                ckptr.save(os.path.join(out, "params", name), args=_pytree_save(pending))
            groups.append(name)
            pending, pending_bytes = {}, 0

    hashing: list[concurrent.futures.Future] = []
    os.makedirs(os.path.join(out, "params"))
    try:
        with tqdm(total=total, unit="B", unit_scale=True, desc="converting", disable=not progress) as bar, \
                _orbax_thread_errors() as pool, concurrent.futures.ThreadPoolExecutor(1) as runner:
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
            finished()
            files = {rel: v for f in hashing for rel, v in f.result().items()}
    finally:
        ckptr.close()
    return {"format": FORMAT, "version": VERSION, "dtype": dtype, "fp8_experts": bool(scales), "params": params,
            "groups": groups, "checksums": {"algorithm": CHECKSUM, "files": files}}


CHECKSUM = "crc32"        # per file, with its size: catches truncated and zeroed bytes; ~1.3 GB/s per core
_HASH_CHUNK = 8 << 20


def _file_checksum(file: str) -> list[int]:
    """[size, crc32] of a file, read in chunks (zlib releases the GIL: files hash in parallel threads)."""
    with open(file, "rb", buffering=0) as f:
        if os.fstat(f.fileno()).st_size <= _HASH_CHUNK:          # most files: one read, no buffer to zero
            data = f.readall()
            return [len(data), zlib.crc32(data)]
        crc, size, buf = 0, 0, bytearray(_HASH_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
            size += n
    return [size, crc]


def _group_files(root: str, group: str) -> list[str]:
    """Every file of params/<group>, as paths relative to `root`, sorted."""
    top = os.path.join(root, "params", group)
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(top) for f in fs)


def _checksums(root: str, group: str, pool: concurrent.futures.Executor) -> dict[str, list[int]]:
    rels = _group_files(root, group)
    return dict(zip(rels, pool.map(_file_checksum, [os.path.join(root, r) for r in rels])))


class _ThreadErrors(logging.Filter):
    """Holds back the tracebacks that Orbax's worker threads log (one per thread and array, hundreds of lines
    for one full disk) while the same error is on its way to the caller as an exception."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record):
        if record.levelno >= logging.ERROR and record.exc_info:
            self.records.append(record)
            return False
        return True


@contextlib.contextmanager
def _orbax_thread_errors():
    """A thread pool for hashing files, with Orbax's thread tracebacks held back while the block runs: logged at
    DEBUG if it fails with an error reported in one line (`_SaveError`, `CheckpointError`), re-logged as they
    were otherwise."""
    capture = _ThreadErrors()
    absl = logging.getLogger("absl")
    absl.addFilter(capture)
    try:
        with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            yield pool
    except (_SaveError, CheckpointError):                 # reported in one line; the details at DEBUG
        for r in capture.records:
            log.debug("Orbax: %s", r.getMessage(), exc_info=r.exc_info)
        raise
    except BaseException:
        _relog(absl, capture)
        raise
    else:                                                 # Orbax logged an error but the work succeeded: show it
        _relog(absl, capture)
    finally:
        absl.removeFilter(capture)


def _relog(logger: logging.Logger, capture: _ThreadErrors) -> None:
    logger.removeFilter(capture)
    for r in capture.records:
        logger.handle(r)


class _SaveError(OSError):
    """Orbax could not write a group (full disk, quota, permissions): one line, the thread tracebacks at DEBUG."""


@contextlib.contextmanager
def _saving(out: str, group: str):
    try:
        yield
    except OSError as e:
        log.debug("Orbax failed writing %s/params/%s", out, group, exc_info=True)
        what = e.strerror or str(e)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            what += " (free some space, or convert to another disk)"
        raise _SaveError(e.errno, f"writing the converted checkpoint failed at params/{group} in {out}: {what}; "
                                  f"the partial output is removed and the destination is unchanged") from e


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
            shardings: Mapping[str, jax.sharding.Sharding], *, progress: bool = True,
            verify: bool = True) -> dict[str, jax.Array]:
    """{param path: jax.Array with its sharding} from a converted directory; the dtype of `targets` wins.

    verify: check every file against the size and CRC-32 in the manifest before Orbax reads it (a changed
    piece raises CheckpointError naming its parameter and box). Any error of the restore itself is raised as
    CheckpointError naming the group and its parameters."""
    meta = read_meta(path)
    _check_meta(path, meta, targets)
    by_group: dict[str, list[tuple[str, str, tuple]]] = {g: [] for g in meta["groups"]}
    for p, info in meta["params"].items():
        for piece in info["pieces"]:
            by_group[piece["group"]].append((p, piece["key"], tuple(map(tuple, piece["box"]))))
    sums = meta.get("checksums")
    if verify and sums is None:
        log.warning("%s records no checksums (converted by an older m3jax): its pieces are not verified", path)
    elif verify and sums.get("algorithm") != CHECKSUM:
        raise CheckpointError(f"{os.path.join(path, META)}: checksum algorithm {sums.get('algorithm')!r} is not "
                              f"{CHECKSUM!r}; load with verify=False to skip the check")
    elif not verify:
        log.info("%s: piece checksums not verified (verify=False)", path)
    verify = verify and sums is not None
    asm = placement.Assembler(targets, shardings)
    ckptr = _checkpointer()
    failed = None
    try:
        with _orbax_thread_errors() as pool, concurrent.futures.ThreadPoolExecutor(1) as runner:
            groups, checks = meta["groups"], {}

            def check(i):                                # the next group is hashed while this one is restored
                if verify and i < len(groups):
                    checks[i] = runner.submit(_verify_group, path, groups[i], by_group[groups[i]], sums["files"],
                                              pool)

            check(0)
            for i, g in enumerate(tqdm(groups, desc="restoring", unit="group", disable=not progress)):
                check(i + 1)
                if verify:
                    checks.pop(i).result()
                abstract = {}
                for p, key, box in by_group[g]:
                    perm = tuple(meta["params"][p]["stored_perm"])
                    shape = tuple(box[i][1] - box[i][0] for i in perm)
                    sh = placement.permute_sharding(placement.piece_sharding(shardings[p], targets[p][0], box), perm)
                    abstract[key] = jax.ShapeDtypeStruct(shape, jnp.dtype(meta["params"][p]["dtype"]), sharding=sh)
                try:
                    restored = ckptr.restore(os.path.join(path, "params", g), abstract)
                except Exception as e:
                    log.debug("restoring %s/params/%s failed", path, g, exc_info=True)
                    names = sorted({p for p, _, _ in by_group[g]})
                    failed = (f"converted checkpoint {path}: params/{g} (pieces of {', '.join(names)}) cannot be "
                              f"restored: {_root_cause(e)}")
                    break
                for p, key, box in by_group[g]:
                    asm.add(p, box, restored[key], tuple(meta["params"][p]["stored_perm"]))
                del restored
                jax.block_until_ready([asm.arrays[p] for p, _, _ in by_group[g]])     # one group in flight
    finally:
        ckptr.close()
    if failed is not None:                   # raised here, with Orbax's traceback and checkpointer gone
        _collect_quietly()
        raise CheckpointError(failed)
    return asm.result()


def _collect_quietly() -> None:
    """A failed restore leaves Orbax's other reads of the group as suspended coroutines; collected at exit,
    each prints "Exception ignored in ..." with a traceback (dozens of lines after the one-line error).
    Collect them now, with their messages at DEBUG."""
    import gc
    import sys

    previous = sys.unraisablehook
    sys.unraisablehook = lambda u: log.debug("after a failed restore: %s", u.exc_value)
    try:
        gc.collect()
    finally:
        sys.unraisablehook = previous


def _root_cause(e: BaseException) -> str:
    """The first line of the innermost exception (Orbax wraps TensorStore's message in a generic one)."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _verify_group(path: str, group: str, pieces, want: Mapping[str, list[int]],
                  pool: concurrent.futures.Executor) -> None:
    """Raise CheckpointError naming the piece (parameter and box) of the first file of `group` that is missing
    or whose size or CRC-32 differs from the manifest."""
    prefix = f"params/{group}/"
    expected = {r: v for r, v in want.items() if r.startswith(prefix)}
    owner = {key: f"piece {key} of {p} (box {[list(b) for b in box]})" for p, key, box in pieces}

    def name(rel):
        key = rel[len(prefix):].split("/", 1)[0]
        return f"{owner.get(key, f'group {group} metadata')}, file {rel}"

    if not expected:
        raise CheckpointError(f"converted checkpoint {path}: the manifest has no checksums for params/{group}")
    have = _group_files(path, group)
    missing = sorted(set(expected) - set(have))
    if missing:
        raise CheckpointError(f"converted checkpoint {path} is damaged: {name(missing[0])} is missing")
    rels = sorted(expected)
    for rel, got in zip(rels, pool.map(_file_checksum, [os.path.join(path, r) for r in rels])):
        size, crc = expected[rel]
        if got[0] != size:
            raise CheckpointError(f"converted checkpoint {path} is damaged: {name(rel)} has {got[0]} bytes, "
                                  f"the manifest says {size}")
        if got[1] != crc:
            raise CheckpointError(f"converted checkpoint {path} is damaged: {name(rel)} does not match its "
                                  f"checksum (CRC-32 {got[1]:08x}, expected {crc:08x}); re-convert it, or load "
                                  f"with verify=False to skip the check")


__all__ = ["FORMAT", "META", "convert", "is_converted", "read_meta", "recover_interrupted", "restore"]
