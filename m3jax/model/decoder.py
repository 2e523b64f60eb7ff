"""The decoder layer (the one layer body of every forward) and stacks of consecutive layers of one kind.

`DecoderLayer.forward` is the only place a layer's computation is written. It runs over one or more *groups* of
tokens (the no-cache forward has one, the cached step a decode group and a prefill group) and takes the keys its
attention reads from a *key source*: `SequenceKeys` (no cache: the group's own keys) or
`m3jax.model.cached.CachedKeys` (the paged cache, written first). Only the key source differs between the
no-cache forward and the engine's step.

`LayerStack.scan` runs a stack's layers: each step gets its layer's slice of the stacked parameters (norms,
router), except the `InPlace` ones (every matmul weight: attention projections, MLPs, routed experts), which it
gets whole with the layer index, so that the kernels read them where they lie (see `m3jax.model.layers.InPlace`).
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from m3jax.config import M3Config, MOE_MLP
from m3jax.model.attention import Attention, Projections
from m3jax.model.layers import MLP, InPlace, RMSNorm
from m3jax.model.moe import MoE


class KeySource(Protocol):
    def attend(self, attn: Attention, group: int, p: Projections) -> tuple[jax.Array, "KeySource", jax.Array | None]:
        """(o [B, T, N, H], the key source after this group's keys were added, MSA block ids or None)."""


class SequenceKeys:
    """No cache: each group attends over its own tokens, the token at position s in key slot s."""

    def __init__(self, positions: Sequence[jax.Array]):
        self.positions = positions           # per group i32[B, T]

    def attend(self, attn: Attention, group: int, p: Projections):
        o, block_ids = attn.attend_sequence(p, self.positions[group])
        return o, self, block_ids


class DecoderLayer(nnx.Module):
    """Pre-norm residual block: h += attn(norm(h)); h += ffn(norm(h)). `impl` (the model's kernel choice) goes to
    attention and MoE alike."""

    def __init__(self, cfg: M3Config, attention_type: str, mlp_type: str, *, dtype, rngs: nnx.Rngs,
                 mesh: Mesh | None = None, impl: str | None = None, fp8_experts: bool = False):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.attn = Attention(cfg, attention_type, dtype=dtype, rngs=rngs, mesh=mesh, impl=impl)
        self.post_attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.ffn = (MoE(cfg, dtype=dtype, rngs=rngs, mesh=mesh, impl=impl, fp8_experts=fp8_experts)
                    if mlp_type == MOE_MLP
                    else MLP(cfg, cfg.dense_intermediate_size, dtype=dtype, rngs=rngs, mesh=mesh, impl=impl))

    def forward(self, hs: Sequence[jax.Array], ropes: Sequence[tuple[jax.Array, jax.Array]], keys: KeySource,
                index=None):
        """One layer over groups of tokens hs (each [B, T, D], with its RoPE (cos, sin)).

        Attention runs per group (each group reads `keys`, which may grow with it); the feed-forward block runs
        once over the tokens of all groups together ([1, sum B*T, D]), so the MoE sees one batch of rows.
        index: this layer's index in its stack when its InPlace parameters are the stack's (LayerStack.scan),
        None for a lone layer.
        Returns (new hs, the key source after this layer, per group MSA block ids or None).
        """
        after_attn, block_ids = [], []
        for i, (h, (cos, sin)) in enumerate(zip(hs, ropes)):
            p = self.attn.project(self.input_norm(h), cos, sin, index)
            o, keys, ids = keys.attend(self.attn, i, p)
            after_attn.append(h + self.attn.output(o, index))
            block_ids.append(ids)
        if len(after_attn) == 1:
            return [self.ffn_block(after_attn[0], index)], keys, block_ids
        d = after_attn[0].shape[-1]
        flat = self.ffn_block(jnp.concatenate([h.reshape(1, -1, d) for h in after_attn], axis=1), index)
        out, start = [], 0
        for h in after_attn:
            n = h.shape[0] * h.shape[1]
            out.append(flat[:, start:start + n].reshape(h.shape))
            start += n
        return out, keys, block_ids

    def ffn_block(self, h, index=None):
        """h + ffn(norm(h)): the second half of the layer (benchmarks time it on its own).

        index: None when every parameter is this layer's own; else an int32 scalar, this layer's index in its
        stack, whose InPlace parameters ([L, ...]) this layer then holds whole."""
        x = self.post_attention_norm(h)
        return h + self.ffn(x, layer=index)

    def __call__(self, h, positions, cos, sin):
        """The no-cache layer over one sequence batch: new h."""
        return self.forward([h], [(cos, sin)], SequenceKeys([positions]))[0][0]


class LayerStack(nnx.Module):
    """`num_layers` consecutive DecoderLayers of one kind; parameters carry a leading layer axis.

    Scanning keeps compile time flat in the layer count (the released model is two stacks: 3 + 57 layers). A
    step of the scan gets its layer's slice of each stacked parameter, except the `InPlace` ones (every matmul
    weight: the attention projections, the dense and shared MLPs, the routed experts and their MXFP8 exponents):
    those it gets whole, [L, ...], with the layer index, and the kernels read layer l where it lies
    (m3jax.model.layers.stacked_matmul, dispatch.moe). So no matmul weight is sliced (copied) per step, and the
    kernels see the whole stack's shape (pallas_kernels/gpu/moe.py: an MXFP8 stack of M3 takes the direct e4m3
    loads, one layer on its own would not).
    """

    def __init__(self, cfg: M3Config, first_layer: int, num_layers: int, attention_type: str, mlp_type: str,
                 *, dtype, rngs: nnx.Rngs, mesh: Mesh | None = None, impl: str | None = None,
                 fp8_experts: bool = False):
        self.first_layer = first_layer
        self.num_layers = num_layers
        self.attention_type = attention_type
        self.mlp_type = mlp_type

        @nnx.split_rngs(splits=num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(r):
            return DecoderLayer(cfg, attention_type, mlp_type, dtype=dtype, rngs=r, mesh=mesh, impl=impl,
                                fp8_experts=fp8_experts)

        self.layers = make(rngs)

    def _partition(self):
        """(graphdef, the InPlace parameters [L, ...], every other parameter [L, ...]) of the stacked layers."""
        return nnx.split(self.layers, InPlace, ...)

    def scan(self, body: Callable, carry, xs=None):
        """Run body(layer, index, carry, x) -> (carry, y) over the stacked layers; xs/ys have a leading layer axis.

        index: the layer's index in the stack (int32 scalar). `layer` holds its slice of every parameter except
        the InPlace ones, which it holds whole (closed over by the scan, never sliced); its modules read them at
        `index` (DecoderLayer.forward(..., index=index)).
        """
        graphdef, whole, sliced = self._partition()

        def step(c, isx):
            i, s, x = isx
            # copy=True: the step's InPlace Variables must be made inside the scan's trace (nnx.remat around
            # `body` updates its inputs' Variables; the closed-over `whole` ones belong to the outer trace).
            return body(nnx.merge(graphdef, whole, s, copy=True), i, c, x)

        return jax.lax.scan(step, carry, (jnp.arange(self.num_layers, dtype=jnp.int32), sliced, xs))

    def forward(self, h, positions, cos, sin):
        """(h, block ids stacked over the layers [L, B, T, K, topk], or None for full-attention stacks)."""
        def body(layer, index, h, _):
            hs, _, ids = layer.forward([h], [(cos, sin)], SequenceKeys([positions]), index)
            return hs[0], ids[0]

        return self.scan(body, h)

    def __call__(self, h, positions, cos, sin):
        return self.forward(h, positions, cos, sin)[0]
