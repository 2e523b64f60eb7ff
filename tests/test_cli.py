"""The CLI: one line and exit code 2 for user errors; make-tiny then generate from it."""

from __future__ import annotations

import os
import stat
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import m3jax
from m3jax import cli
from m3jax.params import flat_params
from m3jax.sharding import parse_mesh
from m3jax.testing import make_tiny_checkpoint, random_model, random_params
from m3jax.tokenizer import M3Tokenizer


def test_make_tiny_then_generate(tmp_path, capsys):
    """make-tiny writes a checkpoint; generate prints exactly the library's greedy result for it (text, then ids)."""
    path = str(tmp_path / "ck")
    assert cli.main(["make-tiny", path, "--dtype", "float32"]) == 0
    assert capsys.readouterr().out == f"wrote {path}\n"
    assert cli.main(["generate", "--model", path, "--prompt", "hello", "--max-new-tokens", "5", "--dtype", "float32",
                     "--ids"]) == 0
    out = capsys.readouterr().out
    model = m3jax.load(path, dtype="float32", progress=False)
    tok = M3Tokenizer.from_pretrained(path)
    want = m3jax.generate(model, ["hello"], m3jax.SamplingParams(max_new_tokens=5), tokenizer=tok, max_seq_len=64)[0]
    assert len(want.token_ids) == 5 or want.finish_reason == "stop"
    assert out == f"{want.text}\ntoken ids: {want.token_ids} ({want.finish_reason})\n"


def test_user_errors_print_one_line(tmp_path, capsys):
    assert cli.main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("m3jax generate: error:") and "\n" not in err
    assert cli.main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("m3jax convert") and "\n" not in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.multi_device
def test_generate_on_a_mesh_gives_the_same_tokens(capsys):
    """`--mesh 2x4` (8 forced host devices, tests/conftest.py): the bundled tiny model's greedy ids are unchanged."""
    args = ["generate", "--prompt", "hello world", "--prompt", "a second prompt", "--max-new-tokens", "6", "--ids"]
    assert cli.main(args) == 0
    want = [line for line in capsys.readouterr().out.splitlines() if line.startswith("token ids")]
    assert cli.main(args + ["--mesh", "2x4"]) == 0
    got = [line for line in capsys.readouterr().out.splitlines() if line.startswith("token ids")]
    assert len(want) == 2 and got == want
    for bad in ("3x3", "2by4"):
        assert cli.main(args + ["--mesh", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("m3jax generate: error:") and "mesh" in err and "\n" not in err


def test_generate_with_fp8_experts(tmp_path, capsys):
    assert cli.main(["make-tiny", str(tmp_path / "q"), "--quant", "mxfp8"]) == 0
    args = ["generate", "--model", str(tmp_path / "q"), "--prompt", "hi", "--max-new-tokens", "4", "--ids",
            "--dtype", "float32"]
    capsys.readouterr()
    assert cli.main(args) == 0
    want = capsys.readouterr().out
    assert cli.main(args + ["--fp8-experts"]) == 0
    assert capsys.readouterr().out == want


# Issue 15: what a user can hit from the command line and the API -------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny") / "ck"))


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"m3jax {command}: error:") and "\n" not in err and "Traceback" not in err, err
    return err


def test_make_tiny_refuses_to_replace_anything_but_a_checkpoint(tmp_path, capsys):
    """Item 1: a non-empty DST is refused (exit 2, one line); --overwrite replaces only a checkpoint."""
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        assert cli.main(["make-tiny", str(user), *extra]) == 2
        err = _one_line_error(capsys, "make-tiny")
        assert str(user) in err and ("not empty" in err if not extra else "does not look like a checkpoint" in err)
        assert (user / "notes.txt").read_text() == "keep me" and os.listdir(user) == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    assert cli.main(["make-tiny", str(tmp_path / "file"), "--overwrite"]) == 2
    assert "not a directory" in _one_line_error(capsys, "make-tiny") and (tmp_path / "file").read_text() == "x"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["make-tiny", str(empty)]) == 0                      # an empty directory is fine
    ck = str(empty)
    first = open(os.path.join(ck, "model.safetensors"), "rb").read()
    assert cli.main(["make-tiny", ck, "--seed", "1"]) == 2               # a checkpoint, but no --overwrite
    assert "--overwrite" in _one_line_error(capsys, "make-tiny")
    assert cli.main(["make-tiny", ck, "--seed", "1", "--overwrite"]) == 0
    assert open(os.path.join(ck, "model.safetensors"), "rb").read() != first
    open(os.path.join(ck, "README.md"), "w").write("my notes")           # a checkpoint plus a user's file
    assert cli.main(["make-tiny", ck, "--overwrite"]) == 2
    assert "'README.md'" in _one_line_error(capsys, "make-tiny")
    assert sorted(os.listdir(ck)) == ["README.md", "config.json", "model.safetensors", "tokenizer.json"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]    # no temporary directories left


