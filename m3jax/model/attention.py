"""Attention of M3: GQA with per-head Gemma QK-norm and partial NeoX RoPE; dense causal on full-attention
layers, MSA (index branch selects blocks, main branch attends to them) on sparse layers.

The attention math itself is not here: it runs through `pallas_kernels.dispatch` over a paged KV layout, so the
no-cache forward, the cached engine and the kernels share one definition (reference.py). Without a cache the
freshly projected keys are viewed as pages (`pallas_kernels.layout`), one page per MSA block.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from m3jax.config import M3Config, SPARSE_ATTENTION
from m3jax.model.layers import RMSNorm, _init, apply_rope
from m3jax.sharding import MODEL
from pallas_kernels import dispatch, layout


# shard_map specs of the attention ops' operands: heads on "model" ([B, T, heads, X] and [K, P, R, H] pools);
# page tables, positions and the index-K pool whole on every device.
_HEADS, _KV_POOL, _ALL = P(None, None, MODEL, None), P(MODEL), P()


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Projections:
    """Per-token attention inputs after norm + RoPE. iq/ik are None on full-attention layers."""

    q_btnh: jax.Array
    k_btkh: jax.Array
    v_btkh: jax.Array
    iq_btki: jax.Array | None = None
    ik_bti: jax.Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedKV:
    """The keys a step attends to, in the paged layout of pallas_kernels/reference.py."""

    k_pages: jax.Array                 # [K, P, R, H]
    v_pages: jax.Array                 # [K, P, R, H]
    page_table: jax.Array              # i32[B, M]
    ik_pages: jax.Array | None = None  # [P, R, I], sparse layers only


class Attention(nnx.Module):
    """With a mesh, the attention ops run head-parallel inside `shard_map`: each device takes the query heads and
    the KV (= index) heads it holds on "model" (KV heads replicated by m3jax.sharding when "model" exceeds them),
    so MSA selection and the Pallas kernels, which XLA cannot partition itself, run locally with no collective.
    """

    def __init__(self, cfg: M3Config, attention_type: str, *, dtype, rngs: nnx.Rngs, mesh: Mesh | None = None):
        d, n, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.mesh = mesh if mesh is not None and mesh.shape[MODEL] > 1 else None
        self.sparse = attention_type == SPARSE_ATTENTION
        self.block_size = cfg.msa.block_size
        self.topk_blocks = cfg.msa.topk_blocks
        self.local_blocks = cfg.msa.local_blocks
        self.q_dnh = _init(rngs, (d, n, h), dtype)
        self.k_dkh = _init(rngs, (d, k, h), dtype)
        self.v_dkh = _init(rngs, (d, k, h), dtype)
        self.o_nhd = _init(rngs, (n, h, d), dtype)
        self.q_norm = RMSNorm(h, cfg.rms_norm_eps, dtype=dtype)
        self.k_norm = RMSNorm(h, cfg.rms_norm_eps, dtype=dtype)
        if self.sparse:
            i = cfg.msa.index_dim
            self.index_q_dki = _init(rngs, (d, cfg.msa.num_index_heads, i), dtype)
            self.index_k_di = _init(rngs, (d, i), dtype)
            self.index_q_norm = RMSNorm(i, cfg.rms_norm_eps, dtype=dtype)
            self.index_k_norm = RMSNorm(i, cfg.rms_norm_eps, dtype=dtype)

    def project(self, x_btd, cos, sin) -> Projections:
        """q, k, v (and the index branch's iq, ik) of the normalised hidden state x: project -> norm -> RoPE."""
        q = apply_rope(self.q_norm(jnp.einsum("btd,dnh->btnh", x_btd, self.q_dnh[...])), cos, sin)
        k = apply_rope(self.k_norm(jnp.einsum("btd,dkh->btkh", x_btd, self.k_dkh[...])), cos, sin)
        v = jnp.einsum("btd,dkh->btkh", x_btd, self.v_dkh[...])
        if not self.sparse:
            return Projections(q, k, v)
        iq = apply_rope(self.index_q_norm(jnp.einsum("btd,dki->btki", x_btd, self.index_q_dki[...])), cos, sin)
        ik = self.index_k_norm(jnp.einsum("btd,di->bti", x_btd, self.index_k_di[...]))
        ik = apply_rope(ik[:, :, None, :], cos, sin)[:, :, 0, :]
        return Projections(q, k, v, iq, ik)

    def attend(self, p: Projections, kv: PagedKV, q_pos, *, block_ids=None, impl=None):
        """o [B, T, N, H] in the model dtype: MSA on sparse layers (selecting blocks unless `block_ids` are
        given), causal GQA on full layers."""
        if self.sparse:
            if block_ids is None:
                block_ids = self.select_blocks(p, kv, q_pos, impl=impl)
            op = functools.partial(dispatch.sparse_attention, impl=impl)
            o = self._on_heads(op, (p.q_btnh, kv.k_pages, kv.v_pages, kv.page_table, q_pos, block_ids),
                               (_HEADS, _KV_POOL, _KV_POOL, _ALL, _ALL, _HEADS), _HEADS)
        else:
            op = functools.partial(dispatch.dense_attention, impl=impl)
            o = self._on_heads(op, (p.q_btnh, kv.k_pages, kv.v_pages, kv.page_table, q_pos),
                               (_HEADS, _KV_POOL, _KV_POOL, _ALL, _ALL), _HEADS)
        return o.astype(p.q_btnh.dtype)

    def select_blocks(self, p: Projections, kv: PagedKV, q_pos, *, impl=None):
        """MSA index branch: i32[B, T, K, topk] logical block ids per (query, KV group), -1 padded."""
        op = functools.partial(dispatch.indexer_topk, topk=self.topk_blocks, local_blocks=self.local_blocks,
                               impl=impl)
        return self._on_heads(op, (p.iq_btki, kv.ik_pages, kv.page_table, q_pos), (_HEADS, _ALL, _ALL, _ALL),
                              _HEADS)

    def _on_heads(self, op, args, in_specs, out_spec):
        if self.mesh is None:
            return op(*args)
        return jax.shard_map(op, mesh=self.mesh, in_specs=in_specs, out_specs=out_spec, check_vma=False)(*args)

    def output(self, o_btnh):
        return jnp.einsum("btnh,nhd->btd", o_btnh, self.o_nhd[...])

    def sequence_kv(self, p: Projections) -> PagedKV:
        """This step's own keys viewed as pages (no cache): token s of a row sits in page slot s."""
        k_pages, page_table = layout.kv_pages_from_sequence(p.k_btkh, self.block_size)
        v_pages, _ = layout.kv_pages_from_sequence(p.v_btkh, self.block_size)
        ik_pages = layout.index_pages_from_sequence(p.ik_bti, self.block_size)[0] if self.sparse else None
        return PagedKV(k_pages, v_pages, page_table, ik_pages)

    def forward(self, x_btd, positions_bt, cos, sin, *, impl=None):
        """No-cache causal attention over the sequence itself; key slot s holds the token at position s.

        Returns (output [B, T, D], block_ids i32[B, T, K, topk] on sparse layers else None).
        """
        p = self.project(x_btd, cos, sin)
        kv = self.sequence_kv(p)
        block_ids = self.select_blocks(p, kv, positions_bt, impl=impl) if self.sparse else None
        o = self.attend(p, kv, positions_bt, block_ids=block_ids, impl=impl)
        return self.output(o), block_ids

    def __call__(self, x_btd, positions_bt, cos, sin, *, impl=None):
        return self.forward(x_btd, positions_bt, cos, sin, impl=impl)[0]
