"""Switching tasks on merged weights: unmerge one trained delta, merge another."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpeft.core import paths as P
from jpeft.core.transform import apply, merge, unmerge
from jpeft.methods import build
from jpeft.train.optim import OptimConfig
from jpeft.train.trainer import Trainer
from tests.helpers import tiny_batch, tiny_bert


def _train(model, params, spec, labels_from, steps=6):
    trainer = Trainer(model, build(spec), params, train_head=False,
                      optim=OptimConfig(lr=5e-2, warmup_ratio=0.0), total_steps=steps)
    state = trainer.init_state(jax.random.key(len(spec) + labels_from))
    for i in range(steps):
        batch = dict(tiny_batch(batch=8, seed=i))
        batch["labels"] = (batch["input_ids"][:, labels_from] > 30).astype(jnp.int32)
        state, _ = trainer.train_step(state, trainer.frozen, batch)
    return trainer.transform, state.trainable["delta"]


@pytest.mark.parametrize("spec", ["lora", "lora+bitfit", "ia3", "diff_pruning"])
def test_unmerge_one_task_merge_another(spec):
    model, base = tiny_bert()
    t, delta_a = _train(model, base, spec, labels_from=1)
    _, delta_b = _train(model, base, spec, labels_from=2)
    batch = tiny_batch(seed=11)
    run = lambda p: model.apply({"params": p}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    served_a = merge(t, base, delta_a)
    np.testing.assert_allclose(run(served_a), apply(model, t, base, delta_a, batch["input_ids"],
                               batch["attention_mask"], batch["token_type_ids"]), atol=2e-5)
    served_b = merge(t, unmerge(t, served_a, delta_a), delta_b)
    direct_b = apply(model, t, base, delta_b, batch["input_ids"], batch["attention_mask"],
                     batch["token_type_ids"])
    np.testing.assert_allclose(run(served_b), direct_b, atol=2e-5)
    for path, leaf in P.flatten(unmerge(t, served_b, delta_b)).items():
        np.testing.assert_allclose(leaf, P.flatten(base)[path], atol=2e-5, err_msg=path)
    # two different trained deltas (so the switch is not vacuous)
    gap = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(delta_a),
                                                          jax.tree_util.tree_leaves(delta_b)))
    assert gap > 1e-3
