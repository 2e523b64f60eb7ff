"""The optax train step for any M3Config, and the Orbax train state with resume.

- Optimizer: AdamW (weight decay on matrices only) with a linear warm-up and cosine decay of the learning rate,
  after clipping the global gradient norm.
- Schedule: the step count and warm-up are arguments of the compiled step (`Trainer.set_schedule`), so a
  time-boxed run (benchmarks/train_default.py) times its steps first and then fixes its length without compiling
  again; `train(stop_at=...)` stops a run that overruns its time.
- Precision: the master weights (and the Adam moments) are float32; each step casts them to `compute_dtype`
  (bfloat16) for the forward and backward, except the MoE router weight and bias, which the model keeps in
  float32 at any dtype. The gradient comes back to float32 through the cast.
- Memory: `nnx.remat` around each decoder layer (m3jax.training.losses.forward).
- MSA: an indexer warm-up of `indexer_warmup_steps` steps with dense attention (the indexer learns from the dense
  teacher), then sparse attention over the selected blocks; the two phases are two compiled step functions.
- MoE load balance: M3's router has a selection-only bias (`router_bias_e`, the checkpoint's
  e_score_correction_bias), the signature of auxiliary-loss-free balancing (DeepSeek-V3): after each step, each
  expert's bias moves by `router_bias_rate` towards balance, b_e += rate * sign(mean load - load_e), loads
  counted over the step's global batch. We do that rather than add an auxiliary loss because it is what the bias
  is for, it adds no gradient that competes with the LM loss, and it leaves the routing weights (the unbiased
  sigmoid scores) untouched. The bias has no gradient (it only reorders the top-k), so the optimizer skips it.
- Sharding: the mesh rules of inference (m3jax.sharding.param_spec: heads on "model", experts over all devices,
  vocab on "model") with the batch on "data"; XLA partitions the training forward's attention, and the MoE runs
  its expert-parallel shard_map as in inference. An axis the rules would split that the mesh does not divide
  (KV heads when "model" > num_key_value_heads) stays replicated: inference replicates the KV heads as copies,
  which training cannot do (the copies would get different gradients and drift apart).
- Train state: {"params", "opt_state", "step"} (a pytree, params by dotted path) plus the loader position and
  seed, saved together by Orbax; a resumed run is bit-identical on CPU (tests/test_training.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from m3jax.params import dotted
from m3jax import sharding
from m3jax.config import DENSE_MLP, FULL_ATTENTION, MOE_MLP, SPARSE_ATTENTION, M3Config, MSAConfig
from m3jax.model import M3ForCausalLM
from m3jax.training import losses

log = logging.getLogger(__name__)
f32 = jnp.float32
_ROUTER = ("router_de", "router_bias_e")        # stay float32 at any compute dtype (as the model keeps them)
_ROUTER_BIAS = "router_bias_e"


@dataclasses.dataclass(frozen=True, slots=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 512
    lr: float = 3e-4
    warmup_steps: int = 100                 # linear learning-rate warm-up
    min_lr_ratio: float = 0.1               # cosine decays to lr * min_lr_ratio at `steps`
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0                  # global gradient norm
    indexer_warmup_steps: int = 100         # dense attention for the first steps, then MSA
    kl_weight: float = 1.0                  # the KL only moves the indexer: this sets its share of the loss
    router_bias_rate: float = 1e-3          # MoE balance: bias step per training step
    compute_dtype: str = "bfloat16"
    remat: bool = True
    seed: int = 0                           # parameter init and data order
    checkpoint_every: int = 500
    keep_checkpoints: int = 2

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "checkpoint_every", "keep_checkpoints"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("warmup_steps", "indexer_warmup_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        if not (self.lr > 0 and np.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        for name in ("min_lr_ratio", "weight_decay", "kl_weight", "router_bias_rate", "grad_clip"):
            v = getattr(self, name)
            if not (v >= 0 and np.isfinite(v)):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.compute_dtype not in ("bfloat16", "float32"):
            raise ValueError(f"compute_dtype must be 'bfloat16' or 'float32', got {self.compute_dtype!r}")

    def sparse_at(self, step: int) -> bool:
        """Whether step `step` (0-based) attends sparsely (after the indexer warm-up)."""
        return step >= self.indexer_warmup_steps


def model_config(name: str, vocab_size: int) -> M3Config:
    """A named training preset with the tokenizer's vocabulary, or a config.json path (its vocab must fit).

    tiny:  0.24M parameters at vocab 512, blocks of 8, top-3: CPU tests and notebooks.
    small: 55.4M parameters at vocab 8192 (1 dense + 7 MSA/MoE layers, 8 experts top-2), blocks of 64, top-8:
           MSA keeps a quarter of the blocks at 2K tokens and an eighth at 4K.
    default: the bundled model (m3jax.default_model_path(), benchmarks/train_default.py): 15.9M parameters at
           vocab 8192 (31.7 MB in bfloat16; tied embeddings), hidden 384, 1 dense + 5 MSA/MoE layers, 8 heads in
           4 KV groups of head_dim 64, 8 experts top-2 of width 128 plus a shared expert of 256; MSA blocks of 64
           tokens, top-16 (own block included): at a 4096-token context a query keeps 16 of 64 visible blocks, a
           quarter (0.59 of the visible blocks averaged over the 4096 query positions, all of them up to 1024).
    default-dense: `default` with dense attention in every layer (the indexer-free baseline of the same size).
    """
    if name == "tiny":
        return M3Config.tiny(vocab_size=vocab_size, eos_token_id=(0,))     # id 0: <|endoftext|> (training.data)
    if name == "small":
        n = 8
        return M3Config(
            vocab_size=vocab_size, hidden_size=512, num_hidden_layers=n, num_attention_heads=8,
            num_key_value_heads=4, head_dim=64, rotary_dim=32, rope_theta=10000.0, max_position_embeddings=8192,
            dense_intermediate_size=1536, intermediate_size=384, shared_intermediate_size=384,
            num_local_experts=8, num_experts_per_tok=2, bos_token_id=None, eos_token_id=(0,),
            layer_types=(FULL_ATTENTION,) + (SPARSE_ATTENTION,) * (n - 1),
            mlp_layer_types=(DENSE_MLP,) + (MOE_MLP,) * (n - 1),
            msa=MSAConfig(num_index_heads=4, index_dim=64, block_size=64, topk_blocks=8, local_blocks=1))
    if name in ("default", "default-dense"):
        n = 6
        cfg = M3Config(
            vocab_size=vocab_size, hidden_size=384, num_hidden_layers=n, num_attention_heads=8,
            num_key_value_heads=4, head_dim=64, rotary_dim=32, rope_theta=10000.0, max_position_embeddings=8192,
            dense_intermediate_size=1024, intermediate_size=128, shared_intermediate_size=256,
            num_local_experts=8, num_experts_per_tok=2, bos_token_id=None, eos_token_id=(0,),
            tie_word_embeddings=True,
            layer_types=(FULL_ATTENTION,) + (SPARSE_ATTENTION,) * (n - 1),
            mlp_layer_types=(DENSE_MLP,) + (MOE_MLP,) * (n - 1),
            msa=MSAConfig(num_index_heads=4, index_dim=64, block_size=64, topk_blocks=16, local_blocks=1))
        return dense_variant(cfg) if name == "default-dense" else cfg
    if not os.path.exists(name):
        raise ValueError(f"--config must be one of {', '.join(PRESETS)} or a path to a config.json, got {name!r}")
    cfg = M3Config.from_pretrained(name)
    if cfg.vocab_size < vocab_size:
        raise ValueError(f"config {name} has vocab_size={cfg.vocab_size}, but the data uses {vocab_size} ids")
    return cfg


PRESETS = ("tiny", "small", "default", "default-dense")


def dense_variant(cfg: M3Config) -> M3Config:
    """`cfg` with dense attention in every layer: the same parameters less the MSA indexer's."""
    return dataclasses.replace(cfg, layer_types=(FULL_ATTENTION,) * cfg.num_hidden_layers)


