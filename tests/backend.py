"""What a test may expect of the backend it runs on.

CPU: every float32 op is IEEE float32 and deterministic, so two paths that compute the same sums in the same order
agree bit for bit. NVIDIA GPU: float32 models and references use precision=HIGHEST (no TF32), but kernels tile and
order their float32 sums by block shapes that differ between paths (e.g. the MXFP8 and the bf16/f32 fused MoE
kernels pick different row tiles), so such paths agree to float32 rounding, not to the bit.
"""

from __future__ import annotations

import jax
import numpy as np

ON_CPU = jax.default_backend() == "cpu"


def assert_same_sums(got, want, *, gpu_atol: float = 2e-5, what: str = ""):
    """Bit-equal on CPU; within `gpu_atol` (float32 summation order) on an accelerator."""
    got, want = np.asarray(got), np.asarray(want)
    if ON_CPU:
        np.testing.assert_array_equal(got, want, err_msg=what)
    else:
        np.testing.assert_allclose(got, want, atol=gpu_atol, rtol=0, err_msg=f"{what} ({jax.default_backend()}: "
                                   "float32 summation order differs between kernel tilings)")
