"""Benchmark the GPU MSA kernels against dense cuDNN flash attention, on the lent GPU.

    python benchmarks/kernels.py [--quick] [--out DIR]
    python benchmarks/kernels.py --issue13 [--out DIR]   # issue 13's cases (see issue13()): in-jit decode
        timing, FP8 index-K, the dense layers' chunk path, 512K / 1M prefill in Engine-sized chunks
    python benchmarks/kernels.py --engine-rows-dense [--out DIR]   # the full-attention layer on Engine prefill
        rows (a 512-token chunk in rows of 64 / 512, after 0 / 32K / 128K of history): paged kernel vs chunk path

Full M3 attention geometry: 64 q heads, 4 KV heads, head dim 128, index 4 x 128, block (page) 128, top-16.
Prefill: batch 1 at 8K / 32K / 128K (the whole prompt as one chunk). Decode: batch 1 / 8 / 32 / 64 x context
8K / 32K / 128K, one new token per request, pages scattered over the pool. Random bf16 inputs (never zeros).
The card's ceilings are measured in the same run: bf16 matmul (8192^3 jnp.dot) and a device-to-device copy
(bytes read + written). FLOPs count only the useful work: the keys of the attended blocks that are causally
visible (sparse), the visible keys (dense), the visible index keys (indexer). Bytes for decode count what must
move once: the index-K history, the selected K/V pages, q and the output.
Prints one table last and writes benchmarks.json under --out (default $OUT or .).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from pallas_kernels import gpu  # noqa: E402
from pallas_kernels.gpu.attention import (KV_MAJOR_MIN_QUERIES, SPARSE_TUNING,  # noqa: E402
                                           sparse_attention_tuned)
from pallas_kernels.gpu.msa import msa_tuned  # noqa: E402

N, K, H, I, R, C = 64, 4, 128, 128, 128, 16
G = N // K


def bench(fn, *args, iters=10, reps=5):
    """Median seconds per call: `reps` batches of `iters` back-to-back calls, synchronised at the end."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times)


def ceilings():
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (8192, 8192), jnp.bfloat16)
    b = jax.random.normal(kb, (8192, 8192), jnp.bfloat16)
    mm = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.bfloat16))
    t = bench(mm, a, b, iters=10)
    return {"matmul_tflops": 2 * 8192 ** 3 / t / 1e12, "copy_gbs": copy_rate()}


