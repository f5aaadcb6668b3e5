"""Adapter banks: mixed-task batches equal each example run alone, gradients stay per task,
multi-task training in one step, hot swap without recompiling."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jpeft import bank as B
from jpeft.checkpoint.export import base_fingerprint, save_adapter
from jpeft.core import paths as P
from jpeft.core.transform import ApplyContext, apply, compose
from jpeft.methods import (
    AdapterConfig,
    DiffPruningConfig,
    LoraConfig,
    PrefixConfig,
    PromptConfig,
    build,
    lora,
)
from jpeft.train.trainer import Trainer
from tests.helpers import perturb, tiny_batch, tiny_bert

TOL = 1e-5
K = 3
CONFIGS = {
    "lora": LoraConfig(r=2, alpha=4, targets=r"(query|value|intermediate/dense)$"),
    "prefix": PrefixConfig(num_virtual_tokens=3, projection=True, projection_hidden=8),
    "prompt": PromptConfig(num_virtual_tokens=2),
    "houlsby": AdapterConfig(size=4, init_scale=0.3),
    "diff_pruning": DiffPruningConfig(),
}
SPECS = ["lora", "prefix", "prompt", "ptuning2", "lora+bitfit", "houlsby+ia3",
         "diff_pruning"]

_tiny = functools.lru_cache(maxsize=None)(tiny_bert)


def _mixed(b=6, seed=0):
    batch = dict(tiny_batch(batch=b, seed=seed))
    batch["adapter_index"] = jnp.asarray(np.arange(b) % K, jnp.int32)
    return batch


def _trained_bank(spec, heads=True, seed=0):
    """A bank whose every task has a different non-trivial delta and head."""
    model, base = _tiny()
    inner = build(spec, CONFIGS)
    method = B.bank(inner, K, heads=heads)
    delta = perturb(method.init(jax.random.key(seed), base, model.info()), seed=seed + 1, scale=0.3)
    return model, base, inner, method, delta


def _inputs(batch):
    return batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]


def _single(model, inner):
    """The method alone (no bank), jitted: every example of a test reuses one compilation."""
    return jax.jit(lambda params, d, ids, mask, types: apply(model, inner, params, d, ids, mask, types))


def _alone(single, base, delta, batch, b):
    """Example ``b`` run by ``single`` with its own task's delta and base leaves."""
    d, own = B.task(delta, int(batch["adapter_index"][b]))
    params = P.unflatten({**P.flatten(base), **own})
    return single(params, d, *(x[b:b + 1] for x in _inputs(batch)))[0]


@pytest.mark.parametrize("spec", SPECS)
def test_mixed_batch_equals_each_example_alone(spec):
    model, base, inner, method, delta = _trained_bank(spec)
    batch = _mixed()
    run = jax.jit(lambda d, x: apply(model, method, base, d, *_inputs(x),
                                     ctx=ApplyContext(adapter_index=x["adapter_index"])))
    mixed = run(delta, batch)
    single = _single(model, inner)
    alone = jnp.stack([_alone(single, base, delta, batch, b) for b in range(6)])
    np.testing.assert_allclose(mixed, alone, rtol=0, atol=TOL)
    # the tasks really differ, so the check above can fail
    swapped = dict(batch, adapter_index=(batch["adapter_index"] + 1) % K)
    other = run(delta, swapped)
    assert float(jnp.abs(other - mixed).max()) > 1e-3


def _task_loss(logits, labels, weights):
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return (losses * weights).sum() / weights.sum()


