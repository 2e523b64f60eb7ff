"""Train the bundled default model (m3jax.default_model_path()) and its dense-attention twin, evaluate, export.

One command on a 2-GPU host does all of it within a wall-clock budget (`all`):

    PYTHONPATH=$PWD PYTHONUNBUFFERED=1 python benchmarks/train_default.py all --out $OUT --budget-s 540

1. prepare: the `.py` files of the running Python's standard library (sysconfig "stdlib", sorted relative
   paths; site-packages excluded; test/ included when the installation has it: it is ordinary Python source and
   more than doubles the corpus), ~5% of the files held out by a hash of their path
   (m3jax.training.data.is_heldout), the byte-level BPE tokenizer trained on the training files only, the token
   memmaps, and the exact file lists (path, bytes, sha256) with the Python version.
2. train: two processes at once, one per GPU (CUDA_VISIBLE_DEVICES): `msa` (the `default` preset, MSA + MoE:
   the shipped model) and `dense` (`default-dense`: the same model with dense attention everywhere). Same data
   order, optimizer, batch and steps. Each first times a few steps of each compiled step (compilation
   included), writes its plan, and both then take the same step count: the largest that both fit before the
   training deadline (each plan's seconds per step, counted from when the later plan was ready). The
   learning-rate cosine uses that count (the step count is an argument of the compiled step, so timing costs
   no second compilation). The MSA model attends densely for its first 15% of steps (indexer warm-up).
3. eval: held-out bits per byte at a 4096-token context (m3jax.training.evaluate: documents concatenated with
   <|endoftext|>, non-overlapping windows, bits over every predicted token / UTF-8 bytes they cover) of the MSA
   model with sparse attention, the same model with all blocks selected, and the dense model; lzma
   (preset 9 | PRESET_EXTREME) on exactly the bytes the windows cover, as one stream, and per file over the
   whole held-out files. The MSA selection fraction at that context. Two held-out sets, each evaluated so:
   all held-out files ("eval", "lzma"), and the hand-written ones ("eval_hand_written", "lzma_hand_written"):
   the held-out files less those that declare themselves machine-generated in their first lines
   (m3jax.training.data.is_generated: the Sphinx-built pydoc_data/topics.py, the gencodec.py charmap tables,
   token.py, ...; listed with the line that says so in "heldout_sets"). Training uses every training file.
4. export (msa): the release layout (config.json, bf16 safetensors shards < 14 MiB, index, tokenizer.json),
   then `m3jax.load` + greedy `m3jax.generate` after `def fibonacci(n):` as a check, printed.

$OUT receives default_model/ (6 files), train_results.json and log.txt: 8 files. Everything else (token files,
Orbax checkpoints, the dense model) stays under --work. A failing training leaves the other's results; the
results JSON is written whatever the sample generation does. A short table is printed last.

CPU smoke run of the whole flow (both "GPUs" are the CPU):
    python benchmarks/train_default.py all --out /tmp/o --work /tmp/w --budget-s 120 --config tiny
        --seq-len 256 --batch 2 --max-files 40 --devices cpu

`dense-twin` (one GPU, about 250 s on an H200; GPU_COMMAND.txt) re-creates the shipped run's dense twin and
evaluates the shipped model on both held-out sets: the data prepared as the run did but encoded with the SHIPPED
tokenizer (m3jax/data/default_model/tokenizer.json), checked against the run's record
(benchmarks/results_train_default_2xh200.json: both file lists with sha256, the token counts, the bytes the
evaluation windows cover; any difference stops it); lzma on both sets; the shipped MSA model (sparse and all
blocks, loaded in --eval-dtype, bfloat16 by default); then the dense twin (`default-dense`) trained with the run's
recipe for --steps (default 709, the run's; a smaller count is flagged in the output and its learning-rate cosine
spans that count), no checkpoints, and evaluated in its bfloat16 compute dtype as the run did. Results in
$OUT/dense_twin_results.json (rewritten after each stage) and dense_twin_log.txt; a table is printed last.
CPU dry run (tiny twin, a file subset, not verified):
    python benchmarks/train_default.py dense-twin --out /tmp/o --work /tmp/w --config tiny --seq-len 128
        --batch 2 --steps 5 --max-files 80 --reference none --eval-dtype float32 --max-eval-windows 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repo, before benchmarks/

VARIANTS = ("msa", "dense")
HELDOUT_FRACTION = 0.05
INDEXER_WARMUP_FRACTION = 0.15
LR_WARMUP_FRACTION = 0.05
# No trailing newline: the byte-level BPE pre-tokenizer makes a newline and the next line's indentation one token
# ("\n   "), so a prompt ending in a bare "\n" is a token boundary the model never saw before indented code.
PROMPT = "def fibonacci(n):"


_LOG: list[str] = []                                # this process's lines, for log.txt


def log(tag: str, msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')} {tag}] {msg}"
    _LOG.append(line + "\n")
    print(line, flush=True)


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


# 1. prepare ---------------------------------------------------------------------------------------------------
def stdlib_files(root: str, max_files: int | None = None) -> tuple[list[str], dict]:
    """Sorted relative paths of the stdlib's .py files (site-packages and __pycache__ excluded); with
    max_files, an evenly spaced subset (smoke runs)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        out.extend(os.path.normpath(os.path.join(rel, f)) for f in filenames if f.endswith(".py"))
    out.sort()
    has_test = any(p.startswith("test" + os.sep) for p in out)
    if max_files is not None and len(out) > max_files:
        step = len(out) / max_files
        out = [out[int(i * step)] for i in range(max_files)]
    return out, {"stdlib": root, "python": platform.python_version(), "includes_test_dir": has_test,
                 "excluded": ["site-packages", "dist-packages", "__pycache__"], "max_files": max_files}


