"""Version-specific Pallas imports for the GPU kernels, in one place (jax 0.10.2 on CPU, 0.11.2 on GPU)."""

from __future__ import annotations

from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton


def compiler_params(num_warps: int, num_stages: int):
    """Triton compiler parameters; the class name moved between releases (TritonCompilerParams -> CompilerParams)."""
    cls = getattr(pl_triton, "CompilerParams", None) or getattr(pl_triton, "TritonCompilerParams")
    return cls(num_warps=num_warps, num_stages=num_stages)


def whole_array():
    """A BlockSpec whose ref is the whole operand (page pools, page tables: indexed inside the kernel)."""
    return getattr(pl, "no_block_spec", None) or pl.BlockSpec()


def masked_store(ref, value, mask):
    """Store where mask is true (rows of a gathered tile that exist); pl_triton.store on both releases."""
    return pl_triton.store(ref, value, mask=mask)


def cudnn_attention_with_lse(q_btnh, k_bskh, v_bskh, seqlen, *, scale):
    """cuDNN flash attention, causal over the first seqlen[b] rows of q and k (padding-causal mask, GQA), with
    its log-sum-exp: (o [B, T, N, H] in q's dtype, f32[B, T, N]). bf16/f16 only. jax.nn.dot_product_attention
    does not return the log-sum-exp, so this calls jax's cuDNN module directly (a private API: kept here)."""
    from jax._src.cudnn import fused_attention_stablehlo as fa
    seqlen = seqlen.astype("int32")
    o, lse = fa.dot_product_attention(q_btnh, k_bskh, v_bskh, q_seqlen=seqlen, kv_seqlen=seqlen, scale=scale,
                                      mask_type=fa.MaskType.PADDING_CAUSAL, qkv_layout="BTNH",
                                      return_residual=True)
    return o, lse.transpose(0, 2, 1)                                       # [B, N, T] -> [B, T, N]
