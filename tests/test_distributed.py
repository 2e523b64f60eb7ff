"""Multi-host inference on CPU: 2 real processes x 4 forced host devices (jax.distributed, gloo collectives) against
one process with 8 devices: the same logits (from the release safetensors and from the converted Orbax directory),
the same greedy and sampled tokens and step layouts, each process reading only its slices; and
the failure paths (a process that never starts, a process that dies) ending the run with an error, never a hang.

The workers are this file run as a script (`python tests/test_distributed.py worker ...`), so that each starts a
fresh jax with its own device count before anything initialises the backend.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = ("1x8", "2x4")            # "model" across the two processes; "data" across them (rows on both hosts)
PROMPTS = [[5, 17, 200, 33, 90, 41, 7, 12, 64, 99, 3], [250, 8, 77, 19]]
NEW_TOKENS = 4
# 8 query heads and 4 KV heads so that "model" can be 8 (tiny's default has 4 heads).
TINY = dict(num_attention_heads=8, num_key_value_heads=4, num_index_heads=4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _worker_cmd(*args) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "worker", *map(str, args)]


# ----------------------------------------------------------------------------------------------- the worker
def expected_bytes(ckpt: str, mesh) -> int:
    """Bytes of released tensors that this process's devices hold under load()'s placement: the distinct slices
    of its addressable devices, KV-head weights whole (they are read whole, then replicated on device)."""
    import jax
    from m3jax import sharding
    from m3jax.config import M3Config
    from m3jax.params import abstract_params

    cfg = M3Config.from_pretrained(ckpt)
    replicas = sharding.kv_replication(cfg, mesh)
    _, _, _, targets = abstract_params(cfg, np.float32, None, mesh)
    total = 0
    for path, (shape, _) in targets.items():
        spec = (jax.sharding.PartitionSpec() if replicas > 1 and sharding.KV_HEAD_PARAMS.search(path)
                else sharding.param_spec(path, shape, mesh))
        ns = jax.sharding.NamedSharding(mesh, spec)
        boxes = {tuple(s.indices(n)[:2] for s, n in zip(idx, shape))
                 for idx in ns.addressable_devices_indices_map(shape).values()}
        total += sum(int(np.prod([b - a for a, b in box])) for box in boxes) * 4      # float32 release
    return total


def _record_layouts(engine) -> list:
    """Every step's batch layout (request, positions, pages, shard of each row), appended as the engine runs."""
    layouts, schedule = [], engine.scheduler.schedule

    def recording():
        batch = schedule()
        if batch is not None:
            layouts.append([(r.request_id, r.start, len(r.tokens), r.pages, r.shard, r.sample) for r in batch.rows])
        return batch

    engine.scheduler.schedule = recording
    return layouts


def _lead_or_follow(engine, num_processes: int, process_id: int):
    """Requests arriving in process 0 only (as in the server): process 0 leads, the others follow."""
    import m3jax
    from m3jax import distributed

    params = m3jax.SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    if process_id > 0:
        return distributed.follow(engine)                       # the number of steps it ran
    leader = distributed.LeaderEngine(engine) if num_processes > 1 else engine
    rids = [leader.add_request(p, params) for p in PROMPTS]
    while leader.has_work():
        leader.step()
    if num_processes > 1:
        leader.close()
    return [list(leader.pop_result(r).token_ids) for r in rids]


