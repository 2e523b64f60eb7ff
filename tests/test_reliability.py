"""Faults and bad inputs a user can hit (issue 15): each test fails on the code before its fix.

Sampling parameters refused before they reach a step (item 5, item 9), streamed text equal to the final text
(item 11), and the converter: overlapping SRC/DST (2), leftovers of a killed convert (3), corrupt pieces (6),
a full disk (7) and the permissions of what it writes (12).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from m3jax.sampling import INT32_MAX, SamplingBatch, SamplingParams
from m3jax.tokenizer import IncrementalDecoder, M3Tokenizer, write_byte_level_tokenizer


# Sampling parameters (items 5 and 9) ----------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("top_k", 2**31), ("top_k", 3_000_000_000), ("top_k", -1), ("top_k", True), ("top_k", 2.0),
    ("max_new_tokens", True), ("max_new_tokens", 0), ("max_new_tokens", 4.0),
    ("stop_token_ids", 5), ("stop_token_ids", (True,)), ("stop_token_ids", [1, False]), ("stop_token_ids", "5"),
    ("seed", True), ("temperature", True), ("temperature", float("nan")), ("top_p", float("nan")),
    ("top_p", True), ("stop", "END"), ("logprobs", 1), ("ignore_eos", "yes"),
])
def test_sampling_params_refuse_bad_values_naming_request_and_field(field, value):
    with pytest.raises(ValueError, match=rf"^request r7: sampling\.{field} must be"):
        SamplingParams(**{field: value}).check("r7")


def test_top_k_fits_int32_and_the_vocab():
    ok = SamplingParams(top_k=INT32_MAX, temperature=1.0)
    ok.check("r")
    SamplingBatch.from_params([ok], [0], [0], pad_to=2)            # reaches the device as int32 without overflow
    SamplingParams(top_k=384).check("r", vocab_size=384)
    with pytest.raises(ValueError, match=r"sampling\.top_k must be <= the vocab size 384"):
        SamplingParams(top_k=385).check("r", vocab_size=384)
    with pytest.raises(ValueError, match=r"sampling\.stop_token_ids must be token ids in \[0, 384\)"):
        SamplingParams(stop_token_ids=(3, 384)).check("r", vocab_size=384)


def test_good_sampling_params_pass():
    for p in (SamplingParams(), SamplingParams(max_new_tokens=np.int64(3), top_k=np.int32(5), seed=2**32 - 1,
                                               stop_token_ids=[np.int64(3), 4], stop=["a"], temperature=np.float32(.5),
                                               top_p=1, logprobs=True, ignore_eos=np.bool_(True))):
        p.check("r", vocab_size=384)


# Incremental detokenisation (item 11) ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    """The tiny checkpoint's tokenizer (m3jax.testing writes it with write_byte_level_tokenizer)."""
    file = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    specials = write_byte_level_tokenizer(file)
    return M3Tokenizer.from_pretrained(file), sorted(specials.values())


def _stream(tok, ids) -> list[str]:
    dec = IncrementalDecoder(tok)
    return [dec.push(t) for t in ids] + [dec.flush()]


@pytest.mark.parametrize("text", ["héllo wörld", "中文字符", "a😀b😀😀", "ℝ∑ ∫x²", "Ελληνικά and ascii", "ok"])
def test_streamed_text_equals_final_text_on_multibyte_characters(byte_tokenizer, text):
    tok, _ = byte_tokenizer
    ids = tok.encode(text)
    assert len(ids) == len(text.encode())                           # byte-level: characters split over tokens
    pieces = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)                   # never a half character
    if len(ids) > len(text):
        assert "".join(tok.decode([t]) for t in ids) != text       # what a one-token-at-a-time decode prints


def test_streamed_text_equals_final_text_on_random_bytes(byte_tokenizer):
    """Invalid and truncated UTF-8 too (a random model prints them): the stream still equals the final text."""
    tok, specials = byte_tokenizer
    rng = random.Random(0)
    kinds = (lambda: rng.randrange(0x80), lambda: rng.randrange(0x80, 0xC0), lambda: rng.randrange(0xC0, 0x100),
             lambda: rng.choice(specials))
    for _ in range(500):
        ids = [rng.choice(kinds)() for _ in range(rng.randrange(12))]
        assert "".join(_stream(tok, ids)) == tok.decode(ids), ids


def test_incomplete_character_is_held_until_complete(byte_tokenizer):
    tok, specials = byte_tokenizer
    e4, b8, ad = "中".encode()
    dec = IncrementalDecoder(tok)
    assert [dec.push(e4), dec.push(b8), dec.push(ad), dec.push(ord("!"))] == ["", "", "中", "!"]
    assert [dec.push(e4), dec.push(b8), dec.flush()] == ["", "", "\ufffd"]      # never completed
    assert tok.decode([e4, b8]) == "\ufffd"
    assert [dec.push(0xF0), dec.push(specials[0])] == ["", "\ufffd]~!b["]   # a special token ends it: U+FFFD