def selection_fraction(cfg: M3Config, context: int) -> dict:
    """How much of the visible context MSA keeps at `context` tokens: the share of visible blocks selected by
    the last query (`at_context`) and averaged over the query positions 0..context-1 (`mean_over_positions`);
    the own block is among the top-k (pallas_kernels.reference.indexer_topk)."""
    t = np.arange(context)
    visible = t // cfg.msa.block_size + 1
    kept = np.minimum(visible, cfg.msa.topk_blocks) / visible
    return {"context": context, "block_size": cfg.msa.block_size, "topk_blocks": cfg.msa.topk_blocks,
            "visible_blocks_at_context": int(visible[-1]), "at_context": float(kept[-1]),
            "mean_over_positions": float(kept.mean())}


def num_params(cfg: M3Config) -> int:
    _, state = nnx.split(nnx.eval_shape(lambda: M3ForCausalLM(cfg, dtype=f32, rngs=nnx.Rngs(0))))
    return int(sum(np.prod(v.shape) for v in jax.tree.leaves(state)))


def param_sharding(path: str, shape, mesh: Mesh) -> NamedSharding:
    """The inference rule of `path` (m3jax.sharding.param_spec), with the axes the mesh does not divide
    replicated (see the module docstring)."""
    spec = tuple(sharding.param_spec(path, shape)) + (None,) * len(shape)
    keep = []
    for dim, axis in zip(shape, spec):
        names = axis if isinstance(axis, tuple) else (axis,)
        size = int(np.prod([mesh.shape[a] for a in names])) if axis is not None else 1
        keep.append(axis if axis is not None and dim % size == 0 else None)
    return NamedSharding(mesh, P(*keep))


