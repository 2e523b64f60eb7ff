"""Test-wide setup: 8 host CPU devices, so sharding tests can build 1x8, 2x4, 4x2 and 8x1 meshes.

Must run before jax is imported anywhere; single-device tests are unaffected (arrays live on device 0).
"""

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

# torchvision's PyPI wheel beside torch's CPU wheel: define its missing nms/qnms op schemas before anything imports
# transformers (which then imports torchvision); see tests/vision_helpers.py. No-op without torchvision.
from tests.vision_helpers import define_torchvision_op_schemas  # noqa: E402

define_torchvision_op_schemas()


def pytest_collection_modifyitems(config, items):
    """Tests marked `multi_device` build meshes of up to 8 devices. On the CPU backend those are the forced host devices
    above; a GPU host's default backend has its own (usually fewer) devices, so there they are skipped, saying so."""
    import jax
    import pytest

    if jax.device_count() >= 8:
        return
    skip = pytest.mark.skip(
        reason=f"needs 8 devices of the default backend ({jax.default_backend()}: {jax.device_count()}); the forced "
               f"host devices of tests/conftest.py exist on the CPU backend only, so `make test` runs these")
    for item in items:
        if "multi_device" in item.keywords:
            item.add_marker(skip)
