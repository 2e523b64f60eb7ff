"""MSA on a trained model's activations (issue 13): FP8 index-K selection quality, and how many blocks neighbouring
queries share.

    python benchmarks/msa_trained.py [--tokens 4096] [--dtype bfloat16] [--tiles 1 2 4 8 16 32 64]
                                     [--prompts 4] [--prompt-len 2048] [--new-tokens 16] [--no-engine] [--out DIR]

The random-data benchmarks (kernels.py, fp8_index_k.py) make the blocks' index maxima near-ties and give
neighbouring queries independent selections; a trained indexer does neither. This script measures both on the
bundled default model (m3jax.default_model_path(): trained on the Python standard library; MSA blocks of 64,
top-16, 4 KV groups) over `--tokens` tokens of standard-library code the training split held out
(m3jax.training.data.heldout_stdlib_ids), in every MSA layer, at the queries that see more than top-k blocks (so the
selection is a strict subset). The model runs its own no-cache forward; the projections of each MSA layer are
taken from it (DecoderLayer.forward with a key source that hands them out), so nothing is re-implemented.

fp8       the FP8 index-K cache (Engine(fp8_index_k=True) stores pallas_kernels.layout.quantize_index_k: e4m3 codes
          and a float32 scale per token) against the model-dtype index keys: identical top-k sets per (query, KV
          group), share of blocks shared, and the mass recall: of the softmax mass that sparse attention over the
          model-dtype selection puts on its blocks (float32, per query head), the share on blocks the FP8 selection
          also chose (fp8_index_k.selection_stats, the random-data benchmark's measure).
locality  aligned tiles of n consecutive queries, one KV group: `union`, the mean number of distinct blocks the
          tile's queries chose, and `reuse` = n * topk / union, how many of the tile's queries use each block a
          tile-merged kernel would load once (1 to n). Beside it, random selections of the same shape (the forced
          local blocks plus topk - local uniform among the other visible blocks), which is what the random-data
          kernel benchmarks see.
engine    greedy continuations of held-out prompts through the Engine with the model-dtype and the FP8 index-K
          cache: share of identical generated tokens, outputs and first tokens.

Prints one table last and writes msa_trained.json under --out (default $OUT or .).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import fp8_index_k  # noqa: E402
import m3jax  # noqa: E402
from m3jax.model.decoder import SequenceKeys  # noqa: E402
from m3jax.tokenizer import M3Tokenizer  # noqa: E402
from m3jax.training import data  # noqa: E402
from pallas_kernels import dispatch, layout  # noqa: E402

TILES = (1, 2, 4, 8, 16, 32, 64)


class _HandOutKeys(SequenceKeys):
    """The no-cache key source, also handing out each MSA layer's projections with its block ids."""

    def attend(self, attn, group, p):
        o, keys, ids = super().attend(attn, group, p)
        return o, keys, None if ids is None else (ids, p)


def msa_layers(model, ids_bt) -> dict:
    """{decoder layer: (block ids i32[B, T, K, topk], its Projections)} of every MSA layer of the no-cache forward
    of ids_bt (positions 0..T-1)."""
    h = model.embed(ids_bt).astype(model.dtype)
    positions = jnp.broadcast_to(jnp.arange(ids_bt.shape[1], dtype=jnp.int32), ids_bt.shape)
    cos, sin = model.rope(positions)
    out = {}
    for stack in model.stacks:
        def body(layer, index, h, _):
            hs, _, got = layer.forward([h], [(cos, sin)], _HandOutKeys([positions]), index)
            return hs[0], got[0]

        h, ys = stack.scan(body, h)
        if ys is not None:
            for i in range(stack.num_layers):
                out[stack.first_layer + i] = jax.tree.map(lambda x, i=i: x[i], ys)
    return out


