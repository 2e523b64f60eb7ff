"""pytest plugin for `make test-gpu` (`-p tests.gpu_workers`): each xdist worker sees one GPU, round robin, so one
run spreads over all the GPUs of a host. A worker process gets it before jax starts a backend (plugins load
before conftest), so CUDA_VISIBLE_DEVICES still applies. Without xdist, without NVIDIA GPUs, or when the user set
CUDA_VISIBLE_DEVICES, it assigns no GPU.

It also moves the tests marked `gpu_long` (over 40 s on one H200) to the front of the run and makes xdist hand out
tests two per worker first and then one at a time (`--maxschedchunk 1`, unless given): a 3-minute test handed out
last sets the suite's wall time on its own, and xdist's default first hands each worker a run of consecutive tests
(a quarter of its share), which put all the long tests on the first two workers. Both happened on the H200: 570 s
with the long tests last, 585 s (cut, 5 long tests never started) with them first in default chunks."""

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


def pytest_configure(config):
    if getattr(config.option, "maxschedchunk", 0) is None:
        config.option.maxschedchunk = 1


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.get_closest_marker("gpu_long") is None)      # stable: otherwise in order
