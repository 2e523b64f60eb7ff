"""README.md runs as pasted (issue 15, item 10): every ```python block, and the CLI section's generate and
make-tiny lines, with PATH / MXFP8_PATH / DST standing for directories written here.

Each block runs in a fresh interpreter from the repository root (as a user who pasted it into `python` would);
/tmp/m3-tiny is redirected to this test's temporary directory so that a user's own /tmp/m3-tiny is never touched.
The OpenAI client block talks to a `m3jax serve` started here on a free port instead of 8000.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()


def _blocks(lang: str) -> list[tuple[str, str]]:
    """(section heading, code) of every ```lang block."""
    out, section = [], ""
    for m in re.finditer(rf"^(## [^\n]*)$|^```{lang}\n(.*?)^```$", README, re.M | re.S):
        if m.group(1):
            section = m.group(1)[3:]
        else:
            out.append((section, m.group(2)))
    return out


PYTHON = _blocks("python")
SERVE_CLIENT = [code for _, code in PYTHON if "OpenAI(" in code]
# The multi-host block runs one process per host (SPMD), so it cannot run as one paste here; tests/test_distributed.py
# runs the same calls as 2 processes x 4 CPU devices.
MULTI_HOST = [code for section, code in PYTHON if section.startswith("Multi-host")]
LOCAL = [(section, code) for section, code in PYTHON if "OpenAI(" not in code and not section.startswith("Multi-host")]


def _run(args, tmp_path, timeout=600, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")   # tests/conftest.py sets it too
    r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **kw)
    assert r.returncode == 0, f"{args}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    return r


def _python(code: str, tmp_path) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-c", code.replace("/tmp/m3-tiny", str(tmp_path / "m3-tiny"))], tmp_path)


def test_readme_has_the_blocks_this_test_runs():
    assert [s for s, _ in LOCAL] == ["Quick start", "API", "Sharding and conversion"] and len(SERVE_CLIENT) == 1
    assert len(MULTI_HOST) == 1 and "m3jax.distributed.initialize(" in MULTI_HOST[0]
    assert CLI_LINES and all(line.startswith(("m3jax generate", "m3jax make-tiny")) for line in CLI_LINES)


def _marks(text: str, slow: bool) -> list:
    """slow as asked; multi_device where the text builds a mesh of 8 devices (skipped where there are fewer)."""
    return [pytest.mark.slow] * slow + [pytest.mark.multi_device] * bool(re.search(r"make_mesh\(|--mesh 2x4", text))


@pytest.mark.parametrize("section,code", [pytest.param(s, c, marks=_marks(c, slow=s != "Quick start"),
                                                       id=s.split()[0].lower()) for s, c in LOCAL])
@pytest.mark.gpu_long
def test_python_block_runs_as_pasted(section, code, tmp_path):
    r = _python(code, tmp_path)
    if section == "Quick start":
        out = r.stdout.strip()
        assert re.search(r"\] .*?(stop|length)$", out, re.S | re.M), out          # token ids, text, reason
        assert re.fullmatch(r"\[\d+(, \d+)*\]", out.splitlines()[-1]), out      # the image prompt's token ids


# The CLI section's lines --------------------------------------------------------------------------------------------

CLI_LINES = [line.split("  #")[0].strip() for section, code in _blocks("bash") if section == "CLI"
             for line in code.splitlines() if line.startswith(("m3jax generate", "m3jax make-tiny"))]


def _cli_args(line: str, paths: dict[str, str]) -> list[str]:
    """A README line as argv: `[--opt value]` groups are taken, PATH-like words replaced, quotes honoured."""
    import shlex
    words = shlex.split(line.replace("[", "").replace("]", ""))
    words = [paths.get(w, w) for w in words]
    return [sys.executable, "-m", "m3jax.cli", *words[1:]]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    from m3jax.testing import make_tiny_checkpoint
    d = tmp_path_factory.mktemp("readme-cli")
    return {"PATH": make_tiny_checkpoint(str(d / "bf16")),
            "MXFP8_PATH": make_tiny_checkpoint(str(d / "mxfp8"), quant="mxfp8"),
            "DST": str(d / "dst")}


@pytest.mark.parametrize("line", [pytest.param(line, id=f"line{i}", marks=_marks(line, i > 0 and "make-tiny" not in line))
                                  for i, line in enumerate(CLI_LINES)])
def test_cli_line_runs_as_pasted(line, paths, tmp_path):
    args = _cli_args(line, paths)
    if "--max-new-tokens" not in args and "make-tiny" not in line:
        args += ["--max-new-tokens", "4"]              # the README's defaults, only shorter
    _run(args, tmp_path)
    if "make-tiny" in line:
        assert sorted(os.listdir(paths["DST"]))[0] == "config.json"


# The OpenAI client block, against `m3jax serve` -------------------------------------------------------------------

@pytest.mark.slow
def test_openai_client_block_runs_against_m3jax_serve(tmp_path):
    pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "m3jax.cli", "serve", "--port", str(port)],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "m3jax serve did not come up in 300 s"
                time.sleep(1)
        r = _python(SERVE_CLIENT[0].replace("127.0.0.1:8000", f"127.0.0.1:{port}"), tmp_path)
        assert "prompt_tokens" in r.stdout, r.stdout
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
