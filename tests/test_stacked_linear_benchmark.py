"""benchmarks/stacked_linear.py --small end to end on CPU (the kernel interpreted): every method runs in scan form
and gives reference.linear's layer, the tile sweep runs, rows go to the jsonl file and the table is printed."""

from __future__ import annotations

import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_stacked_linear_benchmark_small(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_stacked_linear",
                                                  os.path.join(ROOT, "benchmarks", "stacked_linear.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "rows.jsonl"
    rows = mod.main(["--small", "--sweep", "--weights", "q", "--out", str(out)])
    methods = [r["method"] for r in rows]
    assert methods.count("kernel") == methods.count("xla_slice") == methods.count("xla_separate") == 2   # rows 1, 20
    assert methods.count("sweep") >= 1
    for r in rows:
        assert "error" not in r, r
        assert r["rel_err"] < 1e-2 and r["us"] > 0 and r["ratio_to_bound"] > 0
        assert (r["weight"], r["k"], r["n"], r["layers"]) == ("q", 64, 96, 2)
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    printed = capsys.readouterr().out
    assert "xla_separate" in printed and "sweep, best LinearTiles" in printed


def test_m3_widths_come_from_the_release_config():
    spec = importlib.util.spec_from_file_location("bench_stacked_linear",
                                                  os.path.join(ROOT, "benchmarks", "stacked_linear.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    w = {name: (k, n) for name, (k, n, _) in mod.geometry(False)["weights"].items()}
    assert w == {"q": (6144, 8192), "kv": (6144, 512), "o": (8192, 6144), "index_k": (6144, 128),
                 "mlp_up": (6144, 12288), "mlp_down": (12288, 6144), "shared_up": (6144, 3072),
                 "shared_down": (3072, 6144)}