def _optimizer(tcfg: TrainConfig, paths) -> optax.GradientTransformation:
    """AdamW at learning rate 1: the step multiplies its update by `learning_rate(tcfg, step, total)` (optax's
    adamw scales the Adam direction and the decoupled decay by the rate alike, so this is AdamW at that rate).
    The total step count is an argument of the compiled step, not a constant in it, so a run can time its steps
    and then fix its length (and cosine) without compiling again."""
    decay = {p: not p.endswith((".weight", _ROUTER_BIAS)) for p in paths}       # no decay on norms, router bias
    labels = {p: "bias" if p.endswith(_ROUTER_BIAS) else "train" for p in paths}
    adamw = optax.adamw(1.0, b1=tcfg.b1, b2=tcfg.b2, weight_decay=tcfg.weight_decay, mask=decay)
    train = optax.chain(optax.clip_by_global_norm(tcfg.grad_clip), adamw) if tcfg.grad_clip > 0 else adamw
    return optax.multi_transform({"train": train, "bias": optax.set_to_zero()}, labels)


def learning_rate(tcfg: TrainConfig, step, total, warmup):
    """The learning rate of 0-based step `step` of a `total`-step run: linear warm-up from 0 to `tcfg.lr` over
    `warmup` steps, then cosine decay to lr * min_lr_ratio at `total` (scalars or traced arrays)."""
    step, total, warmup = (jnp.asarray(x, f32) for x in (step, total, warmup))
    frac = jnp.clip((step - warmup) / jnp.maximum(total - warmup, 1.0), 0.0, 1.0)
    decayed = tcfg.lr * (tcfg.min_lr_ratio + (1.0 - tcfg.min_lr_ratio) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac)))
    return jnp.where(step < warmup, tcfg.lr * step / jnp.maximum(warmup, 1.0), decayed)


def learning_rate_schedule(tcfg: TrainConfig):
    """step -> learning rate of a run of `tcfg.steps` steps with `tcfg.warmup_steps` of warm-up."""
    return lambda step: learning_rate(tcfg, step, tcfg.steps, tcfg.warmup_steps)