def worker(ckpt: str, out: str, coordinator: str, num_processes: int, process_id: int, mode: str) -> None:
    from m3jax import distributed
    if num_processes > 1:
        distributed.initialize(coordinator, num_processes, process_id, init_timeout_s=20, heartbeat_timeout_s=10)
    import jax
    import m3jax
    from convert import safetensors_io

    if mode == "die" and process_id == 1:
        os._exit(3)                               # dies after joining: process 0 must not hang in a collective
    result = {"process": jax.process_index(), "devices": jax.device_count(), "local": jax.local_device_count()}
    for text in MESHES:
        d, m = map(int, text.split("x"))
        mesh = m3jax.sharding.make_mesh(data=d, model=m)
        before = safetensors_io.bytes_read()
        model = m3jax.load(ckpt, dtype="float32", mesh=mesh, progress=False)
        read = safetensors_io.bytes_read() - before
        ids = np.asarray([PROMPTS[0][:8]] * d, np.int32)
        logits = distributed.to_host(model(ids))
        engine = m3jax.Engine(model, max_batch_size=2 * d, max_seq_len=64, prefill_chunk=16)
        layouts = _record_layouts(engine)
        outs = m3jax.generate(engine, PROMPTS, m3jax.SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0,
                                                                    ignore_eos=True))
        tokens = [list(o.token_ids) for o in outs]
        # Every process made the same scheduling decisions (rows, positions, pages of every step) and got the
        # same tokens; a disagreement raises DistributedError in every process.
        distributed.check_agree(f"step layouts on mesh {text}", layouts)
        distributed.check_agree(f"greedy tokens on mesh {text}", tokens)
        np.save(os.path.join(out, f"logits_{text}_{process_id}.npy"), logits)
        result[text] = dict(bytes_read=read, expected_bytes=expected_bytes(ckpt, mesh), tokens=tokens)
        if d > 1:        # rows on both hosts: sampled tokens are drawn per row with process-independent keys
            sampled = m3jax.generate(engine, PROMPTS, m3jax.SamplingParams(max_new_tokens=3, temperature=1.0,
                                                                           seed=7, ignore_eos=True))
            result[text]["sampled"] = [list(o.token_ids) for o in sampled]
            result[text]["led"] = _lead_or_follow(engine, num_processes, process_id)
        else:            # the converted (Orbax) directory restores onto the same global mesh
            restored = m3jax.load(ckpt + "-orbax", dtype="float32", mesh=mesh, progress=False)
            np.save(os.path.join(out, f"logits_orbax_{process_id}.npy"), distributed.to_host(restored(ids)))
    result["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(os.path.join(out, f"result_{process_id}.json"), "w") as f:
        json.dump(result, f)


# ----------------------------------------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from convert import orbax_io
    from m3jax.testing import make_tiny_checkpoint
    path = make_tiny_checkpoint(str(tmp_path_factory.mktemp("dist") / "tiny"), seed=3, dtype="float32", **TINY)
    orbax_io.convert(path, path + "-orbax", dtype="float32", progress=False)
    return path


def _spawn(ckpt, out, port, n, pid, mode="run", devices=4):
    return subprocess.Popen(_worker_cmd(ckpt, out, f"127.0.0.1:{port}", n, pid, mode), cwd=ROOT, env=_env(devices),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(procs, timeout):
    deadline = time.monotonic() + timeout
    outs = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"worker hung (> {timeout} s)")
        outs.append((p.returncode, o, e))
    return outs


@pytest.mark.gpu_long
@pytest.mark.slow
def test_two_processes_match_one_process_with_8_devices(ckpt, tmp_path):
    ref_dir, multi_dir = tmp_path / "ref", tmp_path / "multi"
    ref_dir.mkdir(), multi_dir.mkdir()
    port = _free_port()
    procs = [_spawn(ckpt, str(ref_dir), 0, 1, 0, devices=8)]                    # the 8-device reference
    procs += [_spawn(ckpt, str(multi_dir), port, 2, i) for i in range(2)]
    for rc, o, e in _finish(procs, timeout=420):
        assert rc == 0, f"worker failed ({rc}):\n{e[-3000:]}"
    ref = json.loads((ref_dir / "result_0.json").read_text())
    got = [json.loads((multi_dir / f"result_{i}.json").read_text()) for i in range(2)]
    assert ref["devices"] == 8 and [g["process"] for g in got] == [0, 1]
    assert all(g["devices"] == 8 and g["local"] == 4 for g in got)
    for text in MESHES:
        want = np.load(ref_dir / f"logits_{text}_0.npy")
        for i in range(2):
            np.testing.assert_allclose(np.load(multi_dir / f"logits_{text}_{i}.npy"), want, rtol=2e-5, atol=2e-5)
            assert got[i][text]["tokens"] == ref[text]["tokens"], text
            assert got[i][text].get("sampled") == ref[text].get("sampled"), text
        if "led" in ref[text]:           # process 0 led with requests only it had; process 1 followed
            assert got[0][text]["led"] == ref[text]["tokens"] and ref[text]["led"] == ref[text]["tokens"]
            assert got[1][text]["led"] >= 1
            # Each process reads exactly the slices its 4 devices hold: on 1x8 half of every split parameter (the
            # rest is replicated: norms, router, KV-head weights); on 2x4 half of the experts.
            assert got[i][text]["bytes_read"] == got[i][text]["expected_bytes"], (text, i)
            assert got[i][text]["bytes_read"] < ref[text]["bytes_read"] * (0.6 if text == "1x8" else 0.9), (text, i)
        assert ref[text]["bytes_read"] == ref[text]["expected_bytes"]
    for i in range(2):
        np.testing.assert_allclose(np.load(multi_dir / f"logits_orbax_{i}.npy"), np.load(ref_dir / "logits_1x8_0.npy"),
                                   rtol=2e-5, atol=2e-5)
    print("max RSS MiB: reference", round(ref["max_rss_mib"]), "processes",
          [round(g["max_rss_mib"]) for g in got], "bytes read:",
          {t: (ref[t]["bytes_read"], [g[t]["bytes_read"] for g in got]) for t in MESHES})


def test_missing_process_fails_within_init_timeout(ckpt, tmp_path):
    """Process 1 never starts: process 0 exits non-zero with one clear error once the init timeout (20 s) ends."""
    start = time.monotonic()
    (rc, _, err), = _finish([_spawn(ckpt, str(tmp_path), _free_port(), 2, 0)], timeout=120)
    assert rc != 0
    assert "could not join the run through coordinator 127.0.0.1:" in err, err[-2000:]
    assert time.monotonic() - start < 100


@pytest.mark.slow
def test_dead_process_ends_the_run(ckpt, tmp_path):
    """Process 1 dies after joining: process 0 is ended by jax's heartbeat check (10 s here) with an error naming
    the dead process ("another task died ... stopped sending heartbeats: 1"), never a hang."""
    port = _free_port()
    procs = [_spawn(ckpt, str(tmp_path), port, 2, i, mode="die") for i in range(2)]
    (rc0, _, err0), (rc1, _, _) = _finish(procs, timeout=150)
    assert rc1 == 3
    assert rc0 != 0, err0[-2000:]
    assert "another task died" in err0 and "stopped sending heartbeats" in err0, err0[-2000:]


def test_partial_command_line_is_a_clear_error():
    import argparse
    from m3jax import distributed

    ap = argparse.ArgumentParser()
    distributed.add_distributed_args(ap)
    args = ap.parse_args(["--coordinator", "127.0.0.1:1234", "--num-processes", "2"])
    with pytest.raises(ValueError, match="missing --process-id"):
        distributed.maybe_initialize(args)
    assert distributed.maybe_initialize(ap.parse_args([])) is False


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    a = sys.argv[2:]
    worker(a[0], a[1], a[2], int(a[3]), int(a[4]), a[5])
