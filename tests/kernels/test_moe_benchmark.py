"""benchmarks/moe.py --small end to end on CPU (kernels interpreted): the MXFP8 cases read a layer of a
[2, E, D, F] stack, report the kernel's load path, and the tile sweep agrees with the default tiles."""

from __future__ import annotations

import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_moe_benchmark_small(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_moe", os.path.join(ROOT, "benchmarks", "moe.py"))
    bench_moe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_moe)
    bench_moe.geometry = lambda small: dict(experts=8, hidden=64, width=32, cases=[("decode", 2)])
    rows = bench_moe.main(["--small", "--weights", "mxfp8", "--sweep", "mxfp8", "--out", str(tmp_path)])
    assert len(rows) == 1 + len(bench_moe.SWEEP[("mxfp8", "decode")])
    for r in rows:
        assert "error" not in r, r
        assert (r["weight_shape"], r["layer"], r["load_path"]) == ([2, 8, 64, 32], 1, "direct")
        assert r["rel_err"] < 1e-2 and r["ms"] > 0        # tiles change only the f32 summation order
    assert sum(r["default_tiles"] for r in rows) == 1
    saved = json.loads((tmp_path / "moe.json").read_text())
    assert len(saved["rows"]) == len(rows) and len((tmp_path / "moe.jsonl").read_text().splitlines()) == len(rows)
    assert "best MXFP8 tiles" in capsys.readouterr().out