def update_router_bias(bias_le, load_le, rate: float):
    """Auxiliary-loss-free MoE balance: b_e += rate * sign(mean load - load_e), per layer ([L, E])."""
    load = load_le.astype(f32)
    return bias_le + rate * jnp.sign(load.mean(-1, keepdims=True) - load)


class Trainer:
    """Holds the model structure, the optimizer and the compiled steps; the train state is a plain pytree.

    state = {"params": {dotted path: f32 array}, "opt_state": optax state, "step": i32[]}
    """

    def __init__(self, cfg: M3Config, tcfg: TrainConfig, *, mesh: Mesh | None = None):
        self.cfg, self.tcfg = cfg, tcfg
        self.mesh = None if mesh is None else sharding.check_mesh(mesh)
        if self.mesh is not None and tcfg.batch_size % self.mesh.shape[sharding.DATA]:
            raise ValueError(f"batch size {tcfg.batch_size} must be divisible by the mesh's "
                             f"data={self.mesh.shape[sharding.DATA]}")
        # The reference implementations are differentiable XLA; the Pallas kernels have no VJP.
        abstract = nnx.eval_shape(lambda: M3ForCausalLM(cfg, dtype=f32, attn_impl="reference", mesh=self.mesh,
                                                        rngs=nnx.Rngs(0)))
        self.graphdef, state = nnx.split(abstract)
        leaves, self.treedef = jax.tree_util.tree_flatten_with_path(state)
        self.paths = [dotted(p) for p, _ in leaves]
        self.tx = _optimizer(tcfg, self.paths)
        self.schedule = learning_rate_schedule(tcfg)
        self._steps: dict = {}              # compiled functions by (kind, sparse)
        self.state_shardings = None

    # Model <-> params ------------------------------------------------------------------------------
    def model(self, params: Mapping[str, jax.Array]) -> M3ForCausalLM:
        """The M3ForCausalLM holding `params` (attn_impl "reference"; pass a mesh to Trainer for sharding)."""
        return nnx.merge(self.graphdef, jax.tree_util.tree_unflatten(self.treedef, [params[p] for p in self.paths]))

    def compute_params(self, params):
        """The parameters as the step computes with them (compute_dtype; the router stays float32)."""
        return self._cast(params)

    def _cast(self, params):
        dtype = jnp.dtype(self.tcfg.compute_dtype)
        return {p: v if p.endswith(_ROUTER) or not jnp.issubdtype(v.dtype, jnp.floating) else v.astype(dtype)
                for p, v in params.items()}

    # State -------------------------------------------------------------------------------------------
    def _init(self) -> dict:
        model = M3ForCausalLM(self.cfg, dtype=f32, attn_impl="reference", mesh=self.mesh,
                              rngs=nnx.Rngs(self.tcfg.seed))
        leaves = jax.tree_util.tree_flatten_with_path(nnx.split(model)[1])[0]
        params = {dotted(p): v for p, v in leaves}
        return {"params": params, "opt_state": self.tx.init(params), "step": jnp.zeros((), jnp.int32)}

    def init_state(self) -> dict:
        """Fresh parameters (the model's own initialisation, seed `tcfg.seed`), optimizer state and step 0,
        placed on the mesh when there is one."""
        state = self._init()                 # eagerly: compiling the initialisation costs more than running it
        return state if self.mesh is None else jax.device_put(state, self._state_shardings())

    def abstract_state(self):
        """ShapeDtypeStructs (with shardings on a mesh) of the state: the restore target."""
        shapes = jax.eval_shape(self._init)
        if self.mesh is None:
            return shapes
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                            self._state_shardings())

    def _state_shardings(self):
        """None without a mesh; else every array of the state placed like the parameter it belongs to (params
        and Adam moments, by path), the rest replicated."""
        if self.mesh is None:
            return None
        if self.state_shardings is None:
            shapes = jax.eval_shape(self._init)
            params = {p: param_sharding(p, shapes["params"][p].shape, self.mesh) for p in self.paths}
            replicated = NamedSharding(self.mesh, P())

            def place(path, x):
                keys = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
                name = next((k for k in reversed(keys) if k in params), None)
                if name is not None and x.shape == shapes["params"][name].shape:
                    return params[name]
                return replicated

            self.state_shardings = jax.tree_util.tree_map_with_path(place, shapes)
        return self.state_shardings

    # The step ----------------------------------------------------------------------------------------
    def _loss(self, params, inputs, targets, sparse: bool):
        out = losses.forward(self.model(self._cast(params)), inputs, sparse=sparse, remat=self.tcfg.remat)
        lm = losses.lm_loss(out.logits, targets)
        return lm + self.tcfg.kl_weight * out.kl, (lm, out.kl, out.expert_load)

    def _grads(self, params, tokens, *, sparse: bool):
        return jax.grad(self._loss, has_aux=True)(params, tokens[:, :-1], tokens[:, 1:], sparse)

    def loss_and_grads(self, params, tokens, *, sparse: bool):
        """(f32 gradients of the training loss by parameter path, (lm loss, indexer KL, expert loads)) on int32
        tokens [batch, seq_len + 1]; jitted (with the state's shardings on a mesh). What the step applies."""
        key = ("grads", sparse)
        if key not in self._steps:
            fn = functools.partial(self._grads, sparse=sparse)
            if self.mesh is None:
                self._steps[key] = jax.jit(fn)
            else:
                sh = self._state_shardings()["params"]
                self._steps[key] = jax.jit(fn, in_shardings=(sh, NamedSharding(self.mesh, P(sharding.DATA, None))),
                                           out_shardings=(sh, NamedSharding(self.mesh, P())))
        return self._steps[key](params, jnp.asarray(tokens, jnp.int32))

    def _step_fn(self, sparse: bool):
        tcfg = self.tcfg

        def step(state, tokens, schedule):          # schedule: i32[2] = (total steps, warm-up steps)
            grads, (lm, kl, loads) = self._grads(state["params"], tokens, sparse=sparse)
            updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
            lr = learning_rate(tcfg, state["step"], schedule[0], schedule[1])
            params = optax.apply_updates(state["params"], jax.tree.map(lambda u: lr * u, updates))
            imbalance = []
            for i, load in enumerate(loads):
                if load is None:
                    continue
                path = f"stacks.{i}.layers.ffn.{_ROUTER_BIAS}"
                params[path] = update_router_bias(params[path], load, tcfg.router_bias_rate)
                imbalance.append(load.max(-1) / load.mean(-1))
            metrics = {"loss": lm, "indexer_kl": kl, "grad_norm": optax.tree.norm(grads),
                       "lr": lr,
                       "max_expert_load": jnp.concatenate(imbalance).mean() if imbalance else jnp.zeros((), f32)}
            return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

        if self.mesh is None:
            return jax.jit(step, donate_argnums=0)
        batch = NamedSharding(self.mesh, P(sharding.DATA, None))
        shardings = self._state_shardings()
        return jax.jit(step, in_shardings=(shardings, batch, NamedSharding(self.mesh, P())),
                       out_shardings=(shardings, NamedSharding(self.mesh, P())), donate_argnums=0)

    def step(self, state: dict, tokens) -> tuple[dict, dict]:
        """One optimizer step on int32 tokens [batch, seq_len + 1]; returns (new state, metrics as arrays).
        The input state is donated."""
        tokens = np.asarray(tokens)
        want = (self.tcfg.batch_size, self.tcfg.seq_len + 1)
        if tokens.shape != want:
            raise ValueError(f"tokens must be [batch_size, seq_len + 1] = {list(want)}, got {list(tokens.shape)}")
        sparse = self.tcfg.sparse_at(int(state["step"]))
        if ("step", sparse) not in self._steps:
            self._steps[("step", sparse)] = self._step_fn(sparse)
        schedule = jnp.asarray([self.tcfg.steps, self.tcfg.warmup_steps], jnp.int32)
        return self._steps[("step", sparse)](state, jnp.asarray(tokens, jnp.int32), schedule)

    def set_schedule(self, steps: int, warmup_steps: int, indexer_warmup_steps: int) -> None:
        """Fix the run's length and warm-ups, e.g. after timing steps: the compiled steps are kept (the
        learning-rate schedule is their argument, the indexer warm-up picks which one runs)."""
        self.tcfg = dataclasses.replace(self.tcfg, steps=steps, warmup_steps=warmup_steps,
                                        indexer_warmup_steps=indexer_warmup_steps)
        self.schedule = learning_rate_schedule(self.tcfg)


