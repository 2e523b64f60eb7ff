"""Paged KV + index-K cache (device arrays): layout and writes.

Layout (K KV heads, P pages per layer, R = rows per page = the MSA block size, so one selected block is one page):

  per layer    K/V pages  [K, P, R, H]   head-major: one (head, page) tile is contiguous
               index-K    [P, R, I]      sparse (MSA) layers only: the shared index-k head, post norm + RoPE
               (FP8 index-K, `fp8_index_k=True`: index-K float8_e4m3fn [P, R, I] + ik_scale float32 [P, R], one
               scale per token = amax / 448, pallas_kernels.layout.quantize_index_k; the indexers read the key
               as codes * scale. 132 instead of 256 bytes per token and MSA layer at I = 128: half of what the
               decode indexer reads, which dominates decode traffic at long context.)
  per stack    the L layers of one LayerStack are stored in one pool with the layer folded into the page axis:
               k/v `[K, L*P, R, H]`, ik `[L*P, R, I]`; layer l's page p sits at l*P + p (`layer_offset`).
               A layer's view is `k[:, l*P:(l+1)*P]`, exactly the per-layer layout above.

  per data shard  on a mesh, each "data" shard d owns a pool of its own: the arrays are `[K, D*L*P, R, H]`
               with shard d's `[K, L*P, R, H]` (the layout above) at pages d*L*P ... (d+1)*L*P - 1, split
               over "data" (and the KV heads over "model"). Page tables hold ids local to the row's shard.

Folding the layer into the page axis lets the cached forward keep the whole pool in the carry of the layer
scan and update it in place (a scatter), and lets an attention kernel read layer l through the ordinary page
table shifted by l*P: no per-layer slice of the pool is ever copied. Page 0 of every layer (l*P) is the sink
that padding tokens write to; the allocator never hands it out.

Which request owns which page is host state: `m3jax.scheduler.PageAllocator`, one per data shard.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from m3jax.config import M3Config, SPARSE_ATTENTION
from m3jax.distributed import min_over_processes
from m3jax.sharding import DATA, MODEL
from pallas_kernels.layout import quantize_index_k

log = logging.getLogger(__name__)

SINK_PAGE = 0


class OutOfPages(RuntimeError):
    """The page pool cannot satisfy an allocation or does not fit in memory."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StackCache:
    """The cache of one LayerStack: L layers folded into the page axis (see the module docstring)."""

    k_pages: jax.Array                 # [K, L*P, R, H]
    v_pages: jax.Array                 # [K, L*P, R, H]
    ik_pages: jax.Array | None = None  # [L*P, R, I], MSA stacks only (float8_e4m3fn with an FP8 index-K cache)
    ik_scale: jax.Array | None = None  # f32[L*P, R]: per-token scale of an FP8 index-K cache, else None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """One StackCache per LayerStack of the model, in order; `num_pages` physical pages per layer in each of the
    `num_shards` data shards' pools."""

    stacks: list[StackCache]
    num_pages: int = dataclasses.field(metadata=dict(static=True))
    page_size: int = dataclasses.field(metadata=dict(static=True))
    num_shards: int = dataclasses.field(default=1, metadata=dict(static=True))

    @property
    def fp8_index_k(self) -> bool:
        """Whether index-K is stored as float8_e4m3fn codes with a float32 scale per token."""
        return any(s.ik_scale is not None for s in self.stacks)

    def layer_k(self, layer: int) -> jax.Array:
        """[K, S*P, R, H]: the K pages of global layer `layer`, data shard s's pages at s*P... (a copy; for tests
        and debugging)."""
        i, l = self._locate(layer)
        pool = self.stacks[i].k_pages
        k, rest = pool.shape[0], pool.shape[2:]
        split = pool.reshape(k, self.num_shards, -1, *rest)          # [K, S, L*P, R, H]
        start = layer_offset(l, self.num_pages)
        return split[:, :, start:start + self.num_pages].reshape(k, -1, *rest)

    def _locate(self, layer: int) -> tuple[int, int]:
        n = 0
        for i, st in enumerate(self.stacks):
            num = st.k_pages.shape[1] // (self.num_pages * self.num_shards)
            if layer < n + num:
                return i, layer - n
            n += num
        raise IndexError(f"layer {layer} out of range (the cache has {n} layers)")