def prepare(work: str, vocab_size: int, max_files: int | None, *, stdlib: str | None = None,
            tokenizer: str | None = None) -> dict:
    """Step 1 (module docstring) into WORK/data; stdlib: the library to read (default: the running Python's);
    tokenizer: encode with this tokenizer.json instead of training one (dense-twin: the shipped model's). Also
    splits the held-out files into hand-written and generated ones (write_heldout_sets)."""
    from m3jax.training import data

    root = stdlib or sysconfig.get_paths()["stdlib"]
    files, meta = stdlib_files(root, max_files)
    t0 = time.perf_counter()
    manifest = data.prepare_corpus(root, os.path.join(work, "data"), vocab_size=vocab_size,
                                   heldout_fraction=HELDOUT_FRACTION, files=files, meta=meta, tokenizer=tokenizer)
    import numpy as np
    n_train = len(np.load(os.path.join(work, "data", "tokens.npy"), mmap_mode="r"))
    n_held = len(np.load(os.path.join(work, "data", "heldout.npy"), mmap_mode="r"))
    sets = write_heldout_sets(os.path.join(work, "data"))
    summary = {"seconds": time.perf_counter() - t0, "python": meta["python"], "stdlib": root,
               "includes_test_dir": meta["includes_test_dir"], "train_files": len(manifest["train_files"]),
               "heldout_files": len(manifest["heldout_files"]), "skipped_not_utf8": manifest["skipped_not_utf8"],
               "train_bytes": sum(f["bytes"] for f in manifest["train_files"]),
               "heldout_bytes": sum(f["bytes"] for f in manifest["heldout_files"]),
               "train_tokens": n_train, "heldout_tokens": n_held, "vocab_size": manifest["vocab_size"],
               "tokenizer": manifest["tokenizer"], "heldout_hand_written_files": len(sets["hand_written"]),
               "heldout_generated_files": len(sets["generated"]),
               "heldout_hand_written_bytes": sets["hand_written_bytes"],
               "heldout_hand_written_tokens": sets["hand_written_tokens"]}
    log("prep", json.dumps(summary))
    log("prep", f"held-out files declaring themselves generated (excluded from the hand-written set): "
                f"{', '.join(f['path'] for f in sets['generated']) or 'none'}")
    return summary


# Held-out sets: all held-out files, and the hand-written ones -------------------------------------------------
HELDOUT_SETS = {"all": "heldout.npy", "hand_written": "heldout_hand_written.npy"}


def write_heldout_sets(ddir: str) -> dict:
    """Split the held-out files of a prepared data dir by m3jax.training.data.is_generated (a file whose first
    lines declare it machine-generated) and write heldout_hand_written.npy (the hand-written files' tokens, each
    followed by <|endoftext|>, exactly as heldout.npy is built for all of them; checked by re-encoding all) and
    heldout_sets.json (the two lists, each generated file with the line that declares it). Only the evaluation
    uses the split; training data is unchanged."""
    import numpy as np
    from tokenizers import Tokenizer

    from m3jax.training import data

    manifest = json.load(open(os.path.join(ddir, "files.json")))
    tok = Tokenizer.from_file(os.path.join(ddir, "tokenizer.json"))
    texts, hand, gen = [], [], []
    for f in manifest["heldout_files"]:
        raw = open(os.path.join(manifest["source"], f["path"]), "rb").read()
        if hashlib.sha256(raw).hexdigest() != f["sha256"]:
            raise ValueError(f"held-out file {f['path']} changed since it was prepared (sha256 differs)")
        text = raw.decode("utf-8")
        texts.append(text)
        marker = data.generated_marker(text)
        if marker is None:
            hand.append((f, text))
        else:
            gen.append({"path": f["path"], "bytes": f["bytes"], "marker": marker})
    if not np.array_equal(data.encode_documents(tok, texts), np.load(os.path.join(ddir, "heldout.npy"))):
        raise AssertionError("re-encoding the held-out files does not give heldout.npy")
    ids = data.encode_documents(tok, [t for _, t in hand])
    np.save(os.path.join(ddir, HELDOUT_SETS["hand_written"]), ids)
    sets = {"rule": "m3jax.training.data.is_generated: one of the first "
                    f"{data.GENERATED_HEAD_LINES} lines matches a marker (case-insensitive)",
            "markers": list(data.GENERATED_MARKERS), "generated": gen,
            "hand_written": [f["path"] for f, _ in hand],
            "generated_bytes": sum(f["bytes"] for f in gen),
            "hand_written_bytes": sum(f["bytes"] for f, _ in hand), "hand_written_tokens": int(len(ids))}
    _write_json(os.path.join(ddir, "heldout_sets.json"), sets)
    return sets


def load_heldout_sets(ddir: str) -> dict:
    """{set name: token ids} of the held-out sets (HELDOUT_SETS) of a prepared data dir."""
    from m3jax.training import data
    return {name: data.load_tokens(os.path.join(ddir, fname)) for name, fname in HELDOUT_SETS.items()}


def evaluate_sets(nll_fns: dict, sets: dict, context: int, table, batch: int, tag: str,
                  max_windows: int | None = None) -> dict:
    """{set: {mode: result}}: m3jax.training.evaluate.heldout_bits_per_byte of each nll_fn (mode name -> fn) on
    each held-out set; max_windows: only the first N windows of each set (smoke runs; the results say so). A set
    too short for one window gets {"error": ...}."""
    from m3jax.training import evaluate

    out: dict = {name: {} for name in sets}
    for mode, fn in nll_fns.items():
        for name, ids in sets.items():
            if max_windows:
                ids = ids[:max_windows * context + 1]
            t1 = time.time()
            try:
                r = evaluate.heldout_bits_per_byte(fn, ids, context, table, batch=batch)
            except ValueError as e:                   # fewer tokens than one window (tiny smoke subsets)
                out[name][mode] = {"error": str(e)}
                log(tag, f"held-out ({name}) {mode}: not evaluated: {e}")
                continue
            r["seconds"] = time.time() - t1
            if max_windows:
                r["max_windows"] = max_windows
            out[name][mode] = r
            log(tag, f"held-out ({name}) {mode}: {r['bits_per_byte']:.4f} bits/byte over {r['bytes']} bytes "
                     f"({r['windows']} windows of {r['context']}) in {r['seconds']:.0f} s")
    return out


# 2-4. one training process ------------------------------------------------------------------------------------
def _plan_steps(plans: dict, deadline: float, ready: float) -> int:
    """The step count every variant fits before `deadline`, starting at `ready` (5% margin)."""
    left = deadline - ready
    return max(1, min(int(0.95 * left / p["seconds_per_step"]) for p in plans.values()))


def _timed_steps(trainer, state, loader, n: int) -> tuple[dict, float, list[float]]:
    import jax
    times = []
    for _ in range(n):
        batch = loader.next_batch()
        t0 = time.perf_counter()
        state, metrics = trainer.step(state, batch)
        jax.device_get(metrics)
        times.append(time.perf_counter() - t0)
    return state, times[0], times[1:]


