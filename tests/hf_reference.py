"""Build random tiny MiniMax-M3 models in transformers==5.23.0 (the executable ground truth) for parity tests."""

from __future__ import annotations

import math

import numpy as np
import torch
from transformers.models.minimax_m3_vl import configuration_minimax_m3_vl as hf_config
from transformers.models.minimax_m3_vl import modeling_minimax_m3_vl as hf_modeling

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)


def text_config(*, layers, heads, kv_heads, head_dim, block, topk, hidden=64, index_dim=None, rotary=None,
                experts=8, top_experts=2, vocab=300, local_blocks=1, theta=10000.0):
    rotary = head_dim // 2 if rotary is None else rotary
    return dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=32, num_hidden_layers=len(layers),
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, dense_intermediate_size=64,
        shared_intermediate_size=32, num_local_experts=experts, num_experts_per_tok=top_experts,
        index_n_heads=kv_heads, index_head_dim=index_dim or head_dim, index_block_size=block,
        index_topk_blocks=topk, index_local_blocks=local_blocks,
        layer_types=["minimax_m3_sparse" if a == "S" else "full_attention" for a, _ in layers],
        mlp_layer_types=["sparse" if m == "E" else "dense" for _, m in layers],
        rope_parameters={"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": rotary / head_dim},
        rotary_dim=rotary, max_position_embeddings=4096, bos_token_id=None, eos_token_id=vocab - 1,
    )


def random_hf_model(text: dict, seed: int):
    """A float32 eager-attention transformers model with every weight, norm and router bias random."""
    torch.manual_seed(seed)
    cfg = hf_config.MiniMaxM3VLConfig(text_config=text, vision_config=VISION)
    cfg._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    model = hf_modeling.MiniMaxM3SparseForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
    return model


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids, dtype=torch.long), use_cache=False)
    return out.logits.float().numpy()


def capture_indexer(model, ids: np.ndarray):
    """Run the model and return {layer: (indexer input hidden states, block indices [B, K, T, C])}."""
    seen = {}
    hooks = []
    for i, layer in enumerate(model.model.language_model.layers):
        indexer = layer.self_attn.indexer
        if indexer is None:
            continue

        def hook(mod, args, out, i=i):
            seen[i] = (args[0].detach().float().numpy(), out.detach().numpy())

        hooks.append(indexer.register_forward_hook(hook))
    try:
        hf_logits(model, ids)
    finally:
        for h in hooks:
            h.remove()
    return seen
