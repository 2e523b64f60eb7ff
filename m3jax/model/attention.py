"""Attention of M3: GQA with per-head Gemma QK-norm and partial NeoX RoPE; dense causal on full-attention
layers, MSA (index branch selects blocks, main branch attends to them) on sparse layers.

The attention math itself is not here: it runs through `pallas_kernels.dispatch` over a paged KV layout, so the
no-cache forward, the cached engine and the kernels share one definition (reference.py). Without a cache the
freshly projected keys are viewed as pages (`pallas_kernels.layout`), one page per MSA block.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from m3jax import cache as cache_lib
from m3jax.config import M3Config, SPARSE_ATTENTION
from m3jax.model.layers import (InPlace, RMSNorm, _init, apply_rope, matmul_precision, stacked_matmul,
                               stacked_matmul_path)
from m3jax.sharding import DATA, MODEL
from pallas_kernels import dispatch, layout

log = logging.getLogger(__name__)


# shard_map specs of the attention operands, for a batch axis `b` (DATA or None): heads on "model"
# ([B, T, heads, X] and [K, pages, R, H] pools), batch rows and page pools on "data" (each data shard owns its
# rows' pages), page tables and positions with their rows, the shared index-K pool on every "model" device.
def _heads(b):
    return P(b, None, MODEL, None)


def _kv_pool(b):
    return P(MODEL, b)


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
    ik_pages: jax.Array | None = None  # [P, R, I], sparse layers only (float8_e4m3fn in an FP8 index-K cache)
    ik_scale: jax.Array | None = None  # f32[P, R] per-token scale of an FP8 index-K cache (m3jax/cache.py)


class Attention(nnx.Module):
    """impl: the kernel choice (pallas_kernels.dispatch), fixed at construction like the MoE's (one per model,
    see M3ForCausalLM). With a mesh, paging, MSA selection and attention run inside `shard_map`: each device takes
    the query heads and the KV (= index) heads it holds on "model" (KV heads replicated by m3jax.sharding when "model" exceeds
    them) and the batch rows (with their pages) of its "data" shard, so the selection and the Pallas kernels,
    which XLA cannot partition itself, run locally with no collective.
    """

    def __init__(self, cfg: M3Config, attention_type: str, *, dtype, rngs: nnx.Rngs, mesh: Mesh | None = None,
                 impl: str | None = None):
        d, n, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.impl = impl
        self.mesh = mesh if mesh is not None and mesh.size > 1 else None
        self.data_shards = 1 if self.mesh is None else self.mesh.shape[DATA]
        self.sparse = attention_type == SPARSE_ATTENTION
        self.block_size = cfg.msa.block_size
        self.topk_blocks = cfg.msa.topk_blocks
        self.local_blocks = cfg.msa.local_blocks
        self.q_dnh = _init(rngs, (d, n, h), dtype, kind=InPlace)
        self.k_dkh = _init(rngs, (d, k, h), dtype, kind=InPlace)
        self.v_dkh = _init(rngs, (d, k, h), dtype, kind=InPlace)
        self.o_nhd = _init(rngs, (n, h, d), dtype, kind=InPlace)
        self.precision = matmul_precision(dtype)
        self.q_norm = RMSNorm(h, cfg.rms_norm_eps, dtype=dtype)
        self.k_norm = RMSNorm(h, cfg.rms_norm_eps, dtype=dtype)
        if self.sparse:
            i = cfg.msa.index_dim
            self.index_q_dki = _init(rngs, (d, cfg.msa.num_index_heads, i), dtype, kind=InPlace)
            self.index_k_di = _init(rngs, (d, i), dtype, kind=InPlace)
            self.index_q_norm = RMSNorm(i, cfg.rms_norm_eps, dtype=dtype)
            self.index_k_norm = RMSNorm(i, cfg.rms_norm_eps, dtype=dtype)

    def _matmul(self, x, name: str, layer, in_axes: int = 1):
        """x contracted with projection `name` (its layer `layer` of the stack, read in place; see
        m3jax.model.layers.stacked_matmul)."""
        return stacked_matmul(x, getattr(self, name)[...], layer, in_axes=in_axes, precision=self.precision,
                              impl=self.impl, mesh=self.mesh, rule=f"attn.{name}")

    def matmul_paths(self, rows: int) -> dict[str, str]:
        """{projection: what stacked_matmul runs for it at `rows` rows} (this module holding a stack's weights)."""
        names = ["q_dnh", "k_dkh", "v_dkh", "o_nhd"] + ["index_q_dki", "index_k_di"] * self.sparse
        return {name: stacked_matmul_path(rows, getattr(self, name)[...], in_axes=2 if name == "o_nhd" else 1,
                                          impl=self.impl, mesh=self.mesh, rule=f"attn.{name}") for name in names}

    def project(self, x_btd, cos, sin, layer=None) -> Projections:
        """q, k, v (and the index branch's iq, ik) of the normalised hidden state x: project -> norm -> RoPE.
        layer: None when the projections are this layer's own, else this layer's index in the stacked weights
        this module holds (LayerStack.scan)."""
        q = apply_rope(self.q_norm(self._matmul(x_btd, "q_dnh", layer)), cos, sin)
        k = apply_rope(self.k_norm(self._matmul(x_btd, "k_dkh", layer)), cos, sin)
        v = self._matmul(x_btd, "v_dkh", layer)
        if not self.sparse:
            return Projections(q, k, v)
        iq = apply_rope(self.index_q_norm(self._matmul(x_btd, "index_q_dki", layer)), cos, sin)
        ik = self.index_k_norm(self._matmul(x_btd, "index_k_di", layer))
        ik = apply_rope(ik[:, :, None, :], cos, sin)[:, :, 0, :]
        return Projections(q, k, v, iq, ik)

    def attend_sequence(self, p: Projections, positions_bt):
        """No-cache causal attention of the projections over the sequence itself; key slot s holds the token at
        position s. Returns (o [B, T, N, H], block_ids i32[B, T, K, topk] on sparse layers else None). On a mesh
        every device pages, selects and attends over its own rows and heads.
        """
        def local(p, pos):
            kv = self.sequence_kv(p)
            return self._attend(p, kv, pos, self.impl)

        b = self._data_axis(positions_bt.shape[0])
        return self._local(local, (p, positions_bt), (self._proj_specs(b), P(b)),
                           (_heads(b), _heads(b) if self.sparse else None))

    def forward(self, x_btd, positions_bt, cos, sin):
        """(output [B, T, D], block ids or None) of the no-cache attention of x (see attend_sequence)."""
        o, block_ids = self.attend_sequence(self.project(x_btd, cos, sin), positions_bt)
        return self.output(o), block_ids

    def attend_cached(self, p: Projections, kv: PagedKV, q_pos, layer_offset):
        """Write this step's keys into the cache pools, then attend over the cache: (o [B, T, N, H], new kv).

        kv holds a stack's pools (layers folded into the page axis, m3jax/cache.py) and a page table of page ids
        local to the data shard that owns the row; this layer's pages start at `layer_offset`
        (m3jax.cache.layer_offset) in each shard's pool. A query at position p writes to page
        `page_table[b, p // R]`, row p % R; padding (q_pos -1) writes to the sink. On a mesh the batch rows and pools are split over "data" (rows [d*B/D, (d+1)*B/D) own
        shard d's pages), heads over "model": each device writes and reads only its own pages.

        Full-attention layers pass dense_attention the promise contiguous_chunks=True: every row of a cached step
        holds consecutive positions of one request, then -1 padding (m3jax.model.cached.StepGroup's contract,
        how m3jax.runner lays out prompt chunks and decode rows). Because every row's keys are written before any
        row attends, a row's history (positions before its first) is in the cache, including earlier rows of the
        same prompt chunk. Which computation that gives is `dense_path` (on GPU, bf16, rows of >= 512 queries:
        cuDNN over the row's own chunk + the paged kernel over its history, merged by log-sum-exp).
        """
        b = DATA if self.data_shards > 1 else None
        if b is not None and q_pos.shape[0] % self.data_shards:
            raise ValueError(f"cached attention: {q_pos.shape[0]} batch rows cannot be split over data="
                             f"{self.data_shards} shards (each shard owns its rows' pages)")

        def local(p, kv, pos, offset):
            page, row = cache_lib.write_slots(pos, kv.page_table, self.block_size, offset)
            k = cache_lib.write_kv(kv.k_pages, p.k_btkh, page, row)
            v = cache_lib.write_kv(kv.v_pages, p.v_btkh, page, row)
            ik, ik_scale = kv.ik_pages, kv.ik_scale
            if ik is not None:
                ik, ik_scale = cache_lib.write_ik(ik, p.ik_bti, page, row, ik_scale)
            layer = PagedKV(k, v, kv.page_table + offset, ik, ik_scale)
            o, _ = self._attend(p, layer, pos, self.impl, contiguous_chunks=True)
            return o, PagedKV(k, v, kv.page_table, ik, ik_scale)

        kv_specs = self._kv_specs(b, kv)
        offset = jnp.asarray(layer_offset, jnp.int32)
        return self._local(local, (p, kv, q_pos, offset), (self._proj_specs(b), kv_specs, P(b), P()),
                           (_heads(b), kv_specs))

    def select_blocks(self, p: Projections, kv: PagedKV, q_pos):
        """MSA index branch alone: i32[B, T, K, topk] logical block ids per (query, KV group), -1 padded; global
        page ids (on a mesh: head-parallel, batch whole on every data shard). Used by the transformers parity
        test to compare selections layer by layer."""
        return self._local(lambda p, kv, pos: self._select(p, kv, pos, self.impl), (p, kv, q_pos),
                           (self._proj_specs(None), self._kv_specs(None, kv), P()), _heads(None))

    def _select(self, p: Projections, kv: PagedKV, q_pos, impl):
        return dispatch.indexer_topk(p.iq_btki, kv.ik_pages, kv.page_table, q_pos, topk=self.topk_blocks,
                                     local_blocks=self.local_blocks, ik_scale=kv.ik_scale, impl=impl)

    def _attend(self, p: Projections, kv: PagedKV, q_pos, impl, contiguous_chunks: bool = False):
        """(o [B, T, N, H] in the model dtype, the MSA block ids or None): MSA's two branches in one op on sparse
        layers (dispatch.msa: kernels may join the selection and the attention), causal GQA on full ones
        (contiguous_chunks: the caller's promise about q_pos, see attend_cached)."""
        if self.sparse:
            o, ids = dispatch.msa(p.q_btnh, kv.k_pages, kv.v_pages, kv.page_table, q_pos, p.iq_btki, kv.ik_pages,
                                  topk=self.topk_blocks, local_blocks=self.local_blocks, ik_scale=kv.ik_scale,
                                  impl=impl)
            return o.astype(p.q_btnh.dtype), ids
        o = dispatch.dense_attention(p.q_btnh, kv.k_pages, kv.v_pages, kv.page_table, q_pos, impl=impl,
                                     contiguous_chunks=contiguous_chunks)
        return o.astype(p.q_btnh.dtype), None

    def msa_path(self, num_queries: int) -> str:
        """The computation this MSA layer runs for rows of `num_queries` queries: dispatch.msa_path of this layer's
        kernel choice, e.g. "gpu:two-step" (indexer_topk, then sparse_attention), "reference" on CPU."""
        if not self.sparse:
            raise ValueError("msa_path: this is a full-attention layer; its attention is dense_attention")
        return dispatch.msa_path(num_queries, impl=self.impl)

    def dense_path(self, num_queries: int, dtype, *, cached: bool = True) -> str:
        """The computation this full-attention layer's dense attention runs for rows of `num_queries` queries of
        `dtype` (the model's): pallas_kernels.dispatch.dense_attention_path of this layer's kernel choice, with
        the cached step's contiguous_chunks promise (cached=True) or without it (the no-cache forward, whose
        positions are the caller's and carry no promise). E.g. "gpu:cudnn-chunk+paged-history" for a bf16
        prefill row of 512+ queries on GPU, "gpu:paged" for a decode row or the Engine's 64-token rows,
        "reference" on CPU."""
        if self.sparse:
            raise ValueError("dense_path: this is an MSA (sparse) layer; its attention is sparse_attention")
        return dispatch.dense_attention_path(dtype, num_queries, contiguous_chunks=cached, impl=self.impl)

    def _data_axis(self, batch: int):
        """DATA when the batch splits over the data shards, else None (rows whole on every data shard)."""
        if self.data_shards == 1:
            return None
        if batch % self.data_shards == 0:
            return DATA
        log.warning("attention: batch %d is not a multiple of data=%d; rows are replicated over 'data'", batch,
                    self.data_shards)
        return None

    def _proj_specs(self, b) -> Projections:
        sparse = self.sparse
        return Projections(_heads(b), _heads(b), _heads(b), _heads(b) if sparse else None, P(b) if sparse else None)

    @staticmethod
    def _kv_specs(b, kv: PagedKV) -> PagedKV:
        return PagedKV(_kv_pool(b), _kv_pool(b), P(b), None if kv.ik_pages is None else P(b),
                       None if kv.ik_scale is None else P(b))

    def _local(self, fn, args, in_specs, out_specs):
        """fn on each device's rows and heads (shard_map: the Pallas kernels cannot be partitioned by XLA)."""
        if self.mesh is None:
            return fn(*args)
        return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)

    def output(self, o_btnh, layer=None):
        return self._matmul(o_btnh, "o_nhd", layer, in_axes=2)

    def sequence_kv(self, p: Projections) -> PagedKV:
        """This step's own keys viewed as pages (no cache): token s of a row sits in page slot s."""
        k_pages, page_table = layout.kv_pages_from_sequence(p.k_btkh, self.block_size)
        v_pages, _ = layout.kv_pages_from_sequence(p.v_btkh, self.block_size)
        ik_pages = layout.index_pages_from_sequence(p.ik_bti, self.block_size)[0] if self.sparse else None
        return PagedKV(k_pages, v_pages, page_table, ik_pages)

    def __call__(self, x_btd, positions_bt, cos, sin):
        return self.forward(x_btd, positions_bt, cos, sin)[0]
