"""Training losses of M3: the causal LM loss and the MSA indexer's KL loss, over a training forward.

The training forward (`forward`) runs the model's own modules (norms, `Attention.project`/`output`, MLP/MoE,
embedding, lm_head) layer by layer, but computes attention itself in jnp, because the indexer's teacher needs
the main branch's attention probabilities, which the inference kernels never materialise. Its semantics are the
inference semantics (pallas_kernels/reference.py): the block selection IS `reference.indexer_topk` and the index
scores ARE `reference.block_scores`, and tests/test_training.py checks that its logits equal `model(input_ids)`.

Indexer KL (per MSA layer, per query token t, per KV group k; blocks m of the sequence):
    teacher[t, k, m] = sum_{s in block m} mean_{g in group k} P[t, k*G+g, s]
        P = the main branch's attention probabilities (dense during the indexer warm-up, over the selected
            blocks once sparse), so the teacher sums to 1 over the visible blocks;
    student[t, k, :] = softmax over the blocks visible to t of  I[t, k, m] * index_dim**-0.5
        I = block_scores: max over the block's visible keys of <iq, ik> (the scores selection ranks; the
            MSA training reference applies index_dim**-0.5, which does not change the ranking, only the
            student's temperature);
    KL = sum_m teacher * (log teacher - log student)  (0 log 0 = 0), averaged over tokens, groups and layers.
The indexer is detached from the backbone: its projections read `stop_gradient(x)` and the teacher is
`stop_gradient(P)`, so the KL's gradient reaches only the index-branch parameters (index_q/k and their norms),
and the LM loss cannot reach them (the selection is discrete). In the sparse phase the teacher is zero on
unselected blocks, so the KL also pushes the student's mass off them (MSA's own reference instead renormalises
both distributions over the selected tokens; the issue asks for the student over the visible blocks).

Memory: attention materialises [B, T, K, G, S] logits per layer (with `nnx.remat`, one layer at a time): fine
for the small models this trainer targets at 4-8K tokens; a flash-style kernel with a block-summed
probability output would be the path to longer contexts.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from m3jax.model.layers import matmul_precision
from m3jax.model.moe import MoE
from pallas_kernels import layout, reference

f32 = jnp.float32


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerStats:
    """What one decoder layer reports to the losses (None where the layer kind has no such thing)."""

    kl: jax.Array | None = None              # f32[]: mean indexer KL of an MSA layer
    expert_load: jax.Array | None = None     # i32[E]: routed (token, slot) pairs per expert of an MoE layer
    recall: jax.Array | None = None          # f32[B, T, K]: dense attention mass on the selected blocks (diagnostic)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ForwardOutput:
    logits: jax.Array                        # f32[B, T, V]
    kl: jax.Array                            # f32[]: indexer KL averaged over the MSA layers (0 without any)
    expert_load: list[jax.Array | None]      # per layer stack: i32[L, E] on MoE stacks, else None
    recall: list[jax.Array | None] | None = None   # per layer stack: f32[L, B, T, K] on MSA stacks (recall=True)


def causal_positions(batch: int, seq: int):
    return jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))


def attention(q_btnh, k_btkh, v_btkh, positions_bt, keep_btkm, block_size: int):
    """Causal GQA over the sequence, restricted to the blocks where keep is true (None: all visible blocks).

    Returns (o [B, T, N, H] in q's dtype, teacher f32[B, T, K, M]: attention probabilities averaged over each KV
    group's G heads and summed per block of `block_size` keys). Logits and softmax in float32.
    """
    b, t, n, h = q_btnh.shape
    kh = k_btkh.shape[2]
    s = k_btkh.shape[1]
    q = q_btnh.reshape(b, t, kh, n // kh, h)                                        # [B, T, K, G, H]
    prec = matmul_precision(q_btnh.dtype)             # float32 stays float32 on GPUs too (no TF32)
    logits = jnp.einsum("btkgh,bskh->btkgs", q, k_btkh, preferred_element_type=f32, precision=prec) * h ** -0.5
    mask = reference.visible_keys(positions_bt, s)[:, :, None, :]                    # [B, T, 1, S]
    if keep_btkm is not None:
        keep = jnp.repeat(keep_btkm, block_size, axis=-1)[..., :s]                   # [B, T, K, S]
        mask = mask & keep
    logits = jnp.where(mask[:, :, :, None, :], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)          # every query sees itself (its own block is always kept)
    o = jnp.einsum("btkgs,bskh->btkgh", probs.astype(v_btkh.dtype), v_btkh, preferred_element_type=f32,
                   precision=prec)
    m = layout.num_blocks(s, block_size)
    per_key = jnp.pad(probs.mean(axis=3), ((0, 0), (0, 0), (0, 0), (0, m * block_size - s)))
    teacher = per_key.reshape(b, t, kh, m, block_size).sum(-1)                       # [B, T, K, M]
    return o.reshape(b, t, n, h).astype(q_btnh.dtype), teacher


def indexer_kl(teacher_btkm, scores_btkm, positions_bt, block_size: int):
    """Mean over (token, KV group) of KL(teacher || softmax(scores over the visible blocks)); f32[].

    scores: block scores already scaled, -inf for blocks with no visible key. The teacher is used as given
    (callers pass it through stop_gradient)."""
    m = scores_btkm.shape[-1]
    visible = jnp.arange(m)[None, None, None, :] <= (positions_bt // block_size)[:, :, None, None]
    # A large finite stand-in for -inf keeps the masked terms' gradients exactly 0 (no inf - inf).
    logp = jax.nn.log_softmax(jnp.where(visible, scores_btkm, -1e30), axis=-1)
    pos = teacher_btkm > 0
    terms = jnp.where(pos, teacher_btkm * (jnp.log(jnp.where(pos, teacher_btkm, 1.0)) - logp), 0.0)
    return terms.sum(-1).mean()


def _index_scores(attn, x_btd, positions_bt, cos, sin, index=None):
    """Index branch on a detached input: (raw block scores f32[B, T, K, M], the same scaled for the student).

    `Attention.project` computes q/k/v as well; they are unused here and removed by XLA."""
    p = attn.project(jax.lax.stop_gradient(x_btd), cos, sin, index)
    ik_pages, page_table = layout.index_pages_from_sequence(p.ik_bti, attn.block_size)
    raw = reference.block_scores(p.iq_btki, ik_pages, page_table, positions_bt)
    return raw, raw * p.iq_btki.shape[-1] ** -0.5, (p.iq_btki, ik_pages, page_table)


def _selected_blocks(attn, index_inputs, positions_bt, num_blocks: int):
    """bool[B, T, K, M]: the blocks MSA selects (reference.indexer_topk, the inference selection)."""
    iq, ik_pages, page_table = index_inputs
    ids = reference.indexer_topk(jax.lax.stop_gradient(iq), jax.lax.stop_gradient(ik_pages), page_table,
                                 positions_bt, topk=attn.topk_blocks, local_blocks=attn.local_blocks)
    return (ids[..., None] == jnp.arange(num_blocks)).any(-2)


def layer_forward(layer, h_btd, positions_bt, cos, sin, *, sparse: bool, recall: bool = False, index=None):
    """One decoder layer of the training forward: (new h, LayerStats).

    index: the layer's index in its stack (LayerStack.scan: the routed experts are the stack's, read at it;
    gradients reach the stacked experts through it), None for a lone layer.

    sparse=False is the indexer warm-up: MSA layers attend densely (their indexer still learns from the dense
    teacher); sparse=True attends to the selected blocks, as inference does. recall=True also reports, per
    (token, KV group), the share of the layer's dense attention probability mass (averaged over the group's
    heads) that falls on the blocks the indexer selects: how much of dense attention the top-k keeps.
    """
    attn = layer.attn
    x = layer.input_norm(h_btd)
    p = attn.project(x, cos, sin, index)
    stats = LayerStats()
    if attn.sparse:
        raw, scaled, index_inputs = _index_scores(attn, x, positions_bt, cos, sin, index)
        selected = _selected_blocks(attn, index_inputs, positions_bt, raw.shape[-1]) if sparse or recall else None
        keep = selected if sparse else None
        o, teacher = attention(p.q_btnh, p.k_btkh, p.v_btkh, positions_bt, keep, attn.block_size)
        stats.kl = indexer_kl(jax.lax.stop_gradient(teacher), scaled, positions_bt, attn.block_size)
        if recall:
            dense = teacher if keep is None else attention(p.q_btnh, p.k_btkh, p.v_btkh, positions_bt, None,
                                                           attn.block_size)[1]
            stats.recall = jnp.where(selected, dense, 0.0).sum(-1)
    else:
        o, _ = attention(p.q_btnh, p.k_btkh, p.v_btkh, positions_bt, None, attn.block_size)
    h = h_btd + attn.output(o, index)
    if isinstance(layer.ffn, MoE):
        x = layer.post_attention_norm(h)
        ids, _ = layer.ffn.route(x.reshape(-1, x.shape[-1]))
        stats.expert_load = jnp.bincount(ids.reshape(-1), length=layer.ffn.router_bias_e.shape[-1])
    return layer.ffn_block(h, index), stats


def forward(model, input_ids, *, sparse: bool, remat: bool = False, recall: bool = False) -> ForwardOutput:
    """The training forward over int32 [B, T] tokens (positions 0..T-1 in every row).

    remat: recompute each layer's activations in the backward pass (`nnx.remat` around the layer body), so
    that only the residual stream between layers is kept. recall: also the selection recall of every MSA layer
    (see layer_forward; a diagnostic, it costs a second dense attention per MSA layer when sparse).
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    b, t = input_ids.shape
    positions = causal_positions(b, t)
    cos, sin = model.rope(positions)
    h = model.embed(input_ids)
    kls, loads, recalls = [], [], []

    def body(layer, index, h, _):
        return layer_forward(layer, h, positions, cos, sin, sparse=sparse, recall=recall, index=index)

    if remat:
        body = nnx.remat(body)
    for stack in model.stacks:
        h, stats = stack.scan(body, h)
        if stats.kl is not None:
            kls.append(stats.kl)                                                     # [L]
        loads.append(stats.expert_load)
        recalls.append(stats.recall)
    kl = jnp.concatenate(kls).mean() if kls else jnp.zeros((), f32)
    return ForwardOutput(model.logits(h), kl, loads, recalls if recall else None)


def lm_loss(logits_btv, targets_bt):
    """Mean next-token cross entropy (nats) in float32."""
    logp = jax.nn.log_softmax(logits_btv.astype(f32), axis=-1)
    return -jnp.take_along_axis(logp, targets_bt[..., None], axis=-1).mean()


__all__ = ["ForwardOutput", "LayerStats", "attention", "forward", "indexer_kl", "layer_forward", "lm_loss"]
