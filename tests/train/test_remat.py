"""Rematerialisation (``config.remat``): the same loss and gradients as without it, for every
kind of method hook (single methods and compositions), on a tiny BERT in training mode (dropout on), and on tiny
Llama/GPT-2 configs; and fewer saved activations (less temporary memory on GPU/TPU) for a
deeper model.

Tolerance (float32): for every leaf of the gradient of the trainable tree,
``max |g_remat - g| <= 1e-6 * max |g|`` (the max taken over the whole tree); measured ≲ 3e-7.
The loss agrees to 1e-6 absolute. Remat recomputes the same ops in the backward pass, so the only
differences are XLA's fusion/reassociation choices.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpeft.core import paths as P
from jpeft.core.transform import ApplyContext, apply
from jpeft.methods import build
from jpeft.models.bert import BertConfig, BertModel, init_params
from jpeft.train.trainer import Trainer
from tests.helpers import perturb, tiny_batch, tiny_bert

# relative to the largest gradient entry of the tree; float32 rounding differs with the fusions
# XLA picks for the recomputed pass: 1.5e-7 to 5.4e-7 on an Intel Xeon, 1.6e-6 for prefix tuning on
# Llama on an AMD EPYC (the same at the revision before the layer-hook change)
GRAD_TOL = 5e-6
LOSS_TOL = 1e-6

# Remat wraps the layers, so what matters is the kind of hook traced inside them: weight
# interceptors (lora, ia3), taps in attention (prefix), at the embeddings (prompt), adapter taps
# (houlsby, pfeiffer), trained base leaves (full, freeze, bitfit) and an encoder outside the
# layers with its own dropout (ptuning). Each kind is covered once.
METHODS = ["full", "ptuning", "freeze"]
COMPOSITIONS = ["prefix+lora", "houlsby+ia3", "prompt+lora+ia3", "pfeiffer+bitfit"]


def _remat(model):
    return type(model)(dataclasses.replace(model.config, remat=True))


def _assert_same_grads(g0, g1):
    f0, f1 = P.flatten(g0), P.flatten(g1)
    assert f0.keys() == f1.keys()
    scale = max(float(jnp.max(jnp.abs(x))) for x in f0.values())
    assert scale > 0
    worst = max(float(jnp.max(jnp.abs(f0[k] - f1[k]))) for k in f0) / scale
    assert worst <= GRAD_TOL, f"max |g_remat - g| / max |g| = {worst:.3g}"


def _trainer_grads(model, params, spec, batch, rng):
    trainer = Trainer(model, build(spec), params, total_steps=4)
    state = trainer.init_state(jax.random.key(0))
    trainable = perturb(state.trainable, scale=0.05)  # non-trivial deltas (LoRA B != 0 ...)
    grad = jax.jit(jax.grad(trainer._loss, has_aux=True))
    grads, (loss, _) = grad(trainable, trainer.frozen, batch, rng)
    return grads, float(loss)


@pytest.fixture(scope="module")
def bert():
    return tiny_bert(dropout=0.1)  # training mode with dropout: masks must match under remat


@pytest.mark.parametrize("spec", METHODS + COMPOSITIONS)
def test_bert_remat_same_gradients(bert, spec):
    model, params = bert
    batch = tiny_batch(batch=4)
    rng = jax.random.key(7)
    g0, l0 = _trainer_grads(model, params, spec, batch, rng)
    g1, l1 = _trainer_grads(_remat(model), params, spec, batch, rng)
    assert abs(l0 - l1) <= LOSS_TOL
    _assert_same_grads(g0, g1)


def test_remat_dropout_rng(bert):
    """Under remat in training mode dropout is live (other rng → other loss) and the recomputed
    forward pass reuses the same mask (same rng → the same loss and gradients as without)."""
    model, params = bert
    batch = tiny_batch(batch=4)
    rmodel = _remat(model)
    _, a = _trainer_grads(rmodel, params, "lora", batch, jax.random.key(1))
    others = [_trainer_grads(rmodel, params, "lora", batch, jax.random.key(k))[1] for k in (2, 3)]
    _, c = _trainer_grads(model, params, "lora", batch, jax.random.key(1))
    assert max(abs(a - b) for b in others) > 1e-4  # one other key may land close by chance
    assert abs(a - c) <= LOSS_TOL


def test_remat_parameter_tree_unchanged(bert):
    model, params = bert
    rparams = init_params(_remat(model), jax.random.key(0))
    assert set(P.flatten(rparams)) == set(P.flatten(params))


def _lm_grads(model, params, spec, rng, targets):
    from jpeft.methods.lora import LoraConfig

    transform = build(spec, {"lora": LoraConfig(r=2, targets=targets)})
    delta = perturb(transform.init(jax.random.key(0), params, model.info()), scale=0.05)
    ids = jax.random.randint(jax.random.key(3), (2, 6), 2, 99)
    mask = jnp.ones_like(ids).at[1, 4:].set(0)

    def loss(delta):
        ctx = ApplyContext(train=True, rng=rng)
        logits = apply(model, transform, params, delta, ids, mask, ctx=ctx)
        logits = logits[:, -ids.shape[1]:-1].astype(jnp.float32)  # drop prepended positions
        ll = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(ll, ids[:, 1:, None], axis=-1).mean()

    value, grads = jax.jit(jax.value_and_grad(loss))(delta)
    return grads, float(value)


@pytest.mark.parametrize("spec", ["lora", "prefix"])
def test_llama_remat_same_gradients(spec):
    from jpeft.models import llama

    config = llama.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=37,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               attention_dropout=0.1, initializer_range=0.2)
    model = llama.LlamaForCausalLM(config)
    params = llama.init_params(model, jax.random.key(0))
    rng = jax.random.key(5)
    g0, l0 = _lm_grads(model, params, spec, rng, r"(q_proj|v_proj|down_proj)$")
    g1, l1 = _lm_grads(_remat(model), params, spec, rng, r"(q_proj|v_proj|down_proj)$")
    assert abs(l0 - l1) <= LOSS_TOL
    _assert_same_grads(g0, g1)


def test_gpt2_remat_same_gradients():
    from jpeft.models import gpt2

    config = gpt2.GPT2Config(vocab_size=99, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                             n_inner=37, initializer_range=0.2)
    model = gpt2.GPT2LMHeadModel(config)
    params = gpt2.init_params(model, jax.random.key(0))
    rng = jax.random.key(5)
    g0, l0 = _lm_grads(model, params, "lora", rng, r"(c_attn|c_proj)$")
    g1, l1 = _lm_grads(_remat(model), params, "lora", rng, r"(c_attn|c_proj)$")
    assert abs(l0 - l1) <= LOSS_TOL
    _assert_same_grads(g0, g1)


def _deep_bert_trainer(remat: bool):
    config = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
                        intermediate_size=256, max_position_embeddings=128, remat=remat)
    model = BertModel(config)
    params = init_params(model, jax.random.key(0))
    trainer = Trainer(model, build("lora"), params, total_steps=4)
    return trainer, trainer.init_state(jax.random.key(0)), tiny_batch(batch=8, length=128, vocab=128)


def _residual_bytes(remat: bool) -> int:
    """Bytes JAX keeps from the forward pass for the backward pass (the vjp's residuals), by
    abstract evaluation (nothing is computed)."""
    trainer, state, batch = _deep_bert_trainer(remat)

    def residuals(trainable, frozen):
        loss = lambda t: trainer._loss(t, frozen, batch, jax.random.key(0))[0]
        return jax.vjp(loss, trainable)[1]

    leaves = jax.tree_util.tree_leaves(jax.eval_shape(residuals, state.trainable, trainer.frozen))
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves
               if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))


def test_remat_saves_fewer_residuals():
    """6 layers, batch 8×128: 96.8 MB of saved activations without remat, 2.8 MB with."""
    plain, remat = _residual_bytes(False), _residual_bytes(True)
    assert remat < 0.1 * plain, (plain, remat)


def _temp_bytes(remat: bool) -> int:
    trainer, state, batch = _deep_bert_trainer(remat)
    compiled = trainer.train_step.lower(state, trainer.frozen, batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_remat_lowers_compiled_temp_memory():
    """The compiled train step's temporary buffers shrink with remat on GPU/TPU. XLA:CPU (jax
    0.10) strips the optimization barriers that keep the recomputation in the backward pass and
    schedules it early, so there the numbers are equal (measured: 93.1 MB without, 93.9 MB with);
    the backend-independent check is :func:`test_remat_saves_fewer_residuals`."""
    if jax.default_backend() == "cpu":
        pytest.skip("XLA:CPU ignores rematerialisation in its schedule (see docstring)")
    plain, remat = _temp_bytes(False), _temp_bytes(True)
    assert remat < 0.6 * plain, (plain, remat)
