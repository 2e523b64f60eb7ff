"""Streamed text: incremental detokenisation that never emits half a UTF-8 character, and stop-string holdback.

The streamed text of a request must equal its final text. Two things can break that: a multi-byte character
split across tokens (decoding the first token alone gives U+FFFD), and a stop string that arrives in pieces (the
engine cuts the final text before it, so its first piece must not have been streamed). `StreamText` holds both
back; at the end, `finish(final_text)` sends what the engine's final text adds to what was streamed.
"""

from __future__ import annotations

import logging
from typing import Sequence

from m3jax.tokenizer import IncrementalDecoder

log = logging.getLogger("m3jax.serve")

class _StreamDecoder:
    """m3jax.tokenizer.IncrementalDecoder (the one UTF-8-safe detokenizer, also behind `m3jax generate --stream`)
    fed lists of ids: `push` returns only text whose UTF-8 sequences are complete."""

    def __init__(self, tokenizer):
        self._dec = IncrementalDecoder(tokenizer)

    def push(self, ids: Sequence[int]) -> str:
        return "".join(self._dec.push(int(i)) for i in ids)

    def flush(self) -> str:
        """Whatever is still held (an incomplete sequence at the very end decodes to U+FFFD)."""
        return self._dec.flush()


def make_decoder(tokenizer) -> _StreamDecoder:
    """The incremental decoder the stream path uses."""
    return _StreamDecoder(tokenizer)


def stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that could still grow into one of `stops`."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class StreamText:
    """Text deltas of one request from its generated ids: complete characters, never the start of a stop string.

    Feed every generated id except the last one of a finished request (an eos or stop id is not text); then
    `finish(final_text)` returns the rest, taken from the engine's final text so that the stream equals it.
    """

    def __init__(self, tokenizer, stops: Sequence[str] = ()):
        self._dec = make_decoder(tokenizer)
        self._stops = tuple(stops)
        self._pending = ""
        self.emitted = ""

    def push(self, ids: Sequence[int]) -> str:
        self._pending += self._dec.push(ids)
        if self._stops and any(s in self._pending for s in self._stops):
            return ""                                     # the engine is about to finish and cut here
        keep = stop_prefix_len(self._pending, self._stops)
        out = self._pending[:len(self._pending) - keep]
        self._pending = self._pending[len(out):]
        self.emitted += out
        return out

    def finish(self, final_text: str | None) -> str:
        if final_text is None:
            final_text = self.emitted + self._pending + self._dec.flush()
        if not final_text.startswith(self.emitted):
            # Cannot happen with a prefix-stable tokenizer; say so rather than send text twice.
            log.error("streamed text %r is not a prefix of the final text %r; the stream ends here",
                      self.emitted[-40:], final_text[:80])
            return ""
        rest = final_text[len(self.emitted):]
        self.emitted = final_text
        return rest


__all__ = ["StreamText", "make_decoder", "stop_prefix_len"]