@pytest.mark.parametrize("spec", ["lora", "prompt"])  # a weight interceptor and a tap
def test_each_delta_gets_gradients_only_from_its_examples(spec):
    model, base, inner, method, delta = _trained_bank(spec)
    batch = _mixed(b=6)
    batch["adapter_index"] = jnp.asarray([0, 2, 0, 2, 2, 0], jnp.int32)  # task 1 has no example
    n = 6

    def bank_loss(d):
        logits = apply(model, method, base, d, *_inputs(batch), ctx=ApplyContext(adapter_index=batch["adapter_index"]))
        return _task_loss(logits, batch["labels"], batch["weights"])

    grads = jax.grad(bank_loss)(delta)
    for k in range(K):
        rows = np.flatnonzero(np.asarray(batch["adapter_index"]) == k)
        got_delta, got_base = B.task(grads, k)
        if rows.size == 0:
            assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree_util.tree_leaves(grads["adapters"])
                       for g in [g[k]])
            assert all(float(jnp.abs(v).max()) == 0.0 for v in got_base.values())
            continue
        d, own = B.task(delta, k)
        sub = {key: v[rows] for key, v in batch.items()}

        def own_loss(d, own, sub=sub, rows=rows):
            params = P.unflatten({**P.flatten(base), **own})
            logits = apply(model, inner, params, d, *_inputs(sub))
            return _task_loss(logits, sub["labels"], sub["weights"]) * rows.size / n

        want_delta, want_base = jax.grad(own_loss, argnums=(0, 1))(d, own)
        for got, want in [(got_delta, want_delta), (got_base, want_base)]:
            for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
                np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_multitask_training_step_trains_k_deltas_and_heads():
    model, base = tiny_bert(dropout=0.1)
    method = B.bank(lora(LoraConfig(r=2, dropout=0.1)), K)
    trainer = Trainer(model, method, base, total_steps=20)
    assert trainer.base_trainable_paths == []  # the heads live in the bank
    state = trainer.init_state(jax.random.key(0))
    heads = P.flatten(state.trainable["delta"]["base"])
    assert heads and all(p.startswith("head/") and v.shape[0] == K for p, v in heads.items())
    batch = _mixed(b=6)
    losses = []
    for _ in range(8):
        state, metrics = trainer.train_step(state, trainer.frozen, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    trained = P.flatten(state.trainable["delta"]["base"])
    kernel = next(v for p, v in trained.items() if p.endswith("kernel"))
    assert float(jnp.abs(kernel[0] - kernel[1]).max()) > 1e-4  # tasks' heads diverged
    assert trainer.eval_step(state, trainer.frozen, batch).shape == (6, 2)


def test_hot_swap_reuses_the_compiled_function():
    model, base, _, method, delta = _trained_bank("lora")
    serve = B.predictor(model, method, base)
    batch = _mixed()
    first = serve(delta, batch)
    other = perturb(delta, seed=7, scale=0.3)
    second = serve(other, batch)
    assert serve._cache_size() == 1
    assert float(jnp.abs(first - second).max()) > 1e-3
    assert "__ynn_fusion" not in serve.lower(delta, batch).compile().as_text()  # jpeft.core.compile's options


def test_load_bank_from_saved_adapters(tmp_path):
    model, base = _tiny()
    inner = build("lora", CONFIGS)
    folders, expected = [], []
    batch = _mixed()
    fp = base_fingerprint(model, base)
    for k in range(K):
        delta = perturb(inner.init(jax.random.key(k), base, model.info()), seed=k, scale=0.3)
        flat = P.flatten(base)
        head = perturb({p: v for p, v in flat.items() if p.startswith("head/")}, seed=10 + k, scale=0.3)
        params = P.unflatten({**flat, **head})
        folders.append(save_adapter(tmp_path / f"task{k}", inner, delta, params, base_model="tiny",
                                    base_fingerprint=fp, method_spec="lora",
                                    method_configs={"lora": CONFIGS["lora"]}, model=model))
        expected.append(apply(model, inner, params, delta, *_inputs(batch)))
    method, bank_delta = B.load_bank(folders, model, base)
    got = B.predictor(model, method, base)(bank_delta, batch)
    want = jnp.stack([expected[int(k)][b] for b, k in enumerate(batch["adapter_index"])])
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


def test_bad_banks_are_refused():
    model, base, inner, method, delta = _trained_bank("lora")
    batch = _mixed()
    with pytest.raises(ValueError, match="adapter index"):
        apply(model, method, base, delta, *_inputs(batch))
    with pytest.raises(ValueError, match="out of range"):
        apply(model, method, base, delta, *_inputs(batch),
              ctx=ApplyContext(adapter_index=jnp.full((6,), K, jnp.int32)))
    with pytest.raises(ValueError, match="cannot be composed"):
        compose(method, build("bitfit"))
    with pytest.raises(ValueError, match="same shapes"):
        B.stack([lora(LoraConfig(r=2)).init(jax.random.key(0), base, model.info()),
                 lora(LoraConfig(r=3)).init(jax.random.key(0), base, model.info())])
    with pytest.raises(ValueError, match="size"):
        B.bank(inner, 0)
    stacked = B.stack([B.task(delta, k)[0] for k in range(K)])
    for a, b in zip(jax.tree_util.tree_leaves(stacked), jax.tree_util.tree_leaves(delta["adapters"])):
        np.testing.assert_array_equal(a, b)
