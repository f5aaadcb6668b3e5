"""The jitted trainer: frozen base untouched, optimizer state only for trainable leaves,
determinism, bounded compilations, learning."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpeft.core import paths as P
from jpeft.methods.full import full
from jpeft.methods.lora import LoraConfig, lora
from jpeft.train.optim import OptimConfig, base_labels, learning_rate_schedule, make_optimizer
from jpeft.train.trainer import Trainer, regression_loss
from tests.helpers import tiny_batch, tiny_bert


def _run(steps=5, seed=0, transform=None, batches=None, **kw):
    model, params = tiny_bert(**kw)
    trainer = Trainer(model, transform or lora(LoraConfig(r=2)), params,
                      optim=OptimConfig(lr=1e-2, warmup_ratio=0.0), total_steps=steps)
    state = trainer.init_state(jax.random.key(seed))
    losses = []
    for i in range(steps):
        batch = (batches or [tiny_batch(batch=4, seed=0)])[i % len(batches or [0])]
        state, metrics = trainer.train_step(state, trainer.frozen, batch)
        losses.append(float(metrics["loss"]))
    return trainer, state, params, losses


def test_frozen_base_untouched_and_head_trained():
    trainer, state, params, losses = _run(steps=4)
    frozen_before = P.flatten(params)
    for path, leaf in trainer.frozen.items():
        np.testing.assert_array_equal(leaf, frozen_before[path])
    assert set(P.flatten(state.trainable["base"])) == {"head/classifier/kernel", "head/classifier/bias"}
    assert not np.array_equal(state.trainable["base"]["head"]["classifier"]["kernel"],
                              frozen_before["head/classifier/kernel"])
    # the caller's base survives donation of the state
    assert np.isfinite(np.asarray(params["head"]["classifier"]["kernel"])).all()


def test_optimizer_state_only_for_trainable_leaves():
    trainer, state, *_ = _run(steps=1)
    n_trainable = P.count_params(state.trainable)
    mu_nu = [x for x in jax.tree_util.tree_leaves(state.opt_state) if getattr(x, "ndim", 0) > 0]
    assert sum(x.size for x in mu_nu) == 2 * n_trainable  # Adam's two moments, nothing else
    assert n_trainable < P.count_params(trainer.frozen) / 4


def _learnable_batch(seed):
    batch = dict(tiny_batch(batch=16, seed=seed))
    labels = (batch["input_ids"][:, 1] >= 33).astype(jnp.int32)  # the label is in the tokens
    return {**batch, "labels": labels}


def test_lora_learns_a_tiny_task():
    batches = [_learnable_batch(s) for s in range(4)]
    model, params = tiny_bert(hidden=32, heads=4)
    trainer = Trainer(model, lora(LoraConfig(r=4, alpha=8.0, targets="(query|value|dense)$")), params,
                      optim=OptimConfig(lr=2e-2, warmup_ratio=0.0, schedule="constant"), total_steps=60)
    state = trainer.init_state(jax.random.key(0))
    losses = []
    for i in range(60):
        state, metrics = trainer.train_step(state, trainer.frozen, batches[i % 4])
        losses.append(float(metrics["loss"]))
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4]), losses


def test_same_seed_same_run_bit_for_bit():
    _, s1, _, l1 = _run(steps=3, seed=7)
    _, s2, _, l2 = _run(steps=3, seed=7)
    assert l1 == l2
    for a, b in zip(jax.tree_util.tree_leaves(s1.trainable), jax.tree_util.tree_leaves(s2.trainable)):
        np.testing.assert_array_equal(a, b)
    _, s3, _, _ = _run(steps=3, seed=8)
    assert not all(np.array_equal(a, b) for a, b in zip(
        jax.tree_util.tree_leaves(s1.trainable), jax.tree_util.tree_leaves(s3.trainable)))


def test_one_compilation_per_batch_shape():
    shapes = [tiny_batch(batch=4, length=8, seed=s) for s in range(3)] + \
             [tiny_batch(batch=4, length=16, seed=s) for s in range(3)]
    trainer, *_ = _run(steps=6, batches=shapes)
    assert trainer.compilations()["train_step"] == 2


def test_full_trains_everything():
    trainer, state, params, _ = _run(steps=2, transform=full())
    assert trainer.frozen == {}
    assert P.count_params(state.trainable) == P.count_params(params)


def test_regression_loss_and_weights():
    logits = jnp.array([[1.0], [2.0], [5.0]])
    batch = {"labels": jnp.array([1.0, 0.0, 0.0]), "weights": jnp.array([1.0, 1.0, 0.0])}
    assert float(regression_loss(logits, batch)) == pytest.approx((0.0 + 4.0) / 2)


def test_schedule_and_labels():
    sched = learning_rate_schedule(OptimConfig(lr=1.0, warmup_ratio=0.1), 100)
    assert float(sched(0)) == 0.0 and float(sched(10)) == pytest.approx(1.0)
    assert float(sched(55)) == pytest.approx(0.5, abs=1e-6) and float(sched(100)) == pytest.approx(0.0)
    staged = learning_rate_schedule(OptimConfig(lr=1.0, warmup_ratio=0.1), 100, stage_starts=(60, 0, 500))
    # stage 1: warm-up 6, decay to 0 at 60; stage 2: warm-up 4 from 60, decay to 0 at 100
    assert float(staged(6)) == pytest.approx(1.0) and float(staged(60)) == 0.0
    assert float(staged(64)) == pytest.approx(1.0) and float(staged(82)) == pytest.approx(0.5, abs=1e-6)
    assert float(staged(100)) == pytest.approx(0.0)
    labels = base_labels({"a/LayerNorm/scale": 0, "a/dense/bias": 0, "a/dense/kernel": 0})
    assert labels == {"a/LayerNorm/scale": "no_decay", "a/dense/bias": "no_decay",
                      "a/dense/kernel": "default"}
    with pytest.raises(ValueError, match="unknown groups"):
        model, params = tiny_bert()
        Trainer(model, lora(), params, optim=OptimConfig(group_lr={"nope": 2.0}))


def test_head_group_reaches_the_whole_task_head():
    """The task head is its own group: ``head`` (kernels) and ``head_no_decay`` (biases), which
    takes ``head``'s multiplier; ``group_lr={"head": 0}`` leaves both unchanged while the other
    trainable leaves move, and the head's bias is not decayed."""
    labels = base_labels({"head/dense/kernel": 0, "head/dense/bias": 0, "a/dense/kernel": 0},
                         head={"head/dense/kernel", "head/dense/bias"})
    assert labels == {"head/dense/kernel": "head", "head/dense/bias": "head_no_decay",
                      "a/dense/kernel": "default"}
    from jpeft.methods import build

    model, params = tiny_bert()
    for spec, group_lr in [("full", {"head": 0.0}), ("lora", {"head": 0.0, "head_no_decay": 0.0})]:
        trainer = Trainer(model, build(spec), params, total_steps=2,
                          optim=OptimConfig(lr=1e-2, warmup_ratio=0.0, group_lr=group_lr))
        state = trainer.init_state(jax.random.key(0))
        flat = P.flatten(trainer.labels(state.trainable)["base"])
        head = {path for path, label in flat.items() if label.startswith("head")}
        assert head and all(path.startswith("head/") for path in head), head
        before = jax.tree_util.tree_map(np.array, state.trainable)
        state, _ = trainer.train_step(state, trainer.frozen, tiny_batch())
        moved = {path for path, leaf in P.flatten(state.trainable["base"]).items()
                 if not np.array_equal(leaf, P.flatten(before["base"])[path])}
        assert not moved & head, (spec, moved & head)
        delta_moved = not all(np.array_equal(a, b) for a, b in zip(
            jax.tree_util.tree_leaves(state.trainable["delta"]), jax.tree_util.tree_leaves(before["delta"])))
        assert moved or delta_moved, spec
    # with a multiplier of 2 the head trains, with weight decay on kernels only
    tx_config = OptimConfig(lr=1.0, weight_decay=0.5, warmup_ratio=0.0, schedule="constant",
                            group_lr={"head": 2.0})
    tree = {"k": jnp.ones(3), "b": jnp.ones(3)}
    tx = make_optimizer(tx_config, {"k": "head", "b": "head_no_decay"}, 10)
    updates, _ = tx.update(jax.tree_util.tree_map(jnp.zeros_like, tree), tx.init(tree), tree)
    np.testing.assert_allclose(updates["k"], -2.0 * 0.5 * np.ones(3), rtol=1e-6)  # decay only
    np.testing.assert_allclose(updates["b"], np.zeros(3), atol=0)
    with pytest.raises(ValueError, match="groups here: .*'head'"):
        make_optimizer(OptimConfig(group_lr={"heads": 2.0}), {"k": "head_no_decay"}, 10)


