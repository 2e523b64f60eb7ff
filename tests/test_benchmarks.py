"""The benchmark scripts stay runnable and their committed outputs stay what the code computes."""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import pytest
from flax import nnx

import m3jax
from m3jax.config import MOE_MLP, SPARSE_ATTENTION
from m3jax.testing import random_model

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)


def test_memory_plan_json_is_what_the_code_computes():
    import memory_plan
    with open(os.path.join(BENCH, "MEMORY_PLAN.json")) as f:
        committed = json.load(f)["rows"]
    computed = memory_plan.plan_rows()
    assert len(computed) == len(committed), f"{len(computed)} rows computed, {len(committed)} committed"
    for i, (got, want) in enumerate(zip(computed, committed)):
        assert got.keys() == want.keys(), f"row {i}: fields {sorted(got)} != {sorted(want)}"
        for field, value in want.items():
            # Tolerance on the numbers only: GiB figures are float sums whose last bits depend on the order of
            # summation; names, meshes, contexts, batches and the fits flag must match exactly.
            if isinstance(value, float):
                assert got[field] == pytest.approx(value, rel=1e-9), f"row {i} ({want['slice']}): {field}"
            else:
                assert got[field] == value, f"row {i} ({want['slice']}): {field}"


@pytest.mark.slow
@pytest.mark.multi_device
def test_multi_gpu_script_on_forced_cpu_devices():
    """benchmarks/multi_gpu.py --small: every mesh (model-, data- and mixed-parallel) with FP8 experts generates
    the one-device greedy tokens."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (forced host) devices")
    import multi_gpu
    args = argparse.Namespace(small=True, experts=8, dtype="float32", batch=4, prompt_len=60, new_tokens=3,
                              meshes=["1x1", "1x4", "4x1", "2x4"], fp8_experts=True, chunk=60, out=None)
    rows = multi_gpu.run(args)
    assert [r["mesh"] for r in rows] == args.meshes
    assert all(r["same_tokens_as_first"] and r["fp8_experts"] for r in rows)


@pytest.mark.slow
def test_generate_script_small_runs_through_public_seams(tmp_path):
    """benchmarks/generate.py --small --part jax on CPU: prefill through the Engine, decode through
    Engine.runner.execute; every measurement is recorded and decode does not recompile while timed."""
    import generate
    out = tmp_path / "rows.jsonl"
    generate.main(["--part", "jax", "--small", "--prefill", "40", "--context", "40", "--batches", "1", "2",
                   "--jax-chunk", "32", "--reps", "1", "--warmup", "1", "--decode-steps", "2", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["what"] for r in rows] == ["setup", "prefill", "decode", "decode"]
    assert not any("error" in r for r in rows), rows
    # the path of the stacked matmuls is recorded (CPU: the reference, i.e. the layer's slice and XLA's matmul)
    assert rows[1]["stacked_matmuls"] == "xla" and rows[2]["stacked_matmuls"] == "xla"
    assert rows[1]["tokens"] == 40 and rows[1]["tokens_per_s"] > 0
    assert [r["batch"] for r in rows[2:]] == [1, 2]
    assert all(r["compiles_in_timing"] == 0 and r["tokens_per_s"] > 0 for r in rows[2:])
    # each decode row carries the bytes the step must read and its ratio to the copy-rate bound of this run
    assert rows[0]["copy_gbs"] > 0
    for r in rows[2:]:
        assert r["bytes"] == r["weight_bytes"] + r["cache_bytes"] > 0
        assert r["x_bound"] == pytest.approx(r["step_ms"] / (r["bytes"] / (rows[0]["copy_gbs"] * 1e9) * 1e3))


def test_decode_step_bytes_counts_what_a_step_reads():
    """generate.decode_step_bytes on the tiny model, against a count by hand from the config."""
    import generate
    from m3jax.cache import init_cache

    cfg = m3jax.M3Config.tiny()
    model = random_model(cfg, seed=0)                       # float32: 4 bytes per element
    d, f, e, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.num_experts_per_tok
    cache = init_cache(model, 20)
    whole = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) * 4
    moe_layers = sum(n for _, n, _, mlp in cfg.layer_groups if mlp == MOE_MLP)
    experts = moe_layers * e * 3 * d * f * 4
    assert generate.expected_experts_hit(e, k, 1) == pytest.approx(k)
    assert generate.expected_experts_hit(8, 2, 2) == pytest.approx(8 - 8 * (6 / 8) ** 2)
    ctx, b = 50, 3
    got = generate.decode_step_bytes(model, cache, b, ctx)
    hit = generate.expected_experts_hit(e, k, b)
    table = cfg.vocab_size * d * 4
    assert got["weight_bytes"] == pytest.approx(whole - experts - table + experts * hit / e + b * d * 4)
    kv_token = 2 * cfg.num_key_value_heads * cfg.head_dim * 4            # K and V of one token, all heads
    attended = min(ctx, cfg.msa.topk_blocks * cfg.msa.block_size)
    per_request = 0
    for _, n, attn, _ in cfg.layer_groups:
        sparse = attn == SPARSE_ATTENTION
        per_request += n * (kv_token * attended + cfg.msa.index_dim * 4 * ctx if sparse else kv_token * ctx)
    assert got["cache_bytes"] == pytest.approx(b * per_request)


@pytest.mark.multi_device
def test_moe_combine_script_small_variants_agree(tmp_path):
    """benchmarks/moe_combine.py --small: experts split over 4 CPU devices (TPU interpreter), every way of
    combining the partials runs and gives the single-device result (bf16 partials within their rounding)."""
    import moe_combine
    rows = moe_combine.main(["--small", "--devices", "4", "--tokens", "4", "--out", str(tmp_path)])
    assert [r["variant"] for r in rows] == list(moe_combine.VARIANTS) and not any("error" in r for r in rows)
    err = {r["variant"]: r["rel_err"] for r in rows if r["variant"] != "local"}
    assert err["psum"] < 1e-6 and err["rs-ag"] < 1e-6 and err["psum-bf16"] < 1e-2, err


def test_long_context_script_small_runs_both_parts(tmp_path):
    """benchmarks/long_context.py --small on CPU: the prompt fills the context but for the new tokens, the
    prefill is chunked as asked, every new token is timed; transformers' forward is recorded per length."""
    import long_context
    out = tmp_path / "rows.jsonl"
    long_context.main(["--part", "jax", "--small", "--context", "300", "--new-tokens", "3", "--prefill-chunk", "64",
                       "--out", str(out)])
    long_context.main(["--part", "torch", "--small", "--torch-lengths", "48", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["what"] for r in rows] == ["setup", "long_context", "setup", "torch_prefill"]
    lc = rows[1]
    assert (lc["context"], lc["prompt_tokens"], lc["new_tokens"]) == (300, 297, 3)
    assert lc["steps"] == 5 + 2                      # ceil(297 / 64) prefill steps, then 2 decode steps
    assert lc["ttft_s"] > 0 and lc["decode_tokens_per_s"] > 0
    assert rows[3]["prompt_tokens"] == 48 and rows[3]["wall_s"] > 0


def test_msa_trained_script_measures_the_bundled_model(tmp_path):
    """benchmarks/msa_trained.py on a short held-out window: the indexer over the model's own index keys reproduces
    the model's selection (checked inside), FP8 statistics lie in range, every tile's union lies between one
    query's top-k and n times it (and random selections of the same shape obey the same bounds), the Engine runs
    both caches."""
    import msa_trained
    res = msa_trained.run(1152, "bfloat16", (1, 4, 64), str(tmp_path), prompts=1, prompt_len=1040, new_tokens=2)
    topk = res["meta"]["topk"]
    assert [r["layer"] for r in res["fp8"]] == [1, 2, 3, 4, 5]
    for r in res["fp8"]:
        assert r["rows"] == (1152 - topk * res["meta"]["block"]) * 4
        assert 0.0 <= r["same_sets"] <= 1.0 and 0.5 < r["overlap"] <= 1.0
        assert 0.0 <= r["mass_recall_min"] <= r["mass_recall_mean"] <= 1.0 + 1e-6
    for r in res["locality"]:
        for u in (r["union"], r["random_union"]):
            assert topk - 1e-9 <= u <= r["tile"] * topk + 1e-9
        if r["tile"] == 1:
            assert r["union"] == r["random_union"] == topk
    e = res["engine"]
    assert (e["prompts"], e["new_tokens"]) == (1, 2) and 0.0 <= e["same_tokens"] <= 1.0
    assert json.loads((tmp_path / "msa_trained.json").read_text())["meta"]["tokens"] == 1152


def test_open_measurements_script_names_real_scripts_and_flags():
    """benchmarks/open_measurements.sh: an unknown part exits 2; every benchmark script it runs exists and takes
    every --flag it passes (so the script stays true as the benchmarks change)."""
    import re
    import subprocess
    root = os.path.join(os.path.dirname(__file__), "..")
    script = os.path.join(root, "benchmarks", "open_measurements.sh")
    r = subprocess.run(["bash", script, "bogus"], capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr
    text = open(script).read().replace("\\\n", " ")
    calls = re.findall(r"python3 (benchmarks/\w+\.py)([^\n;|]*)", text)
    assert {c[0] for c in calls} >= {"benchmarks/moe.py", "benchmarks/generate.py", "benchmarks/kernels.py",
                                     "benchmarks/long_context.py", "benchmarks/full_m3.py"}
    shared = open(os.path.join(root, "benchmarks", "generate.py")).read()    # the scaled-M3 scripts' common flags
    for path, args in calls:
        src = open(os.path.join(root, path)).read()
        for flag in re.findall(r"(--[a-z0-9-]+)", args):
            assert f'"{flag}"' in src or ("benchmarks.generate import" in src and f'"{flag}"' in shared), (path, flag)
