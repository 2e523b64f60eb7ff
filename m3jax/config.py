"""M3Config: the typed, validated configuration of the MiniMax-M3 text model.

`M3Config.from_hf` is the only place where HuggingFace and legacy key names (`sparse_attention_config`,
`moe_layer_freq`, `index_*`, `rope_parameters`) appear. Modules receive an `M3Config`, never a raw dict.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any, Mapping

log = logging.getLogger(__name__)

FULL_ATTENTION = "full_attention"
SPARSE_ATTENTION = "minimax_m3_sparse"
DENSE_MLP = "dense"
MOE_MLP = "sparse"
_ATTENTION_TYPES = (FULL_ATTENTION, SPARSE_ATTENTION)
_MLP_TYPES = (DENSE_MLP, MOE_MLP)


def _is_int(v: Any) -> bool:
    """An int that is not a bool (JSON `true` would otherwise count as 1)."""
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class ConfigError(ValueError):
    """A config.json that is missing a field, has a wrong value, or contradicts itself."""


@dataclasses.dataclass(frozen=True, slots=True)
class MSAConfig:
    """MiniMax Sparse Attention: the index branch and its block selection."""

    num_index_heads: int = 4        # one per KV group; == num_key_value_heads
    index_dim: int = 128            # head dim of the index q heads and of the single shared index-k head
    block_size: int = 128           # keys per scored block == KV-cache page size
    topk_blocks: int = 16           # blocks kept per (query token, KV group), forced local blocks included
    local_blocks: int = 1           # blocks ending at the query's own block that are always kept

    def __post_init__(self):
        for name in ("num_index_heads", "index_dim", "block_size", "topk_blocks", "local_blocks"):
            if not _is_int(getattr(self, name)):
                raise ConfigError(f"msa.{name} must be an integer, got {getattr(self, name)!r}")
        for name in ("num_index_heads", "index_dim", "block_size", "topk_blocks"):
            if getattr(self, name) < 1:
                raise ConfigError(f"msa.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.local_blocks <= self.topk_blocks:
            raise ConfigError(f"msa.local_blocks (index_local_blocks) must be in [0, topk_blocks="
                              f"{self.topk_blocks}], got {self.local_blocks}")


@dataclasses.dataclass(frozen=True, slots=True)
class M3Config:
    """The MiniMax-M3 text backbone. Defaults are the released model (`MiniMaxAI/MiniMax-M3`)."""

    vocab_size: int = 200064
    hidden_size: int = 6144
    num_hidden_layers: int = 60
    num_attention_heads: int = 64
    num_key_value_heads: int = 4
    head_dim: int = 128
    rotary_dim: int = 64
    rope_theta: float = 5_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 1_048_576
    dense_intermediate_size: int = 12288
    intermediate_size: int = 3072           # per routed expert
    shared_intermediate_size: int = 3072    # the single shared expert
    num_local_experts: int = 128
    num_experts_per_tok: int = 4
    routed_scaling_factor: float = 2.0
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 200034
    eos_token_id: tuple[int, ...] = (200020,)
    layer_types: tuple[str, ...] = (FULL_ATTENTION,) * 3 + (SPARSE_ATTENTION,) * 57
    mlp_layer_types: tuple[str, ...] = (DENSE_MLP,) * 3 + (MOE_MLP,) * 57
    msa: MSAConfig = MSAConfig()
    # The checkpoint's `quantization_config`, if any; left out of the hash (a dict) so that a model loaded from an
    # MXFP8 release can be a static jit argument (the engine's step).
    quantization: Mapping[str, Any] | None = dataclasses.field(default=None, hash=False)

    def __post_init__(self):
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "max_position_embeddings", "dense_intermediate_size",
                    "intermediate_size", "shared_intermediate_size", "num_local_experts", "num_experts_per_tok")
        for name in positive:
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        # A negative eps, a NaN theta or a negative clamp loads fine and then generates garbage (NaN logits,
        # token 0 forever): every float must be finite, and these must be > 0.
        for name in ("rope_theta", "rms_norm_eps", "routed_scaling_factor", "swiglu_alpha", "swiglu_limit"):
            v = getattr(self, name)
            if not _is_number(v) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"{name} must be a finite number > 0, got {v!r}")
        if not _is_int(self.rotary_dim):
            raise ConfigError(f"rotary_dim must be an integer, got {self.rotary_dim!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError(f"tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")
        for name, ids in (("bos_token_id", () if self.bos_token_id is None else (self.bos_token_id,)),
                          ("eos_token_id", self.eos_token_id)):
            if not isinstance(ids, tuple) or not all(_is_int(i) and i >= 0 for i in ids):
                want = "None or a token id >= 0" if name == "bos_token_id" else "a tuple of token ids >= 0"
                raise ConfigError(f"{name} must be {want}, got {getattr(self, name)!r}")
        if not isinstance(self.msa, MSAConfig):
            raise ConfigError(f"msa must be an MSAConfig, got {type(self.msa).__name__}")
        if self.quantization is not None and not isinstance(self.quantization, Mapping):
            raise ConfigError(f"quantization_config must be an object, got {self.quantization!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                              f"num_key_value_heads ({self.num_key_value_heads})")
        if self.rotary_dim < 0 or self.rotary_dim > self.head_dim or self.rotary_dim % 2:
            raise ConfigError(f"rotary_dim must be even and in [0, head_dim={self.head_dim}], got {self.rotary_dim}")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ConfigError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be <= num_local_experts "
                              f"({self.num_local_experts})")
        for name, allowed in (("layer_types", _ATTENTION_TYPES), ("mlp_layer_types", _MLP_TYPES)):
            kinds = getattr(self, name)
            if len(kinds) != self.num_hidden_layers:
                raise ConfigError(f"{name} has {len(kinds)} entries, expected num_hidden_layers="
                                  f"{self.num_hidden_layers}")
            bad = sorted({k for k in kinds if k not in allowed})
            if bad:
                raise ConfigError(f"{name} has unknown entries {bad}; expected one of {list(allowed)}")
        if self.has_sparse_layers:
            if self.msa.num_index_heads != self.num_key_value_heads:
                raise ConfigError(f"index_n_heads ({self.msa.num_index_heads}) must equal num_key_value_heads "
                                  f"({self.num_key_value_heads}): one index head selects blocks per KV group")
            if self.rotary_dim > self.msa.index_dim:
                raise ConfigError(f"rotary_dim ({self.rotary_dim}) must be <= index_head_dim "
                                  f"({self.msa.index_dim}): the index branch uses the same partial RoPE")

    # Derived values -------------------------------------------------------------------------------
    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def has_sparse_layers(self) -> bool:
        return SPARSE_ATTENTION in self.layer_types

    @property
    def layer_kinds(self) -> tuple[tuple[str, str], ...]:
        return tuple(zip(self.layer_types, self.mlp_layer_types))

    @property
    def layer_groups(self) -> tuple[tuple[int, int, str, str], ...]:
        """Runs of consecutive layers of one kind: (first layer, count, attention type, mlp type)."""
        groups: list[tuple[int, int, str, str]] = []
        for i, (a, m) in enumerate(self.layer_kinds):
            if groups and groups[-1][2:] == (a, m):
                first, n, _, _ = groups[-1]
                groups[-1] = (first, n + 1, a, m)
            else:
                groups.append((i, 1, a, m))
        return tuple(groups)

    # Construction ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_dict: str | os.PathLike | Mapping[str, Any]) -> "M3Config":
        """From a directory holding `config.json`, a path to a json file, or an already-parsed dict."""
        if isinstance(path_or_dict, Mapping):
            return cls.from_hf(path_or_dict)
        path = os.fspath(path_or_dict)
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.exists(file):
            raise ConfigError(f"config.json not found at {file}")
        try:
            with open(file) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file} is not valid JSON: {e}") from None
        return cls.from_hf(d)

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> "M3Config":
        """Translate a HF config dict (the VL wrapper or a text-only config; legacy or flat MSA keys)."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        quant = d.get("quantization_config")
        if "text_config" in d:
            t = d["text_config"]
            if not isinstance(t, Mapping):
                raise ConfigError("text_config must be a JSON object")
            quant = quant or t.get("quantization_config")
        else:
            t = d
        return cls(**_translate_text_config(t), quantization=quant)

    def to_hf(self) -> dict[str, Any]:
        """A text config dict in transformers' flat naming (what `from_hf` reads back)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("msa", "quantization", "rotary_dim", "rope_theta", "eos_token_id",
                               "layer_types", "mlp_layer_types")}
        d.update(
            model_type="minimax_m3_vl_text",
            layer_types=list(self.layer_types), mlp_layer_types=list(self.mlp_layer_types),
            eos_token_id=list(self.eos_token_id) if len(self.eos_token_id) != 1 else self.eos_token_id[0],
            rotary_dim=self.rotary_dim,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta,
                             "partial_rotary_factor": self.rotary_dim / self.head_dim},
            index_n_heads=self.msa.num_index_heads, index_head_dim=self.msa.index_dim,
            index_block_size=self.msa.block_size, index_topk_blocks=self.msa.topk_blocks,
            index_local_blocks=self.msa.local_blocks, hidden_act="swigluoai",
        )
        return d

    @classmethod
    def tiny(cls, **overrides) -> "M3Config":
        """A few-kB model with every feature live: 1 dense + 2 MSA/MoE layers, blocks of 8, top-3."""
        base = dict(
            vocab_size=384, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, rotary_dim=8, rope_theta=10000.0, max_position_embeddings=4096,
            dense_intermediate_size=96, intermediate_size=32, shared_intermediate_size=32, num_local_experts=8,
            num_experts_per_tok=2, bos_token_id=None, eos_token_id=(257,),
            layer_types=(FULL_ATTENTION, SPARSE_ATTENTION, SPARSE_ATTENTION),
            mlp_layer_types=(DENSE_MLP, MOE_MLP, MOE_MLP),
            msa=MSAConfig(num_index_heads=2, index_dim=16, block_size=8, topk_blocks=3, local_blocks=1),
        )
        msa_over = {k: overrides.pop(k) for k in list(overrides) if k in MSAConfig.__slots__}
        base.update(overrides)
        if msa_over:
            base["msa"] = dataclasses.replace(base["msa"], **msa_over)
        if "num_hidden_layers" in overrides and "layer_types" not in overrides:
            n = overrides["num_hidden_layers"]
            base["layer_types"] = (FULL_ATTENTION,) + (SPARSE_ATTENTION,) * (n - 1)
            base["mlp_layer_types"] = (DENSE_MLP,) + (MOE_MLP,) * (n - 1)
        return cls(**base)


_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false"}


def _check_kind(key: str, v: Any, kind: type | tuple[type, ...]) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(v, kinds) and (bool in kinds or not isinstance(v, bool))     # bool is an int subclass
    if not ok:
        want = _KIND_NAMES[float] if float in kinds else " or ".join(_KIND_NAMES.get(k, k.__name__) for k in kinds)
        raise ConfigError(f"config field '{key}' must be {want}, got {v!r}")
    return v


def _require(t: Mapping[str, Any], key: str, kind: type | tuple[type, ...] = int) -> Any:
    if key not in t:
        raise ConfigError(f"config field '{key}' is missing")
    return _check_kind(key, t[key], kind)


def _optional(t: Mapping[str, Any], key: str, default: Any, kind: type | tuple[type, ...]) -> Any:
    if key not in t or t[key] is None:
        return default
    return _check_kind(key, t[key], kind)


def _per_layer(t: Mapping[str, Any], key: str, legacy: Any, legacy_key: str, names: tuple[str, str],
               n: int) -> tuple[str, ...]:
    """`layer_types` / `mlp_layer_types`, or their legacy 0/1 frequency lists."""
    if t.get(key) is not None:
        v = t[key]
        if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
            raise ConfigError(f"config field '{key}' must be a list of strings, got {v!r}")
        return tuple(v)
    if legacy is not None:
        if not isinstance(legacy, (list, tuple)) or not all(_is_int(x) and x in (0, 1) for x in legacy):
            raise ConfigError(f"config field '{legacy_key}' must be a list of 0/1, got {legacy!r}")
        return tuple(names[int(x)] for x in legacy)
    raise ConfigError(f"config field '{key}' (or legacy '{legacy_key}') is missing")


def _translate_text_config(t: Mapping[str, Any]) -> dict[str, Any]:
    num_layers = _require(t, "num_hidden_layers")
    hidden = _require(t, "hidden_size")
    heads = _require(t, "num_attention_heads")
    head_dim = _optional(t, "head_dim", None, int)
    if head_dim is None:
        if hidden % heads:
            raise ConfigError(f"config field 'head_dim' is missing and hidden_size ({hidden}) is not divisible by "
                              f"num_attention_heads ({heads})")
        head_dim = hidden // heads
    for key in ("hidden_act",):
        if key in t and t[key] not in ("swigluoai", "silu"):
            raise ConfigError(f"config field '{key}' must be 'swigluoai', got {t[key]!r}")
    if t.get("scoring_func", "sigmoid") != "sigmoid":
        raise ConfigError(f"config field 'scoring_func' must be 'sigmoid', got {t['scoring_func']!r}")
    if t.get("attention_output_gate", False):
        raise ConfigError("config field 'attention_output_gate' = true is not supported (M3 has no output gate)")
    if t.get("use_gemma_norm", True) is not True:
        raise ConfigError("config field 'use_gemma_norm' must be true: M3 uses Gemma (1 + w) RMSNorm")
    if t.get("qk_norm_type", "per_head") != "per_head":
        raise ConfigError(f"config field 'qk_norm_type' must be 'per_head', got {t['qk_norm_type']!r}")
    if t.get("n_shared_experts", 1) != 1:
        raise ConfigError(f"config field 'n_shared_experts' must be 1, got {t['n_shared_experts']!r}")
    if t.get("rope_scaling"):
        raise ConfigError(f"config field 'rope_scaling' is not supported (M3 uses plain RoPE), got {t['rope_scaling']!r}")

    # RoPE: transformers computes the rotated width from rope_parameters.partial_rotary_factor; the released
    # config spells it as rope_theta / partial_rotary_factor / rotary_dim at the top level.
    rope = t.get("rope_parameters") or {}
    if not isinstance(rope, Mapping):
        raise ConfigError(f"config field 'rope_parameters' must be an object, got {rope!r}")
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"config field 'rope_parameters.rope_type' must be 'default', got {rope['rope_type']!r}")
    theta = _check_kind("rope_theta", rope.get("rope_theta", t.get("rope_theta", 5_000_000.0)), (int, float))
    prf = rope.get("partial_rotary_factor", t.get("partial_rotary_factor"))
    rotary_dim = _optional(t, "rotary_dim", None, int)
    if rotary_dim is not None and not (0 <= rotary_dim <= head_dim and rotary_dim % 2 == 0):
        raise ConfigError(f"config field 'rotary_dim' must be even and in [0, head_dim={head_dim}], got {rotary_dim}")
    if prf is not None:
        if not _is_number(prf) or not 0 <= prf <= 1:
            raise ConfigError(f"config field 'partial_rotary_factor' must be in [0, 1], got {prf!r}")
        from_prf = int(head_dim * prf)
        if rotary_dim is not None and rotary_dim != from_prf:
            # transformers ignores `rotary_dim` and rotates head_dim * partial_rotary_factor channels.
            log.warning("config: rotary_dim=%d disagrees with head_dim * partial_rotary_factor = %d; using %d "
                        "as transformers does", rotary_dim, from_prf, from_prf)
        rotary_dim = from_prf
    if rotary_dim is None:
        rotary_dim = head_dim       # transformers' default partial_rotary_factor is 1.0

    sparse = t.get("sparse_attention_config") or {}
    if not isinstance(sparse, Mapping):
        raise ConfigError(f"config field 'sparse_attention_config' must be an object, got {sparse!r}")
    if sparse.get("use_sparse_attention", True) is False:
        sparse_freq = [0] * num_layers
    else:
        sparse_freq = sparse.get("sparse_attention_freq")
    if sparse.get("sparse_score_type", "max") != "max":
        raise ConfigError(f"config field 'sparse_attention_config.sparse_score_type' must be 'max', got "
                          f"{sparse['sparse_score_type']!r}")
    if sparse.get("sparse_init_block", 0) != 0:
        raise ConfigError(f"config field 'sparse_attention_config.sparse_init_block' must be 0, got "
                          f"{sparse['sparse_init_block']!r}")
    disable_iv = sparse.get("sparse_disable_index_value")
    if disable_iv is not None and sparse_freq is not None:
        if any(f and not d for f, d in zip(sparse_freq, disable_iv)):
            raise ConfigError("config field 'sparse_attention_config.sparse_disable_index_value' enables the "
                              "index value branch on a sparse layer; M3 ships none and it is not supported")

    def msa_field(flat: str, legacy: str, default: int) -> int:
        v = t.get(flat) if t.get(flat) is not None else sparse.get(legacy, default)
        if not _is_int(v):
            raise ConfigError(f"config field '{flat}' (legacy '{legacy}') must be an integer, got {v!r}")
        return v

    msa = MSAConfig(
        num_index_heads=msa_field("index_n_heads", "sparse_num_index_heads", 4),
        index_dim=msa_field("index_head_dim", "sparse_index_dim", 128),
        block_size=msa_field("index_block_size", "sparse_block_size", 128),
        topk_blocks=msa_field("index_topk_blocks", "sparse_topk_blocks", 16),
        local_blocks=msa_field("index_local_blocks", "sparse_local_block", 1),
    )
    eos = t.get("eos_token_id", 200020)
    eos = () if eos is None else (tuple(eos) if isinstance(eos, (list, tuple)) else (eos,))
    if not all(_is_int(e) for e in eos):
        raise ConfigError(f"config field 'eos_token_id' must be an int or a list of ints, got {eos!r}")
    num_experts = _optional(t, "num_local_experts", None, int)
    if num_experts is None:
        num_experts = _optional(t, "num_experts", 128, int)

    return dict(
        vocab_size=_require(t, "vocab_size"),
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=_require(t, "num_key_value_heads"),
        head_dim=head_dim,
        rotary_dim=rotary_dim,
        rope_theta=float(theta),
        rms_norm_eps=float(_optional(t, "rms_norm_eps", 1e-6, (int, float))),
        max_position_embeddings=_optional(t, "max_position_embeddings", 1_048_576, int),
        dense_intermediate_size=_optional(t, "dense_intermediate_size", 12288, int),
        intermediate_size=_require(t, "intermediate_size"),
        shared_intermediate_size=_optional(t, "shared_intermediate_size", 3072, int),
        num_local_experts=num_experts,
        num_experts_per_tok=_optional(t, "num_experts_per_tok", 4, int),
        routed_scaling_factor=float(_optional(t, "routed_scaling_factor", 2.0, (int, float))),
        swiglu_alpha=float(_optional(t, "swiglu_alpha", 1.702, (int, float))),
        swiglu_limit=float(_optional(t, "swiglu_limit", 7.0, (int, float))),
        tie_word_embeddings=_optional(t, "tie_word_embeddings", False, bool),
        bos_token_id=None if (bos := t.get("bos_token_id", 200034)) is None else _check_kind("bos_token_id", bos, int),
        eos_token_id=eos,
        layer_types=_per_layer(t, "layer_types", sparse_freq, "sparse_attention_config.sparse_attention_freq",
                               (FULL_ATTENTION, SPARSE_ATTENTION), num_layers),
        mlp_layer_types=_per_layer(t, "mlp_layer_types", t.get("moe_layer_freq"), "moe_layer_freq",
                                   (DENSE_MLP, MOE_MLP), num_layers),
        msa=msa,
    )
