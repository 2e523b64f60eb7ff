"""Sharded generation over 1, 2, 4 ... GPUs: the same greedy tokens as one GPU, and tokens/s per mesh.

Scaled M3 (hidden 6144, 64 q / 4 KV heads x 128, index 4 x 128, blocks of 128, top-16, expert width 3072, top-4 +
shared expert, vocab 200064; the first 6 layers of the real pattern: 3 dense + 3 MSA/MoE; --experts routed
experts), random weights. Each mesh is "DATAxMODEL": heads split over "model" (KV heads replicated when it
exceeds 4), batch rows and page pools over "data" (each data shard owns its requests' pages), experts over all
devices (expert parallel), attention kernels per device in shard_map. The weights are built once on the first
GPU, kept on the host, and placed on each mesh by `m3jax.params.shard_model`; the engine then runs the same
prompts (prefill of all prompts in one step, then decode) and its greedy tokens are compared with the first
mesh's. Summation order differs across meshes: in bfloat16 a near-tie between the top two logits can flip a
greedy token, so the exactness check runs in float32 (--dtype float32).

    python benchmarks/multi_gpu.py --meshes 1x1 1x2 2x1             # one JSON line per mesh, table last
    python benchmarks/multi_gpu.py --small --meshes 1x1 2x4 4x2       # tiny geometry (CPU, forced host devices)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LAYERS = (("full_attention", "dense"),) * 3 + (("minimax_m3_sparse", "sparse"),) * 3


def build_model(args):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from m3jax.config import M3Config, MSAConfig
    from m3jax.model import M3ForCausalLM

    if args.small:
        g = dict(vocab=512, hidden=128, heads=8, kv=4, head_dim=32, block=16, topk=4, expert_width=64,
                 dense_width=256, rotary=16)
    else:
        g = dict(vocab=200064, hidden=6144, heads=64, kv=4, head_dim=128, block=128, topk=16, expert_width=3072,
                 dense_width=12288, rotary=64)
    cfg = M3Config(vocab_size=g["vocab"], hidden_size=g["hidden"], num_hidden_layers=len(LAYERS),
                   num_attention_heads=g["heads"], num_key_value_heads=g["kv"], head_dim=g["head_dim"],
                   rotary_dim=g["rotary"], dense_intermediate_size=g["dense_width"],
                   intermediate_size=g["expert_width"], shared_intermediate_size=g["expert_width"],
                   num_local_experts=args.experts, num_experts_per_tok=4,
                   layer_types=tuple(a for a, _ in LAYERS), mlp_layer_types=tuple(m for _, m in LAYERS),
                   msa=MSAConfig(num_index_heads=g["kv"], index_dim=g["head_dim"], block_size=g["block"],
                                 topk_blocks=g["topk"]))
    dtype = jnp.dtype(args.dtype)
    model = nnx.jit(lambda: M3ForCausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0)))()
    # Norm weights random too (the init leaves them at 0), so no layer is an identity.
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    key = jax.random.key(1)
    new = [0.2 * jax.random.normal(jax.random.fold_in(key, i), v.shape, v.dtype)
           if jax.tree_util.keystr(p).endswith("['weight'].value") else v for i, (p, v) in enumerate(leaves)]
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, new))


def run(args) -> list[dict]:
    import jax
    import numpy as np

    import m3jax
    from m3jax import params, sharding

    from flax import nnx

    built = build_model(args)
    graphdef, state = nnx.split(m3jax.quantize_experts(built) if args.fp8_experts else built)
    del built
    model = nnx.merge(graphdef, jax.device_put(state, jax.devices("cpu")[0]))     # frees the GPU for the meshes
    del state
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, model.config.vocab_size, args.prompt_len - 7 * i).tolist() for i in range(args.batch)]
    sp = m3jax.SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    first = m3jax.SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)
    rows, want = [], None
    for spec in args.meshes:
        data, width = map(int, spec.split("x"))
        if data * width > len(jax.devices()):
            print(json.dumps(dict(mesh=spec, skipped=f"only {len(jax.devices())} devices")), flush=True)
            continue
        mesh = sharding.make_mesh(data=data, model=width, devices=jax.devices()[:data * width])
        m = params.shard_model(model, mesh)
        per_seq = (args.prompt_len + args.new_tokens) // model.config.msa.block_size + 2
        pages = -(-args.batch // data) * per_seq + 1                         # per data shard, sink included
        engine = m3jax.Engine(m, max_batch_size=args.batch, max_seq_len=args.prompt_len + args.new_tokens + 8,
                              mesh=mesh, num_pages=pages, prefill_chunk=args.prompt_len,
                              max_tokens_per_step=args.batch * (args.prompt_len + 1))
        t0 = time.perf_counter()
        m3jax.generate(engine, prompts, sp, progress=False)                    # compiles prefill and decode
        t_compile = time.perf_counter() - t0
        t0 = time.perf_counter()
        m3jax.generate(engine, prompts, first, progress=False)
        t_prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = [r.token_ids for r in m3jax.generate(engine, prompts, sp, progress=False)]
        t_all = time.perf_counter() - t0
        want = out if want is None else want
        row = dict(mesh=spec, devices=data * width, device=str(jax.devices()[0].device_kind), jax=jax.__version__,
                   dtype=args.dtype, fp8_experts=args.fp8_experts, experts=args.experts, batch=args.batch,
                   prompt_len=args.prompt_len,
                   new_tokens=args.new_tokens, same_tokens_as_first=out == want,
                   tokens_matching_first=sum(a == b for o, w in zip(out, want) for a, b in zip(o, w)),
                   first_run_s=t_compile, prefill_s=t_prefill,
                   prefill_tokens_per_s=sum(map(len, prompts)) / t_prefill,
                   # decode estimate: the full run minus the prefill-only run of the same prompts
                   decode_tokens_per_s=args.batch * (args.new_tokens - 1) / max(t_all - t_prefill, 1e-9),
                   end_to_end_s=t_all)
        print(json.dumps(row), flush=True)
        rows.append(row)
        del engine, m
        gc.collect()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--meshes", nargs="+", default=["1x1", "1x2", "2x1"], help="DATAxMODEL per run")
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--fp8-experts", action="store_true", help="routed experts held in MXFP8 (quantize_experts)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = run(args)
    print(f"| mesh (data x model) | devices | same greedy tokens as {rows[0]['mesh'] if rows else '-'} | "
          f"prefill tokens/s | decode tokens/s (batch {args.batch}) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mesh']} | {r['devices']} | {r['same_tokens_as_first']} | {r['prefill_tokens_per_s']:,.0f} | "
              f"{r['decode_tokens_per_s']:,.1f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