def layer_offset(layer, num_pages: int):
    """Where layer `layer` of a stack starts on the page axis of the stack's pool in each data shard (layers
    folded into the page axis: layer l's page p is l*P + p). The one place this offset is defined; `layer` may be
    traced (the layer scan's index)."""
    return layer * num_pages


def bytes_per_page(cfg: M3Config, dtype, *, data: int = 1, model: int = 1, fp8_index_k: bool = False) -> int:
    """One device's bytes for one more page per layer in every data shard's pool (K + V everywhere, index-K on
    MSA layers: in `dtype`, or 1-byte codes + a 4-byte scale per token with fp8_index_k), in the layout of
    `cache_layout` on a ("data", "model") mesh of these sizes."""
    layout = cache_layout(cfg, 1, data=data, model=model, fp8_index_k=fp8_index_k)
    pools = jax.tree.leaves(layout, is_leaf=lambda x: isinstance(x, PoolLayout))
    sizes = {DATA: data, MODEL: model}
    return sum(math.prod(p.device_shape(sizes)) * jnp.dtype(p.dtype or dtype).itemsize for p in pools)


def pages_per_sequence(num_tokens: int, page_size: int) -> int:
    """Pages that hold num_tokens tokens (ceiling division)."""
    return -(-num_tokens // page_size)


def num_pages_for_memory(cfg: M3Config, dtype, *, max_pages: int, memory_fraction: float = 0.5,
                         device: jax.Device | None = None, mesh=None, fp8_index_k: bool = False) -> int:
    """Pages per layer and data shard that fit in `memory_fraction` of the free memory of the device with the
    least free memory (`device`, the mesh's devices, or the first device), at most `max_pages`, at least 2.

    On a mesh a device holds its share of the pools (its KV heads on "model", its data shard's pages; see
    cache_layout); cfg is the config the cache serves. Devices that report no memory statistics (CPU) get
    `max_pages`. The rest of the free memory is left for activations and the attention workspace of a step.
    """
    if not 0 < memory_fraction <= 1:
        raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
    devices = [device] if device is not None else list(mesh.devices.flat) if mesh is not None else jax.devices()[:1]
    if jax.process_count() > 1:           # multi-host: this host's devices here, the minimum over hosts below
        devices = [d for d in devices if d.process_index == jax.process_index()]
    free = None
    for d in devices:
        try:
            stats = d.memory_stats()
        except Exception:          # noqa: BLE001 - backends without statistics raise assorted errors
            stats = None
        if not stats or "bytes_limit" not in stats:
            free = -1
            break
        left = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        free = left if free is None else min(free, left)
    free = min_over_processes(-1 if free is None else free)    # every process must size the pool alike
    if free < 0:
        return max_pages
    sizes = dict(mesh.shape) if mesh is not None else {DATA: 1, MODEL: 1}
    per_page = bytes_per_page(cfg, dtype, data=sizes[DATA], model=sizes[MODEL], fp8_index_k=fp8_index_k)
    fit = int(free * memory_fraction) // per_page
    if fit < 2:
        raise OutOfPages(f"free device memory ({free / 2**30:.2f} GiB x {memory_fraction}) holds {fit} pages of "
                         f"{per_page / 2**20:.2f} MiB; at least 2 (sink + one) are needed")
    return min(fit, max_pages)


@dataclasses.dataclass(frozen=True)
class PoolLayout:
    """Global shape of one cache pool, its PartitionSpec over ("data", "model") and its dtype (None: the cache's
    dtype, the model's by default)."""

    shape: tuple[int, ...]
    spec: P
    dtype: str | None = None

    def device_shape(self, mesh_shape: dict[str, int]) -> tuple[int, ...]:
        """The shape of one device's shard of the pool on a mesh of these axis sizes."""
        spec = tuple(self.spec) + (None,) * (len(self.shape) - len(self.spec))
        return tuple(n // (mesh_shape[a] if a is not None else 1) for n, a in zip(self.shape, spec))


def cache_layout(cfg: M3Config, num_pages: int, *, data: int = 1, model: int = 1,
                 fp8_index_k: bool = False) -> list[StackCache]:
    """The pools of every LayerStack as PoolLayouts (StackCaches of them), for `num_pages` pages per layer in
    each of `data` shards' pools. cfg is the config the cache serves (KV heads already replicated for the mesh);
    K/V heads are split over "model" when it divides them, else whole on every "model" device. fp8_index_k:
    index-K as float8_e4m3fn codes plus a float32 scale pool [pages, R] (see the module docstring). init_cache
    allocates exactly this; benchmarks/memory_plan.py sizes caches with it."""
    k, r, h, i = cfg.num_key_value_heads, cfg.msa.block_size, cfg.head_dim, cfg.msa.index_dim
    heads = MODEL if k % model == 0 else None
    stacks = []
    for first, num_layers, attention_type, _ in cfg.layer_groups:
        n = data * num_layers * num_pages
        kv = PoolLayout((k, n, r, h), P(heads, DATA))
        ik = scale = None
        if attention_type == SPARSE_ATTENTION:
            ik = PoolLayout((n, r, i), P(DATA), "float8_e4m3fn" if fp8_index_k else None)
            scale = PoolLayout((n, r), P(DATA), "float32") if fp8_index_k else None
        stacks.append(StackCache(kv, kv, ik, scale))
    return stacks


def _device_of(model):
    """The device of the model's parameters (one device: no mesh), or the default device."""
    for x in jax.tree.leaves(nnx.state(model, nnx.Param)):
        if isinstance(x, jax.Array) and len(x.devices()) == 1:
            return next(iter(x.devices()))
    return jax.devices()[0]


def init_cache(model, num_pages: int, dtype=None, mesh=None, *, fp8_index_k: bool = False) -> KVCache:
    """A zeroed KVCache for `model` (an M3ForCausalLM) with `num_pages` pages per layer (page 0 = sink) in every
    data shard's pool. fp8_index_k: index-K pools as float8_e4m3fn codes + float32 per-token scales (a zero
    scale decodes unwritten rows to 0, as the bf16 pool's zeros).

    mesh ("data", "model"): one pool per "data" shard, split over "data" on the page axis; K/V pools are split
    over "model" on their KV-head axis (the heads are replicated at load time to match, see m3jax.sharding)
    when it divides them, else whole there; the index-K pools are whole on every "model" device.
    """
    if num_pages < 2:
        raise ValueError(f"num_pages must be >= 2 (page 0 is the sink), got {num_pages}")
    if mesh is not None and mesh.size > 1 and mesh != getattr(model, "mesh", None):
        # The pools are split over the mesh and read through the model's shard_map: they must be the same mesh.
        raise ValueError("cache: mesh is not the mesh the model was placed on; load it with "
                         "m3jax.load(path, mesh=mesh) or place it with m3jax.params.shard_model(model, mesh)")
    dtype = jnp.dtype(dtype or model.dtype)
    sizes = {DATA: 1, MODEL: 1} if mesh is None else dict(mesh.shape)
    # Without a mesh: committed to the model's device, as a step's output pools are. An uncommitted input would
    # make a jitted step's first call a different program from every later one (each compiled on its own).
    single = None if mesh is not None else SingleDeviceSharding(_device_of(model))
    layout = cache_layout(model.config, num_pages, data=sizes[DATA], model=sizes[MODEL], fp8_index_k=fp8_index_k)

    def zeros(pool: PoolLayout | None):
        if pool is None:
            return None
        local = pool.device_shape(sizes)
        if len(local) == 4 and math.prod(local) >= 2**31:
            log.warning("cache: a device's K/V pool has %d elements (>= 2**31; layers are folded into the page "
                        "axis): kernels that index pages with 32-bit offsets would overflow; use fewer pages or "
                        "check the kernel", math.prod(local))
        pool_dtype = jnp.dtype(pool.dtype or dtype)
        sharding = single if mesh is None else NamedSharding(mesh, pool.spec)
        return jax.jit(lambda: jnp.zeros(pool.shape, pool_dtype), out_shardings=sharding)()

    stacks = [StackCache(zeros(s.k_pages), zeros(s.v_pages), zeros(s.ik_pages), zeros(s.ik_scale)) for s in layout]
    return KVCache(stacks, num_pages, model.config.msa.block_size, sizes[DATA])


def write_slots(q_pos, page_table, page_size: int, offset):
    """(page, row) i32[B, T] where each query's keys go: page_table[b, pos // R] + offset, row pos % R; padding
    (q_pos -1) goes to the sink page (0 + offset), row 0."""
    valid = q_pos >= 0
    pos = jnp.maximum(q_pos, 0)
    page = jnp.take_along_axis(page_table, pos // page_size, axis=1)
    return jnp.where(valid, page, 0) + offset, jnp.where(valid, pos % page_size, 0)


def _set(pool, index, vals):
    """pool.at[index].set(vals.astype(pool.dtype)). On the CPU the scatter runs on the bit patterns (unsigned ints
    of the same width; the same bytes land): XLA's CPU backend scatters into a bf16 or fp8 array by converting the
    whole array to float32 and back, and a pool holds every layer's pages (a 0.9 GB pool, 8 decode rows: 1.53 ->
    0.86 s per step; the two bitcasts still copy the pool there). Other backends scatter the pool as it is."""
    vals = vals.astype(pool.dtype)
    if not (jnp.issubdtype(pool.dtype, jnp.floating) and pool.dtype.itemsize < 4):     # float32 / ints: natively
        return pool.at[index].set(vals)
    bits = {1: jnp.uint8, 2: jnp.uint16}[pool.dtype.itemsize]

    def as_bits(pool, vals):
        new = jax.lax.bitcast_convert_type(vals, bits)
        return jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(pool, bits).at[index].set(new), pool.dtype)

    return jax.lax.platform_dependent(pool, vals, cpu=as_bits, default=lambda pool, vals: pool.at[index].set(vals))


def write_kv(pool_kprh, new_btkh, page_bt, row_bt):
    """pool[:, page[b,t], row[b,t], :] = new[b, t]."""
    return _set(pool_kprh, (slice(None), page_bt, row_bt), jnp.moveaxis(new_btkh, 2, 0))     # vals [K, B, T, H]


def write_ik(pool_pri, new_bti, page_bt, row_bt, scale_pr=None):
    """Write index keys new[b, t] to pool[page[b,t], row[b,t]]; returns (pool, scale pool). With an FP8 index-K
    cache (scale_pr f32[P, R] given, pool float8_e4m3fn) the keys are quantised with one scale per token
    (pallas_kernels.layout.quantize_index_k) and codes and scale are written together; else scale_pr is None
    and stays None."""
    if scale_pr is None:
        return _set(pool_pri, (page_bt, row_bt), new_bti), None
    if pool_pri.dtype != jnp.float8_e4m3fn:
        raise ValueError(f"write_ik: a scale pool goes with a float8_e4m3fn index-K pool, got {pool_pri.dtype}")
    codes, scale = quantize_index_k(new_bti)
    return _set(pool_pri, (page_bt, row_bt), codes), _set(scale_pr, (page_bt, row_bt), scale)


def max_blocks(max_seq_len: int, page_size: int) -> int:
    """The page-table width of a request of up to max_seq_len tokens."""
    return max(1, pages_per_sequence(max_seq_len, page_size))