@pytest.mark.parametrize("spec,extra", [("bitfit", "none"), ("freeze", "none"), ("lora", "delta"),
                                        ("diff_pruning", "logits"), ("lora+bitfit", "lora")])
def test_total_count_is_the_adapted_models(spec, extra):
    """'all params' counts the base once: additive deltas on existing weights add nothing."""
    from jpeft.methods import build

    model, params = tiny_bert()
    trainer = Trainer(model, build(spec), params, total_steps=2)
    state = trainer.init_state(jax.random.key(0))
    delta = state.trainable["delta"]
    added = {"none": 0, "delta": P.count_params(delta), "logits": P.count_params(delta.get("logits", {})),
             "lora": P.count_params(delta.get("lora", {}))}[extra]
    counts = trainer.counts(state)
    assert counts.total == P.count_params(params) + added
    assert counts.trainable == P.count_params(state.trainable)


def test_compiler_options_default_and_override():
    """On CPU the steps compile without YNNPACK library fusions unless told otherwise; the
    options reach the compiled step (the XLA_FLAGS precedence: tests/core/test_compile.py)."""
    from jpeft.core.compile import CPU_COMPILER_OPTIONS

    assert jax.default_backend() == "cpu"
    model, params = tiny_bert()
    batch = tiny_batch(batch=4, seed=0)

    def compiled_text(trainer):
        state = trainer.init_state(jax.random.key(0))
        return trainer.train_step.lower(state, trainer.frozen, batch).compile().as_text()

    default = Trainer(model, lora(LoraConfig(r=2)), params, total_steps=2)
    assert default.compiler_options == CPU_COMPILER_OPTIONS
    assert "__ynn_fusion" not in compiled_text(default)
    xla_own = Trainer(model, lora(LoraConfig(r=2)), params, total_steps=2, compiler_options={})
    assert xla_own.compiler_options == {}
    assert "__ynn_fusion" in compiled_text(xla_own)
    # A model with bf16 matmuls keeps XLA's defaults (YNNPACK's dots have the AMX bf16 kernels).
    bf16_model = type(model)(dataclasses.replace(model.config, matmul_dtype="bfloat16"))
    assert Trainer(bf16_model, lora(LoraConfig(r=2)), params, total_steps=2).compiler_options == {}
