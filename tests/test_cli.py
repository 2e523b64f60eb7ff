"""The CLI: one line and exit code 2 for user errors; make-tiny then generate from it."""

from __future__ import annotations

import pytest

import m3jax
from m3jax import cli
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
