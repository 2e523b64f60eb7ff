"""m3jax: MiniMax-M3 in JAX, with MiniMax Sparse Attention kernels for GPU and TPU."""

from m3jax import distributed, params, sharding, testing
from m3jax.api import default_model_path, load, quantize_experts
from m3jax.config import ConfigError, M3Config, MSAConfig
from m3jax.engine import Engine, GenerationResult, generate
from m3jax.model import M3ForCausalLM
from m3jax.sampling import SamplingParams

__all__ = ["ConfigError", "M3Config", "MSAConfig", "M3ForCausalLM", "load", "default_model_path", "quantize_experts",
           "distributed", "params", "sharding", "testing", "Engine", "GenerationResult", "SamplingParams", "generate"]
