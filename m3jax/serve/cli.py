"""`m3jax serve`: load a checkpoint, build the Engine, and serve it over HTTP with uvicorn."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from m3jax import distributed


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="m3jax serve", description="Serve an M3 checkpoint over an OpenAI-compatible "
                                 "HTTP API (/v1/completions, /v1/chat/completions, /v1/models, /health).")
    ap.add_argument("--model", help="checkpoint directory (default: the bundled default model, "
                                    "m3jax.default_model_path())")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--dtype", default=None,
                    help="bfloat16 | float32 (default: float32 for the bundled model, else bfloat16)")
    ap.add_argument("--mesh", default=None, help="DATAxMODEL device mesh, e.g. 1x8 (default: one device)")
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--max-seq-len", type=int, default=None, help="default: 4096, or the model's limit if lower")
    ap.add_argument("--served-model-name", default=None, help="the `model` name clients use (default: the "
                    "checkpoint directory's name)")
    ap.add_argument("--fp8-experts", action="store_true", help="keep an MXFP8 release's routed experts in FP8")
    ap.add_argument("--fp8-index-k", action="store_true", help="cache MSA index keys in FP8 (Engine(fp8_index_k))")
    ap.add_argument("--max-queue", type=int, default=None,
                    help="requests waiting beyond the running batch before 503 (default: 4 x max-batch-size)")
    ap.add_argument("--prefill-chunk", type=int, default=None,
                    help="prompt tokens per request and step (default: the backend's, Engine's default_prefill_chunk)")
    ap.add_argument("--no-prefix-caching", action="store_true",
                    help="compute every prompt in full (default: reuse the cached blocks of earlier prompts)")
    ap.add_argument("--attn-impl", default=None, help="reference | gpu | tpu | ... (default: the backend's)")
    ap.add_argument("--no-verify", action="store_true",
                    help="skip the checksums of a converted checkpoint's pieces (faster load, corruption unnoticed)")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    distributed.add_distributed_args(ap)
    return ap


def build_app(args):
    """(app, model name) from parsed arguments: loads the model and builds the Engine."""
    import os

    from m3jax.api import load
    from m3jax.engine import Engine
    from m3jax.serve.app import create_app
    from m3jax.sharding import parse_mesh
    from m3jax.api import default_model_path
    from m3jax.tokenizer import M3Tokenizer

    for name in ("port", "max_batch_size", "prefill_chunk"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    path = args.model or default_model_path()
    mesh = parse_mesh(args.mesh) if args.mesh else None
    dtype = args.dtype or ("float32" if args.model is None else "bfloat16")
    model = load(path, dtype=dtype, mesh=mesh, attn_impl=args.attn_impl, progress=False,
                 fp8_experts=args.fp8_experts, verify=not args.no_verify)
    tok = M3Tokenizer.from_pretrained(path)
    max_seq_len = args.max_seq_len if args.max_seq_len is not None else min(4096, model.config.max_position_embeddings)
    engine = Engine(model, max_batch_size=args.max_batch_size, max_seq_len=max_seq_len, tokenizer=tok,
                    prefill_chunk=args.prefill_chunk, mesh=mesh,
                    enable_prefix_caching=not args.no_prefix_caching, fp8_index_k=args.fp8_index_k)
    if distributed.is_multi_process():      # process 0 serves; the others replay its engine operations
        if not distributed.is_main_process():
            distributed.follow(engine)
            return None, None
        engine = distributed.LeaderEngine(engine)
    name = args.served_model_name or os.path.basename(os.path.normpath(path))
    return create_app(engine, model_name=name, max_queue=args.max_queue, tokenizer=tok, checkpoint_dir=path), name


def serve_main(argv: Sequence[str] | None = None) -> int:
    """`m3jax serve`: returns the exit code. Errors print one line to stderr and return 2."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from m3jax.cli import USER_ERRORS
    try:
        distributed.maybe_initialize(args)      # multi-host: before any jax call (see m3jax.distributed)
        app, name = build_app(args)
    except USER_ERRORS as e:
        print(f"m3jax serve: error: {e}", file=sys.stderr)
        return 2
    if app is None:                             # a follower whose leader closed
        return 0
    import uvicorn
    print(f"m3jax serve: {name!r} on http://{args.host}:{args.port}/v1 (prefix caching "
          f"{'off' if args.no_prefix_caching else 'on'})", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(serve_main())