# The converter (items 2, 3, 6, 7, 12) ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A private copy of the bundled tiny checkpoint (written once per machine; a copy takes milliseconds and a
    test that fails by deleting its source cannot damage the shared one)."""
    from m3jax.api import bundled_tiny_checkpoint
    dst = str(tmp_path_factory.mktemp("rel") / "release")
    shutil.copytree(bundled_tiny_checkpoint(), dst)
    return dst


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory):
    """Converted under umask 0o002, so the modes it gets are neither the default umask's nor 0700."""
    from convert import orbax_io
    dst = str(tmp_path_factory.mktemp("conv") / "converted")
    old = os.umask(0o002)
    try:
        orbax_io.convert(tiny, dst, "float32", progress=False, group_bytes=64 << 10)
    finally:
        os.umask(old)
    return dst


def _cli(args, capsys) -> tuple[int, str]:
    from m3jax import cli
    rc = cli.main(args)
    return rc, capsys.readouterr().err


def test_convert_refuses_a_destination_that_overlaps_the_source(tiny, tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(tiny)
    for dst, how in ((tiny, "is the source"), (os.path.join(tiny, "sub"), "is inside the source"),
                     (os.path.dirname(tiny), "contains the source"), (str(link), "is the source")):
        rc, err = _cli(["convert", tiny, dst, "--overwrite", "--no-progress"], capsys)
        assert rc == 2 and err.count("\n") == 1, err
        assert f"destination {dst} {how} {tiny}" in err and "Traceback" not in err
    assert sorted(os.listdir(tiny)) == ["config.json", "model.safetensors", "tokenizer.json"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _leave_claim(dst: str, ident: str, pid: int) -> tuple[str, str, str]:
    """What a convert killed at some moment leaves beside DST: its claim (tmp and old are made by the test)."""
    parent, base = os.path.split(dst)
    claim = os.path.join(parent, f".{base}.convert-{socket.gethostname()}-{pid}-{ident}.json")
    with open(claim, "w") as f:
        json.dump({"owner": "m3jax convert", "host": socket.gethostname(), "pid": pid, "dst": dst,
                   "tmp": f".{base}.tmp-{ident}", "old": f".{base}.old-{ident}"}, f)
    return claim, os.path.join(parent, f".{base}.tmp-{ident}"), os.path.join(parent, f".{base}.old-{ident}")


def test_leftovers_of_a_killed_convert_are_recovered_and_only_those(converted, tmp_path, caplog):
    from convert import orbax_io
    dst = str(tmp_path / "out")
    shutil.copytree(converted, dst)
    dead = _dead_pid()
    # 1. killed while writing: a partial .tmp -> removed
    claim1, tmp1, _ = _leave_claim(dst, "aaaa0001", dead)
    os.makedirs(os.path.join(tmp1, "params", "g00000"))
    # 2. killed between moving DST away and moving the new one in: DST is put back
    claim2, tmp2, old2 = _leave_claim(dst, "aaaa0002", dead)
    os.replace(dst, old2)
    os.makedirs(tmp2)
    # 3. a convert that is still running (this process): untouched
    claim3, tmp3, _ = _leave_claim(dst, "aaaa0003", os.getpid())
    os.makedirs(tmp3)
    # 4. a hidden directory that no claim names: untouched
    stranger = str(tmp_path / ".out.tmp-xyz")
    os.makedirs(stranger)
    with caplog.at_level(logging.WARNING, logger="convert.orbax_io"):
        done = orbax_io.recover_interrupted(dst)
    assert len(done) == 3 and orbax_io.is_converted(dst)
    assert not any(map(os.path.exists, (claim1, tmp1, claim2, tmp2, old2)))
    assert all(map(os.path.exists, (claim3, tmp3, stranger)))
    log_text = caplog.text
    assert f"put the previous {dst} back from {old2}" in log_text and f"removed {tmp1}" in log_text
    assert f"{stranger} looks like the leftover of an interrupted convert, but no claim proves whose" in log_text
    # 5. killed after the new DST was moved in: the replaced one is removed
    claim5, _, old5 = _leave_claim(dst, "aaaa0005", dead)
    shutil.copytree(dst, old5)
    assert orbax_io.recover_interrupted(dst) == [f"removed {old5}, the {dst} that the interrupted convert of "
                                                 f"{dst} by pid {dead} on {socket.gethostname()}, which is no "
                                                 f"longer running had replaced"]
    assert not os.path.exists(old5) and not os.path.exists(claim5) and orbax_io.is_converted(dst)


def test_convert_leaves_no_claim_and_cleans_up_before_it_starts(tiny, tmp_path):
    from convert import orbax_io
    dst = str(tmp_path / "out")
    _, tmp, _ = _leave_claim(dst, "bbbb0001", _dead_pid())
    os.makedirs(tmp)
    orbax_io.convert(tiny, dst, progress=False)
    assert os.listdir(tmp_path) == ["out"]


def test_converted_files_get_the_umask_permissions(converted):
    modes = {os.path.relpath(os.path.join(d, n), converted): os.stat(os.path.join(d, n)).st_mode & 0o777
             for d, dirs, files in os.walk(converted) for n in dirs + files}
    modes["."] = os.stat(converted).st_mode & 0o777
    dirs = {k for k in modes if os.path.isdir(os.path.join(converted, k))}
    assert {modes[k] for k in dirs} == {0o775}, {k: oct(modes[k]) for k in dirs if modes[k] != 0o775}
    assert {modes[k] for k in set(modes) - dirs} == {0o664}


def _restore(path, verify=True):
    import jax.numpy as jnp
    from convert import orbax_io, placement
    from m3jax.config import M3Config
    _, _, _, targets = placement.abstract_params(M3Config.from_pretrained(path), jnp.dtype("float32"))
    shardings = placement.resolve_shardings({p: s for p, (s, _) in targets.items()}, None, None)
    return {k: np.asarray(v) for k, v in orbax_io.restore(path, targets, shardings, progress=False,
                                                           verify=verify).items()}


def _piece_file(path: str, param: str) -> tuple[str, dict]:
    from convert import orbax_io
    meta = orbax_io.read_meta(path)
    piece = meta["params"][param]["pieces"][0]
    folder = os.path.join(path, "params", piece["group"], piece["key"])
    chunk = [f for f in os.listdir(folder) if not f.startswith(".")][0]
    return os.path.join(folder, chunk), piece


def test_zeroed_bytes_in_a_piece_are_caught_naming_it(converted, tmp_path):
    from convert import orbax_io
    from convert.safetensors_io import CheckpointError
    bad = str(tmp_path / "bad")
    shutil.copytree(converted, bad)
    meta = orbax_io.read_meta(bad)
    assert meta["checksums"]["algorithm"] == "crc32"
    on_disk = {os.path.relpath(os.path.join(d, f), bad) for d, _, fs in os.walk(os.path.join(bad, "params"))
               for f in fs}
    assert set(meta["checksums"]["files"]) == on_disk                  # every file of every piece
    file, piece = _piece_file(bad, "embed_vd")
    with open(file, "r+b") as f:
        f.seek(64)
        f.write(bytes(256))
    with pytest.raises(CheckpointError, match=rf"is damaged: piece {piece['key']} of embed_vd \(box "
                                              rf"{re.escape(str(piece['box']))}\), file .* does not match its "
                                              rf"checksum") as e:
        _restore(bad)
    assert "\n" not in str(e.value)
    unverified = _restore(bad, verify=False)                            # the opt-out: loads the damaged values
    assert not np.array_equal(unverified["embed_vd"], _restore(converted)["embed_vd"])


def test_truncated_piece_names_it_with_and_without_verification(converted, tmp_path):
    from convert.safetensors_io import CheckpointError
    bad = str(tmp_path / "bad")
    shutil.copytree(converted, bad)
    file, piece = _piece_file(bad, "embed_vd")
    os.truncate(file, 10)
    with pytest.raises(CheckpointError, match=rf"piece {piece['key']} of embed_vd .* has 10 bytes"):
        _restore(bad)
    with pytest.raises(CheckpointError, match=rf"params/{piece['group']} \(pieces of .*embed_vd.*\) cannot be "
                                              rf"restored: .*Error reading local file") as e:
        _restore(bad, verify=False)
    assert "\n" not in str(e.value)


def test_full_disk_during_convert_is_one_line(tiny, tmp_path, capsys, caplog, monkeypatch):
    from orbax.checkpoint._src.serialization import serialization

    async def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(serialization, "async_serialize_from_host", disk_full)
    dst = str(tmp_path / "out")
    with caplog.at_level(logging.WARNING):
        rc, err = _cli(["convert", tiny, dst, "--no-progress"], capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith("m3jax convert: error: [Errno 28] writing the converted checkpoint failed at params/g00000")
    assert "No space left on device" in err and "the destination is unchanged" in err
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]    # Orbax's thread tracebacks held back
    assert os.listdir(tmp_path) == []                                        # no partial output, no claim


def test_a_manifest_without_checksums_loads_and_says_it_is_not_verified(converted, tmp_path, caplog):
    from convert import orbax_io
    old = str(tmp_path / "old")
    shutil.copytree(converted, old)
    meta = orbax_io.read_meta(old)
    del meta["checksums"]                                              # as written before checksums existed
    with open(os.path.join(old, orbax_io.META), "w") as f:
        json.dump(meta, f)
    with caplog.at_level(logging.WARNING, logger="convert.orbax_io"):
        got = _restore(old)
    assert "records no checksums (converted by an older m3jax): its pieces are not verified" in caplog.text
    want = _restore(converted)
    assert all(np.array_equal(got[k], want[k]) for k in want)
