"""`m3jax generate | convert | make-tiny | serve`: the command line. User errors print one line and exit 2.

The command line sits above everything (engine, api, convert); nothing in m3jax imports it.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from convert.safetensors_io import CheckpointError
from m3jax import distributed
from m3jax.config import ConfigError

USER_ERRORS = (ValueError, OSError, ConfigError, CheckpointError)


def _parser() -> argparse.ArgumentParser:
    from convert.cli import add_arguments as convert_arguments

    p = argparse.ArgumentParser(prog="m3jax", description="MiniMax-M3 in JAX")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("generate", add_help=False,
                   help="generate text (default: the bundled default model); `m3jax generate -h` for options")
    convert_arguments(sub.add_parser("convert", help="release safetensors -> Orbax checkpoint"))
    sub.add_parser("serve", add_help=False, help="OpenAI-compatible HTTP server (needs `pip install m3jax[serve]`); "
                   "`m3jax serve -h` for options")
    sub.add_parser("train", add_help=False, help="train an M3-architecture model with optax (LM + MSA indexer KL "
                   "losses); `m3jax train -h` for options")
    t = sub.add_parser("make-tiny", help="write a tiny random-weight test checkpoint in the HF release format")
    t.add_argument("dst")
    t.add_argument("--overwrite", action="store_true",
                   help="replace a checkpoint at DST (only a dir holding config.json, safetensors, tokenizer.json)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--quant", choices=["mxfp8"], default=None)
    t.add_argument("--num-shards", type=int, default=1)
    t.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    return p


def _make_tiny(args) -> None:
    from m3jax.testing import make_tiny_checkpoint
    path = make_tiny_checkpoint(args.dst, seed=args.seed, quant=args.quant, num_shards=args.num_shards,
                                dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {path}")


def _convert(args) -> None:
    from convert.cli import convert_main
    convert_main(args)


def _say(notes: list[str]) -> None:
    """Notes on stderr after the output (so that a user error stays the one line on stderr)."""
    sys.stdout.flush()
    for note in notes:
        print(f"m3jax generate: {note}", file=sys.stderr)


def generate_main(argv: Sequence[str] | None = None) -> int:
    """`m3jax generate`: returns the exit code. Errors print one line to stderr and return 2."""
    ap = argparse.ArgumentParser(prog="m3jax generate", description="Generate text with an M3 checkpoint.")
    ap.add_argument("--model", help="checkpoint directory (default: the bundled default model, "
                                    "m3jax.default_model_path())")
    ap.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ap.add_argument("--chat", action="store_true", help="apply the chat template to each prompt")
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--max-seq-len", type=int, default=None, help="default: 4096, or the model's limit if lower")
    ap.add_argument("--dtype", default=None,
                    help="bfloat16 | float32 (default: float32 for the bundled model, else bfloat16)")
    ap.add_argument("--attn-impl", default=None, help="reference | gpu | tpu | ... (default: the backend's)")
    ap.add_argument("--mesh", default=None, help="DATAxMODEL device mesh, e.g. 1x8 (default: one device)")
    ap.add_argument("--fp8-experts", action="store_true", help="keep an MXFP8 release's routed experts in FP8")
    ap.add_argument("--fp8-index-k", action="store_true", help="cache MSA index keys in FP8 (Engine(fp8_index_k))")
    ap.add_argument("--stream", action="store_true", help="print tokens as they come (one prompt)")
    ap.add_argument("--ids", action="store_true", help="also print the generated token ids")
    ap.add_argument("--no-verify", action="store_true",
                    help="skip the checksums of a converted checkpoint's pieces (faster load, corruption unnoticed)")
    distributed.add_distributed_args(ap)
    args = ap.parse_args(argv)
    try:
        distributed.maybe_initialize(args)       # multi-host: before any jax call (see m3jax.distributed)
        import jax

        from m3jax.api import default_model_path, load
        from m3jax.engine import Engine, generate
        from m3jax.sampling import SamplingParams
        from m3jax.sharding import parse_mesh
        from m3jax.tokenizer import IncrementalDecoder, M3Tokenizer
        if args.model is None:                           # say what runs
            path = default_model_path()
            notes = [f"no --model given: the text above came from the bundled default model (a small M3 trained "
                     f"on Python source code; pass --model for a real checkpoint), {path}"]
        else:
            path, notes = args.model, []
        mesh = parse_mesh(args.mesh) if args.mesh else None
        if mesh is not None and mesh.size < len(jax.devices()):
            notes.append(f"mesh {args.mesh} used the first {mesh.size} of the {len(jax.devices())} devices")
        dtype = args.dtype or ("float32" if args.model is None else "bfloat16")     # small: float32 is cheap
        model = load(path, dtype=dtype, mesh=mesh, attn_impl=args.attn_impl, progress=False,
                     fp8_experts=args.fp8_experts, verify=not args.no_verify)
        tok = M3Tokenizer.from_pretrained(path)
        max_seq_len = args.max_seq_len
        if max_seq_len is None:                          # 0 or a negative value is refused by the Engine
            max_seq_len = min(4096, model.config.max_position_embeddings)
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=tuple(args.stop))
        engine = Engine(model, max_batch_size=args.max_batch_size, max_seq_len=max_seq_len, tokenizer=tok,
                        mesh=mesh, fp8_index_k=args.fp8_index_k)
        if args.stream and len(args.prompt) == 1:
            dec = IncrementalDecoder(tok)          # a character split over tokens is printed once complete
            for t in engine.stream(args.prompt[0], params, chat=args.chat, request_id="cli"):
                sys.stdout.write(dec.push(t))
                sys.stdout.flush()
            sys.stdout.write(dec.flush() + "\n")
            _say(notes)
            return 0
        for i, r in enumerate(generate(engine, args.prompt, params, chat=args.chat, progress=False)):
            if len(args.prompt) > 1:
                print(f"--- [{i}] ({r.finish_reason}, {len(r.token_ids)} tokens)")
            print(r.text)
            if args.ids:
                print(f"token ids: {list(r.token_ids)} ({r.finish_reason})")
        _say(notes)
        return 0
    except USER_ERRORS as e:
        print(f"m3jax generate: error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["generate"]:                 # the engine owns its options
        return generate_main(argv[1:])
    if argv[:1] == ["serve"]:                    # so does the server (m3jax/serve/cli.py)
        try:
            import uvicorn  # noqa: F401

            from m3jax.serve.cli import serve_main
            import m3jax.serve.app  # noqa: F401
        except ImportError as e:
            print(f"m3jax serve: error: the server needs the serve extra ({e.name} is missing): "
                  f"pip install 'm3jax[serve]'", file=sys.stderr)
            return 2
        return serve_main(argv[1:])
    if argv[:1] == ["train"]:                    # and the trainer (m3jax/training/cli.py)
        from m3jax.training.cli import train_main
        return train_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        {"convert": _convert, "make-tiny": _make_tiny}[args.command](args)
    except USER_ERRORS as e:
        print(f"m3jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
