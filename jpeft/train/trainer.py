"""The jitted train and eval steps over a frozen base and a trainable delta.

The base tree is split once into

* ``trainable["base"]``: base leaves a method trains directly (the task head, unfrozen layers
  of ``full``), as a nested dict mirroring the parameter tree, and
* ``frozen``: everything else, passed to the steps as an argument, never differentiated (so XLA
  computes no weight gradient for it) and never rewritten.

``trainable["delta"]`` is the transform's delta. The optimizer (``optax.multi_transform``) holds
state only for the trainable tree. ``train_step(state, frozen, batch)`` is jitted with the state
donated; its compiled versions are one per distinct batch shape (see :meth:`Trainer.compilations`).
``eval_step`` returns the model's output, ``eval_loss`` the loss, both in evaluation mode.
The steps compile with ``jpeft.core.compile.default_compiler_options(model.info().matmul_dtype)``
unless ``compiler_options`` is given.
The model is called as ``model(**{k: batch[k] for k in model_inputs})``; the trainer has no
method- or model-specific branch.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jpeft.core import paths as P
from jpeft.core.capabilities import ReplacesForward, TrainingHooks
from jpeft.core.compile import default_compiler_options
from jpeft.core.compile import jit as compiled_jit
from jpeft.core.transform import ApplyContext, ModelInfo, Transform, apply
from jpeft.train.optim import OptimConfig, base_labels, make_optimizer

Batch = Mapping[str, jax.Array]
LossFn = Callable[[jax.Array, Batch], jax.Array]


class TrainState(NamedTuple):
    """Everything that changes during training (a pytree; checkpointed as a whole)."""

    step: jax.Array
    trainable: dict[str, Any]
    opt_state: Any
    rng: jax.Array


def classification_loss(logits: jax.Array, batch: Batch) -> jax.Array:
    """Mean cross-entropy over rows with ``weights`` > 0 (padding rows weigh 0)."""
    chex.assert_rank(logits, 2)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"].astype(jnp.int32))
    return _weighted_mean(losses, batch)


def regression_loss(logits: jax.Array, batch: Batch) -> jax.Array:
    """Mean squared error of ``logits[:, 0]`` (one output) against float labels."""
    pred = logits.reshape(logits.shape[0], -1)[:, 0]
    return _weighted_mean((pred - batch["labels"].astype(pred.dtype)) ** 2, batch)


def causal_lm_loss(logits: jax.Array, batch: Batch) -> jax.Array:
    """Next-token cross-entropy on the tokens marked by ``batch["loss_mask"]`` (B,T).

    ``logits (B,T',V)``: the last ``T`` positions align with ``input_ids (B,T)`` (methods that
    prepend tokens add ``T'-T`` positions in front). Position ``t`` predicts token ``t+1``; the
    loss averages ``-log p(x_{t+1} | x_≤t)`` over the pairs whose target has ``loss_mask = 1``,
    rows weighted by ``weights`` (B,) when present (padding rows weigh 0).
    """
    chex.assert_rank(logits, 3)
    ids = batch["input_ids"]
    t = ids.shape[1]
    logits = logits[:, logits.shape[1] - t:].astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:].astype(jnp.int32))
    mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
    if "weights" in batch:
        mask = mask * batch["weights"].astype(jnp.float32)[:, None]
    return (losses * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def _weighted_mean(values: jax.Array, batch: Batch) -> jax.Array:
    weights = batch.get("weights")
    if weights is None:
        return values.mean()
    weights = weights.astype(values.dtype)
    return (values * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def head_paths(base: P.Params, info: ModelInfo) -> list[str]:
    """Paths of the task head (trained by every method)."""
    if not info.head_patterns:
        return []
    return P.select(base, info.head_patterns, what="task head")


def trainable_base_paths(transform: Transform, base: P.Params, info: ModelInfo,
                         train_head: bool = True) -> list[str]:
    """Base leaves that are trained: the method's selection plus the task head (unless the
    method's delta carries its own heads, as a bank's does)."""
    selected = dict.fromkeys(transform.trainable_base(base))
    own_forward = transform.capability(ReplacesForward)
    if train_head and not (own_forward is not None and own_forward.trains_head):
        selected.update(dict.fromkeys(head_paths(base, info)))
    return list(selected)


@dataclasses.dataclass
class ParamCounts:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,d} || all params: {self.total:,d} "
                f"|| trainable%: {self.percent:.4f}")


class Trainer:
    """Holds the static pieces (model, transform, frozen base, optimizer) and the jitted steps.

    Args:
      model: a Linen module (jpeft's own, any other, or :func:`jpeft.from_linen`'s) or the model
        of :func:`jpeft.from_nnx`; ``model.info()`` gives its :class:`ModelInfo` (an empty one
        for a plain Linen module without ``info``).
      transform: the PEFT method (possibly composed).
      base: the pretrained parameters (never modified).
      loss: ``(logits, batch) -> scalar``.
      optim: optimizer config; ``total_steps`` sets the schedule length.
      model_inputs: batch keys passed to the model, in order.
      train_head: also train the model's task head (``info.head_patterns``).
      mesh: a ``(data, fsdp)`` device mesh (:func:`jpeft.train.sharding.make_mesh`): the batch is
        split over ``data``, large leaves over ``fsdp`` by the rule of
        :mod:`jpeft.train.sharding` (``shard_rules`` and ``min_shard_size`` refine it), a
        method's delta leaves as their kernels (:func:`jpeft.train.sharding.delta_rules`), and
        the jitted steps declare these input and output shardings. ``None``: one device.
    """

    def __init__(
        self,
        model: nn.Module,
        transform: Transform,
        base: P.Params,
        *,
        loss: LossFn = classification_loss,
        optim: OptimConfig = OptimConfig(),
        total_steps: int = 1000,
        model_inputs: Sequence[str] = ("input_ids", "attention_mask", "token_type_ids"),
        train_head: bool = True,
        mesh: Any = None,
        shard_rules: Sequence[tuple[str, Any]] = (),
        min_shard_size: int = 2**16,
        compiler_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.transform = transform
        self.info: ModelInfo = model.info() if hasattr(model, "info") else ModelInfo()
        self.loss = loss
        self.model_inputs = tuple(model_inputs)
        self.base_trainable_paths = trainable_base_paths(transform, base, self.info, train_head)
        self.head_paths = frozenset(head_paths(base, self.info))
        trainable_flat, frozen_flat = P.partition(base, self.base_trainable_paths)
        self.frozen: dict[str, Any] = frozen_flat
        self._initial_base = trainable_flat
        self.optim_config = optim
        self.total_steps = total_steps
        abstract = jax.eval_shape(self._fresh_trainable, jax.random.key(0))
        self._tx = self.optimizer(abstract)
        self.mesh = mesh
        self.compiler_options = dict(default_compiler_options(self.info.matmul_dtype)
                                     if compiler_options is None else compiler_options)
        self._traces: dict[str, int] = {"train_step": 0, "eval_step": 0, "eval_loss": 0}
        jit = lambda fn, **kw: compiled_jit(self._counted(fn), compiler_options=self.compiler_options, **kw)
        if mesh is None:
            self.state_sharding = None
            self.train_step = jit(self._train_step, donate_argnums=(0,))
            self.eval_step = jit(self._eval_step)
            self.eval_loss = jit(self._eval_loss)
        else:
            from jpeft.train import sharding as S

            base = P.combine(self._initial_base, self.frozen)
            delta = jax.eval_shape(lambda k: self.transform.init(k, base, self.info), jax.random.key(0))
            rules = [*S.delta_rules(transform, delta, base, self.info, mesh, shard_rules, min_shard_size),
                     *shard_rules]
            shard = lambda tree: S.tree_shardings(tree, mesh, rules, min_shard_size)
            frozen_sharding = shard(self.frozen)
            self.frozen = jax.device_put(self.frozen, frozen_sharding)
            self.state_sharding = shard(jax.eval_shape(self._fresh_state, jax.random.key(0)))
            self.batch_sharding = S.batch_sharding(mesh)
            self.train_step = jit(
                self._train_step, donate_argnums=(0,),
                in_shardings=(self.state_sharding, frozen_sharding, self.batch_sharding),
                out_shardings=(self.state_sharding, S.replicated(mesh)))
            self.eval_step = jit(
                self._eval_step, in_shardings=(self.state_sharding, frozen_sharding, self.batch_sharding),
                out_shardings=self.batch_sharding)
            self.eval_loss = jit(
                self._eval_loss, in_shardings=(self.state_sharding, frozen_sharding, self.batch_sharding),
                out_shardings=S.replicated(mesh))

    # -- state --------------------------------------------------------------------------------
    def labels(self, trainable: dict[str, Any]) -> dict[str, Any]:
        return {"delta": self.transform.labels(trainable["delta"]),
                "base": P.unflatten(base_labels(P.flatten(trainable["base"]), self.head_paths))}

    def optimizer(self, trainable: dict[str, Any]) -> optax.GradientTransformation:
        config = dataclasses.replace(
            self.optim_config, group_lr={**self.transform.group_lr, **self.optim_config.group_lr})
        return make_optimizer(config, self.labels(trainable), self.total_steps,
                              self.transform.stage_starts(self.total_steps))

    def init_state(self, rng: jax.Array) -> TrainState:
        """A fresh delta (from ``rng``), the trainable base leaves, and optimizer state. On a mesh
        the state is created by a jitted function straight into its sharding (which also works
        when the mesh spans several processes, whose devices this one cannot write to)."""
        if self.state_sharding is not None:
            return jax.jit(self._fresh_state, out_shardings=self.state_sharding)(rng)
        return self._fresh_state(rng)

    def _fresh_state(self, rng: jax.Array) -> TrainState:
        init_key, train_key = jax.random.split(rng)
        trainable = self._fresh_trainable(init_key)
        opt_state = self._tx.init(trainable)
        return TrainState(jnp.zeros((), jnp.int32), trainable, opt_state, train_key)

    def shard_batch(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Place a host batch on the mesh: each process passes its own slice of the global
        batch (``jax.make_array_from_process_local_data``). Identity without a mesh."""
        if self.mesh is None:
            return dict(batch)
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
                for k, v in batch.items()}

    def _fresh_trainable(self, key: jax.Array) -> dict[str, Any]:
        base = P.combine(self._initial_base, self.frozen)
        delta = self.transform.init(key, base, self.info)
        trained = P.unflatten(self._initial_base)
        # Copies: the state is donated to the train step, the caller's base must survive it.
        copy = lambda x: jnp.array(x, copy=True)
        return jax.tree_util.tree_map(copy, {"delta": delta, "base": trained})

    def counts(self, state: TrainState) -> ParamCounts:
        """Trainable and total parameter counts (as HF PEFT's print_trainable_parameters): the
        total is the adapted model's, base plus what the method adds (``Transform.new_params``)."""
        trainable = P.count_params(state.trainable)
        total = (P.count_params(self.frozen) + P.count_params(state.trainable["base"])
                 + self.transform.new_params(state.trainable["delta"]))
        return ParamCounts(trainable, total)

    def params(self, state: TrainState) -> dict[str, Any]:
        """The full base tree with the trained base leaves put back (delta not applied)."""
        return P.combine(P.flatten(state.trainable["base"]), self.frozen)

    # -- steps --------------------------------------------------------------------------------
    def forward(self, trainable: dict[str, Any], frozen: dict[str, Any], batch: Batch,
                ctx: ApplyContext) -> jax.Array:
        base = P.combine(P.flatten(trainable["base"]), frozen)
        inputs = [batch[k] for k in self.model_inputs if k in batch]
        return apply(self.model, self.transform, base, trainable["delta"], *inputs, ctx=ctx)

    def _loss(self, trainable, frozen, batch, rng):
        ctx = ApplyContext(train=True, rng=rng, adapter_index=batch.get("adapter_index"))
        logits = self.forward(trainable, frozen, batch, ctx)
        task_loss = self.loss(logits, batch)
        penalty = self.transform.penalty(trainable["delta"], ctx)
        return task_loss + penalty, (task_loss, penalty)

    def _train_step(self, state: TrainState, frozen: dict[str, Any], batch: Batch):
        rng, step_rng = jax.random.split(state.rng)
        grads, (task_loss, penalty) = jax.grad(self._loss, has_aux=True)(
            state.trainable, frozen, batch, step_rng
        )
        updates, opt_state = self._tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {"loss": task_loss, "penalty": penalty, "grad_norm": optax.tree.norm(grads)}
        return TrainState(state.step + 1, trainable, opt_state, rng), metrics

    def _eval_step(self, state: TrainState, frozen: dict[str, Any], batch: Batch) -> jax.Array:
        ctx = ApplyContext(train=False, adapter_index=batch.get("adapter_index"))
        return self.forward(state.trainable, frozen, batch, ctx)

    def _eval_loss(self, state: TrainState, frozen: dict[str, Any], batch: Batch) -> jax.Array:
        """The task loss of ``batch`` in evaluation mode (no dropout, no penalty)."""
        return self.loss(self._eval_step(state, frozen, batch), batch)

    def between_steps(self, state: TrainState, step: int) -> TrainState:
        """``state`` (after ``step`` steps, counted on the host) with the delta rewritten by
        the method's :class:`~jpeft.core.capabilities.TrainingHooks` ``between_steps`` (if it has one
        and it changes something at this step); the optimizer state is kept."""
        hooks = self.transform.capability(TrainingHooks)
        hook = None if hooks is None else hooks.between_steps
        if hook is None:
            return state
        delta = state.trainable["delta"]
        new = hook(delta, step, self.total_steps)
        if new is delta:
            return state
        if self.state_sharding is not None:
            new = jax.device_put(new, self.state_sharding.trainable["delta"])
        return state._replace(trainable={**state.trainable, "delta": new})

    def learning_rate(self, step: int) -> float:
        from jpeft.train.optim import learning_rate_schedule

        schedule = learning_rate_schedule(self.optim_config, self.total_steps,
                                          self.transform.stage_starts(self.total_steps))
        return float(schedule(step))

    def _counted(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` counting its traces: ``jax.jit`` traces once per compilation (a new shape)."""
        name = fn.__name__.lstrip("_")

        @functools.wraps(fn)
        def traced(*args: Any, **kwargs: Any) -> Any:
            self._traces[name] += 1
            return fn(*args, **kwargs)

        return traced

    def compilations(self) -> dict[str, int]:
        """How many times each step has been compiled (one per distinct batch shape), counted
        as the number of times ``jax.jit`` traced it."""
        return dict(self._traces)
