"""Released safetensors (BF16 or MXFP8, sharded) -> m3jax parameters and Orbax checkpoints."""
