"""The bundled default model (m3jax.default_model_path()): it ships in the release layout within 40 MB, loads,
and its greedy continuation of a Python prompt is Python-like text and the same through the engine (paged KV
cache, MSA decode) as through plain full forwards: a regression check of the trained weights and of the serving
path on them. Not a hard-coded output string: the properties any code-trained model's continuation has."""

from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import m3jax
from m3jax.tokenizer import M3Tokenizer

# No trailing newline: the tokenizer joins a newline with the next line's indentation (see the Makefile's demo).
PROMPT = "def read_lines(path):\n    with open(path) as f:"
NEW_TOKENS = 40
KEYWORDS = {"return", "if", "else", "elif", "def", "for", "in", "import", "with", "as", "not", "class", "while",
            "self", "None", "try", "except", "raise", "is", "and", "or"}


@pytest.fixture(scope="module")
def model():
    return m3jax.load(m3jax.default_model_path(), dtype="float32", progress=False)


def test_ships_in_the_release_layout():
    path = m3jax.default_model_path()
    sizes = {f: os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)}
    assert {"config.json", "tokenizer.json", "model.safetensors.index.json"} <= set(sizes)
    assert sum(sizes.values()) <= 40e6 and max(sizes.values()) < 15 * 2 ** 20
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        shards = set(json.load(f)["weight_map"].values())
    assert shards == {f for f in sizes if f.endswith(".safetensors")}
    cfg = m3jax.M3Config.from_pretrained(path)
    assert cfg.has_sparse_layers and cfg.num_local_experts > 1
    assert (cfg.msa.block_size, cfg.msa.topk_blocks) == (64, 16)        # a quarter of the blocks at 4096 tokens


@pytest.mark.gpu_long
def test_greedy_continuation_is_python_like_and_the_engine_agrees(model):
    tok = M3Tokenizer.from_pretrained(m3jax.default_model_path())
    res = m3jax.generate(model, [PROMPT], m3jax.SamplingParams(max_new_tokens=NEW_TOKENS), max_seq_len=256)[0]

    # The same tokens from full forwards without a cache (one compiled length; the model is causal, so the
    # right padding does not reach the position read).
    ids = tok.encode(PROMPT)
    n0 = len(ids)
    buf = np.zeros((1, n0 + NEW_TOKENS), np.int32)
    buf[0, :n0] = ids
    step = jax.jit(lambda x, i: jnp.argmax(model(x)[0, i]))
    want = []
    for i in range(n0, n0 + len(res.token_ids)):
        t = int(step(jnp.asarray(buf), i - 1))
        want.append(t)
        if i < buf.shape[1]:
            buf[0, i] = t
    assert res.token_ids == want

    text = PROMPT + res.text
    assert "\ufffd" not in text and all(c == "\n" or c.isprintable() for c in text), repr(text)
    lines = [line for line in text.splitlines()[:-1] if line.strip()]        # the last line may be cut short
    assert len(lines) >= 4, repr(text)
    assert all(re.match(r"^( {4})*\S", line) for line in lines), repr(text)   # indentation in steps of 4
    words = set(re.findall(r"[A-Za-z_]\w*", res.text))
    assert len(words & KEYWORDS) >= 2, repr(text)
