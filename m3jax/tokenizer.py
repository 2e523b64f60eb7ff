"""Tokenizers: the checkpoint's `tokenizer.json` through the `tokenizers` library, plus the M3 chat layout."""

from __future__ import annotations

import os
from typing import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

# M3 special tokens used by the chat layout (M3_SPEC.md §4.7).
BOS, ROLE, EOT = "]~!b[", "]~b]", "[e~["


class M3Tokenizer:
    """Text <-> token ids, and the M3 chat layout `]~!b[]~b]role\\ncontent[e~[\\n...]~b]ai\\n`."""

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer

    @classmethod
    def from_pretrained(cls, path: str) -> "M3Tokenizer":
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.exists(file):
            raise FileNotFoundError(f"tokenizer.json not found at {file}: pass token ids instead of strings")
        return cls(Tokenizer.from_file(file))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """Render [{"role": ..., "content": ...}] in the M3 layout; roles user/system/ai/tool ("assistant" -> ai)."""
        parts = [BOS]
        for i, m in enumerate(messages):
            if "role" not in m or "content" not in m:
                raise ValueError(f"chat message {i} must have 'role' and 'content', got keys {sorted(m)}")
            role = {"assistant": "ai"}.get(m["role"], m["role"])
            parts.append(f"{ROLE}{role}\n{m['content']}{EOT}\n")
        if add_generation_prompt:
            parts.append(f"{ROLE}ai\n")
        return "".join(parts)


def write_byte_level_tokenizer(path: str, specials: Sequence[str] = (BOS, EOT, ROLE)) -> dict[str, int]:
    """A byte-level tokenizer.json: ids 0..255 are the bytes, then the special tokens. Returns their ids."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    if set(vocab) != set(alphabet):
        raise RuntimeError("byte-level alphabet of the tokenizers library changed")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(specials))
    tmp = path + ".tmp"
    tok.save(tmp)
    os.replace(tmp, path)
    return {s: tok.token_to_id(s) for s in specials}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


__all__ = ["M3Tokenizer", "write_byte_level_tokenizer"]
