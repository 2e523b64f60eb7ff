"""How the FP8 index-K cache (Engine(fp8_index_k=True): e4m3 codes + a float32 scale per token) changes MSA's
block selection, and what it saves in decode. Issue 13, item 4.

    python benchmarks/fp8_index_k.py [--small] [--seeds N] [--contexts N ...] [--no-engine] [--out DIR]

selection  over `seeds` fresh random inputs per context (random data: no trained model is used): queries at the
           last positions of the context, the indexer (the backend's default kernel: GPU Pallas on a GPU, the
           float32 reference on CPU) with the bf16 index-K pool and with its quantisation
           (pallas_kernels.layout.quantize_index_k, exactly what the cache stores). Reported per context:
           - same_sets: share of (token, KV group) rows whose top-k block sets are identical;
           - overlap: share of the bf16 selection's blocks the FP8 selection also chose;
           - mass recall: of the softmax mass that sparse attention over the bf16 selection puts on its blocks
             (float32, per query head), the share on blocks the FP8 selection also chose (mean and minimum).
           Random keys make the top blocks' maxima nearly equal, so the k-th / (k+1)-th boundary is a near-tie and
           set identity is a pessimistic measure; the mass recall says what a changed set costs.
engine     (CPU and GPU) greedy generation of the tiny random model through the Engine with and without the FP8
           cache, fresh random prompts long enough to be sparse: share of identical generated tokens and of
           identical outputs.
decode     (GPU only) batch 32 at 128K, the issue's case: the indexer alone and the MSA layer (indexer + sparse
           attention, in one jit) with the bf16 and the FP8 index-K pool (benchmarks/kernels.py decode_case_13).

Full M3 geometry on GPU (64 q heads, 4 KV groups, head dim 128, index 4 x 128, blocks of 128, top-16, bf16);
--small (the default on CPU): the tiny config's geometry (blocks of 8, index dim 16, top-3). Prints one table last
and writes fp8_index_k.json under --out (default $OUT or .).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from pallas_kernels import dispatch, layout, reference  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Geometry:
    heads: int          # N query heads
    kv_heads: int       # K KV groups (= index heads)
    head_dim: int       # H
    index_dim: int      # I
    block: int          # R rows per page = MSA block
    topk: int           # C blocks chosen per (token, group)

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


M3 = Geometry(64, 4, 128, 128, 128, 16)
SMALL = Geometry(4, 2, 16, 16, 8, 3)            # M3Config.tiny()'s attention


def selection_case(geo: Geometry, ctx: int, queries: int, seed: int, chunk: int = 8) -> dict:
    """One random input: (same-set, overlap, mass-recall) statistics of the FP8 selection against the bf16 one."""
    key = jax.random.key(seed)
    ks = jax.random.split(key, 5)
    m = ctx // geo.block
    pool = m + 1
    dt = jnp.bfloat16
    k_pages = jax.random.normal(ks[0], (geo.kv_heads, pool, geo.block, geo.head_dim), dt)
    ik_pages = jax.random.normal(ks[1], (pool, geo.block, geo.index_dim), dt)
    table = (1 + jax.random.permutation(ks[2], m)).reshape(1, m).astype(jnp.int32)        # pages shuffled
    q = jax.random.normal(ks[3], (1, queries, geo.heads, geo.head_dim), dt)
    iq = jax.random.normal(ks[4], (1, queries, geo.kv_heads, geo.index_dim), dt)
    pos = (ctx - queries + jnp.arange(queries, dtype=jnp.int32))[None]
    codes, scale = layout.quantize_index_k(ik_pages)
    sel = dispatch.indexer_topk(iq, ik_pages, table, pos, topk=geo.topk)
    sel8 = dispatch.indexer_topk(iq, codes, table, pos, topk=geo.topk, ik_scale=scale)
    return selection_stats(q, k_pages, table, pos, sel, sel8, chunk)


def selection_stats(q_btnh, k_pages, page_table, q_pos, sel, sel8, chunk: int = 8) -> dict:
    """Sums of (same set, overlap, mass recall) of the selection sel8 against sel (i32[1, T, K, C] block ids) for
    the queries q [1, T, N, H] at positions q_pos [1, T] over the keys of k_pages [K, P, R, H] / page_table
    [1, M]; `chunk` queries at a time (bounded memory at 128K). Mass recall: of the softmax mass that sparse
    attention over sel puts on its blocks (float32, per query head), the share on blocks sel8 also chose."""
    kv_heads, _, block, head_dim = k_pages.shape
    m = page_table.shape[1]
    queries, heads = q_btnh.shape[1], q_btnh.shape[2]
    chosen = np.asarray((sel[..., None] == jnp.arange(m)).any(-2))                    # [1, T, K, M]
    chosen8 = np.asarray((sel8[..., None] == jnp.arange(m)).any(-2))
    same = (chosen == chosen8).all(-1)
    overlap = (chosen & chosen8).sum(-1) / np.maximum(chosen.sum(-1), 1)
    k_seq = reference.gather_sequence(k_pages, page_table).astype(jnp.float32)       # [1, K, S, H]
    recalls = []
    for t0 in range(0, queries, chunk):
        t1 = min(queries, t0 + chunk)
        qf = q_btnh[:, t0:t1].astype(jnp.float32).reshape(1, t1 - t0, kv_heads, heads // kv_heads, head_dim)
        logits = jnp.einsum("btkgh,bksh->btkgs", qf, k_seq, precision="highest") * head_dim ** -0.5
        vis = jnp.arange(m * block)[None, None, :] <= q_pos[:, t0:t1, None]
        keep = jnp.repeat(jnp.asarray(chosen[:, t0:t1]), block, axis=-1) & vis[:, :, None, :]
        p = jax.nn.softmax(jnp.where(keep[:, :, :, None, :], logits, -jnp.inf), axis=-1)
        on8 = jnp.repeat(jnp.asarray(chosen8[:, t0:t1]), block, axis=-1)[:, :, :, None, :]
        recalls.append(np.asarray(jnp.sum(jnp.where(on8, p, 0.0), axis=-1)))             # [1, t, K, G]
    recall = np.concatenate(recalls, axis=1)
    return {"rows": int(same.size), "same": int(same.sum()), "overlap_sum": float(overlap.sum()),
            "recall_sum": float(recall.sum()), "recall_n": int(recall.size), "recall_min": float(recall.min())}


def summarise(cases) -> dict:
    """selection_stats sums of one or more inputs -> rows, same_sets, overlap, mass_recall_mean / _min."""
    rows = sum(c["rows"] for c in cases)
    return {"rows": rows, "same_sets": sum(c["same"] for c in cases) / rows,
            "overlap": sum(c["overlap_sum"] for c in cases) / rows,
            "mass_recall_mean": sum(c["recall_sum"] for c in cases) / sum(c["recall_n"] for c in cases),
            "mass_recall_min": min(c["recall_min"] for c in cases)}


SELECTION_HEADER = (f"{'rows':>6} {'same top-k sets':>15} {'blocks shared':>13} {'mass recall mean':>16} "
                    f"{'min':>6}")


def selection_line(r: dict) -> str:
    """A summarise() row under SELECTION_HEADER."""
    return (f"{r['rows']:>6} {100 * r['same_sets']:14.1f}% {100 * r['overlap']:12.1f}% "
            f"{100 * r['mass_recall_mean']:15.2f}% {100 * r['mass_recall_min']:5.1f}%")


def selection(geo: Geometry, contexts, queries: int, seeds: int) -> list[dict]:
    out = []
    for ctx in contexts:
        cases = [selection_case(geo, ctx, queries, 1000 * ctx // geo.block + s) for s in range(seeds)]
        r = {"ctx": ctx, "queries": queries, "seeds": seeds, **summarise(cases),
             "same_sets_per_seed": [c["same"] / c["rows"] for c in cases]}
        print("selection", r, flush=True)
        out.append(r)
    return out


def engine_tokens(prompts: int, prompt_len: int, new_tokens: int, seed: int = 0) -> dict:
    """Greedy tokens of the tiny random model (float32) through the Engine, bf16-layout (model dtype) vs FP8
    index-K cache, on fresh random prompts of prompt_len tokens (prompt_len / 8 blocks, top-3: sparse)."""
    import m3jax
    from m3jax.testing import random_model
    model = random_model(m3jax.M3Config.tiny(), seed=seed)
    rng = np.random.default_rng(seed)
    ids = [list(map(int, rng.integers(0, 256, prompt_len))) for _ in range(prompts)]
    sp = m3jax.SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    kw = dict(max_batch_size=min(8, prompts), max_seq_len=prompt_len + new_tokens, compile_cache=False)
    want = [r.token_ids for r in m3jax.generate(model, ids, sp, progress=False, **kw)]
    got = [r.token_ids for r in m3jax.generate(model, ids, sp, progress=False, fp8_index_k=True, **kw)]
    same_tok = sum(int(a == b) for w, g in zip(want, got) for a, b in zip(w, g))
    r = {"prompts": prompts, "prompt_len": prompt_len, "new_tokens": new_tokens,
         "same_tokens": same_tok / sum(len(w) for w in want),
         "same_outputs": sum(int(w == g) for w, g in zip(want, got)) / prompts,
         "first_token_same": sum(int(w[0] == g[0]) for w, g in zip(want, got)) / prompts}
    print("engine", r, flush=True)
    return r


def decode_speed() -> dict:
    """Batch 32 at 128K: bf16 vs FP8 index-K (indexer per call, MSA layer in one jit), GPU only."""
    import kernels
    idx, att = kernels.msa_fns()
    r = kernels.decode_case_13(32, 131072, idx, att)
    print("decode", {k: v for k, v in r.items()}, flush=True)
    return r


def print_table(res: dict) -> None:
    geo = res["geometry"]
    print(f"FP8 index-K vs bf16 ({res['meta']['device']}, {geo}, random data, no trained model)")
    print(f"{'ctx':>8} {SELECTION_HEADER}")
    for r in res.get("selection", []):
        print(f"{r['ctx']:>8} {selection_line(r)}")
    e = res.get("engine")
    if e:
        print(f"engine (tiny random model, {e['prompts']} prompts x {e['prompt_len']} tokens, {e['new_tokens']} "
              f"greedy): same tokens {100 * e['same_tokens']:.1f}%, same outputs {100 * e['same_outputs']:.1f}%, "
              f"same first token {100 * e['first_token_same']:.1f}%")
    d = res.get("decode")
    if d:
        print(f"decode b32 128K: indexer {1e6 * d['t_idx']:.1f} -> {1e6 * d['t_idx_fp8']:.1f} us per call; MSA layer "
              f"in-jit {1e6 * d['t_layer_jit']:.1f} -> {1e6 * d['t_layer_fp8_jit']:.1f} us "
              f"({d['t_layer_jit'] / d['t_layer_fp8_jit']:.2f}x); cuDNN dense {1e6 * d['t_dense_jit']:.1f} us")
    for err in res.get("errors", []):
        print("ERROR", err)


def run(small: bool, seeds: int, out_dir: str | None, engine: bool = True, decode: bool | None = None,
        contexts=None) -> dict:
    on_gpu = jax.default_backend() == "gpu"
    geo = SMALL if small else M3
    contexts = contexts or ((256, 1024) if small else (8192, 32768, 131072))
    queries = 16 if small else 32
    decode = on_gpu and not small if decode is None else decode
    meta = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    res = {"meta": meta, "geometry": dataclasses.asdict(geo), "data": "random (no trained model)"}
    jobs = [("selection", lambda: selection(geo, contexts, queries, seeds))]
    if decode:
        jobs.append(("decode", decode_speed))
    if engine:
        jobs.append(("engine", lambda: engine_tokens(prompts=8, prompt_len=48, new_tokens=8)))
    for name, fn in jobs:
        t0 = time.time()
        try:
            res[name] = fn()
        except Exception as e:  # noqa: BLE001 - one failing part must not lose the others
            traceback.print_exc()
            res.setdefault("errors", []).append(f"{name}: {type(e).__name__}: {str(e)[:500]}")
        print(f"{name}: {time.time() - t0:.1f} s", flush=True)
        if out_dir:
            with open(os.path.join(out_dir, "fp8_index_k.json"), "w") as f:
                json.dump(res, f, indent=1, default=str)
    print_table(res)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", default=None,
                    help="the tiny config's geometry (default on CPU)")
    ap.add_argument("--seeds", type=int, default=4, help="fresh random inputs per context")
    ap.add_argument("--contexts", type=int, nargs="+", help="context lengths (default: 256 1024 small, "
                    "8192 32768 131072 full)")
    ap.add_argument("--no-engine", action="store_true", help="skip the Engine token comparison")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    small = args.small if args.small is not None else jax.default_backend() != "gpu"
    run(small, args.seeds, args.out, engine=not args.no_engine, contexts=args.contexts)


if __name__ == "__main__":
    main()