def copy_rate(nbytes: int = 2 ** 31) -> float:
    """GB/s of `v * 1.5` over a bf16 array of `nbytes` (2 GiB: far past the caches), counting the bytes read and
    the bytes written: the rate a kernel that streams its operands once can hope for."""
    x = jax.random.normal(jax.random.key(0), (nbytes // 2,), jnp.bfloat16)
    tc = bench(jax.jit(lambda v: v * jnp.bfloat16(1.5)), x, iters=10)
    return 2 * x.nbytes / tc / 1e9


def prefill_inputs(s):
    """A batch-1 prefill of s tokens: pools, queries, positions and the GPU indexer's selection."""
    key = jax.random.key(s)
    k_pages, v_pages, ik_pages, table = make_pool(key, 1, s)
    kq, ki = jax.random.split(jax.random.fold_in(key, 1))
    q = jax.random.normal(kq, (1, s, N, H), jnp.bfloat16)
    iq = jax.random.normal(ki, (1, s, K, I), jnp.bfloat16)
    pos = jnp.arange(s, dtype=jnp.int32)[None]
    sel = gpu.indexer_topk(iq, ik_pages, table, pos, topk=C)
    return k_pages, v_pages, ik_pages, table, q, iq, pos, sel


def make_pool(key, batch, ctx, dtype=jnp.bfloat16):
    """Random K/V/index-K page pools for `batch` requests of `ctx` keys, pages shuffled."""
    m = ctx // R
    p = batch * m + 1
    kk, kv, ki, kp = jax.random.split(key, 4)
    k_pages = jax.random.normal(kk, (K, p, R, H), dtype)
    v_pages = jax.random.normal(kv, (K, p, R, H), dtype)
    ik_pages = jax.random.normal(ki, (p, R, I), dtype)
    table = (1 + jax.random.permutation(kp, batch * m)).reshape(batch, m).astype(jnp.int32)
    return k_pages, v_pages, ik_pages, table


def msa_fns():
    idx = jax.jit(lambda iq, ik, pt, pos: gpu.indexer_topk(iq, ik, pt, pos, topk=C))
    att = jax.jit(lambda q, k, v, pt, pos, sel: gpu.sparse_attention(q, k, v, pt, pos, sel))
    return idx, att


OURS_DENSE = jax.jit(gpu.dense_attention)
# The full-attention layers' path for prompt chunks: cuDNN over the chunk + paged history merged by LSE.
OURS_DENSE_CHUNK = jax.jit(lambda *a: gpu.dense_attention(*a, contiguous_chunks=True))


def _sparse_with_schedule(schedule: str):
    """Sparse attention pinned to one schedule ("query": query-outer, "kv": KV-block-major), jitted."""
    return jax.jit(lambda *args: sparse_attention_tuned(*args, scale=None, interpret=False, schedule=schedule,
                                                        **SPARSE_TUNING))


ATT_QUERY_OUTER = _sparse_with_schedule("query")
ATT_KV_MAJOR = _sparse_with_schedule("kv")


def cudnn_dense(q, k, v, causal):
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")


def prefill_case(s, idx, att, slow_variants=True):
    key = jax.random.key(s)
    k_pages, v_pages, ik_pages, table = make_pool(key, 1, s)
    kq, ki, kk, kv = jax.random.split(jax.random.fold_in(key, 1), 4)
    q = jax.random.normal(kq, (1, s, N, H), jnp.bfloat16)
    iq = jax.random.normal(ki, (1, s, K, I), jnp.bfloat16)
    pos = jnp.arange(s, dtype=jnp.int32)[None]
    iters = 3 if s >= 65536 else 10
    t_idx = bench(idx, iq, ik_pages, table, pos, iters=iters, reps=3)
    sel = idx(iq, ik_pages, table, pos)
    t_att = bench(att, q, k_pages, v_pages, table, pos, sel, iters=iters, reps=3)
    t_att_query = (bench(ATT_QUERY_OUTER, q, k_pages, v_pages, table, pos, sel, iters=iters, reps=3)
                   if slow_variants else float("nan"))
    # below KV_MAJOR_MIN_QUERIES the default is query-outer: the KV-block-major schedule there too, to place the
    # threshold by measurement (it was set between the 8K and 32K runs without an 8K KV-major point)
    t_att_kv = (bench(ATT_KV_MAJOR, q, k_pages, v_pages, table, pos, sel, iters=iters, reps=3)
                if s < KV_MAJOR_MIN_QUERIES else float("nan"))
    t_ours_dense = (bench(OURS_DENSE, q, k_pages, v_pages, table, pos, iters=1 if s >= 65536 else 3, reps=2)
                    if slow_variants or s <= 32768 else float("nan"))
    t_dense_chunk = bench(OURS_DENSE_CHUNK, q, k_pages, v_pages, table, pos, iters=iters, reps=3)
    del k_pages, v_pages, ik_pages
    kc = jax.random.normal(kk, (1, s, K, H), jnp.bfloat16)
    vc = jax.random.normal(kv, (1, s, K, H), jnp.bfloat16)
    t_dense = bench(jax.jit(lambda a, b, c: cudnn_dense(a, b, c, True)), q, kc, vc, iters=iters, reps=3)
    t = np.arange(s)
    keys_sparse = (np.minimum(C, t // R + 1) - 1) * R + t % R + 1          # chosen non-local blocks are full
    return {"kind": "prefill", "batch": 1, "ctx": s, "t_idx": t_idx, "t_att": t_att, "t_dense": t_dense,
            "t_ours_dense": t_ours_dense, "t_att_query_outer": t_att_query, "t_att_kv_major": t_att_kv,
            "t_ours_dense_chunk": t_dense_chunk,
            "flops_att": 4 * H * N * float(keys_sparse.sum()),
            "flops_dense": 4 * H * N * float((t + 1).sum()),
            "flops_idx": 2 * I * K * float((t + 1).sum())}


def decode_inputs(batch, ctx):
    """A decode step's inputs at `ctx` tokens of context: the paged pool, queries, positions, and the keys that
    make the contiguous K / V for cuDNN (made by the caller after it frees the pool: both do not fit at 128K)."""
    key = jax.random.key(batch * 1000 + ctx // 1024)
    k_pages, v_pages, ik_pages, table = make_pool(key, batch, ctx)
    kq, ki, kk, kv = jax.random.split(jax.random.fold_in(key, 1), 4)
    q = jax.random.normal(kq, (batch, 1, N, H), jnp.bfloat16)
    iq = jax.random.normal(ki, (batch, 1, K, I), jnp.bfloat16)
    pos = jnp.full((batch, 1), ctx - 1, jnp.int32)
    return k_pages, v_pages, ik_pages, table, q, iq, pos, (kk, kv)


def decode_case(batch, ctx, idx, att):
    k_pages, v_pages, ik_pages, table, q, iq, pos, (kk, kv) = decode_inputs(batch, ctx)
    t_idx = bench(idx, iq, ik_pages, table, pos, iters=20)
    sel = idx(iq, ik_pages, table, pos)
    t_att = bench(att, q, k_pages, v_pages, table, pos, sel, iters=20)
    t_ours_dense = bench(OURS_DENSE, q, k_pages, v_pages, table, pos, iters=10)
    del k_pages, v_pages, ik_pages
    kc = jax.random.normal(kk, (batch, ctx, K, H), jnp.bfloat16)
    vc = jax.random.normal(kv, (batch, ctx, K, H), jnp.bfloat16)
    t_dense = bench(jax.jit(lambda a, b, c: cudnn_dense(a, b, c, False)), q, kc, vc, iters=20)
    sel_keys = min(C, ctx // R) * R
    bytes_idx = batch * ctx * I * 2
    bytes_att = batch * (K * sel_keys * H * 2 * 2 + 2 * N * H * 2)
    return {"kind": "decode", "batch": batch, "ctx": ctx, "t_idx": t_idx, "t_att": t_att, "t_dense": t_dense,
            "t_ours_dense": t_ours_dense, "flops_att": batch * 4 * H * N * sel_keys,
            "flops_dense": batch * 4 * H * N * ctx,
            "flops_idx": batch * 2 * I * K * ctx, "bytes_idx": bytes_idx, "bytes_att": bytes_att,
            "bytes_dense": batch * (ctx * K * H * 2 * 2 + 2 * N * H * 2)}


def derive(r, ceil):
    r["t_total"] = r["t_idx"] + r["t_att"]
    r["speedup"] = r["t_dense"] / r["t_total"]
    r["tflops_att"] = r["flops_att"] / r["t_att"] / 1e12
    r["tflops_dense"] = r["flops_dense"] / r["t_dense"] / 1e12
    r["tflops_ours_dense"] = r["flops_dense"] / r["t_ours_dense"] / 1e12
    r["tflops_idx"] = r["flops_idx"] / r["t_idx"] / 1e12
    r["att_vs_dense_tflops"] = r["tflops_att"] / r["tflops_dense"]
    if r["kind"] == "decode":
        r["gbs_total"] = (r["bytes_idx"] + r["bytes_att"]) / r["t_total"] / 1e9
        r["gbs_idx"] = r["bytes_idx"] / r["t_idx"] / 1e9
        r["gbs_att"] = r["bytes_att"] / r["t_att"] / 1e9
        r["gbs_dense"] = r["bytes_dense"] / r["t_dense"] / 1e9
        r["copy_frac_total"] = r["gbs_total"] / ceil["copy_gbs"]
    return r


def table(rows, ceil):
    head = (f"{'case':>16} {'idx ms':>8} {'attn ms':>8} {'total ms':>9} {'cuDNN ms':>9} {'x dense':>7} "
            f"{'attn TF/s':>9} {'cuDNN TF/s':>10} {'idx TF/s':>8} {'GB/s':>7} {'%copy':>6} {'ourdense ms':>11}")
    lines = [f"ceilings: bf16 matmul {ceil['matmul_tflops']:.0f} TFLOP/s, copy {ceil['copy_gbs']:.0f} GB/s", head]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['kind']} b{r['batch']} {r['ctx'] // 1024}K: ERROR {r['error'][:90]}")
            continue
        name = f"{r['kind']} b{r['batch']} {r['ctx'] // 1024}K"
        gbs = f"{r['gbs_total']:7.0f} {100 * r['copy_frac_total']:5.1f}%" if r["kind"] == "decode" else " " * 14
        lines.append(f"{name:>16} {1e3 * r['t_idx']:8.3f} {1e3 * r['t_att']:8.3f} {1e3 * r['t_total']:9.3f} "
                     f"{1e3 * r['t_dense']:9.3f} {r['speedup']:7.2f} {r['tflops_att']:9.1f} "
                     f"{r['tflops_dense']:10.1f} {r['tflops_idx']:8.1f} {gbs} {1e3 * r['t_ours_dense']:11.3f}")
    return "\n".join(lines)


QUERY_SWEEP = [(1, 2, 32)]                                        # (num_warps, num_stages, chunk)
KV_SWEEP = [(16, 4, 3, False), (4, 4, 2, True), (8, 4, 2, True), (8, 8, 2, True), (16, 8, 2, True),
            (16, 8, 3, True), (8, 4, 3, True), (32, 8, 2, True)]
# KV-block-major: (tokens_per_item, num_warps, num_stages, tile)


def sweep(out_dir):
    """Time the two sparse-attention schedules and their launch variants in prefill (8K, 32K; best at 128K)."""
    results = []

    def make(cfg):
        if cfg[0] == "query":
            w, st, ch = cfg[1]
            return lambda *a: sparse_attention_tuned(*a, scale=None, interpret=False, num_warps=w, num_stages=st,
                                                     chunk=ch, schedule="query")
        tq, w, st, tile = cfg[1]
        return lambda *a: sparse_attention_tuned(*a, scale=None, interpret=False, num_warps=1, num_stages=2,
                                                 chunk=32, schedule="kv", kv_major=dict(
                                                     tokens_per_item=tq, num_warps=w, num_stages=st, tile=tile))

    for s in (32768, 131072):
        k_pages, v_pages, ik_pages, table, q, iq, pos, sel = prefill_inputs(s)
        grid = [("query", c) for c in QUERY_SWEEP] + [("kv", c) for c in KV_SWEEP]
        if s > 32768:
            prev = sorted((r for r in results if r["ctx"] == 32768 and r["op"] == "kv"), key=lambda r: r["t"])
            grid = [("query", c) for c in QUERY_SWEEP] + [("kv", tuple(r["cfg"])) for r in prev[:3]]
        want = None
        for cfg in grid:
            try:
                fn = jax.jit(make(cfg))
                t = bench(fn, q, k_pages, v_pages, table, pos, sel, iters=3, reps=3)
                got = fn(q, k_pages, v_pages, table, pos, sel).astype(jnp.float32)
                want = got if want is None else want
                err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
            except Exception as e:  # noqa: BLE001
                print(f"sweep {cfg} {s}: {type(e).__name__}: {str(e)[:400]}", flush=True)
                continue
            results.append({"op": cfg[0], "cfg": list(cfg[1]), "ctx": s, "t": t, "rel_err_vs_query": err})
            print(f"sweep {cfg[0]:6s} {str(cfg[1]):14s} {s // 1024:4d}K {1e3 * t:9.3f} ms  err {err:.1e}", flush=True)
        del k_pages, v_pages, ik_pages, q, iq, sel, want
    with open(os.path.join(out_dir, "sweep.json"), "w") as f:
        json.dump(results, f, indent=1)


def profile_kv(out_dir, s=131072):
    """Split the KV-block-major schedule's time at one prefill size: work list, kernel, merge."""
    from pallas_kernels.gpu import kv_major
    from pallas_kernels.gpu.attention import KV_MAJOR_TUNING, compact_block_ids, sparse_attention
    k_pages, v_pages, ik_pages, table, q, iq, pos, sel = prefill_inputs(s)
    key = jax.random.key(s)
    kq, ki = jax.random.split(jax.random.fold_in(key, 1))
    tq = KV_MAJOR_TUNING["tokens_per_item"]
    prep = jax.jit(lambda sel, pos: kv_major.work_items(compact_block_ids(sel, pos, R, s // R)[0], tq, s // R))
    ids, nvalid = jax.jit(lambda sel, pos: compact_block_ids(sel, pos, R, s // R))(sel, pos)
    o = jax.random.normal(kq, (1, s, K, C, G, H), jnp.bfloat16)
    lse = jax.random.normal(ki, (1, s, K, C, G), jnp.float32)
    merge = jax.jit(kv_major.merge_partials)
    full = jax.jit(sparse_attention)
    res = {"ctx": s, "t_prep": bench(prep, sel, pos, iters=3, reps=3),
           "t_merge": bench(merge, o, lse, nvalid, iters=3, reps=3),
           "t_full": bench(full, q, k_pages, v_pages, table, pos, sel, iters=3, reps=3)}
    res["t_kernel_est"] = res["t_full"] - res["t_prep"] - res["t_merge"]
    print({k: (round(1e3 * v, 3) if k.startswith("t_") else v) for k, v in res.items()}, flush=True)
    with open(os.path.join(out_dir, "profile_kv.json"), "w") as f:
        json.dump(res, f, indent=1)


UNROLL = 8


def in_jit(step, n=UNROLL):
    """Device time per call of `step(q, iq_or_none, *rest)` inside one jit: n serially dependent copies
    (unrolled; each call's q and iq depend on the previous output, so XLA can neither hoist nor merge them),
    as the model calls the ops inside its jitted layer step. No per-call host dispatch; returns a jitted fn."""
    def run(q, iq, *rest):
        c = jnp.zeros((), jnp.float32)
        for _ in range(n):
            eps = (c * 0).astype(q.dtype)
            out = step(q + eps, None if iq is None else iq + eps, *rest)
            c = c + out.reshape(-1)[0].astype(jnp.float32)
        return c
    return jax.jit(run)


def bench_in_jit(fn, *args, n=UNROLL):
    return bench(fn, *args, iters=3, reps=5) / n


def msa_layer(q, iq, k, v, ik, table, pos, ik_scale=None, schedule="two-step"):
    """One MSA layer's attention (indexer + sparse attention) through gpu.msa's schedule: "two-step" (the
    default: indexer_topk, then sparse_attention) or "fused-topk" (the attention kernel merges the indexer's
    split candidates)."""
    return msa_tuned(q, k, v, table, pos, iq, ik, topk=C, ik_scale=ik_scale, schedule=schedule)[0]


def decode_case_13(batch, ctx, idx, att):
    """Decode: per-call (separate jits, as issue 4 measured) and in-jit device time of the MSA layer (indexer +
    attention) and cuDNN; the indexer with a bf16 and an FP8 (e4m3 + f32 scale per token) index-K cache."""
    from pallas_kernels import layout
    k_pages, v_pages, ik_pages, table, q, iq, pos, (kk, kv) = decode_inputs(batch, ctx)
    codes, scale = jax.jit(layout.quantize_index_k)(ik_pages)
    idx8 = jax.jit(lambda iq, ik, pt, pos, sc: gpu.indexer_topk(iq, ik, pt, pos, topk=C, ik_scale=sc))
    r = {"kind": "decode", "batch": batch, "ctx": ctx}
    r["t_idx"] = bench(idx, iq, ik_pages, table, pos, iters=20)
    r["t_idx_fp8"] = bench(idx8, iq, codes, table, pos, scale, iters=20)
    sel = idx(iq, ik_pages, table, pos)
    sel8 = idx8(iq, codes, table, pos, scale)
    r["fp8_same_sets"] = float(jnp.mean(jnp.all(jnp.sort(sel, -1) == jnp.sort(sel8, -1), axis=-1)))
    r["t_att"] = bench(att, q, k_pages, v_pages, table, pos, sel, iters=20)
    r["t_layer_jit"] = bench_in_jit(in_jit(lambda q, iq, *a: msa_layer(q, iq, *a)), q, iq, k_pages, v_pages,
                                    ik_pages, table, pos)
    r["t_layer_fp8_jit"] = bench_in_jit(in_jit(lambda q, iq, k, v, ik, t, p, sc: msa_layer(q, iq, k, v, ik, t, p, sc)),
                                        q, iq, k_pages, v_pages, codes, table, pos, scale)
    fused = lambda q, iq, *a: msa_layer(q, iq, *a, schedule="fused-topk")
    r["t_layer_fused_jit"] = bench_in_jit(in_jit(fused), q, iq, k_pages, v_pages, ik_pages, table, pos)
    _, sel_fused = jax.jit(lambda *a: msa_tuned(*a, topk=C, schedule="fused-topk"))(q, k_pages, v_pages, table, pos,
                                                                                      iq, ik_pages)
    r["fused_same_sets"] = float(jnp.mean(jnp.all(jnp.sort(sel, -1) == jnp.sort(sel_fused, -1), axis=-1)))
    del k_pages, v_pages, ik_pages, codes
    kc = jax.random.normal(kk, (batch, ctx, K, H), jnp.bfloat16)
    vc = jax.random.normal(kv, (batch, ctx, K, H), jnp.bfloat16)
    r["t_dense"] = bench(jax.jit(lambda a, b, c: cudnn_dense(a, b, c, False)), q, kc, vc, iters=20)
    r["t_dense_jit"] = bench_in_jit(in_jit(lambda q, iq, k, v: cudnn_dense(q, k, v, False)), q, None, kc, vc)
    sel_keys = min(C, ctx // R) * R
    r["bytes_idx"] = batch * ctx * I * 2
    r["bytes_idx_fp8"] = batch * ctx * (I + 4)
    r["bytes_att"] = batch * (K * sel_keys * H * 2 * 2 + 2 * N * H * 2)
    r["bytes_dense"] = batch * (ctx * K * H * 2 * 2 + 2 * N * H * 2)
    r["t_total"] = r["t_idx"] + r["t_att"]
    r["speedup"] = r["t_dense"] / r["t_total"]
    r["speedup_jit"] = r["t_dense_jit"] / r["t_layer_jit"]
    r["speedup_fp8_jit"] = r["t_dense_jit"] / r["t_layer_fp8_jit"]
    r["speedup_fused_jit"] = r["t_dense_jit"] / r["t_layer_fused_jit"]
    return r


def chunked_prefill_13(lengths=(524288, 1048576), chunk=512, samples=5):
    """Prefill of 512K / 1M tokens in Engine-sized chunks (Engine.prefill_chunk = 512), per MSA layer and per
    full-attention layer, against cuDNN on the same chunking. A chunk's cost depends only on its history h:
    it is measured at `samples` evenly spaced h in [0, S_max - chunk] on one pool of S_max keys, and the total
    over all S / chunk chunks is the sum of the piecewise-linear interpolation (indexer and dense work grow
    linearly in h; sparse attention is flat past 16 blocks). cuDNN per chunk: the chunk's queries against the
    h + chunk contiguous keys without a mask (the causal triangle inside the chunk is 0.05% of the work at
    h = 1M; at h = 0 this overstates cuDNN by at most one chunk^2/2)."""
    s_max = max(lengths)
    key = jax.random.key(7)
    k_pages, v_pages, ik_pages, table = make_pool(key, 1, s_max)
    kq, ki, kk, kv = jax.random.split(jax.random.fold_in(key, 1), 4)
    q = jax.random.normal(kq, (1, chunk, N, H), jnp.bfloat16)
    iq = jax.random.normal(ki, (1, chunk, K, I), jnp.bfloat16)
    kc = jax.random.normal(kk, (1, s_max, K, H), jnp.bfloat16)
    vc = jax.random.normal(kv, (1, s_max, K, H), jnp.bfloat16)
    idx, att = msa_fns()
    hs = np.linspace(0, s_max - chunk, samples).astype(np.int64) // R * R
    rows = []
    for h in hs:
        pos = (int(h) + jnp.arange(chunk, dtype=jnp.int32))[None]
        r = {"h": int(h)}
        r["t_idx"] = bench(idx, iq, ik_pages, table, pos, iters=5, reps=3)
        sel = idx(iq, ik_pages, table, pos)
        r["t_att"] = bench(att, q, k_pages, v_pages, table, pos, sel, iters=5, reps=3)
        r["t_ours_dense_chunk"] = bench(OURS_DENSE_CHUNK, q, k_pages, v_pages, table, pos, iters=3, reps=3)
        n = int(h) + chunk
        r["t_dense"] = bench(jax.jit(lambda a, b, c: cudnn_dense(a, b, c, False)), q, kc[:, :n], vc[:, :n],
                             iters=3, reps=3)
        print("chunk sample", {k: (round(1e3 * v, 3) if k.startswith("t_") else v) for k, v in r.items()},
              flush=True)
        rows.append(r)
    out = {"chunk": chunk, "samples": rows, "totals": {}}
    for s_len in lengths:
        starts = np.arange(0, s_len, chunk)
        tot = {}
        for name in ("t_idx", "t_att", "t_ours_dense_chunk", "t_dense"):
            tot[name] = float(np.interp(starts, hs, [r[name] for r in rows]).sum())
        tot["t_msa"] = tot["t_idx"] + tot["t_att"]
        tot["speedup"] = tot["t_dense"] / tot["t_msa"]
        tot["dense_ratio"] = tot["t_ours_dense_chunk"] / tot["t_dense"]
        out["totals"][s_len] = tot
        print(f"prefill {s_len // 1024}K in {chunk}-token chunks (extrapolated from {samples} measured chunks): "
              f"MSA {tot['t_msa']:.2f} s (indexer {tot['t_idx']:.2f}), cuDNN dense {tot['t_dense']:.2f} s, "
              f"speed-up {tot['speedup']:.1f}x; our dense layer {tot['t_ours_dense_chunk']:.2f} s "
              f"({tot['dense_ratio']:.2f}x cuDNN)", flush=True)
    return out


def fp8_agreement(ctx=32768, n_queries=64, seed=0):
    """How the FP8 index-K cache changes the selection, on random data (no trained model is used here): the
    share of (token, group) top-16 sets identical to the bf16 cache's, and the recall of attention mass: of
    the softmax mass that sparse attention over the bf16 selection puts on its blocks, the share on blocks the
    FP8 selection also chose (mean and minimum over tokens x heads). Queries are the last n_queries positions."""
    from pallas_kernels import layout, reference
    key = jax.random.key(seed)
    k_pages, _, ik_pages, table = make_pool(key, 1, ctx)
    kq, ki = jax.random.split(jax.random.fold_in(key, 1))
    q = jax.random.normal(kq, (1, n_queries, N, H), jnp.bfloat16)
    iq = jax.random.normal(ki, (1, n_queries, K, I), jnp.bfloat16)
    pos = (ctx - n_queries + jnp.arange(n_queries, dtype=jnp.int32))[None]
    codes, scale = layout.quantize_index_k(ik_pages)
    sel = gpu.indexer_topk(iq, ik_pages, table, pos, topk=C)
    sel8 = gpu.indexer_topk(iq, codes, table, pos, topk=C, ik_scale=scale)
    same = jnp.all(jnp.sort(sel, -1) == jnp.sort(sel8, -1), axis=-1)                  # [1, T, K]
    m = ctx // R
    k_seq = reference.gather_sequence(k_pages, table).astype(jnp.float32)            # [1, K, S, H]
    qf = q.astype(jnp.float32).reshape(1, n_queries, K, G, H)
    logits = jnp.einsum("btkgh,bksh->btkgs", qf, k_seq, precision="highest") * H ** -0.5
    vis = jnp.arange(ctx)[None, None, :] <= pos[:, :, None]
    chosen = (sel[..., None] == jnp.arange(m)).any(-2)                                # [1, T, K, M]
    chosen8 = (sel8[..., None] == jnp.arange(m)).any(-2)
    keep = jnp.repeat(chosen, R, axis=-1) & vis[:, :, None, :]
    logits = jnp.where(keep[:, :, :, None, :], logits, -jnp.inf)
    p = jax.nn.softmax(logits, axis=-1)                                               # [1, T, K, G, S]
    on8 = jnp.repeat(chosen8, R, axis=-1)[:, :, :, None, :]
    recall = jnp.sum(jnp.where(on8, p, 0.0), axis=-1)                                 # [1, T, K, G]
    res = {"ctx": ctx, "queries": n_queries, "data": "random bf16 (no trained model)",
           "same_sets": float(jnp.mean(same)), "mass_recall_mean": float(jnp.mean(recall)),
           "mass_recall_min": float(jnp.min(recall)),
           "overlap_blocks_mean": float(jnp.mean(jnp.sum(chosen & chosen8, -1) / jnp.sum(chosen, -1)))}
    print("fp8 index-K agreement", res, flush=True)
    return res


def engine_rows_dense(out_dir, chunk=512, row_lens=(64, 512), histories=(0, 32768, 130560)):
    """The full-attention layer on an Engine prefill group: one request's `chunk`-token prompt chunk laid out as
    chunk / row_len rows of row_len consecutive positions (m3jax.runner's layout, prefill_row_len = row_len)
    after `h` tokens of history in the cache. Times the paged kernel alone (gpu.dense_attention) and the chunk
    path the model now runs for such rows (contiguous_chunks=True: cuDNN over each row's own tokens + the paged
    kernel over the history before the row, LSE merge), against cuDNN over the chunk's queries and the h + chunk
    contiguous keys, unmasked (as chunked_prefill_13: at h = 0 that overstates cuDNN's work by the causal half)."""
    rows_out = []
    for h in histories:
        s = h + chunk
        key = jax.random.key(s)
        k_pages, v_pages, _, table = make_pool(key, 1, s)
        kq, kk, kv = jax.random.split(jax.random.fold_in(key, 1), 3)
        q = jax.random.normal(kq, (1, chunk, N, H), jnp.bfloat16)
        kc = jax.random.normal(kk, (1, s, K, H), jnp.bfloat16)
        vc = jax.random.normal(kv, (1, s, K, H), jnp.bfloat16)
        t_cudnn = bench(jax.jit(lambda a, b, c: cudnn_dense(a, b, c, False)), q, kc, vc, iters=5, reps=3)
        del kc, vc
        for row_len in row_lens:
            n = chunk // row_len
            qr = q.reshape(n, row_len, N, H)
            pos = (h + jnp.arange(chunk, dtype=jnp.int32)).reshape(n, row_len)
            tab = jnp.broadcast_to(table, (n, table.shape[1]))
            r = {"h": h, "chunk": chunk, "row_len": row_len, "t_cudnn": t_cudnn,
                 "t_paged": bench(OURS_DENSE, qr, k_pages, v_pages, tab, pos, iters=5, reps=3),
                 "t_chunk_path": bench(OURS_DENSE_CHUNK, qr, k_pages, v_pages, tab, pos, iters=5, reps=3)}
            got = OURS_DENSE_CHUNK(qr, k_pages, v_pages, tab, pos).astype(jnp.float32)
            ref = OURS_DENSE(qr, k_pages, v_pages, tab, pos).astype(jnp.float32)
            r["rel_l2_chunk_vs_paged"] = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
            print("engine rows", r, flush=True)
            rows_out.append(r)
            with open(os.path.join(out_dir, "engine_rows_dense.json"), "w") as f:   # after each row
                json.dump({"meta": {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat()},
                           "rows": rows_out}, f, indent=1)
        del k_pages, v_pages
    print(f"{'history':>8} {'row_len':>7} {'paged ms':>9} {'chunk path ms':>13} {'cuDNN ms':>9} "
          f"{'paged/chunk':>11} {'chunk/cuDNN':>11} {'rel l2':>8}")
    for r in rows_out:
        print(f"{r['h']:>8} {r['row_len']:>7} {1e3 * r['t_paged']:9.3f} {1e3 * r['t_chunk_path']:13.3f} "
              f"{1e3 * r['t_cudnn']:9.3f} {r['t_paged'] / r['t_chunk_path']:11.2f} "
              f"{r['t_chunk_path'] / r['t_cudnn']:11.2f} {r['rel_l2_chunk_vs_paged']:8.1e}")
    return rows_out


def issue13(out_dir):
    """The cases issue 13 asks for, in one call: prefill 8K/32K/128K (sparse, cuDNN, the dense layer's
    chunk path), decode batch 1/8 (8K/32K/128K/1M) and 32 (128K) per call and in-jit with bf16 and FP8 index-K,
    512K/1M chunked prefill, FP8 selection agreement."""
    dev = jax.devices()[0]
    meta = {"device": dev.device_kind, "jax": jax.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    print(meta, flush=True)
    res = {"meta": meta, "ceilings": ceilings(), "prefill": [], "decode": []}
    print(res["ceilings"], flush=True)
    path = os.path.join(out_dir, "issue13.json")

    def save():
        with open(path, "w") as f:
            json.dump(res, f, indent=1, default=str)

    idx, att = msa_fns()
    jobs = ([("agree", 0, 0)] + [("prefill", 1, s) for s in (8192, 32768, 131072)]
            + [("decode", b, c) for b, c in ((1, 8192), (1, 32768), (1, 131072), (8, 8192), (8, 32768),
                                              (8, 131072), (32, 131072))]
            + [("chunked", 0, 0), ("decode", 1, 1048576), ("decode", 8, 1048576)])
    for kind, b, s in jobs:
        t0 = time.time()
        try:
            if kind == "agree":
                res["fp8_agreement"] = fp8_agreement()
            elif kind == "prefill":
                res["prefill"].append(derive(prefill_case(s, idx, att, slow_variants=False), res["ceilings"]))
            elif kind == "decode":
                res["decode"].append(decode_case_13(b, s, idx, att))
            else:
                res["chunked"] = chunked_prefill_13()
        except Exception as e:  # noqa: BLE001 - one failing case must not lose the others
            traceback.print_exc()
            res.setdefault("errors", []).append(f"{kind} b{b} {s}: {type(e).__name__}: {str(e)[:500]}")
        print(f"{kind} b{b} {s}: {time.time() - t0:.1f}s", flush=True)
        save()
    print_issue13(res)


def print_issue13(res):
    print(f"{'prefill':>10} {'idx ms':>8} {'attn ms':>8} {'MSA ms':>8} {'cuDNN ms':>9} {'x':>6} "
          f"{'attn TF/s':>9} {'cuDNN TF/s':>10} {'dense-chunk ms':>14} {'x cuDNN':>7} {'paged ms':>9} "
          f"{'kv-major attn ms':>16}")
    for r in res["prefill"]:
        print(f"{r['ctx'] // 1024:>9}K {1e3 * r['t_idx']:8.3f} {1e3 * r['t_att']:8.3f} {1e3 * r['t_total']:8.3f} "
              f"{1e3 * r['t_dense']:9.3f} {r['speedup']:6.2f} {r['tflops_att']:9.1f} {r['tflops_dense']:10.1f} "
              f"{1e3 * r['t_ours_dense_chunk']:14.3f} {r['t_ours_dense_chunk'] / r['t_dense']:7.2f} "
              f"{1e3 * r['t_ours_dense']:9.3f} {1e3 * r.get('t_att_kv_major', float('nan')):16.3f}")
    print(f"{'decode':>10} {'idx':>7} {'idx8':>7} {'att':>7} {'cuDNN':>7} {'x':>5} | in-jit: {'layer':>7} "
          f"{'layer8':>7} {'fused':>7} {'cuDNN':>7} {'x':>5} {'x fp8':>5} {'x fused':>7} {'same8':>5}  (us)")
    for r in res["decode"]:
        print(f"{'b%d %dK' % (r['batch'], r['ctx'] // 1024):>10} {1e6 * r['t_idx']:7.1f} {1e6 * r['t_idx_fp8']:7.1f} "
              f"{1e6 * r['t_att']:7.1f} {1e6 * r['t_dense']:7.1f} {r['speedup']:5.2f} | in-jit: "
              f"{1e6 * r['t_layer_jit']:7.1f} {1e6 * r['t_layer_fp8_jit']:7.1f} {1e6 * r['t_layer_fused_jit']:7.1f} "
              f"{1e6 * r['t_dense_jit']:7.1f} {r['speedup_jit']:5.2f} "
              f"{r['speedup_fp8_jit']:5.2f} {r['speedup_fused_jit']:7.2f} {r['fp8_same_sets']:5.2f}")
    for s_len, tot in res.get("chunked", {}).get("totals", {}).items():
        print(f"prefill {s_len // 1024}K chunked: MSA {tot['t_msa']:.2f} s, cuDNN {tot['t_dense']:.2f} s, "
              f"{tot['speedup']:.1f}x; dense layer {tot['dense_ratio']:.2f}x cuDNN")
    for e in res.get("errors", []):
        print("ERROR", e)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="8K/32K prefill, batch 1/32 decode only")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--sweep", action="store_true", help="time Triton launch variants of the prefill kernels")
    ap.add_argument("--profile-kv", action="store_true", help="split the KV-block-major time at 128K")
    ap.add_argument("--issue13", action="store_true", help="the cases of issue 13 (see issue13())")
    ap.add_argument("--engine-rows-dense", action="store_true",
                    help="the full-attention layer on Engine prefill rows: paged kernel vs the chunk path")
    args = ap.parse_args()
    if args.engine_rows_dense:
        engine_rows_dense(args.out)
        return
    if args.issue13:
        issue13(args.out)
        return
    if args.sweep:
        sweep(args.out)
        return
    if args.profile_kv:
        profile_kv(args.out)
        return
    dev = jax.devices()[0]
    now = datetime.datetime.now(datetime.timezone.utc).isoformat()
    meta = {"device": dev.device_kind, "jax": jax.__version__, "date": now}
    print(meta, flush=True)
    ceil = ceilings()
    print(ceil, flush=True)
    idx, att = msa_fns()
    prefill = [8192, 32768] if args.quick else [8192, 32768, 131072]
    decode = [(b, c) for b in ((1, 32) if args.quick else (1, 8, 32, 64)) for c in (8192, 32768, 131072)]
    jobs = [("prefill", 1, s) for s in prefill] + [("decode", b, c) for b, c in decode]
    rows = []
    for kind, b, s in jobs:
        t0 = time.time()
        try:
            r = prefill_case(s, idx, att) if kind == "prefill" else decode_case(b, s, idx, att)
            rows.append(derive(r, ceil))
        except Exception as e:  # noqa: BLE001 - one failing case must not lose the others
            traceback.print_exc()
            rows.append({"kind": kind, "batch": b, "ctx": s, "error": f"{type(e).__name__}: {e}"})
        print(f"{kind} b{b} {s}: {time.time() - t0:.1f}s", flush=True)
        with open(os.path.join(args.out, "benchmarks.json"), "w") as f:
            json.dump({"meta": meta, "ceilings": ceil, "rows": rows}, f, indent=1)
    print(table(rows, ceil))
    for r in rows:
        if "t_att_query_outer" in r:
            print(f"prefill {r['ctx'] // 1024}K sparse attention, query-outer schedule: "
                  f"{1e3 * r['t_att_query_outer']:.3f} ms")


if __name__ == "__main__":
    main()
