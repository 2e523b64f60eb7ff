"""`m3jax train`: train an M3-architecture model on a directory of text/code or a token file.

    m3jax train --data DIR|FILE --out DIR [--config tiny|small|default|CONFIG.json] [--steps N] [--seq-len N]
                [--batch N] [--lr X] [--warmup-steps N] [--indexer-warmup-steps N] [--mesh DxM] [--resume]

A directory (or one text file) is tokenized first: a byte-level BPE tokenizer of --vocab-size is trained on it
and the token files are written to OUT/data (m3jax.training.data). A `.npy` token file is used as is (give
--vocab-size). OUT holds run.json (model config, train config, data), checkpoints/ (Orbax, the whole train
state), metrics.jsonl (one line per step). --resume continues OUT from its latest checkpoint with the settings in
its run.json (only --steps may change). User errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from m3jax.config import ConfigError, M3Config

USER_ERRORS = (ValueError, OSError, ConfigError)
DEFAULT_VOCAB = {"tiny": 512, "small": 8192, "default": 8192, "default-dense": 8192}
_TRAIN_FLAGS = {"seq_len": "seq_len", "batch": "batch_size", "lr": "lr", "warmup_steps": "warmup_steps",
                "indexer_warmup_steps": "indexer_warmup_steps", "checkpoint_every": "checkpoint_every",
                "seed": "seed"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="m3jax train", description="Train an M3-architecture model (LM + MSA indexer KL).")
    p.add_argument("--data", required=True, help="directory of text/code, one text file, or a .npy token file")
    p.add_argument("--out", required=True, help="run directory (must not exist unless --resume)")
    p.add_argument("--config", default="tiny", help="tiny | small | default | default-dense | path to a config.json (default tiny)")
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps (default 1000)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 512)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step, global (default 8)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 3e-4)")
    p.add_argument("--warmup-steps", type=int, default=None, help="learning-rate warm-up (default 100)")
    p.add_argument("--indexer-warmup-steps", type=int, default=None,
                   help="steps of dense attention before MSA turns sparse (default 100)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints (default 500)")
    p.add_argument("--seed", type=int, default=None, help="init and data-order seed (default 0)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="BPE vocabulary to train (default 512 for tiny, 8192 for small); a token file's id range")
    p.add_argument("--heldout-fraction", type=float, default=0.05,
                   help="share of the corpus files held out for evaluation (default 0.05)")
    p.add_argument("--suffixes", default=None,
                   help="comma-separated file suffixes read from a --data directory (default: common text/code)")
    p.add_argument("--mesh", default=None, help="DATAxMODEL device mesh, e.g. 2x4 (default: one device)")
    p.add_argument("--resume", action="store_true", help="continue OUT from its latest checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _prepare_data(args, out: str) -> tuple[str, int, dict]:
    """(token file, vocabulary size, data description for run.json)."""
    from m3jax.training import data

    if args.data.endswith(".npy"):
        tokens = data.load_tokens(args.data)
        top = int(tokens.max()) + 1 if len(tokens) else 0
        vocab = args.vocab_size
        if vocab is None and args.config in DEFAULT_VOCAB:
            raise ValueError("a token file needs --vocab-size (or --config CONFIG.json) to size the embedding")
        if vocab is not None and top > vocab:
            raise ValueError(f"token file {args.data} holds id {top - 1}, outside --vocab-size {vocab}")
        return os.path.abspath(args.data), vocab or top, {"token_file": os.path.abspath(args.data)}
    vocab = args.vocab_size or DEFAULT_VOCAB.get(args.config, DEFAULT_VOCAB["small"])
    suffixes = data.DEFAULT_SUFFIXES if args.suffixes is None else tuple(
        x.strip() for x in args.suffixes.split(",") if x.strip())
    if not suffixes:
        raise ValueError(f"--suffixes {args.suffixes!r} names no suffix")
    manifest = data.prepare_corpus(args.data, os.path.join(out, "data"), vocab_size=vocab,
                                   heldout_fraction=args.heldout_fraction, suffixes=suffixes)
    return (os.path.abspath(os.path.join(out, "data", "tokens.npy")), manifest["vocab_size"],
            {"corpus": manifest["source"], "dir": os.path.abspath(os.path.join(out, "data")),
             "train_files": len(manifest["train_files"]), "heldout_files": len(manifest["heldout_files"])})


def _new_run(args) -> dict:
    from m3jax.training import train as T

    out = args.out
    if os.path.exists(out) and os.listdir(out):
        raise ValueError(f"--out {out} exists and is not empty; pass --resume to continue it, or choose a new --out")
    if not os.path.exists(args.data):
        raise ValueError(f"--data {args.data}: no such file or directory")
    overrides = {field: getattr(args, flag) for flag, field in _TRAIN_FLAGS.items() if getattr(args, flag) is not None}
    if args.steps is not None:
        overrides["steps"] = args.steps
    tcfg = T.TrainConfig(**overrides)                  # validated before any file is written
    token_file, vocab, described = _prepare_data(args, out)
    cfg = T.model_config(args.config, vocab)
    os.makedirs(out, exist_ok=True)
    run = {"config": args.config, "model": cfg.to_hf(), "train": dataclasses.asdict(tcfg), "tokens": token_file,
           "data": described, "num_params": T.num_params(cfg)}
    _write_json(os.path.join(out, "run.json"), run)
    return run


def _resumed_run(args) -> dict:
    path = os.path.join(args.out, "run.json")
    if not os.path.exists(path):
        raise ValueError(f"--resume: {path} not found (not a run directory of `m3jax train`)")
    given = [f"--{flag.replace('_', '-')}" for flag in _TRAIN_FLAGS if getattr(args, flag) is not None]
    if given:
        raise ValueError(f"--resume keeps the run's settings; only --steps may change, got {' '.join(given)}")
    with open(path) as f:
        run = json.load(f)
    if args.steps is not None and args.steps != run["train"]["steps"]:
        run["train"]["steps"] = args.steps
        _write_json(path, run)
    return run


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def run_training(args) -> str:
    from m3jax.sharding import parse_mesh
    from m3jax.training import data
    from m3jax.training import train as T

    mesh = parse_mesh(args.mesh) if args.mesh else None       # a bad --mesh fails before any file is written
    run = _resumed_run(args) if args.resume else _new_run(args)
    cfg = M3Config.from_hf(run["model"])
    tcfg = T.TrainConfig(**run["train"])
    trainer = T.Trainer(cfg, tcfg, mesh=mesh)
    loader = data.TokenLoader(data.load_tokens(run["tokens"]), tcfg.batch_size, tcfg.seq_len, seed=tcfg.seed)
    ckpt_dir = os.path.join(args.out, "checkpoints")
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    start = 0
    if args.resume:
        ckpts = T.Checkpoints(ckpt_dir)
        start = ckpts.latest_step() or 0
        ckpts.close()
    state, history = T.train(trainer, loader, checkpoint_dir=ckpt_dir, resume=args.resume,
                             progress=not args.no_progress)
    T.write_metrics(metrics_path, history, after_step=start)
    if not history:
        return f"nothing to do: {args.out} is already at step {int(state['step'])} of {tcfg.steps}"
    first, last = history[0], history[-1]
    return (f"trained steps {first['step']}..{last['step']} of {cfg.num_hidden_layers}-layer model "
            f"({run['num_params'] / 1e6:.2f}M params): loss {first['loss']:.3f} -> {last['loss']:.3f}, "
            f"indexer KL {first['indexer_kl']:.3f} -> {last['indexer_kl']:.3f}; checkpoint {ckpt_dir}/{last['step']}")


def train_main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        print(run_training(args))
    except USER_ERRORS as e:
        print(f"m3jax train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:]))
