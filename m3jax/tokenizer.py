"""Tokenizers: the checkpoint's `tokenizer.json` through the `tokenizers` library, and its chat template."""

from __future__ import annotations

import os
from typing import Protocol, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from m3jax.chat import BOS, EOT, ROLE, ChatTemplate, ImagePart, check_messages, check_tools


class M3Tokenizer:
    """Text <-> token ids, and chat prompts through the checkpoint's chat template (m3jax.chat.ChatTemplate: its
    chat_template.jinja when present, else the built-in M3 layout), the same renderer as `m3jax serve`."""

    def __init__(self, tokenizer: Tokenizer, chat_template: ChatTemplate | None = None):
        self._tok = tokenizer
        self.chat_template = chat_template if chat_template is not None else ChatTemplate()

    @classmethod
    def from_pretrained(cls, path: str) -> "M3Tokenizer":
        """path: a checkpoint directory (its tokenizer.json and, when present, chat_template.jinja) or a
        tokenizer.json file (the template beside it)."""
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.exists(file):
            raise FileNotFoundError(f"tokenizer.json not found at {file}: pass token ids instead of strings")
        return cls(Tokenizer.from_file(file), ChatTemplate.from_checkpoint(os.path.dirname(file)))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def apply_chat_template(self, messages: Sequence[dict], tools: Sequence[dict] | None = None,
                            add_generation_prompt: bool = True, thinking_mode: str | None = None, *,
                            images: list[ImagePart] | None = None, **kwargs) -> str:
        """The prompt text of OpenAI chat messages, rendered by `chat_template` (see m3jax.chat).

        tools: OpenAI tool definitions. thinking_mode: "enabled" | "disabled" | "adaptive" (None: the template's
        default, adaptive for the built-in layout); kwargs: further template variables (a jinja template's).
        images: a list that receives the image_url parts of user messages (each becomes the image marker in the
        text, in order); None refuses image parts. Bad input raises m3jax.chat.FieldError (a ValueError) naming
        the field, e.g. `messages[1].role`.
        """
        if thinking_mode is not None:
            kwargs["thinking_mode"] = thinking_mode
        return self.chat_template.render(check_messages(messages, images), check_tools(tools),
                                         add_generation_prompt, **kwargs)


class _Decodes(Protocol):
    def decode(self, ids: Sequence[int]) -> str: ...


class IncrementalDecoder:
    """Detokenise a stream of token ids so that the streamed pieces concatenate to exactly `decode(all ids)`.

    A byte-level BPE token can be part of a multi-byte UTF-8 character; decoding tokens one at a time turns each
    part into U+FFFD. Lossy UTF-8 decoding turns an incomplete sequence at the end into exactly one U+FFFD and
    never changes the characters before it, so `push` decodes a window of recent tokens and emits everything but
    a trailing U+FFFD, which the next token may still complete; `flush` emits what is held at the end (a
    sequence that never completes stays U+FFFD, as in the final text). The window restarts at each clean end,
    keeping the previous tokens as context (decoders that treat the first token specially, e.g. strip a leading
    space, then decode the window as they decode the whole); it grows only over a run of tokens whose text
    ends in U+FFFD. Exact for decoders that decode the concatenated bytes (byte-level BPE, as M3's tokenizer).

        dec = IncrementalDecoder(tokenizer)          # anything with .decode(list[int]) -> str
        for t in token_ids: sys.stdout.write(dec.push(t))
        sys.stdout.write(dec.flush())
    """

    def __init__(self, tokenizer: _Decodes):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0          # window start: tokens before it are never decoded again
        self._read = 0            # the last clean end (all text up to it emitted); ids[_prefix:_read] is context
        self._emitted = 0         # characters of decode(ids[_prefix:]) already emitted

    def push(self, token_id: int) -> str:
        """Add one token; returns the newly completed text (possibly "")."""
        self._ids.append(int(token_id))
        return self._advance(final=False)

    def flush(self) -> str:
        """The text still held back (an incomplete character at the end decodes to U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        text = self._tok.decode(self._ids[self._prefix:])
        end = len(text) - 1 if text.endswith("\ufffd") and not final else len(text)
        new = text[self._emitted:end]
        self._emitted = max(self._emitted, end)
        if end == len(text):                          # clean end: restart the window after the context
            self._prefix, self._read = self._read, len(self._ids)
            self._emitted = len(self._tok.decode(self._ids[self._prefix:]))
        return new


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


__all__ = ["IncrementalDecoder", "M3Tokenizer", "write_byte_level_tokenizer"]
