"""pytest plugin for `make test-gpu` (`-p tests.gpu_workers`): each xdist worker sees one GPU, round robin, so one
run spreads over all the GPUs of a host. A worker process gets it before jax starts a backend (plugins load
before conftest), so CUDA_VISIBLE_DEVICES still applies. Without xdist, without NVIDIA GPUs, or when the user set
CUDA_VISIBLE_DEVICES, it assigns no GPU.

Each worker compiles without XLA's GPU autotuner (`--xla_gpu_autotune_level=0`, unless XLA_FLAGS sets a level): the
suite checks numbers, not speed, and the autotuner compiles dozens of candidate kernels for every matmul of the
hundreds of small programs the suite builds. On one H200 the suite was CPU-bound (load 60-75 on 16 cores, the GPU
1-4% busy).

It also spreads the tests marked `gpu_long` (over 40 s on one H200) over the first third of the run, one in every
few tests, and makes xdist hand out tests two per worker first and then one at a time (`--maxschedchunk 1`, unless
given). A 3-minute test handed out last sets the suite's wall time on its own; xdist's default first hands each
worker a run of consecutive tests (a quarter of its share), which put all the long tests on two workers; and all
of them at once on every worker overloaded the CPUs (each took 2-3x its time). All three happened on the H200."""

import os

_GPUS = "/proc/driver/nvidia/gpus"        # one entry per GPU the driver sees (no CUDA call needed to count them)


def _assign() -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw") or not os.path.isdir(_GPUS):
        return
    if "xla_gpu_autotune_level" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0").strip()
    count = len(os.listdir(_GPUS))
    if count > 1 and "CUDA_VISIBLE_DEVICES" not in os.environ:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(int(worker[2:]) % count)


_assign()


def pytest_configure(config):
    if getattr(config.option, "maxschedchunk", 0) is None:
        config.option.maxschedchunk = 1


def spread_long_first(items, is_long):
    """`items` with the long ones spread over the first third: one long item, then `gap - 1` others, and so on."""
    long = [item for item in items if is_long(item)]
    rest = [item for item in items if not is_long(item)]
    if not long:
        return list(items)
    gap = max(1, len(items) // (3 * len(long)))
    out = []
    for k, item in enumerate(long):
        out.append(item)
        out.extend(rest[k * (gap - 1):(k + 1) * (gap - 1)])
    return out + rest[len(long) * (gap - 1):]


def pytest_collection_modifyitems(config, items):
    items[:] = spread_long_first(items, lambda item: item.get_closest_marker("gpu_long") is not None)