def train_variant(args) -> int:
    """Train, evaluate (and for msa export + generate) one variant; writes WORK/<variant>/result.json."""
    tag = args.variant
    vdir = os.path.join(args.work, tag)
    os.makedirs(vdir, exist_ok=True)
    result: dict = {"variant": tag, "config": args.config if tag == "msa" else f"{args.config} (dense attention)"}
    try:
        _train_variant(args, vdir, result)
        return 0
    except BaseException as e:
        result["error"] = f"{type(e).__name__}: {e}"
        log(tag, "FAILED:\n" + traceback.format_exc())
        if not os.path.exists(os.path.join(vdir, "plan.json")):        # the other process stops waiting
            _write_json(os.path.join(vdir, "plan.json"), {"failed": True})
        return 1
    finally:
        _write_json(os.path.join(vdir, "result.json"), result)


def _train_record(history: list, planned: int, seconds: float, tcfg, num_tokens: int, keys) -> dict:
    """What a results file keeps of a training run: counts, throughput, and about 200 points of its history."""
    done, tokens_per_step = len(history), tcfg.batch_size * tcfg.seq_len
    keep = sorted(set(range(0, done, max(1, done // 200))) | {done - 1})
    return {"steps": done, "planned_steps": planned, "stopped_early": done < planned, "seconds": seconds,
            "tokens": done * tokens_per_step, "tokens_per_s_wall": done * tokens_per_step / seconds,
            "epochs": done * tokens_per_step / num_tokens, "batch": tcfg.batch_size, "seq_len": tcfg.seq_len,
            "lr": tcfg.lr, "final_loss": history[-1]["loss"],
            "history": [{k: history[i][k] for k in keys} for i in keep]}


def _train_variant(args, vdir: str, result: dict) -> None:
    import jax
    import numpy as np
    from tokenizers import Tokenizer

    from m3jax.training import data, evaluate, export, train as T

    tag = args.variant
    t_start = time.time()
    result["device"] = str(jax.devices()[0].device_kind)
    result["jax"] = jax.__version__
    ddir = os.path.join(args.work, "data")
    tok = Tokenizer.from_file(os.path.join(ddir, "tokenizer.json"))
    cfg = T.model_config(args.config, tok.get_vocab_size())
    if tag == "dense":
        cfg = T.dense_variant(cfg)
    result["num_params"] = T.num_params(cfg)
    result["model"] = cfg.to_hf()
    msa = cfg.has_sparse_layers
    tcfg = T.TrainConfig(steps=10 ** 6, batch_size=args.batch, seq_len=args.seq_len, lr=args.lr,
                         warmup_steps=0, indexer_warmup_steps=args.timing_steps if msa else 0,
                         checkpoint_every=10 ** 6, seed=0)
    trainer = T.Trainer(cfg, tcfg)
    tokens = data.load_tokens(os.path.join(ddir, "tokens.npy"))
    log(tag, f"{result['num_params'] / 1e6:.2f}M params, {len(tokens)} training tokens, device {result['device']}")

    # Timing: the compiled steps (dense warm-up and sparse for msa) on a throw-away state.
    state = trainer.init_state()
    loader = data.TokenLoader(tokens, tcfg.batch_size, tcfg.seq_len, seed=1)
    timing = {}
    kinds = ("dense_warmup", "sparse") if msa else ("dense",)
    for kind in kinds:
        state, first, rest = _timed_steps(trainer, state, loader, args.timing_steps)
        timing[kind] = {"first_step_s": first, "step_s": float(np.median(rest))}
        log(tag, f"timing {kind}: first step (compile) {first:.1f} s, then {timing[kind]['step_s'] * 1e3:.1f} ms/step")
    del state
    if msa:
        f = INDEXER_WARMUP_FRACTION
        per_step = f * timing["dense_warmup"]["step_s"] + (1 - f) * timing["sparse"]["step_s"]
    else:
        per_step = timing["dense"]["step_s"]
    result["timing"] = timing
    plan = {"seconds_per_step": per_step, "ready": time.time()}
    _write_json(os.path.join(vdir, "plan.json"), plan)

    # Agree on one step count with the other variant (both compute it from the same two plan files).
    plans, other_failed = {tag: plan}, []
    for other in VARIANTS:
        if other == tag:
            continue
        path = os.path.join(args.work, other, "plan.json")
        while not os.path.exists(path) and time.time() < args.deadline:     # the driver marks a crash
            time.sleep(0.2)
        p = json.load(open(path)) if os.path.exists(path) else {"failed": True}
        if p.get("failed"):
            other_failed.append(other)
        else:
            plans[other] = p
    ready = max(p["ready"] for p in plans.values())
    steps = _plan_steps(plans, args.deadline, ready)
    warmup = max(1, round(LR_WARMUP_FRACTION * steps))
    iwarm = round(INDEXER_WARMUP_FRACTION * steps) if msa else 0
    trainer.set_schedule(steps, warmup, iwarm)
    result["plan"] = {"steps": steps, "lr_warmup_steps": warmup, "indexer_warmup_steps": iwarm,
                      "seconds_per_step_planned": {k: v["seconds_per_step"] for k, v in plans.items()},
                      "matched_with": sorted(set(plans) - {tag}), "other_failed": other_failed,
                      "deadline_in_s": args.deadline - time.time(), "startup_and_timing_s": time.time() - t_start}
    log(tag, f"plan: {steps} steps (lr warm-up {warmup}, indexer warm-up {iwarm}), "
             f"{(args.deadline - time.time()):.0f} s to the training deadline")

    # The run.
    loader = data.TokenLoader(tokens, tcfg.batch_size, tcfg.seq_len, seed=0)
    every = max(1, steps // 25)

    def on_step(step, m):
        if step % every == 0 or step == steps:
            log(tag, f"step {step}/{steps} loss {m['loss']:.3f} kl {m['indexer_kl']:.3f} lr {m['lr']:.2e} "
                     f"{m['tokens_per_s']:.0f} tok/s")

    t0 = time.time()
    # Only a pathological overrun (far slower steps than timed) is cut short; the table then says so.
    stop_at = args.deadline + args.overrun_s
    state, history = T.train(trainer, loader, checkpoint_dir=os.path.join(vdir, "checkpoints"), progress=False,
                             on_step=on_step, stop_at=stop_at)
    train_s = time.time() - t0
    done = len(history)
    if done < steps:
        log(tag, f"STOPPED EARLY after {done} of {steps} planned steps (past the deadline + {args.overrun_s:.0f} s)")
    steady = [h["tokens_per_s"] for h in history[done // 10:]] or [history[-1]["tokens_per_s"]]
    result["train"] = dict(_train_record(history, steps, train_s, tcfg, len(tokens),
                                         ("step", "loss", "indexer_kl", "lr", "max_expert_load")),
                           tokens_per_s_median_step=float(np.median(steady)),
                           final_indexer_kl=history[-1]["indexer_kl"],
                           finished_before_deadline_s=args.deadline - time.time())
    log(tag, f"trained {done} steps in {train_s:.0f} s ({result['train']['tokens_per_s_wall']:.0f} tok/s), "
             f"loss {history[-1]['loss']:.3f}")
    _write_json(os.path.join(vdir, "result.json"), result)

    # Evaluation: all held-out files ("eval") and the hand-written ones ("eval_hand_written").
    params = state["params"]
    modes = {"sparse": True, "all_blocks": False} if msa else {"dense": False}
    ev = evaluate_sets({m: evaluate.model_nll_fn(trainer, params, sparse=sp) for m, sp in modes.items()},
                       load_heldout_sets(ddir), args.eval_context, evaluate.token_bytes(tok), args.eval_batch, tag)
    result["eval"], result["eval_hand_written"] = ev["all"], ev["hand_written"]
    _write_json(os.path.join(vdir, "result.json"), result)
    if msa:
        result["selection"] = T.selection_fraction(cfg, args.eval_context)

    if not msa:
        return
    # Export and check the release directory.
    out_model = os.path.join(vdir, "default_model")
    if os.path.exists(out_model):
        shutil.rmtree(out_model)
    np_params = {p: np.asarray(jax.device_get(v)) for p, v in params.items()}
    result["export"] = export.export_release(out_model, cfg, np_params, os.path.join(ddir, "tokenizer.json"))
    log(tag, f"exported {out_model}: {result['export']['files']}")
    _write_json(os.path.join(vdir, "result.json"), result)
    try:
        import m3jax
        t1 = time.time()
        model = m3jax.load(out_model, progress=False)
        res = m3jax.generate(model, [PROMPT], m3jax.SamplingParams(max_new_tokens=args.sample_tokens),
                             max_seq_len=1024, max_batch_size=1)[0]
        result["sample"] = {"prompt": PROMPT, "text": res.text, "finish_reason": res.finish_reason,
                            "token_ids": res.token_ids, "seconds": time.time() - t1}
        log(tag, f"greedy sample after {PROMPT!r} ({time.time() - t1:.0f} s):\n{PROMPT}{res.text}\n[end of sample]")
    except Exception as e:                      # the results stay; say what failed
        result["sample"] = {"error": f"{type(e).__name__}: {e}"}
        log(tag, "sample generation FAILED:\n" + traceback.format_exc())


# breakdown (CPU, after the run) --------------------------------------------------------------------------------
def breakdown(args) -> int:
    """The exported model on held-out files of a run, read from --stdlib: by default only those equal byte for byte
    (sha256) to the run's; --same-path takes this --stdlib's version of every held-out path (another release of the
    same file: also never trained on, as the split is by path). --only / --exclude pick paths. Same protocol
    (EOT-separated, non-overlapping --eval-context windows, at most --max-windows), lzma on the same bytes.
    A diagnostic beside the run's own numbers, which it does not replace."""
    import numpy as np

    import m3jax
    from m3jax.training import data, evaluate
    from tokenizers import Tokenizer

    with open(args.results) as f:
        run = json.load(f)
    used, texts = [], []
    for f in run["files"]["heldout_files"]:
        if (args.only and f["path"] not in args.only) or f["path"] in args.exclude:
            continue
        p = os.path.join(args.stdlib, f["path"])
        raw = open(p, "rb").read() if os.path.exists(p) else None
        if raw is not None and (args.same_path or hashlib.sha256(raw).hexdigest() == f["sha256"]):
            used.append(f["path"])
            texts.append(raw.decode("utf-8"))
    tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    eot = tok.token_to_id(data.EOT)
    ids = np.asarray([i for t in texts for i in tok.encode(t).ids + [eot]], np.int32)
    if args.max_windows:
        ids = ids[:args.max_windows * args.eval_context + 1]
    table = evaluate.token_bytes(tok)
    model = m3jax.load(args.model, dtype="float32", progress=False)
    out = {"model": args.model, "stdlib": args.stdlib, "same_path": args.same_path, "files": used,
           "files_bytes": sum(len(t.encode()) for t in texts),
           "lzma": evaluate.lzma_bits_per_byte(evaluate.covered_bytes(ids, args.eval_context, table))}
    for mode in args.modes.split(","):
        out[mode] = evaluate.heldout_bits_per_byte(evaluate.loaded_model_nll_fn(model, sparse=mode == "sparse"),
                                                   ids, args.eval_context, table, batch=args.eval_batch)
        log("breakdown", f"{mode}: {out[mode]['bits_per_byte']:.4f} bits/byte over {out[mode]['bytes']} bytes")
    log("breakdown", f"{len(used)} of {len(run['files']['heldout_files'])} held-out files; "
                     f"lzma {out['lzma']['bits_per_byte']:.4f} bits/byte on the same bytes")
    if args.out:
        _write_json(args.out, out)
    return 0


# dense-twin (one GPU, after the run) --------------------------------------------------------------------------
SHIPPED_RUN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results_train_default_2xh200.json")
SHIPPED_STEPS = 709                                   # the step count of the run that trained the shipped model


def verify_data(reference: str, manifest: dict, prep: dict) -> dict:
    """Check the prepared data against a recorded run (its results JSON): both file lists (path, bytes, sha256)
    and the token counts must be equal; raises ValueError naming what differs."""
    with open(reference) as f:
        ref = json.load(f)
    problems = []
    for split in ("train_files", "heldout_files"):
        mine = {f["path"]: (f["bytes"], f["sha256"]) for f in manifest[split]}
        theirs = {f["path"]: (f["bytes"], f["sha256"]) for f in ref["files"][split]}
        if mine != theirs:
            missing, extra = sorted(set(theirs) - set(mine)), sorted(set(mine) - set(theirs))
            changed = sorted(p for p in set(mine) & set(theirs) if mine[p] != theirs[p])
            problems.append(f"{split}: {len(missing)} of the run's missing here {missing[:4]}, {len(extra)} not in "
                            f"the run {extra[:4]}, {len(changed)} with other bytes or sha256 {changed[:4]}")
    for key in ("train_tokens", "heldout_tokens", "vocab_size"):
        if prep[key] != ref["data"][key]:
            problems.append(f"{key}: {prep[key]} here, {ref['data'][key]} in the run")
    if problems:
        raise ValueError(f"the prepared data differ from the run recorded in {reference}: " + "; ".join(problems))
    return {"reference": reference, "verified": True, "train_files": len(manifest["train_files"]),
            "heldout_files": len(manifest["heldout_files"]), "train_tokens": prep["train_tokens"],
            "heldout_tokens": prep["heldout_tokens"]}


def check_covered_bytes(ref: dict, lzma_all: dict) -> None:
    """The bytes the evaluation windows of all held-out files cover (their sha256) must be the recorded run's."""
    if lzma_all["covered_sha256"] != ref["lzma"]["covered_sha256"]:
        raise ValueError(f"the evaluation windows of all held-out files cover other bytes than the run's (sha256 "
                         f"{lzma_all['covered_sha256']} here, {ref['lzma']['covered_sha256']} in the run)")


def run_recorded(ref: dict) -> dict:
    """The recorded run's own bits per byte on all held-out files (its training-time evaluation), to compare."""
    return {"msa": {m: ref["msa"]["eval"][m]["bits_per_byte"] for m in ("sparse", "all_blocks")},
            "dense": ref["dense"]["eval"]["dense"]["bits_per_byte"],
            "lzma": ref["lzma"]["windows_concatenated"]["bits_per_byte"]}


def dense_twin(args) -> int:
    """On one GPU: rebuild the shipped run's data with the shipped tokenizer (checked against the run's file
    lists and token counts), evaluate the shipped MSA model (sparse and all blocks) and lzma on all held-out files
    and on the hand-written ones, then train the dense twin with the run's recipe for --steps (default: the
    run's 709) and evaluate it the same way. Writes $OUT/dense_twin_results.json (after each stage) and
    dense_twin_log.txt; prints a short table last."""
    t_start = time.time()
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")      # as the run's training processes
    if os.path.exists(args.work):
        shutil.rmtree(args.work)
    os.makedirs(args.work)
    os.makedirs(args.out, exist_ok=True)
    out_json = os.path.join(args.out, "dense_twin_results.json")
    results: dict = {"command": sys.argv, "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                     "budget_s": args.budget_s, "config": args.config}
    rc = 0

    def on_term(signum, frame):                 # an outer `timeout`: leave the results so far, then the table
        raise SystemExit(f"stopped by signal {signum} after {time.time() - t_start:.0f} s")

    signal.signal(signal.SIGTERM, on_term)
    try:
        _dense_twin(args, results, out_json, t_start)
    except BaseException as e:
        results["error"] = f"{type(e).__name__}: {e}"
        log("twin", "FAILED:\n" + traceback.format_exc())
        rc = 1
    finally:
        results["wall_s"] = time.time() - t_start
        _write_json(out_json, results)
        text = summary(results)
        with open(os.path.join(args.out, "dense_twin_log.txt"), "w") as f:
            f.write("".join(_LOG) + "===== summary =====\n" + text)
    return rc


def _dense_twin(args, results: dict, out_json: str, t_start: float) -> None:
    import jax
    import numpy as np
    from tokenizers import Tokenizer

    import m3jax
    from m3jax.training import data, evaluate, train as T

    model_dir = args.model or m3jax.default_model_path()
    ddir = os.path.join(args.work, "data")
    steps = args.steps
    results["device"] = str(jax.devices()[0].device_kind)
    results["jax"] = jax.__version__
    results["shipped_model"] = model_dir
    if steps != SHIPPED_STEPS:
        log("twin", f"NOTE: --steps {steps}: NOT the shipped run's {SHIPPED_STEPS} steps (its learning-rate cosine "
                    f"spans {steps} steps)")

    # 1. The shipped run's data, encoded with the shipped tokenizer.
    results["data"] = prepare(args.work, args.vocab_size, args.max_files, stdlib=args.stdlib,
                              tokenizer=os.path.join(model_dir, "tokenizer.json"))
    with open(os.path.join(ddir, "files.json")) as f:
        results["files"] = json.load(f)
    with open(os.path.join(ddir, "heldout_sets.json")) as f:
        results["heldout_sets"] = json.load(f)
    if args.reference == "none":
        results["verified"] = {"verified": False, "why": "--reference none"}
        log("twin", "NOT VERIFIED: the data are not checked against a recorded run (--reference none)")
    else:
        results["verified"] = verify_data(args.reference, results["files"], results["data"])
        log("twin", f"data verified against {args.reference}: the same {results['verified']['train_files']} "
                    f"training and {results['verified']['heldout_files']} held-out files (sha256) and token counts")
    results["lzma"] = lzma_baselines(args.work, args.eval_context, "all", args.max_eval_windows)
    results["lzma_hand_written"] = lzma_baselines(args.work, args.eval_context, "hand_written", args.max_eval_windows)
    if results["verified"]["verified"]:
        with open(args.reference) as f:
            ref = json.load(f)
        if args.max_eval_windows:
            log("twin", "the covered bytes are not compared with the run's (--max-eval-windows)")
        else:
            check_covered_bytes(ref, results["lzma"])
            log("twin", "the evaluation windows of all held-out files cover the run's bytes (sha256)")
        results["run_recorded"] = run_recorded(ref)
    _write_json(out_json, results)
    tok = Tokenizer.from_file(os.path.join(ddir, "tokenizer.json"))
    table = evaluate.token_bytes(tok)
    sets = load_heldout_sets(ddir)

    # 2. The shipped MSA model, as exported (its own weights, loaded at --eval-dtype).
    t1 = time.time()
    model = m3jax.load(model_dir, dtype=args.eval_dtype, progress=False)
    ev = evaluate_sets({"sparse": evaluate.loaded_model_nll_fn(model, sparse=True),
                        "all_blocks": evaluate.loaded_model_nll_fn(model, sparse=False)},
                       sets, args.eval_context, table, args.eval_batch, "msa", args.max_eval_windows)
    results["msa"] = {"variant": "msa (shipped)", "model": model_dir, "eval_dtype": args.eval_dtype,
                      "num_params": T.num_params(model.config), "eval": ev["all"],
                      "eval_hand_written": ev["hand_written"],
                      "selection": T.selection_fraction(model.config, args.eval_context),
                      "seconds": time.time() - t1}
    del model, ev
    _write_json(out_json, results)

    # 3. The dense twin: the run's recipe (train_variant), `steps` steps, no checkpoints.
    cfg = T.dense_variant(T.model_config(args.config, tok.get_vocab_size()))
    tcfg = T.TrainConfig(steps=10 ** 6, batch_size=args.batch, seq_len=args.seq_len, lr=args.lr,
                         warmup_steps=0, indexer_warmup_steps=0, checkpoint_every=10 ** 6, seed=0)
    trainer = T.Trainer(cfg, tcfg)
    warmup = max(1, round(LR_WARMUP_FRACTION * steps))
    trainer.set_schedule(steps, warmup, 0)
    tokens = data.load_tokens(os.path.join(ddir, "tokens.npy"))
    dense: dict = {"variant": "dense", "config": f"{args.config} (dense attention)", "num_params": T.num_params(cfg),
                   "model": cfg.to_hf(), "plan": {"steps": steps, "lr_warmup_steps": warmup,
                                                   "shipped_run_steps": SHIPPED_STEPS}}
    results["dense"] = dense
    loader = data.TokenLoader(tokens, tcfg.batch_size, tcfg.seq_len, seed=0)
    every = max(1, steps // 20)
    first_step_s = []

    def on_step(step, m):
        if step == 1:
            first_step_s.append(time.time() - t0)
            log("dense", f"first step (compile included) {first_step_s[0]:.1f} s")
        if step % every == 0 or step == steps:
            log("dense", f"step {step}/{steps} loss {m['loss']:.3f} lr {m['lr']:.2e} {m['tokens_per_s']:.0f} tok/s")

    stop_at = t_start + args.budget_s - args.reserve_s
    log("dense", f"{dense['num_params'] / 1e6:.2f}M params, {steps} steps (lr warm-up {warmup}), "
                 f"{stop_at - time.time():.0f} s until no further step starts")
    t0 = time.time()
    state, history = T.train(trainer, loader, progress=False, on_step=on_step, stop_at=stop_at)
    train_s = time.time() - t0
    done = len(history)
    step_times = [tcfg.batch_size * tcfg.seq_len / h["tokens_per_s"] for h in history[1:]]
    dense["train"] = dict(_train_record(history, steps, train_s, tcfg, len(tokens),
                                        ("step", "loss", "lr", "max_expert_load")),
                          first_step_s=first_step_s[0] if first_step_s else None,
                          step_s_median=float(np.median(step_times)) if step_times else None)
    if done < steps:
        log("dense", f"STOPPED EARLY after {done} of {steps} steps (--budget-s {args.budget_s:.0f} less "
                     f"--reserve-s {args.reserve_s:.0f})")
    log("dense", f"trained {done} steps in {train_s:.0f} s, loss {history[-1]['loss']:.3f}")
    _write_json(out_json, results)
    ev = evaluate_sets({"dense": evaluate.model_nll_fn(trainer, state["params"], sparse=False)}, sets,
                       args.eval_context, table, args.eval_batch, "dense", args.max_eval_windows)
    dense["eval"], dense["eval_hand_written"] = ev["all"], ev["hand_written"]
    dense["eval_dtype"] = tcfg.compute_dtype


# all ----------------------------------------------------------------------------------------------------------
def run_all(args) -> int:
    t_start = time.time()
    child_platforms = os.environ.get("JAX_PLATFORMS")
    os.environ["JAX_PLATFORMS"] = "cpu"                 # this process only tokenizes: it leaves the GPUs alone
    if os.path.exists(args.work):
        shutil.rmtree(args.work)
    os.makedirs(args.work)
    os.makedirs(args.out, exist_ok=True)
    results: dict = {"command": sys.argv, "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                     "budget_s": args.budget_s, "config": args.config}
    prep = prepare(args.work, args.vocab_size, args.max_files)
    results["data"] = prep
    with open(os.path.join(args.work, "data", "files.json")) as f:
        results["files"] = json.load(f)              # the exact file lists (path, bytes, sha256) and settings
    deadline = t_start + args.budget_s - args.reserve_s
    log("all", f"training deadline in {deadline - time.time():.0f} s (budget {args.budget_s} s, "
               f"{args.reserve_s} s kept for eval/export)")
    devices = args.devices.split(",")
    procs = {}
    for i, variant in enumerate(VARIANTS):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("JAX_PLATFORMS")
        if child_platforms is not None:
            env["JAX_PLATFORMS"] = child_platforms
        if devices[i % len(devices)] == "cpu":
            env["JAX_PLATFORMS"] = "cpu"
        else:
            env["CUDA_VISIBLE_DEVICES"] = devices[i % len(devices)]
            env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
        cmd = [sys.executable, os.path.abspath(__file__), "train", "--variant", variant, "--work", args.work,
               "--deadline", str(deadline), "--config", args.config, "--seq-len", str(args.seq_len),
               "--batch", str(args.batch), "--lr", str(args.lr), "--eval-context", str(args.eval_context),
               "--eval-batch", str(args.eval_batch), "--timing-steps", str(args.timing_steps),
               "--sample-tokens", str(args.sample_tokens), "--overrun-s", str(args.overrun_s)]
        logf = open(os.path.join(args.work, f"{variant}.log"), "w")
        procs[variant] = (subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                           text=True, bufsize=1), logf)
    # Lzma while the GPUs train (the same bytes as the evaluation windows cover).
    with open(os.path.join(args.work, "data", "heldout_sets.json")) as f:
        results["heldout_sets"] = json.load(f)
    results["lzma"] = lzma_baselines(args.work, args.eval_context)
    results["lzma_hand_written"] = lzma_baselines(args.work, args.eval_context, "hand_written")
    log("all", f"lzma: {json.dumps(results['lzma'])}")
    log("all", f"lzma (hand-written held-out files): {json.dumps(results['lzma_hand_written'])}")
    _pump(procs, args.work, t_start + args.budget_s + args.grace_s)
    for variant in VARIANTS:
        path = os.path.join(args.work, variant, "result.json")
        results[variant] = json.load(open(path)) if os.path.exists(path) else {"error": "no result written"}
        results[variant]["returncode"] = procs[variant][0].returncode
    results["wall_s"] = time.time() - t_start
    _write_json(os.path.join(args.out, "train_results.json"), results)
    src = os.path.join(args.work, "msa", "default_model")
    if os.path.isdir(src):
        dst = os.path.join(args.out, "default_model")
        if os.path.exists(dst):
            shutil.rmtree(dst)
        shutil.copytree(src, dst)
    with open(os.path.join(args.out, "log.txt"), "w") as f:
        f.write("===== all =====\n" + "".join(_LOG))
        for variant in VARIANTS:
            f.write(f"===== {variant} =====\n")
            f.write(open(os.path.join(args.work, f"{variant}.log")).read())
    with open(os.path.join(args.out, "log.txt"), "a") as f:
        f.write("===== summary =====\n" + summary(results))
    return 0 if all(results[v].get("returncode") == 0 for v in VARIANTS) else 1


def lzma_baselines(work: str, context: int, heldout_set: str = "all", max_windows: int | None = None) -> dict:
    """lzma -9e on one held-out set (HELDOUT_SETS): on exactly the bytes its evaluation windows cover, as one
    stream (and their sha256), and per file over the set's whole files."""
    from tokenizers import Tokenizer

    from m3jax.training import evaluate

    ddir = os.path.join(work, "data")
    tok = Tokenizer.from_file(os.path.join(ddir, "tokenizer.json"))
    ids = load_heldout_sets(ddir)[heldout_set]
    if max_windows:
        ids = ids[:max_windows * context + 1]
    manifest = json.load(open(os.path.join(ddir, "files.json")))
    paths = [f["path"] for f in manifest["heldout_files"]]
    if heldout_set == "hand_written":
        paths = json.load(open(os.path.join(ddir, "heldout_sets.json")))["hand_written"]
    out: dict = {"set": heldout_set, "files": len(paths)}
    try:
        covered = evaluate.covered_bytes(ids, context, evaluate.token_bytes(tok))
        out["windows_concatenated"] = evaluate.lzma_bits_per_byte(covered)
        out["covered_sha256"] = hashlib.sha256(covered).hexdigest()
    except ValueError as e:                              # fewer tokens than one window (tiny smoke subsets)
        out["windows_concatenated"] = {"error": str(e)}
    raw, comp = 0, 0
    for p in paths:
        b = open(os.path.join(manifest["source"], p), "rb").read()
        raw += len(b)
        comp += evaluate.lzma_bits_per_byte(b)["compressed_bytes"] if b else 0
    out["per_file_whole_heldout"] = {"bytes": raw, "compressed_bytes": comp, "bits_per_byte": 8 * comp / max(raw, 1)}
    return out


def _pump(procs: dict, work: str, hard_deadline: float) -> None:
    """Copy the children's output lines to stdout and their logs until they exit (killed at hard_deadline)."""
    import selectors
    sel = selectors.DefaultSelector()
    for variant, (p, _) in procs.items():
        sel.register(p.stdout, selectors.EVENT_READ, variant)
    open_streams = len(procs)
    while open_streams:
        if time.time() > hard_deadline:
            for variant, (p, logf) in procs.items():
                if p.poll() is None:
                    log("all", f"{variant} still running at the hard deadline: killing it")
                    p.kill()
            break
        for key, _ in sel.select(timeout=1.0):
            line = key.fileobj.readline()
            if not line:                      # exited: a crash before planning must not keep the other waiting
                sel.unregister(key.fileobj)
                open_streams -= 1
                plan = os.path.join(work, key.data, "plan.json")
                if not os.path.exists(plan):
                    _write_json(plan, {"failed": True})
                continue
            sys.stdout.write(line)
            sys.stdout.flush()
            procs[key.data][1].write(line)
    for p, logf in procs.values():
        p.wait()
        logf.close()


def summary(r: dict) -> str:
    def get(d, *keys):
        for k in keys:
            if not isinstance(d, dict) or k not in d:
                return None
            d = d[k]
        return d

    def fmt(x, spec=".4f"):
        return "-" if x is None else format(x, spec)

    lines = []
    msa, dense = r.get("msa", {}), r.get("dense", {})
    lz = {"all": get(r, "lzma", "windows_concatenated", "bits_per_byte"),
          "hand_written": get(r, "lzma_hand_written", "windows_concatenated", "bits_per_byte")}
    sets = r.get("heldout_sets") or {}
    lines.append("\n=== train_default summary ===")
    split = (f" ({len(sets['hand_written'])} hand-written, {len(sets['generated'])} generated: excluded from the "
             f"hand-written set)" if sets else "")
    lines.append(f"data: python {get(r, 'data', 'python')}, {get(r, 'data', 'train_files')} train / "
          f"{get(r, 'data', 'heldout_files')} held-out files{split}, {get(r, 'data', 'train_tokens')} train tokens")
    if msa.get("model") and isinstance(msa["model"], str):
        lines.append(f"msa: the shipped model {msa['model']} (not retrained here), "
                     f"evaluated in {msa.get('eval_dtype')}")
    lines.append(f"{'model':<22}{'params':>11}{'steps':>7}{'tok/s':>10}{'loss':>8}{'all held-out':>14}{'vs lzma':>9}"
                 f"{'hand-written':>14}{'vs lzma':>9}   (bits/byte)")
    rows = [("msa (sparse)", msa, "sparse"), ("msa (all blocks)", msa, "all_blocks"), ("dense", dense, "dense")]
    for name, d, mode in rows:
        cells = ""
        for key, s in (("eval", "all"), ("eval_hand_written", "hand_written")):
            bpb = get(d, key, mode, "bits_per_byte")
            rel = None if bpb is None or lz[s] is None else bpb / lz[s] - 1
            cells += f"{fmt(bpb):>14}{fmt(rel, '+.1%'):>9}"
        lines.append(f"{name:<22}{fmt(get(d, 'num_params'), ',.0f') if d.get('num_params') else '-':>11}"
              f"{fmt(get(d, 'train', 'steps'), 'd'):>7}{fmt(get(d, 'train', 'tokens_per_s_wall'), '.0f'):>10}"
              f"{fmt(get(d, 'train', 'final_loss'), '.3f'):>8}{cells}")
    lines.append(f"{'lzma -9e (same bytes)':<22}{'':>11}{'':>7}{'':>10}{'':>8}{fmt(lz['all']):>14}{'':>9}"
                 f"{fmt(lz['hand_written']):>14}")
    per_file = {k: fmt(get(r, k, "per_file_whole_heldout", "bits_per_byte")) for k in ("lzma", "lzma_hand_written")}
    lines.append(f"lzma -9e per file (whole held-out files): all {per_file['lzma']}, "
                 f"hand-written {per_file['lzma_hand_written']}")
    if sets.get("generated"):
        lines.append("generated held-out files (excluded from hand-written): "
                     + ", ".join(f"{g['path']} ({g['bytes']} B)" for g in sets["generated"]))
    sel = msa.get("selection")
    if sel:
        lines.append(f"MSA selection at {sel['context']} tokens: {sel['topk_blocks']}/{sel['visible_blocks_at_context']} "
              f"blocks = {sel['at_context']:.3f} at the last position, {sel['mean_over_positions']:.3f} averaged")
    for name, d in (("msa", msa), ("dense", dense)):
        if get(d, "train", "stopped_early"):
            lines.append(f"{name}: STOPPED EARLY at {d['train']['steps']} of {d['train']['planned_steps']} planned steps")
        if "error" in d:
            lines.append(f"{name}: ERROR {d['error']}")
    s = msa.get("sample")
    if s:
        lines.append("sample: " + ("ERROR " + s["error"] if "error" in s else repr(PROMPT + s["text"])[:400]))
    rec = r.get("run_recorded")
    if rec:
        lines.append(f"the run's own numbers on all held-out files: msa sparse {rec['msa']['sparse']:.4f}, all blocks "
                     f"{rec['msa']['all_blocks']:.4f}, dense {rec['dense']:.4f}, lzma {rec['lzma']:.4f}")
    v = r.get("verified")
    if v is not None:
        lines.append("data: " + (f"the run's files (sha256) and token counts, verified against {v['reference']}"
                                 if v.get("verified") else f"NOT verified against a recorded run ({v.get('why')})"))
    planned = get(dense, "plan", "shipped_run_steps")
    if planned is not None and get(dense, "plan", "steps") != planned:
        lines.append(f"dense: {get(dense, 'plan', 'steps')} steps, NOT the shipped run's {planned}")
    if "error" in r:
        lines.append(f"ERROR {r['error']}")
    lines.append(f"wall {r.get('wall_s', 0):.0f} s")
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=("all", "prepare", "train", "breakdown", "dense-twin"))
    p.add_argument("--out", default=None, help="where the model, results and log go (all)")
    p.add_argument("--work", default="/tmp/m3jax_train_default", help="scratch: data, checkpoints (erased by all)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock budget of the whole command (all: default 540; dense-twin: default 285)")
    p.add_argument("--reserve-s", type=float, default=None,
                   help="of the budget, kept for eval and export (all: default 120; dense-twin: default 25, "
                        "for the dense twin's evaluation)")
    p.add_argument("--grace-s", type=float, default=20.0, help="past the budget before children are killed")
    p.add_argument("--overrun-s", type=float, default=45.0,
                   help="past the training deadline before a training stops short of its planned steps")
    p.add_argument("--config", default="default", help="preset of the msa model (the dense one is its dense_variant)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--eval-context", type=int, default=None, help="default: --seq-len")
    p.add_argument("--eval-batch", type=int, default=4)
    p.add_argument("--timing-steps", type=int, default=4)
    p.add_argument("--sample-tokens", type=int, default=96)
    p.add_argument("--max-files", type=int, default=None, help="use an evenly spaced subset of files (smoke)")
    p.add_argument("--devices", default="0,1", help="CUDA device per variant, or cpu")
    p.add_argument("--variant", choices=VARIANTS)
    p.add_argument("--model", default=None,
                   help="an exported model directory (breakdown; dense-twin: default m3jax.default_model_path())")
    p.add_argument("--results", default=None, help="a run's train_results.json (breakdown)")
    p.add_argument("--stdlib", default=None, help="a standard library holding the run's files (breakdown; "
                                                  "dense-twin: default the running Python's)")
    p.add_argument("--same-path", action="store_true", help="breakdown: this stdlib's version of each file")
    p.add_argument("--only", nargs="*", default=[], help="breakdown: these held-out paths only")
    p.add_argument("--exclude", nargs="*", default=[], help="breakdown: leave these held-out paths out")
    p.add_argument("--modes", default="sparse,all_blocks", help="breakdown: sparse and/or all_blocks")
    p.add_argument("--max-windows", type=int, default=None, help="breakdown: evaluate the first N windows")
    p.add_argument("--deadline", type=float, default=None, help="unix time training must end by (train)")
    p.add_argument("--steps", type=int, default=SHIPPED_STEPS,
                   help=f"dense-twin: training steps (default: the shipped run's {SHIPPED_STEPS})")
    p.add_argument("--reference", default=SHIPPED_RUN,
                   help="dense-twin: the recorded run whose file lists and token counts the data must equal, or none")
    p.add_argument("--eval-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="dense-twin: the dtype the shipped model is loaded and evaluated in")
    p.add_argument("--max-eval-windows", type=int, default=None,
                   help="dense-twin: evaluate only the first N windows of each held-out set (smoke)")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    args.eval_context = args.eval_context or args.seq_len
    twin = args.command == "dense-twin"
    if args.budget_s is None:
        args.budget_s = 285.0 if twin else 540.0
    if args.reserve_s is None:
        args.reserve_s = 25.0 if twin else 120.0
    if args.command == "prepare":
        prepare(args.work, args.vocab_size, args.max_files)
        return 0
    if args.command == "train":
        return train_variant(args)
    if args.command == "breakdown":
        return breakdown(args)
    if args.out is None:
        p.error(f"{args.command} needs --out")
    if args.command == "dense-twin":
        if args.steps < 1:
            p.error(f"--steps must be at least 1, got {args.steps}")
        if args.reference != "none" and not os.path.isfile(args.reference):
            p.error(f"--reference {args.reference}: no such file (or pass none)")
        return dense_twin(args)
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
