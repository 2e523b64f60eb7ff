"""Training data: a byte-level BPE tokenizer trained on the corpus, a token file, and a deterministic loader.

Corpus -> `prepare_corpus` -> a directory holding
    tokenizer.json   byte-level BPE (the `tokenizers` library), special token <|endoftext|> = id 0
    tokens.npy       uint16/uint32 [N] token ids of every training file, each followed by <|endoftext|>
    heldout.npy      the same for the held-out files (may be empty)
    files.json       the exact file lists (relative path, bytes, sha256) of both splits, and the settings
Every step is deterministic: files in sorted order, the held-out split by a hash of the relative path,
tokenizer training on the files in that order.

`TokenLoader` reads windows of seq_len + 1 tokens from a memory-mapped token file. The order of the windows is
a fixed function of (seed, epoch), and the loader's whole state is (seed, position): a resumed run continues
with exactly the batches the uninterrupted run would have seen. We use a numpy memmap rather than grain: one
host, one flat token array, fixed windows; grain's multi-process readers add nothing here.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Sequence

import numpy as np

EOT = "<|endoftext|>"
DEFAULT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".c", ".h", ".js", ".ts", ".java", ".go", ".rs", ".json", ".toml",
                    ".yaml", ".yml", ".sh", ".html", ".css")


def list_corpus(root: str, suffixes: Sequence[str] = DEFAULT_SUFFIXES) -> list[str]:
    """Relative paths of the text files under `root` whose suffix is in `suffixes`, sorted; `root` may be one
    file (then [its name])."""
    if os.path.isfile(root):
        return [os.path.basename(root)]
    if not os.path.isdir(root):
        raise ValueError(f"--data {root}: no such file or directory")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            if name.endswith(tuple(suffixes)):
                out.append(os.path.relpath(os.path.join(dirpath, name), root))
    if not out:
        raise ValueError(f"--data {root}: no files ending in {', '.join(suffixes)}")
    return sorted(out)


def is_heldout(relpath: str, fraction: float) -> bool:
    """Deterministic split: a file is held out when the hash of its relative path falls below `fraction`."""
    h = int.from_bytes(hashlib.sha256(relpath.encode()).digest()[:8], "big")
    return h / 2 ** 64 < fraction


def _read_texts(root: str, relpaths: Sequence[str]) -> list[tuple[str, str, bytes]]:
    """[(relpath, text, raw bytes)] of the files that are UTF-8; others are skipped (logged by the caller)."""
    base = root if os.path.isdir(root) else os.path.dirname(root)
    out = []
    for rel in relpaths:
        with open(os.path.join(base, rel), "rb") as f:
            raw = f.read()
        try:
            out.append((rel, raw.decode("utf-8"), raw))
        except UnicodeDecodeError:
            continue
    return out


def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """A byte-level BPE `tokenizers.Tokenizer` trained on `texts` (in order); id 0 is <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise ValueError(f"vocab_size must be at least 258 (256 bytes + <|endoftext|> + 1 merge), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def encode_documents(tok, texts: Sequence[str]) -> np.ndarray:
    """Token ids of the texts, each followed by <|endoftext|>, as the smallest unsigned dtype that fits."""
    eot = tok.token_to_id(EOT)
    ids: list[int] = []
    for enc in tok.encode_batch(list(texts)):
        ids.extend(enc.ids)
        ids.append(eot)
    dtype = np.uint16 if tok.get_vocab_size() <= 2 ** 16 else np.uint32
    return np.asarray(ids, dtype=dtype)


def _save_npy(path: str, array: np.ndarray) -> None:
    tmp = path + ".tmp.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def prepare_corpus(src: str, out_dir: str, *, vocab_size: int, heldout_fraction: float = 0.0,
                   suffixes: Sequence[str] = DEFAULT_SUFFIXES, files: Sequence[str] | None = None,
                   meta: dict | None = None) -> dict:
    """Train the tokenizer on the training files of `src` and write the token files (see the module docstring).
    Returns the manifest (files.json). `out_dir` must not exist yet: it is built in a temporary directory beside
    it and renamed when complete. files: the relative paths to read (sorted here) instead of every file under
    `src` with one of `suffixes`; meta: extra entries for the manifest (e.g. how the files were chosen)."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout fraction must be in [0, 1), got {heldout_fraction}")
    if os.path.exists(out_dir):
        raise ValueError(f"{out_dir} already exists")
    rels = list_corpus(src, suffixes) if files is None else sorted(files)
    if not rels:
        raise ValueError(f"--data {src}: no files to read")
    docs = _read_texts(src, rels)
    skipped = sorted(set(rels) - {r for r, _, _ in docs})
    train = [d for d in docs if not is_heldout(d[0], heldout_fraction)]
    held = [d for d in docs if is_heldout(d[0], heldout_fraction)]
    if not train:
        raise ValueError(f"--data {src}: every file is held out or unreadable as UTF-8")
    tok = train_tokenizer([t for _, t, _ in train], vocab_size)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".data-", dir=parent)
    tok.save(os.path.join(tmp, "tokenizer.json"))
    _save_npy(os.path.join(tmp, "tokens.npy"), encode_documents(tok, [t for _, t, _ in train]))
    _save_npy(os.path.join(tmp, "heldout.npy"), encode_documents(tok, [t for _, t, _ in held]))

    def listing(ds):
        return [{"path": r, "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()} for r, _, raw in ds]

    manifest = {"source": os.path.abspath(src), "vocab_size": tok.get_vocab_size(), "eot_id": tok.token_to_id(EOT),
                "heldout_fraction": heldout_fraction, "suffixes": list(suffixes), "train_files": listing(train),
                "heldout_files": listing(held), "skipped_not_utf8": skipped, **(meta or {})}
    with open(os.path.join(tmp, "files.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, out_dir)
    return manifest


def load_tokens(path: str) -> np.ndarray:
    """A 1-D integer token file (.npy), memory-mapped."""
    if not path.endswith(".npy"):
        raise ValueError(f"token file {path} must be a .npy file of integer ids")
    arr = np.load(path, mmap_mode="r")
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"token file {path} must hold a 1-D integer array, got {arr.dtype} {arr.shape}")
    return arr


class TokenLoader:
    """Batches of int32 [batch, seq_len + 1] windows from a token array.

    Windows start at multiples of seq_len (they overlap by the one target token), every window once per epoch,
    in the order `np.random.default_rng([seed, epoch]).permutation`. Batch i holds windows i*batch ..
    (i+1)*batch - 1 of that endless sequence, so the loader's state is (seed, position).
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0):
        self.tokens = tokens
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.num_windows = (len(tokens) - 1) // seq_len
        if self.num_windows < 1:
            raise ValueError(f"the token file has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
        self.position = 0
        self._perm_epoch, self._perm = -1, None

    def _window(self, k: int) -> np.ndarray:
        epoch, i = divmod(k, self.num_windows)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._perm_epoch = epoch
        start = int(self._perm[i]) * self.seq_len
        return np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int32)

    def next_batch(self) -> np.ndarray:
        first = self.position * self.batch_size
        batch = np.stack([self._window(first + j) for j in range(self.batch_size)])
        self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"seed": self.seed, "position": self.position, "batch_size": self.batch_size, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        for key in ("batch_size", "seq_len"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"the checkpoint's loader has {key}={state.get(key)}, this run {getattr(self, key)}")
        self.seed, self.position = int(state["seed"]), int(state["position"])
