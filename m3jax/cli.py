"""`m3jax generate | convert | make-tiny`: the command line. User errors print one line and exit 2."""

from __future__ import annotations

import argparse
import sys

from convert.safetensors_io import CheckpointError
from m3jax.config import ConfigError

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, ConfigError, CheckpointError)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="m3jax", description="MiniMax-M3 in JAX")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a checkpoint (default: the bundled tiny model)")
    g.add_argument("--model", help="checkpoint dir (HF release or converted); omitted: the bundled tiny model")
    g.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the M3 chat template")
    g.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    g.add_argument("--attn-impl", default=None, help="reference | gpu | tpu | gpu-interpret | tpu-interpret")

    t = sub.add_parser("make-tiny", help="write a tiny HF-release-format checkpoint")
    t.add_argument("dst")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--quant", choices=["mxfp8"], default=None)
    t.add_argument("--num-shards", type=int, default=1)
    t.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    return p


def _generate(args) -> None:
    import m3jax
    from m3jax.engine import generate
    from m3jax.sampling import SamplingParams
    from m3jax.tokenizer import M3Tokenizer

    path = args.model or m3jax.testing.bundled_tiny_checkpoint()
    model = m3jax.load(path, dtype=args.dtype, attn_impl=args.attn_impl, progress=False)
    tok = M3Tokenizer.from_pretrained(path)
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}]) if args.chat else p for p in args.prompt]
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    for prompt, out in zip(args.prompt, generate(model, prompts, sampling, tokenizer=tok)):
        print(f"prompt: {prompt!r}")
        print(f"tokens: {out.token_ids}")
        print(f"text:   {out.text!r}  [{out.finish_reason}]")


def _make_tiny(args) -> None:
    from m3jax.testing import make_tiny_checkpoint
    path = make_tiny_checkpoint(args.dst, seed=args.seed, quant=args.quant, num_shards=args.num_shards,
                                dtype=args.dtype)
    print(f"wrote {path}")


COMMANDS = {"generate": _generate, "make-tiny": _make_tiny}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except USER_ERRORS as e:
        print(f"m3jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