def test_make_tiny_compiles_nothing_and_gets_the_umask_modes(tmp_path):
    """Item 12: the weights are drawn with numpy (jax.random compiled ~100 programs: 13-22 s on this box, now
    about 1 s); directory and files get 0o777 / 0o666 & ~umask (they were 0700 / 0600)."""
    compiles = []

    def listen(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listen)
    old = os.umask(0o002)
    try:
        t0 = time.perf_counter()
        path = make_tiny_checkpoint(str(tmp_path / "ck"), quant="mxfp8", num_shards=2)
        seconds = time.perf_counter() - t0
    finally:
        os.umask(old)
        jax.monitoring.unregister_event_duration_listener(listen)
    print(f"make_tiny_checkpoint: {seconds:.2f} s")
    assert compiles == []
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o775
    for name in os.listdir(path):
        assert stat.S_IMODE(os.stat(os.path.join(path, name)).st_mode) == 0o664, name


def test_random_model_holds_the_weights_make_tiny_writes(tmp_path):
    path = make_tiny_checkpoint(str(tmp_path / "ck"), seed=7, dtype="float32")
    loaded = flat_params(m3jax.load(path, dtype="float32", progress=False))
    for name, want in random_params(m3jax.M3Config.tiny(), seed=7).items():
        np.testing.assert_array_equal(np.asarray(loaded[name]), want, err_msg=name)
    model = random_model(m3jax.M3Config.tiny(), seed=7, dtype=jnp.bfloat16)
    assert flat_params(model)["stacks.1.layers.ffn.router_de"].dtype == jnp.float32     # the router stays f32
    assert flat_params(model)["embed_vd"].dtype == jnp.bfloat16


@pytest.mark.parametrize("args,words", [
    (["--top-k", "3000000000"], "sampling.top_k"),                      # item 8: was a 23-line traceback, exit 1
    (["--top-k", "385"], "<= the vocab size 384"),
    (["--max-seq-len", "0"], "max_seq_len must be a positive integer"),  # item 9: was silently 4096
    (["--mesh", "3x3"], "needs 9 devices"),
])
def test_generate_user_errors_are_one_line(args, words, tiny, capsys):
    assert cli.main(["generate", "--model", tiny, "--prompt", "x", "--max-new-tokens", "1", *args]) == 2
    assert words in _one_line_error(capsys, "generate")


def test_a_file_passed_as_model_is_not_a_directory(tmp_path, capsys):
    """Item 9: a file was reported as "does not exist"."""
    (tmp_path / "config.json").write_text("{}")
    assert cli.main(["generate", "--model", str(tmp_path / "config.json"), "--prompt", "x"]) == 2
    assert "is not a directory" in _one_line_error(capsys, "generate")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        m3jax.load(tmp_path / "config.json")


