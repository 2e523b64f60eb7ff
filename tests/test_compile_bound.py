"""The step programs an Engine compiles are a small fixed set (m3jax.runner), whatever the mix of prompt lengths,
batch sizes, chunked prefill and decode; warmup compiles them all, so that generate then compiles nothing; the
persistent compilation cache is on by default and a second process loads the programs from it.

Each test uses its own engine geometry, so that no program is already compiled by another test of the process.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

import m3jax
from m3jax.config import M3Config
from m3jax.runner import trace_count
from m3jax.testing import random_model

MAX_PROGRAMS = 4                     # the bound stated in m3jax.runner: len(row_buckets) + 1, 3 by default


@pytest.fixture(scope="module")
def model():
    return random_model(M3Config.tiny(), seed=0)


def mixed_batches(seed=0):
    """Batches of 1..12 prompts of 3-90 tokens with 1-6 new tokens each: steps mix chunked prefill (several
    chunks per prompt, several prompts per step) with 1..12 decode rows."""
    rs = np.random.RandomState(seed)
    out = []
    for size in (1, 2, 3, 5, 8, 12):
        prompts = [rs.randint(0, 256, int(n)).tolist() for n in rs.randint(3, 91, size)]
        params = [m3jax.SamplingParams(max_new_tokens=int(k), ignore_eos=True) for k in rs.randint(1, 7, size)]
        out.append((prompts, params))
    return out


def test_mixed_workload_compiles_at_most_the_stated_programs(model):
    eng = m3jax.Engine(model, max_batch_size=12, max_seq_len=128, num_pages=200, prefill_chunk=24,
                       max_tokens_per_step=36, prefill_row_len=8, compile_cache=False)
    assert len(eng.programs) == 3 <= MAX_PROGRAMS, [str(p) for p in eng.programs]
    before = trace_count()
    steps_before = eng.num_steps
    for prompts, params in mixed_batches():
        results = m3jax.generate(eng, prompts, params, progress=False)
        assert [len(r.token_ids) for r in results] == [p.max_new_tokens for p in params]
    assert eng.num_steps - steps_before > 30          # a real workload ran
    assert trace_count() - before <= len(eng.programs)


def test_warmup_compiles_every_program_then_generate_compiles_nothing(model):
    eng = m3jax.Engine(model, max_batch_size=10, max_seq_len=120, num_pages=200, prefill_chunk=20,
                       max_tokens_per_step=30, prefill_row_len=4, compile_cache=False)
    before = trace_count()
    eng.warmup(progress=False)
    assert trace_count() - before == len(eng.programs) == 3
    compiles = []
    listener = lambda event, secs, **kw: compiles.append(event)           # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        after = trace_count()
        for prompts, params in mixed_batches(seed=1):
            m3jax.generate(eng, prompts, params, progress=False)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert trace_count() == after, "a step program was compiled after warmup"
    assert "/jax/core/compile/backend_compile_duration" not in compiles, "something compiled after warmup"


def test_persistent_cache_is_on_by_default_and_reused_after_the_memory_caches_go(model, tmp_path, monkeypatch):
    """In-process (a subprocess would rebuild the model for a minute on this box): the default turns the cache on
    at the directory $M3JAX_COMPILE_CACHE names, a directory already set is kept, off leaves it unset; warmup
    stores every program; after jax.clear_caches() (what a new process starts with) warmup loads them all."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    saved = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    cache, other = tmp_path / "jax_cache", tmp_path / "other"
    kw = dict(max_batch_size=3, max_seq_len=64, num_pages=30, prefill_chunk=16, max_tokens_per_step=11,
              prefill_row_len=8)
    hits = []
    listener = lambda event, **k: hits.append(event) if event.endswith("/cache_hits") else None   # noqa: E731
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        cc.reset_cache()
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)       # tiny programs compile fast
        monkeypatch.setenv("M3JAX_COMPILE_CACHE", "off")
        assert m3jax.Engine(model, **kw).compile_cache_dir is None and not jax.config.jax_compilation_cache_dir
        monkeypatch.setenv("M3JAX_COMPILE_CACHE", str(cache))
        assert m3jax.Engine(model, compile_cache=False, **kw).compile_cache_dir is None
        eng = m3jax.Engine(model, **kw)
        assert eng.compile_cache_dir == jax.config.jax_compilation_cache_dir == str(cache)
        assert m3jax.Engine(model, compile_cache=str(other), **kw).compile_cache_dir == str(cache)   # set once
        assert not other.exists()
        eng.warmup(progress=False)
        stored = [f for f in os.listdir(cache) if not f.startswith(".")]
        assert len(stored) >= len(eng.programs), stored
        jax.clear_caches()
        jax.monitoring.register_event_listener(listener)
        before = trace_count()
        m3jax.Engine(model, **kw).warmup(progress=False)
        assert trace_count() - before == len(eng.programs)           # traced again, compiled from the disk
        assert len(hits) >= len(eng.programs), hits
    finally:
        jax.monitoring.unregister_event_listener(listener)
        jax.config.update("jax_compilation_cache_dir", saved[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", saved[1])
        cc.reset_cache()


def test_a_second_engine_on_the_same_model_reuses_the_compiled_programs(model):
    """The step's static half (graphdef + treedef of the flattened weights, m3jax.runner._Structure) is equal for
    two engines of one model, so the second compiles nothing; a model of another shape is a new program."""
    kw = dict(max_batch_size=6, max_seq_len=96, num_pages=100, prefill_chunk=12, max_tokens_per_step=18,
              prefill_row_len=4, compile_cache=False)
    prompts, params = [[5, 6, 7, 8, 9], [1, 2]], m3jax.SamplingParams(max_new_tokens=3, ignore_eos=True)
    first = [r.token_ids for r in m3jax.generate(m3jax.Engine(model, **kw), prompts, params, progress=False)]
    before = trace_count()
    again = [r.token_ids for r in m3jax.generate(m3jax.Engine(model, **kw), prompts, params, progress=False)]
    assert again == first and trace_count() == before
    other = random_model(M3Config.tiny(intermediate_size=96), seed=0)
    m3jax.generate(m3jax.Engine(other, **kw), prompts, params, progress=False)
    assert trace_count() > before


def test_a_loaded_model_compiles_each_program_once():
    """A loaded model's weights are committed to a device, and so is every step's output cache; the fresh cache is
    committed to the model's device too, so a program's first call (fresh pools) and its later calls are one
    compiled program (an uncommitted fresh cache made the second call compile it again)."""
    from m3jax.api import bundled_tiny_checkpoint
    from m3jax.scheduler import Batch

    model = m3jax.load(bundled_tiny_checkpoint(), progress=False)
    eng = m3jax.Engine(model, max_batch_size=3, max_seq_len=80, num_pages=50, prefill_chunk=16,
                       max_tokens_per_step=19, prefill_row_len=4, compile_cache=False)
    compiles = []
    listener = lambda event, secs, **kw: compiles.append(event)           # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for _ in range(2):
            for program in eng.runner.programs:
                jax.block_until_ready(eng.runner._run(Batch(), program)[0])
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles.count("/jax/core/compile/backend_compile_duration") == len(eng.programs)
