"""pytest plugin for `make test-gpu` (`-p tests.gpu_workers`): each xdist worker sees one GPU, round robin, so one
run spreads over all the GPUs of a host. A worker process gets it before jax starts a backend (plugins load
before conftest), so CUDA_VISIBLE_DEVICES still applies. Without xdist, without NVIDIA GPUs, or when the user set
CUDA_VISIBLE_DEVICES, it assigns no GPU.

It also moves the tests marked `gpu_long` (over 40 s on one H200) to the front of the run: xdist hands out tests in
collection order, and a 3-minute test handed out last would set the suite's wall time on its own (it did: the
suite ran 570 s with 10 workers, most idle for the last minutes)."""

import os

_GPUS = "/proc/driver/nvidia/gpus"        # one entry per GPU the driver sees (no CUDA call needed to count them)


def _assign() -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw") or "CUDA_VISIBLE_DEVICES" in os.environ or not os.path.isdir(_GPUS):
        return
    count = len(os.listdir(_GPUS))
    if count > 1:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(int(worker[2:]) % count)


_assign()


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.get_closest_marker("gpu_long") is None)      # stable: otherwise in order