def test_mesh_1x1_is_a_sub_mesh_of_the_first_devices():
    """Item 9: `--mesh 1x1` was refused when more devices exist."""
    devices = jax.devices()
    if len(devices) < 2:
        pytest.skip("needs several (forced host) devices")
    mesh = parse_mesh("1x1")
    assert mesh.shape == {"data": 1, "model": 1} and list(mesh.devices.flat) == devices[:1]
    assert list(parse_mesh(f"1x{len(devices) // 2}").devices.flat) == devices[:len(devices) // 2]
    with pytest.raises(ValueError, match=rf"needs {len(devices) + 1} devices, have {len(devices)}"):
        parse_mesh(f"1x{len(devices) + 1}")


def test_generate_no_verify_and_a_sub_mesh(tmp_path, capsys):
    """Item 6 wiring: a corrupt converted piece is refused by default, loads with --no-verify (CLI and load())."""
    from convert import orbax_io
    from convert.safetensors_io import CheckpointError
    release = make_tiny_checkpoint(str(tmp_path / "rel"), dtype="float32")
    dst = str(tmp_path / "conv")
    orbax_io.convert(release, dst, "float32", progress=False)
    piece = max((os.path.join(d, f) for d, _, fs in os.walk(os.path.join(dst, "params")) for f in fs),
                key=os.path.getsize)
    with open(piece, "r+b") as f:                                         # same size, different bytes
        f.seek(os.path.getsize(piece) // 2)
        f.write(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        m3jax.load(dst, dtype="float32", progress=False)
    m3jax.load(dst, dtype="float32", progress=False, verify=False)
    args = ["generate", "--model", dst, "--prompt", "hi", "--max-new-tokens", "2", "--dtype", "float32"]
    assert cli.main(args) == 2
    assert "does not match its checksum" in _one_line_error(capsys, "generate")
    assert cli.main(args + ["--no-verify", "--mesh", "1x1"]) == 0
    if jax.device_count() > 1:                                            # says which devices ran it
        assert f"mesh 1x1 used the first 1 of the {jax.device_count()} devices" in capsys.readouterr().err


def test_serve_is_a_subcommand(tmp_path, capsys, monkeypatch):
    """`m3jax serve` runs m3jax/serve/cli.py; without the serve extra it says what to install, in one line."""
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "usage: m3jax serve" in out and "--no-verify" in out
    assert cli.main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert "does not exist" in _one_line_error(capsys, "serve")
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "serve" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "uvicorn", None)                    # the serve extra not installed
    assert cli.main(["serve"]) == 2
    assert "pip install 'm3jax[serve]'" in _one_line_error(capsys, "serve")


@pytest.mark.gpu_long
def test_generate_names_the_bundled_default_model(capsys):
    """Item 13 (`make demo` runs this): without --model, say which model ran and where (the bundled trained
    model, m3jax.default_model_path(); the tiny random-weight model is for tests only)."""
    args = ["generate", "--prompt", "def f(x):", "--max-new-tokens", "2"]
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert "bundled default model" in err and m3jax.default_model_path() in err
    assert cli.main(args + ["--top-k", "8193"]) == 2                     # an error stays one line: no note then
    assert "<= the vocab size 8192" in _one_line_error(capsys, "generate")
    assert "bundled default model" in open(os.path.join(os.path.dirname(__file__), "..", "Makefile")).read()


# The Engine and the API (items 5, 9, 10) --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine():
    return m3jax.Engine(random_model(m3jax.M3Config.tiny(), seed=0), max_batch_size=2, max_seq_len=64,
                        prefill_chunk=16)


def test_top_k_beyond_the_vocab_is_refused_before_any_work(engine):
    """Item 5: top_k=2**31 raised OverflowError inside a step and wedged the engine."""
    steps = engine.num_steps
    for top_k in (2**31, 385):
        with pytest.raises(ValueError, match=r"request 0: sampling\.top_k must be"):
            m3jax.generate(engine, [[1, 2, 3]], m3jax.SamplingParams(top_k=top_k, temperature=1.0))
        assert not engine.has_work() and engine.num_steps == steps
    out = m3jax.generate(engine, [[1, 2, 3]], m3jax.SamplingParams(max_new_tokens=2, top_k=384, temperature=1.0))
    assert len(out[0].token_ids) == 2


def test_bools_are_not_token_ids_nor_counts(engine):
    """Item 9: `True` was accepted as token id 1 and as one new token."""
    with pytest.raises(ValueError, match=r"request 0: prompt token ids must be ints, got True"):
        m3jax.generate(engine, [[1, True, 3]])
    with pytest.raises(ValueError, match=r"request x: prompt token ids must be ints, got False"):
        engine.add_request(np.array([1, 2]).tolist() + [False], request_id="x")
    with pytest.raises(ValueError, match=r"sampling\.max_new_tokens must be"):
        m3jax.generate(engine, [[1, 2]], m3jax.SamplingParams(max_new_tokens=True))
    assert not engine.has_work()


def test_a_finished_request_id_can_be_reused(engine):
    """Item 9: once a request's result is taken (run(), generate(), pop_result()), its id is free again."""
    sp = m3jax.SamplingParams(max_new_tokens=2)
    for _ in range(2):
        assert engine.add_request([1, 2, 3], sp, request_id="same") == "same"
        with pytest.raises(ValueError, match="request same: request_id is already in use"):
            engine.add_request([4], sp, request_id="same")
        assert list(engine.run()) == ["same"]
    list(engine.stream([5, 6], sp, request_id="same"))
    assert engine.pop_result("same").finish_reason == "length"
    engine.add_request([1], sp, request_id="same")
    engine.run()


def test_load_records_the_checkpoint_and_the_engine_fits_the_model(tmp_path):
    """Item 10: generate(model, ["Hello"]) failed twice: max_seq_len 8192 > the model's 4096, then no tokenizer."""
    path = make_tiny_checkpoint(str(tmp_path / "ck"))
    model = m3jax.load(path, dtype="float32", progress=False)
    assert model.checkpoint_dir == os.path.abspath(path)
    eng = m3jax.Engine(model, max_batch_size=1, num_pages=8)
    assert eng.max_seq_len == model.config.max_position_embeddings == 4096 and eng.tokenizer is not None
    assert m3jax.Engine(model, max_batch_size=1, num_pages=8, max_seq_len=64).max_seq_len == 64


def test_train_is_a_subcommand(tmp_path, capsys):
    """`m3jax train` reaches the trainer's CLI: a missing corpus is one line and exit 2, and nothing is created."""
    out = tmp_path / "run"
    assert cli.main(["train", "--data", str(tmp_path / "no-such-corpus"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-corpus" in err[0], err
    assert not out.exists()
