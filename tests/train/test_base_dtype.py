"""A bfloat16 frozen base (``--base-dtype=bfloat16``): the encoder computes in bf16 while the
delta, the trained base leaves (task head), gradients and optimizer state stay float32.

Tolerance: on a tiny random BERT, bf16 vs float32 logits differ by at most 5e-2 of the float32
logits' scale (max |Δ| / max |logits|) and the encoder output by at most 5e-2 of its scale
(bf16 has an 8-bit mantissa, ~4e-3 relative per rounding; measured ≈ 1e-2).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from experiments.glue import cast_frozen_base
from jpeft.core import paths as P
from jpeft.core.transform import ApplyContext, apply
from jpeft.methods import build
from jpeft.models.bert import BertModel
from jpeft.train.trainer import Trainer, trainable_base_paths
from tests.helpers import perturb, tiny_batch, tiny_bert, train_tiny

REL_TOL = 5e-2


def _bf16(model, params, transform):
    keep = trainable_base_paths(transform, params, model.info())
    model16 = BertModel(dataclasses.replace(model.config, dtype="bfloat16"))
    return model16, cast_frozen_base(params, keep, "bfloat16")


@pytest.mark.parametrize("head", ["classification", "none"])
def test_bf16_base_close_to_float32(head):
    model, params = tiny_bert(hidden=32, heads=4)
    model = BertModel(dataclasses.replace(model.config, head=head))
    params = perturb(params, seed=3, scale=0.05) if head == "none" else params
    if head == "none":
        params = {k: v for k, v in params.items() if k not in ("head", "pooler")}
    transform = build("lora")
    delta = perturb(transform.init(jax.random.key(0), params, model.info()), scale=0.1)
    model16, params16 = _bf16(model, params, transform)
    batch = tiny_batch(batch=4, length=9)
    args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    out32 = apply(model, transform, params, delta, *args, ctx=ApplyContext())
    out16 = apply(model16, transform, params16, delta, *args, ctx=ApplyContext())
    if head == "classification":
        assert out16.dtype == jnp.float32  # logits: float32 whatever the base dtype
    else:
        assert out16.dtype == jnp.bfloat16  # the encoder really computes in bf16
    scale = float(jnp.max(jnp.abs(out32)))
    err = float(jnp.max(jnp.abs(out16.astype(jnp.float32) - out32))) / scale
    print(f"\nbf16 vs float32 ({head}): max |diff| / max |out| = {err:.3g}")
    assert 0 < err <= REL_TOL, err


def test_frozen_leaves_bf16_trainable_and_optimizer_float32():
    model, params = tiny_bert()
    transform = build("lora+bitfit")
    model16, params16 = _bf16(model, params, transform)
    trainer = Trainer(model16, transform, params16, total_steps=4)
    state = trainer.init_state(jax.random.key(0))
    state, _ = trainer.train_step(state, trainer.frozen, tiny_batch(batch=4))
    frozen = [v for v in trainer.frozen.values() if jnp.issubdtype(v.dtype, jnp.floating)]
    assert frozen and all(v.dtype == jnp.bfloat16 for v in frozen)
    trained_base = P.flatten(state.trainable["base"])
    assert any(p.startswith("head/") for p in trained_base)
    assert len(P.flatten(state.trainable["delta"])) > 2  # lora factors and bitfit's bias deltas
    for tree in (state.trainable, state.opt_state):
        floats = [x for x in jax.tree_util.tree_leaves(tree)
                  if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)]
        assert floats and all(x.dtype == jnp.float32 for x in floats)
    grads, _ = jax.grad(trainer._loss, has_aux=True)(state.trainable, trainer.frozen,
                                                     tiny_batch(batch=4), jax.random.key(1))
    assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(grads))


@pytest.mark.parametrize("spec", ["lora", "prefix", "ia3"])
def test_bf16_base_trains(spec):
    model, params = tiny_bert(hidden=32, heads=4)
    transform = build(spec)
    model16, params16 = _bf16(model, params, transform)
    train_tiny(model16, transform, params16)


def test_cast_frozen_base_refuses_unknown_dtype():
    _, params = tiny_bert()
    with pytest.raises(ValueError, match="base-dtype"):
        cast_frozen_base(params, [], "float16")
