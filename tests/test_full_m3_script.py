"""benchmarks/full_m3.py --small: the full-geometry benchmark's code path (layers, cache, timing, projection) on a
tiny config on CPU, so the GPU run does not fail on a trivial error."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_full_m3_small_runs_and_projects(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("full_m3", os.path.join(ROOT, "benchmarks", "full_m3.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.main(["--small", "--out", str(tmp_path)])
    assert [(r["kind"], r["batch"], r["context"]) for r in rows] == [("decode", 2, 40), ("prefill", 1, 32)]
    for r in rows:
        assert "error" not in r, r
        assert r["moe_layer_ms"] > 0 and r["ffn_ms"] > 0 and r["dense_layer_ms"] > 0 and r["head_ms"] > 0
        lo, hi = r["proj_4gpu_ms"]
        assert 0 < lo <= hi
    saved = json.load(open(tmp_path / "full_m3.json"))
    assert saved["vllm_tpot_ms_8xh200_c4"] == 8.4 and len(saved["rows"]) == 2
    assert "vLLM: 8.4 ms TPOT" in capsys.readouterr().out
