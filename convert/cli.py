"""`m3jax convert SRC DST [--dtype] [--overwrite]`: the converter's command line.

`add_arguments(parser)` declares the options and `convert_main(args)` runs them; `m3jax.cli` wires them as the
`convert` subcommand, which prints user errors (bad checkpoint, config, existing destination) as one line and
exits 2, without a traceback.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("src", help="HF release checkpoint dir (BF16/FP32 or MXFP8 safetensors, index json or single file)")
    p.add_argument("dst", help="output dir (Orbax pieces + config.json + tokenizer files)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="parameter dtype of the converted checkpoint (MXFP8 is dequantised to it)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--piece-mb", type=int, default=128, help="largest piece read at once (host memory)")
    p.add_argument("--group-mb", type=int, default=256,
                   help="pieces per Orbax checkpoint; host memory is about 2 groups + 2 pieces")
    p.add_argument("--compress", action="store_true", help="zstd-compress the Orbax arrays")
    p.add_argument("--fp8-experts", action="store_true",
                   help="keep an MXFP8 release's routed experts in MXFP8 (load with fp8_experts=True)")
    return p


def convert_main(args: argparse.Namespace) -> None:
    """Run a conversion; raises m3jax.cli.USER_ERRORS for bad input (the CLI prints them as one line)."""
    from convert.orbax_io import convert

    if min(getattr(args, "piece_mb", 128), getattr(args, "group_mb", 256)) < 1:
        raise ValueError(f"--piece-mb and --group-mb must be >= 1, got {args.piece_mb} and {args.group_mb}")
    s = convert(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite,
                progress=getattr(args, "progress", True), piece_bytes=getattr(args, "piece_mb", 128) << 20,
                group_bytes=getattr(args, "group_mb", 256) << 20, compress=getattr(args, "compress", False),
                fp8_experts=getattr(args, "fp8_experts", False))
    print(f"converted {s['tensors']} tensors ({s['bytes'] / 1e9:.2f} GB) from {args.src} to {s['dst']} "
          f"in {s['seconds']:.1f} s")
