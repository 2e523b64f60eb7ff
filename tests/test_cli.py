"""The CLI: one line and exit code 2 for user errors; make-tiny then generate from it."""

from __future__ import annotations

from m3jax import cli


def test_make_tiny_then_generate(tmp_path, capsys):
    assert cli.main(["make-tiny", str(tmp_path / "ck"), "--dtype", "float32"]) == 0
    assert cli.main(["generate", "--model", str(tmp_path / "ck"), "--prompt", "hello", "--max-new-tokens", "5",
                     "--dtype", "float32"]) == 0
    assert capsys.readouterr().out.strip()


def test_user_errors_print_one_line(tmp_path, capsys):
    assert cli.main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("m3jax generate: error:") and "\n" not in err
    assert cli.main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("m3jax convert") and "\n" not in err and "Traceback" not in err
