"""The map between released tensor names and m3jax parameters, as data.

Each released text tensor matches exactly one rule; `mtp.*` is skipped; vision / projector tensors are
reported and skipped until the vision tower exists. A rule's target names a parameter of the model
("model" scope), of a decoder layer ("layer") or of one expert of a layer ("expert"); a layer index becomes
(stack, position in stack) through `M3Config.layer_groups`, so the same table serves any layer pattern.

Layouts: "copy" reshapes the tensor to the target shape; "t" transposes a torch [out, in] matrix to
[in, out] and reshapes, with the first `in_axes` target axes forming `in` (q_proj [N*H, D] -> [D, N, H];
o_proj [D, N*H] -> [N, H, D] has in_axes=2).
"""

from __future__ import annotations

import math
import re
from typing import Iterator, NamedTuple

from m3jax.config import DENSE_MLP, MOE_MLP, SPARSE_ATTENTION, M3Config


class Rule(NamedTuple):
    name: str                 # released name; {layer} and {expert} are placeholders
    target: str               # parameter path inside the model ("model") or a DecoderLayer
    layout: str = "t"         # "copy" | "t"
    when: str = "all"         # which layers carry it: "all" | "sparse_attention" | "dense_mlp" | "moe"
    in_axes: int = 1          # for "t": how many leading target axes come from the torch `in` dim

    @property
    def scope(self) -> str:
        return "expert" if "{expert}" in self.name else "layer" if "{layer}" in self.name else "model"


_L = "language_model.model.layers.{layer}."
_MOE = _L + "block_sparse_moe."
RULES: tuple[Rule, ...] = (
    Rule("language_model.model.embed_tokens.weight", "embed_vd", "copy"),
    Rule("language_model.lm_head.weight", "lm_head_dv"),
    Rule("language_model.model.norm.weight", "final_norm.weight", "copy"),
    Rule(_L + "input_layernorm.weight", "input_norm.weight", "copy"),
    Rule(_L + "post_attention_layernorm.weight", "post_attention_norm.weight", "copy"),
    Rule(_L + "self_attn.q_proj.weight", "attn.q_dnh"),
    Rule(_L + "self_attn.k_proj.weight", "attn.k_dkh"),
    Rule(_L + "self_attn.v_proj.weight", "attn.v_dkh"),
    Rule(_L + "self_attn.o_proj.weight", "attn.o_nhd", in_axes=2),
    Rule(_L + "self_attn.q_norm.weight", "attn.q_norm.weight", "copy"),
    Rule(_L + "self_attn.k_norm.weight", "attn.k_norm.weight", "copy"),
    Rule(_L + "self_attn.index_q_proj.weight", "attn.index_q_dki", when="sparse_attention"),
    Rule(_L + "self_attn.index_k_proj.weight", "attn.index_k_di", when="sparse_attention"),
    Rule(_L + "self_attn.index_q_norm.weight", "attn.index_q_norm.weight", "copy", "sparse_attention"),
    Rule(_L + "self_attn.index_k_norm.weight", "attn.index_k_norm.weight", "copy", "sparse_attention"),
    Rule(_L + "mlp.gate_proj.weight", "ffn.gate_df", when="dense_mlp"),
    Rule(_L + "mlp.up_proj.weight", "ffn.up_df", when="dense_mlp"),
    Rule(_L + "mlp.down_proj.weight", "ffn.down_fd", when="dense_mlp"),
    Rule(_MOE + "gate.weight", "ffn.router_de", when="moe"),
    Rule(_MOE + "e_score_correction_bias", "ffn.router_bias_e", "copy", "moe"),
    Rule(_MOE + "experts.{expert}.w1.weight", "ffn.gate_edf", when="moe"),
    Rule(_MOE + "experts.{expert}.w3.weight", "ffn.up_edf", when="moe"),
    Rule(_MOE + "experts.{expert}.w2.weight", "ffn.down_efd", when="moe"),
    Rule(_MOE + "shared_experts.gate_proj.weight", "ffn.shared.gate_df", when="moe"),
    Rule(_MOE + "shared_experts.up_proj.weight", "ffn.shared.up_df", when="moe"),
    Rule(_MOE + "shared_experts.down_proj.weight", "ffn.shared.down_fd", when="moe"),
)
SCALE_SUFFIX = "_scale_inv"                      # MXFP8 exponents, consumed with their weight
SKIP = re.compile(r"^(language_model\.)?(model\.)?mtp\.")
VISION = re.compile(r"^(vision_tower|multi_modal_projector|patch_merge_mlp)\.")