def fp8_layer(attn, sel, p, positions, first: int) -> dict:
    """fp8_index_k.selection_stats of the FP8 index-K selection against the model's, queries from `first` on."""
    ik_pages, table = layout.index_pages_from_sequence(p.ik_bti, attn.block_size)
    codes, scale = layout.quantize_index_k(ik_pages)
    kw = dict(topk=attn.topk_blocks, local_blocks=attn.local_blocks)
    again = dispatch.indexer_topk(p.iq_btki, ik_pages, table, positions, **kw)
    if not bool((again == sel).all()):
        raise AssertionError("the indexer over the model's index keys does not reproduce the model's selection")
    sel8 = dispatch.indexer_topk(p.iq_btki, codes, table, positions, **kw, ik_scale=scale)
    k_pages, _ = layout.kv_pages_from_sequence(p.k_btkh, attn.block_size)
    return fp8_index_k.selection_stats(p.q_btnh[:, first:], k_pages, table, positions[:, first:], sel[:, first:],
                                       sel8[:, first:], chunk=64)


def tile_union(chosen_tkm: np.ndarray, n: int) -> float:
    """Mean number of distinct blocks chosen by aligned tiles of n consecutive queries, per KV group."""
    t = chosen_tkm.shape[0] // n * n
    return float(chosen_tkm[:t].reshape(t // n, n, *chosen_tkm.shape[1:]).any(1).sum(-1).mean())


def random_selection(positions: np.ndarray, kv_heads: int, blocks: int, block: int, topk: int, local: int,
                     rng) -> np.ndarray:
    """bool [T, K, M]: the forced local blocks plus topk - local blocks uniform among the other visible ones."""
    own = positions // block
    blk = np.arange(blocks)
    forced = (blk[None] <= own[:, None]) & (blk[None] > own[:, None] - local)                  # [T, M]
    other = blk[None] <= own[:, None] - local
    keys = np.where(other[:, None, :], rng.random((len(positions), kv_heads, blocks)), np.inf)
    pick = np.argsort(keys, axis=-1)[..., :topk - local]
    chosen = np.zeros((len(positions), kv_heads, blocks), bool)
    np.put_along_axis(chosen, pick, True, axis=-1)
    return (chosen & other[:, None, :]) | forced[:, None, :]


def locality(attn, sel_tkc: np.ndarray, first: int, tiles, rng) -> list[dict]:
    """Per tile size: union and reuse of the model's selections and of random ones (queries from `first` on)."""
    t, kv_heads, topk = sel_tkc.shape
    blocks = -(-t // attn.block_size)
    chosen = (sel_tkc[first:, :, :, None] == np.arange(blocks)).any(-2)                          # [T', K, M]
    rand = random_selection(np.arange(first, t), kv_heads, blocks, attn.block_size, topk, attn.local_blocks, rng)
    rows = []
    for n in tiles:
        u, ur = tile_union(chosen, n), tile_union(rand, n)
        rows.append({"tile": n, "union": u, "reuse": n * topk / u, "random_union": ur, "random_reuse": n * topk / ur})
    return rows


def engine_tokens(model, tok, prompts: int, prompt_len: int, new_tokens: int) -> dict:
    """Greedy continuations of `prompts` consecutive held-out windows, model-dtype vs FP8 index-K cache."""
    ids, files = data.heldout_stdlib_ids(tok, prompts * prompt_len)
    batch = [list(map(int, ids[i * prompt_len:(i + 1) * prompt_len])) for i in range(prompts)]
    sp = m3jax.SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    kw = dict(max_batch_size=prompts, max_seq_len=prompt_len + new_tokens, compile_cache=False, progress=False)
    want = [r.token_ids for r in m3jax.generate(model, batch, sp, **kw)]
    got = [r.token_ids for r in m3jax.generate(model, batch, sp, fp8_index_k=True, **kw)]
    same = sum(int(a == b) for w, g in zip(want, got) for a, b in zip(w, g))
    return {"prompts": prompts, "prompt_len": prompt_len, "new_tokens": new_tokens, "files": len(files),
            "same_tokens": same / sum(len(w) for w in want),
            "same_outputs": sum(int(w == g) for w, g in zip(want, got)) / prompts,
            "first_token_same": sum(int(w[0] == g[0]) for w, g in zip(want, got)) / prompts}


def run(tokens: int, dtype: str, tiles, out_dir: str | None, engine: bool = True, prompts: int = 4,
        prompt_len: int = 2048, new_tokens: int = 16, model_path: str | None = None) -> dict:
    path = model_path or m3jax.default_model_path()
    model = m3jax.load(path, dtype=dtype, progress=False)
    tok = M3Tokenizer.from_pretrained(path)
    cfg = model.config
    ids, files = data.heldout_stdlib_ids(tok, tokens)
    meta = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "model": os.path.basename(path),
            "dtype": dtype, "tokens": tokens, "heldout_files": files, "block": cfg.msa.block_size,
            "topk": cfg.msa.topk_blocks}
    res = {"meta": meta, "fp8": [], "locality": []}
    t0 = time.time()
    layers = jax.jit(lambda x: msa_layers(model, x))(jnp.asarray(ids)[None])
    positions = jnp.arange(tokens, dtype=jnp.int32)[None]
    first = cfg.msa.topk_blocks * cfg.msa.block_size          # from here on a query sees more than topk blocks
    if first >= tokens:
        raise ValueError(f"--tokens {tokens}: the selection is a strict subset only past {first} tokens")
    rng = np.random.default_rng(0)
    for layer, (sel, p) in sorted(layers.items()):
        attn = next(s for s in model.stacks if s.first_layer <= layer < s.first_layer + s.num_layers).layers.attn
        r = {"layer": layer, **fp8_index_k.summarise([fp8_layer(attn, sel, p, positions, first)])}
        print("fp8", r, flush=True)
        res["fp8"].append(r)
        for row in locality(attn, np.asarray(sel)[0], first, tiles, rng):
            res["locality"].append({"layer": layer, **row})
    print(f"fp8 + locality: {time.time() - t0:.1f} s", flush=True)
    if engine:
        t0 = time.time()
        res["engine"] = engine_tokens(model, tok, prompts, prompt_len, new_tokens)
        print("engine", res["engine"], f"{time.time() - t0:.1f} s", flush=True)
    if out_dir:
        with open(os.path.join(out_dir, "msa_trained.json"), "w") as f:
            json.dump(res, f, indent=1)
    print_table(res)
    return res


def print_table(res: dict) -> None:
    m = res["meta"]
    print(f"MSA on the trained model ({m['model']}, {m['dtype']}, {m['tokens']} held-out tokens, blocks of "
          f"{m['block']}, top-{m['topk']}; {m['device']}, jax {m['jax']})")
    print(f"{'layer':>5} {fp8_index_k.SELECTION_HEADER}")
    for r in res["fp8"]:
        print(f"{r['layer']:>5} {fp8_index_k.selection_line(r)}")
    tiles = sorted({r["tile"] for r in res["locality"]})
    print(f"{'tile':>5} {'union (trained)':>15} {'reuse':>6} {'union (random)':>14} {'reuse':>6}   (mean over layers)")
    for n in tiles:
        rows = [r for r in res["locality"] if r["tile"] == n]
        mean = {k: float(np.mean([r[k] for r in rows])) for k in ("union", "reuse", "random_union", "random_reuse")}
        print(f"{n:>5} {mean['union']:15.1f} {mean['reuse']:6.2f} {mean['random_union']:14.1f} "
              f"{mean['random_reuse']:6.2f}")
    e = res.get("engine")
    if e:
        print(f"engine ({e['prompts']} held-out prompts x {e['prompt_len']} tokens, {e['new_tokens']} greedy): same "
              f"tokens {100 * e['same_tokens']:.1f}%, same outputs {100 * e['same_outputs']:.1f}%, same first token "
              f"{100 * e['first_token_same']:.1f}%")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096, help="held-out tokens in the forward (default 4096, the "
                    "bundled model's training context)")
    ap.add_argument("--dtype", default="bfloat16", help="the model's dtype, hence the index-K cache's (default "
                    "bfloat16, the release dtype)")
    ap.add_argument("--tiles", type=int, nargs="+", default=list(TILES))
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--no-engine", action="store_true", help="skip the Engine token comparison")
    ap.add_argument("--model", default=None, help="checkpoint (default: the bundled default model)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    run(args.tokens, args.dtype, args.tiles, args.out, engine=not args.no_engine, prompts=args.prompts,
        prompt_len=args.prompt_len, new_tokens=args.new_tokens, model_path=args.model)


if __name__ == "__main__":
    main()
