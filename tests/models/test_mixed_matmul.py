"""Mixed-precision matmuls (``matmul_dtype="bfloat16"``): bf16 operands, float32 accumulation.

The reference for :func:`mixed_einsum` is a float32 ``einsum`` of the operands rounded to bf16 (in
the backward pass: of the cotangent rounded to bf16 too): the products of two bf16 numbers are
exact in float32, so the two differ only by the order of the float32 additions (≤ 1e-5 relative
here). Whole models with bf16 matmuls stay within 5e-2 (relative to the logits' scale) of
float32, as the bf16 base does (tests/train/test_base_dtype.py), and train.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpeft.methods import build
from jpeft.models import gpt2, llama
from jpeft.models.bert import BertConfig, BertModel
from jpeft.models.common import dense_dot_general, linear, matmul_einsum, mixed_einsum
from tests.helpers import tiny_batch, tiny_bert, train_tiny

BF16 = jnp.dtype(jnp.bfloat16)
REL_TOL = 5e-2

# Every contraction the models use: Dense (2-D), BERT attention, grouped-query attention.
SPECS = {
    "mk,kn->mn": ((24, 16), (16, 40)),
    "bqhd,bkhd->bhqk": ((2, 5, 3, 8), (2, 7, 3, 8)),
    "bhqk,bkhd->bqhd": ((2, 3, 5, 7), (2, 7, 3, 8)),
    "bthgd,bshd->bhgts": ((2, 5, 2, 3, 8), (2, 7, 2, 8)),
    "bhgts,bshd->bthgd": ((2, 2, 3, 5, 7), (2, 7, 2, 8)),
}


def _round(x):
    return x.astype(BF16).astype(jnp.float32)


def _operands(spec, seed=0):
    sa, sb = SPECS[spec]
    ka, kb, kg = jax.random.split(jax.random.key(seed), 3)
    return jax.random.normal(ka, sa), jax.random.normal(kb, sb), kg


@pytest.mark.parametrize("spec", list(SPECS))
def test_forward_is_the_float32_product_of_bf16_operands(spec):
    a, b, _ = _operands(spec)
    out = jax.jit(mixed_einsum, static_argnums=(0, 3))(spec, a, b, BF16)
    ref = jnp.einsum(spec, _round(a), _round(b), precision="highest")
    assert out.dtype == jnp.float32 and out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    # ... and not the float32 product: bf16 rounding is visible.
    assert float(jnp.max(jnp.abs(out - jnp.einsum(spec, a, b, precision="highest")))) > 1e-4


@pytest.mark.parametrize("spec", list(SPECS))
def test_backward_multiplies_in_bf16_too(spec):
    a, b, kg = _operands(spec, seed=1)
    g = jax.random.normal(kg, jnp.einsum(spec, a, b).shape)
    da, db = jax.jit(lambda x, y, c: jax.vjp(lambda u, v: mixed_einsum(spec, u, v, BF16), x, y)[1](c))(a, b, g)
    _, vjp_ref = jax.vjp(lambda x, y: jnp.einsum(spec, x, y, precision="highest"), _round(a), _round(b))
    da_ref, db_ref = vjp_ref(_round(g))
    assert da.dtype == a.dtype and db.dtype == b.dtype
    np.testing.assert_allclose(da, da_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(db, db_ref, rtol=1e-5, atol=1e-5)


def test_matmul_einsum_without_dtype_is_plain_einsum():
    a, b, _ = _operands("bqhd,bkhd->bhqk")
    np.testing.assert_array_equal(matmul_einsum("bqhd,bkhd->bhqk", a, b, None),
                                  jnp.einsum("bqhd,bkhd->bhqk", a, b))
    assert dense_dot_general(None) is dense_dot_general(None)  # hashable, cached
    assert dense_dot_general("bfloat16") is dense_dot_general("bfloat16")


def test_float32_dense_is_one_2d_gemm_without_a_transposed_cotangent():
    """``linear`` and the float32 Dense matmul equal ``x @ w`` in value and gradient, and the
    compiled gradient multiplies the cotangent as it is: no transposed copy (N, B·T) of it,
    which XLA:CPU writes for the 3-D contraction."""
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x, w = jax.random.normal(kx, (4, 6, 16)), jax.random.normal(kw, (16, 40))
    g = jax.random.normal(kg, (4, 6, 40))
    dims = (((2,), (0,)), ((), ()))
    dense = dense_dot_general(None)
    three_d = lambda u, v: jax.lax.dot_general(u, v, dims)
    ref, vjp_ref = jax.vjp(three_d, x, w)
    for f in (linear, lambda u, v: dense(u, v, dims)):
        out, vjp = jax.vjp(f, x, w)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
        for got, want in zip(vjp(g), vjp_ref(g)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    def transposed_cotangents(f):
        grad = jax.jit(jax.grad(lambda u, v: jnp.sum(jnp.tanh(f(u, v))), argnums=(0, 1)))
        return re.findall(r"f32\[40,(?:24|4,6)\]", grad.lower(x, w).compile().as_text())

    assert transposed_cotangents(three_d)  # the form the helper avoids (so this test can fail)
    assert not transposed_cotangents(linear)
    assert not transposed_cotangents(lambda u, v: dense(u, v, dims))
    with pytest.raises(ValueError, match="x\\(...,K\\)·W\\(K,N\\) only"):
        dense(x, w, (((1,), (0,)), ((), ())))


def test_bad_input_is_refused():
    a, b, _ = _operands("mk,kn->mn")
    with pytest.raises(ValueError, match="appear nowhere else"):
        mixed_einsum("mk,kn->m", a, b, BF16)
    with pytest.raises(ValueError, match="explicit indices"):
        mixed_einsum("...k,kn->...n", a, b, BF16)
    with pytest.raises(ValueError, match="matmul_dtype='float16'"):
        BertConfig(matmul_dtype="float16")
    with pytest.raises(ValueError, match="matmul_dtype"):
        llama.LlamaConfig(matmul_dtype="int8")


def _relative_error(out, ref):
    return float(jnp.max(jnp.abs(out - ref))) / float(jnp.max(jnp.abs(ref)))


def test_bert_logits_close_to_float32():
    model, params = tiny_bert(hidden=32, heads=4)
    mixed = BertModel(dataclasses.replace(model.config, matmul_dtype="bfloat16"))
    batch = tiny_batch(batch=4, length=9)
    args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    ref, out = (jax.jit(m.apply)({"params": params}, *args) for m in (model, mixed))
    err = _relative_error(out, ref)
    assert 0 < err <= REL_TOL, err


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_decoder_logits_close_to_float32(family):
    if family == "llama":
        config = llama.LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        cls, init = llama.LlamaForCausalLM, llama.init_params
    else:
        config = gpt2.GPT2Config(vocab_size=32, n_positions=64, n_embd=32, n_layer=2, n_head=4)
        cls, init = gpt2.GPT2LMHeadModel, gpt2.init_params
    model = cls(config)
    params = init(model, jax.random.key(0))
    mixed = cls(dataclasses.replace(config, matmul_dtype="bfloat16"))
    ids = jax.random.randint(jax.random.key(1), (2, 9), 0, 32)
    ref, out = (jax.jit(m.apply)({"params": params}, ids) for m in (model, mixed))
    err = _relative_error(out, ref)
    assert 0 < err <= REL_TOL, err


@pytest.mark.parametrize("spec", ["lora", "full"])
def test_bert_with_bf16_matmuls_trains(spec):
    """Trained weights (full) get their float32 gradients through the bf16 products too."""
    model, params = tiny_bert(hidden=32, heads=4)
    mixed = BertModel(dataclasses.replace(model.config, matmul_dtype="bfloat16"))
    state, _ = train_tiny(mixed, build(spec), params)
    floats = [x for x in jax.tree_util.tree_leaves(state.trainable) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float32 for x in floats)
