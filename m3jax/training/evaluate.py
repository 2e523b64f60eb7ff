"""Held-out evaluation in bits per byte, and the lzma baseline on the same bytes.

Protocol (`heldout_bits_per_byte`): the held-out token file is the held-out documents concatenated, each
followed by <|endoftext|> (m3jax.training.data). It is cut into non-overlapping windows of `context` + 1 tokens
starting at multiples of `context` (the last, shorter remainder is dropped); each window predicts its last
`context` tokens from the ones before them, with positions 0..context-1, as a fresh sequence. Bits are the
model's negative log2-likelihood summed over every predicted token, <|endoftext|> included; bytes are the UTF-8
bytes those predicted tokens stand for (a byte-level BPE token is a fixed byte string; special tokens are 0
bytes). `covered_bytes` returns exactly those bytes (the files' text, concatenated), which is what lzma
compresses for the baseline.
"""

from __future__ import annotations

import lzma
import math

import jax
import jax.numpy as jnp
import numpy as np

from m3jax.tokenizer import _bytes_to_unicode

LZMA_PRESET = 9 | lzma.PRESET_EXTREME            # `xz -9e`


def token_bytes(tok) -> list[bytes]:
    """The byte string of every id of a byte-level BPE `tokenizers.Tokenizer` (b"" for special tokens)."""
    unbyte = {c: b for b, c in _bytes_to_unicode().items()}
    specials = {t.content for t in tok.get_added_tokens_decoder().values()}
    out = []
    for i in range(tok.get_vocab_size()):
        piece = tok.id_to_token(i)
        if piece is None or piece in specials:
            out.append(b"")
            continue
        try:
            out.append(bytes(unbyte[c] for c in piece))
        except KeyError:
            raise ValueError(f"token {i} ({piece!r}) is not a byte-level BPE token") from None
    return out


def windows(ids: np.ndarray, context: int) -> np.ndarray:
    """int32 [n, context + 1]: the non-overlapping evaluation windows of the protocol (module docstring)."""
    n = (len(ids) - 1) // context
    if n < 1:
        raise ValueError(f"the held-out text has {len(ids)} tokens, fewer than context + 1 = {context + 1}")
    idx = np.arange(n)[:, None] * context + np.arange(context + 1)[None, :]
    return np.asarray(ids, dtype=np.int64)[idx].astype(np.int32)


def covered_bytes(ids: np.ndarray, context: int, table: list[bytes]) -> bytes:
    """The bytes the windows' predicted tokens stand for, in order (what the bits per byte divide by)."""
    w = windows(ids, context)
    return b"".join(table[int(i)] for i in w[:, 1:].reshape(-1))


def heldout_bits_per_byte(nll_fn, ids: np.ndarray, context: int, table: list[bytes], batch: int = 4) -> dict:
    """Evaluate `nll_fn(int32 [b, context + 1]) -> f32 [b, context]` (natural-log NLL of each predicted token)
    over the windows of `ids`; returns bits, bytes, tokens, windows and bits_per_byte.

    The last batch is padded with copies of its first window, whose results are dropped, so nll_fn sees one
    shape (one compilation)."""
    w = windows(ids, context)
    nbytes = np.asarray([len(b) for b in table], np.int64)
    nats = 0.0
    for s in range(0, len(w), batch):
        chunk = w[s:s + batch]
        real = len(chunk)
        if real < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch - real, axis=0)])
        nll = np.asarray(jax.device_get(nll_fn(chunk)), np.float64)[:real]
        nats += float(nll.sum())
    total_bytes = int(nbytes[w[:, 1:]].sum())
    bits = nats / math.log(2)
    return {"context": context, "windows": int(len(w)), "tokens": int(w[:, 1:].size), "bytes": total_bytes,
            "bits": bits, "bits_per_byte": bits / total_bytes, "bits_per_token": bits / w[:, 1:].size}


def lzma_bits_per_byte(data: bytes) -> dict:
    """lzma (xz container, preset 9 | PRESET_EXTREME) on `data` as one stream."""
    size = len(lzma.compress(data, preset=LZMA_PRESET))
    return {"preset": "9|PRESET_EXTREME", "bytes": len(data), "compressed_bytes": size,
            "bits_per_byte": 8 * size / len(data)}


def loaded_model_nll_fn(model, *, sparse: bool):
    """As model_nll_fn, for a model loaded with `m3jax.load` (its own dtype; the reference forward)."""
    from flax import nnx

    from m3jax.training import losses

    graphdef, state = nnx.split(model)

    @jax.jit
    def nll(state, tokens):
        out = losses.forward(nnx.merge(graphdef, state), tokens[:, :-1], sparse=sparse)
        logp = jax.nn.log_softmax(out.logits.astype(jnp.float32), axis=-1)
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]

    return lambda tokens: nll(state, jnp.asarray(tokens, jnp.int32))


def model_nll_fn(trainer, params, *, sparse: bool):
    """A jitted nll_fn for `heldout_bits_per_byte`: the training forward (m3jax.training.losses.forward, the
    inference semantics) of `trainer`'s model at its compute dtype; sparse=False attends to every visible
    block in the MSA layers (all blocks selected)."""
    from m3jax.training import losses

    cast = trainer.compute_params(params)

    @jax.jit
    def nll(p, tokens):
        out = losses.forward(trainer.model(p), tokens[:, :-1], sparse=sparse)
        logp = jax.nn.log_softmax(out.logits.astype(jnp.float32), axis=-1)
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]

    return lambda tokens: nll(cast, jnp.asarray(tokens, jnp.int32))


__all__ = ["LZMA_PRESET", "covered_bytes", "heldout_bits_per_byte", "loaded_model_nll_fn", "lzma_bits_per_byte",
           "model_nll_fn",
           "token_bytes", "windows"]
