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