def _pattern(template: str) -> re.Pattern:
    p = re.escape(template).replace(r"\{layer\}", r"(?P<layer>\d+)").replace(r"\{expert\}", r"(?P<expert>\d+)")
    return re.compile(f"^{p}$")


_PATTERNS = tuple((_pattern(r.name), r) for r in RULES)


class Placement(NamedTuple):
    """Where one released tensor goes: parameter `path`, at `index` along its leading layer/expert axes."""
    name: str
    path: str
    index: tuple[int, ...]
    rule: Rule


def layer_slot(cfg: M3Config, layer: int) -> tuple[int, int]:
    """(stack index, position inside the stack) of decoder layer `layer`."""
    for s, (first, n, _, _) in enumerate(cfg.layer_groups):
        if first <= layer < first + n:
            return s, layer - first
    raise KeyError(f"layer {layer} is outside num_hidden_layers={cfg.num_hidden_layers}")


def _applies(rule: Rule, cfg: M3Config, layer: int) -> bool:
    a, m = cfg.layer_types[layer], cfg.mlp_layer_types[layer]
    return {"all": True, "sparse_attention": a == SPARSE_ATTENTION, "dense_mlp": m == DENSE_MLP,
            "moe": m == MOE_MLP}[rule.when]


def _placement(cfg: M3Config, rule: Rule, name: str, layer: int | None, expert: int | None) -> Placement:
    if rule.scope == "model":
        return Placement(name, rule.target, (), rule)
    stack, pos = layer_slot(cfg, layer)
    index = (pos,) if expert is None else (pos, expert)
    return Placement(name, f"stacks.{stack}.layers.{rule.target}", index, rule)


def expected(cfg: M3Config) -> Iterator[Placement]:
    """Every text tensor a checkpoint of this config must hold, with its placement."""
    for rule in RULES:
        if rule.scope == "model":
            if not (rule.target == "lm_head_dv" and cfg.tie_word_embeddings):
                yield _placement(cfg, rule, rule.name, None, None)
            continue
        for layer in range(cfg.num_hidden_layers):
            if not _applies(rule, cfg, layer):
                continue
            experts = range(cfg.num_local_experts) if rule.scope == "expert" else (None,)
            for e in experts:
                name = rule.name.format(layer=layer, expert=e)
                yield _placement(cfg, rule, name, layer, e)


def place(cfg: M3Config, name: str) -> Placement | None:
    """The placement of a released text tensor, or None if no rule (for this config's layer kinds) takes it."""
    for pattern, rule in _PATTERNS:
        m = pattern.match(name)
        if m is None:
            continue
        g = m.groupdict()
        if rule.scope == "model":
            return _placement(cfg, rule, name, None, None)
        layer = int(g["layer"])
        expert = int(g["expert"]) if "expert" in g else None
        if layer >= cfg.num_hidden_layers or not _applies(rule, cfg, layer):
            return None
        if expert is not None and expert >= cfg.num_local_experts:
            return None
        return _placement(cfg, rule, name, layer, expert)
    return None


def torch_shape(rule: Rule, item_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The released [out, in] (or 1-D) shape of a tensor whose m3jax slot has `item_shape`."""
    if rule.layout == "copy":
        return item_shape
    return (math.prod(item_shape[rule.in_axes:]), math.prod(item_shape[:rule.in_axes]))


def to_param(rule: Rule, w, item_shape: tuple[int, ...]):
    """Released tensor -> m3jax layout (numpy or jax array)."""
    if rule.layout == "copy":
        return w.reshape(item_shape)
    return w.T.reshape(item_shape)


def from_param(rule: Rule, p, item_shape: tuple[int, ...]):
    """m3jax slot -> released layout (inverse of to_param)."""
    if rule.layout == "copy":
        return p.reshape(item_shape)
    return p.reshape(torch_shape(rule, item_shape)[::-1]).T
