"""`m3jax generate | convert | make-tiny`: the command line. User errors print one line and exit 2."""

from __future__ import annotations

import argparse
import sys

from convert.safetensors_io import CheckpointError
from m3jax.config import ConfigError

USER_ERRORS = (ValueError, OSError, ConfigError, CheckpointError)


def _parser() -> argparse.ArgumentParser:
    from convert.cli import add_arguments as convert_arguments

    p = argparse.ArgumentParser(prog="m3jax", description="MiniMax-M3 in JAX")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("generate", add_help=False,
                   help="generate text (default: the bundled tiny model); `m3jax generate -h` for options")
    convert_arguments(sub.add_parser("convert", help="release safetensors -> Orbax checkpoint"))
    t = sub.add_parser("make-tiny", help="write a tiny HF-release-format checkpoint")
    t.add_argument("dst")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--quant", choices=["mxfp8"], default=None)
    t.add_argument("--num-shards", type=int, default=1)
    t.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    return p


def _make_tiny(args) -> None:
    from m3jax.testing import make_tiny_checkpoint
    path = make_tiny_checkpoint(args.dst, seed=args.seed, quant=args.quant, num_shards=args.num_shards,
                                dtype=args.dtype)
    print(f"wrote {path}")


def _convert(args) -> None:
    from convert.cli import convert_main
    convert_main(args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["generate"]:                 # the engine owns its options
        from m3jax.engine import generate_main
        return generate_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        {"convert": _convert, "make-tiny": _make_tiny}[args.command](args)
    except USER_ERRORS as e:
        print(f"m3jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