class Checkpoints:
    """Orbax checkpoints of the whole train state plus the loader position under `directory` (one subfolder per
    step; Orbax writes each to a temporary path and renames it when complete)."""

    def __init__(self, directory: str, keep: int = 2):
        self.manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, data_state: Mapping[str, Any]) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        data=ocp.args.JsonSave(dict(data_state))))
        self.manager.wait_until_finished()

    def restore(self, abstract_state) -> tuple[dict, dict]:
        step = self.latest_step()
        if step is None:
            raise ValueError(f"no checkpoint to resume from in {self.manager.directory}")
        r = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                               data=ocp.args.JsonRestore()))
        return r.state, r.data

    def close(self):
        self.manager.close()


def train(trainer: Trainer, loader, *, checkpoint_dir: str | None = None, resume: bool = False,
          progress: bool = True, on_step: Callable[[int, dict], None] | None = None,
          stop_after: int | None = None, stop_at: float | None = None) -> tuple[dict, list[dict]]:
    """Run `trainer.tcfg.steps` steps over `loader` (m3jax.training.data.TokenLoader); returns (final state,
    metrics of the steps run, as floats). With a checkpoint_dir: saves every `checkpoint_every` steps and at the
    end; resume=True restores the latest checkpoint (state and loader position) first. stop_after: stop after
    that many steps of this call (to simulate an interruption in tests). stop_at: a time.time() after which no
    further step starts (a time-boxed run that overran its plan; the schedule keeps its planned length; the
    last state is checkpointed)."""
    tcfg = trainer.tcfg
    ckpt = Checkpoints(checkpoint_dir, tcfg.keep_checkpoints) if checkpoint_dir is not None else None
    if resume:
        if ckpt is None:
            raise ValueError("resume needs a checkpoint directory")
        state, data_state = ckpt.restore(trainer.abstract_state())
        loader.load_state_dict(data_state)
    else:
        state = trainer.init_state()
    start = int(state["step"])
    end = tcfg.steps if stop_after is None else min(tcfg.steps, start + stop_after)
    history = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=tcfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    tokens_per_step = tcfg.batch_size * tcfg.seq_len
    try:
        for step in range(start, end):
            batch = loader.next_batch()
            t0 = time.perf_counter()
            state, metrics = trainer.step(state, batch)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            dt = time.perf_counter() - t0
            metrics.update(step=step + 1, tokens_per_s=tokens_per_step / dt, sparse=tcfg.sparse_at(step))
            history.append(metrics)
            if on_step is not None:
                on_step(step + 1, metrics)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", kl=f"{metrics['indexer_kl']:.3f}",
                                tok_s=f"{metrics['tokens_per_s']:.0f}")
            late = stop_at is not None and time.time() > stop_at and step + 1 < end
            if ckpt is not None and ((step + 1) % tcfg.checkpoint_every == 0 or step + 1 == end or late):
                ckpt.save(step + 1, state, loader.state_dict())
            if late:
                log.warning("stopping after step %d of %d: past the time limit", step + 1, tcfg.steps)
                break
    finally:
        if bar is not None:
            bar.close()
        if ckpt is not None:
            ckpt.close()
    return state, history


def write_metrics(path: str, history: list[dict], *, after_step: int = 0) -> None:
    """Append `history` to a JSON-lines file, first dropping lines past `after_step` (a resumed run redoes
    them); written to a temporary file and renamed."""
    kept = []
    if os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= after_step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
        for m in history:
            f.write(json.dumps(m) + "\n")
    os.replace(tmp, path)
