"""Faults and bad inputs a user can hit (issue 15): each test fails on the code before its fix.

Sampling parameters refused before they reach a step (item 5, item 9), streamed text equal to the final text
(item 11), and the converter: overlapping SRC/DST (2), leftovers of a killed convert (3), corrupt pieces (6),
a full disk (7) and the permissions of what it writes (12).
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from m3jax.sampling import INT32_MAX, SamplingBatch, SamplingParams
from m3jax.tokenizer import IncrementalDecoder, M3Tokenizer, write_byte_level_tokenizer


# Sampling parameters (items 5 and 9) ----------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("top_k", 2**31), ("top_k", 3_000_000_000), ("top_k", -1), ("top_k", True), ("top_k", 2.0),
    ("max_new_tokens", True), ("max_new_tokens", 0), ("max_new_tokens", 4.0),
    ("stop_token_ids", 5), ("stop_token_ids", (True,)), ("stop_token_ids", [1, False]), ("stop_token_ids", "5"),
    ("seed", True), ("temperature", True), ("temperature", float("nan")), ("top_p", float("nan")),
    ("top_p", True), ("stop", "END"), ("logprobs", 1), ("ignore_eos", "yes"),
])
def test_sampling_params_refuse_bad_values_naming_request_and_field(field, value):
    with pytest.raises(ValueError, match=rf"^request r7: sampling\.{field} must be"):
        SamplingParams(**{field: value}).check("r7")


def test_top_k_fits_int32_and_the_vocab():
    ok = SamplingParams(top_k=INT32_MAX, temperature=1.0)
    ok.check("r")
    SamplingBatch.from_params([ok], [0], [0], pad_to=2)            # reaches the device as int32 without overflow
    SamplingParams(top_k=384).check("r", vocab_size=384)
    with pytest.raises(ValueError, match=r"sampling\.top_k must be <= the vocab size 384"):
        SamplingParams(top_k=385).check("r", vocab_size=384)
    with pytest.raises(ValueError, match=r"sampling\.stop_token_ids must be token ids in \[0, 384\)"):
        SamplingParams(stop_token_ids=(3, 384)).check("r", vocab_size=384)


def test_good_sampling_params_pass():
    for p in (SamplingParams(), SamplingParams(max_new_tokens=np.int64(3), top_k=np.int32(5), seed=2**32 - 1,
                                               stop_token_ids=[np.int64(3), 4], stop=["a"], temperature=np.float32(.5),
                                               top_p=1, logprobs=True, ignore_eos=np.bool_(True))):
        p.check("r", vocab_size=384)


# Incremental detokenisation (item 11) ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    """The tiny checkpoint's tokenizer (m3jax.testing writes it with write_byte_level_tokenizer)."""
    file = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    specials = write_byte_level_tokenizer(file)
    return M3Tokenizer.from_pretrained(file), sorted(specials.values())


def _stream(tok, ids) -> list[str]:
    dec = IncrementalDecoder(tok)
    return [dec.push(t) for t in ids] + [dec.flush()]


@pytest.mark.parametrize("text", ["héllo wörld", "中文字符", "a😀b😀😀", "ℝ∑ ∫x²", "Ελληνικά and ascii", "ok"])
def test_streamed_text_equals_final_text_on_multibyte_characters(byte_tokenizer, text):
    tok, _ = byte_tokenizer
    ids = tok.encode(text)
    assert len(ids) == len(text.encode())                           # byte-level: characters split over tokens
    pieces = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)                   # never a half character
    if len(ids) > len(text):
        assert "".join(tok.decode([t]) for t in ids) != text       # what a one-token-at-a-time decode prints


def test_streamed_text_equals_final_text_on_random_bytes(byte_tokenizer):
    """Invalid and truncated UTF-8 too (a random model prints them): the stream still equals the final text."""
    tok, specials = byte_tokenizer
    rng = random.Random(0)
    kinds = (lambda: rng.randrange(0x80), lambda: rng.randrange(0x80, 0xC0), lambda: rng.randrange(0xC0, 0x100),
             lambda: rng.choice(specials))
    for _ in range(500):
        ids = [rng.choice(kinds)() for _ in range(rng.randrange(12))]
        assert "".join(_stream(tok, ids)) == tok.decode(ids), ids


def test_incomplete_character_is_held_until_complete(byte_tokenizer):
    tok, specials = byte_tokenizer
    e4, b8, ad = "中".encode()
    dec = IncrementalDecoder(tok)
    assert [dec.push(e4), dec.push(b8), dec.push(ad), dec.push(ord("!"))] == ["", "", "中", "!"]
    assert [dec.push(e4), dec.push(b8), dec.flush()] == ["", "", "\ufffd"]      # never completed
    assert tok.decode([e4, b8]) == "\ufffd"
    assert [dec.push(0xF0), dec.push(specials[0])] == ["", "\ufffd]~!b["]   # a special token ends it: U+FFFD
