"""LoHa and LoKr (jpeft.methods.loha / lokr over jpeft.methods.kernel_delta): the written-out
ΔW on every layer kind, stacks and ``layers=``, identity, merge and unmerge, training-time
dropouts, PEFT's factorization rule, and refusals."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.core.transform import ApplyContext
from jpeft.methods.loha import LohaConfig, loha
from jpeft.methods.lokr import LokrConfig, factorization, lokr
from tests import own_models as M
from tests.helpers import perturb, tiny_batch, tiny_bert, train_tiny

KEY = jax.random.key(0)
TOL = dict(rtol=1e-4, atol=1e-5)
TARGETS = r"(query|value|out|up|down)$"


@pytest.fixture(scope="module")
def twins():
    return M.transformer_twins()


def _stacked_product(u, v):
    """``(L, *in, r) × (L, r, *out) -> (L, *in, *out)``, one layer at a time."""
    return np.stack([np.tensordot(u[i], v[i], axes=1) for i in range(u.shape[0])])


def test_loha_equals_the_written_out_formula_on_every_layer_kind_linen_and_nnx(twins):
    linen, nnx_model, params, ids = twins
    method = loha(LohaConfig(r=2, alpha=3.0, targets=TARGETS))
    fresh = method.init(KEY, params, linen.info())
    assert fresh["layers"]["query"]["w1_in"].shape == (M.LAYERS, M.D, 2)
    assert fresh["layers"]["query"]["w1_out"].shape == (M.LAYERS, 2, M.H, M.DH)
    assert fresh["layers"]["out"]["w2_in"].shape == (M.LAYERS, M.H, M.DH, 2)
    base_out = linen.module.apply({"params": params}, ids)
    np.testing.assert_array_equal(jpeft.apply(linen, method, params, fresh, ids), base_out)
    delta = perturb(fresh, scale=0.5)
    out = jpeft.apply(linen, method, params, delta, ids)
    assert float(jnp.abs(out - base_out).max()) > 1e-3
    np.testing.assert_allclose(jax.jit(lambda d: jpeft.apply(nnx_model, method, params, d, ids))(delta),
                               out, **TOL)
    merged = jpeft.merge(method, params, delta, linen.info())
    np.testing.assert_allclose(linen.module.apply({"params": merged}, ids), out, **TOL)
    for name in ("query", "out", "up", "down"):  # kernels (L, *in, *out) for these layers
        d = {k: np.asarray(v) for k, v in delta["layers"][name].items()}
        want = 1.5 * _stacked_product(d["w1_in"], d["w1_out"]) * _stacked_product(d["w2_in"], d["w2_out"])
        np.testing.assert_allclose(merged["layers"][name]["kernel"] - params["layers"][name]["kernel"],
                                   want, rtol=1e-4, atol=1e-6, err_msg=name)
    back = jpeft.unmerge(method, merged, delta, linen.info())
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cfg", [dict(r=1), dict(r=8), dict(r=1, decompose_both=True),
                                 dict(r=1, decompose_factor=2)])
def test_lokr_equals_the_kronecker_product_on_every_layer_kind(twins, cfg):
    linen, nnx_model, params, ids = twins
    method = lokr(LokrConfig(alpha=2.0, targets=TARGETS, **cfg))
    fresh = method.init(KEY, params, linen.info())
    np.testing.assert_array_equal(jpeft.apply(linen, method, params, fresh, ids),
                                  linen.module.apply({"params": params}, ids))
    delta = perturb(fresh, scale=0.5)
    out = jpeft.apply(linen, method, params, delta, ids)
    np.testing.assert_allclose(jpeft.apply(nnx_model, method, params, delta, ids), out, **TOL)
    merged = jpeft.merge(method, params, delta, linen.info())
    np.testing.assert_allclose(linen.module.apply({"params": merged}, ids), out, **TOL)
    s = 2.0 / cfg["r"]
    for name in ("query", "out", "up", "down"):
        d = {k: np.asarray(v) for k, v in delta["layers"][name].items()}
        kernel = np.asarray(params["layers"][name]["kernel"])
        for layer in range(M.LAYERS):
            w1 = d["w1"][layer] if "w1" in d else d["w1_in"][layer] @ d["w1_out"][layer]
            w2 = d["w2"][layer] if "w2" in d else d["w2_in"][layer] @ d["w2_out"][layer]
            want = s * np.kron(w1, w2).reshape(kernel.shape[1:])  # (d_in, d_out) grouped = kernel order
            np.testing.assert_allclose(merged["layers"][name]["kernel"][layer] - kernel[layer], want,
                                       rtol=1e-4, atol=1e-6, err_msg=f"{name}[{layer}]")


@pytest.mark.parametrize("make", [lambda: loha(LohaConfig(r=2, targets="down$", layers=(1,))),
                                  lambda: lokr(LokrConfig(r=1, targets="down$", layers=(1,),
                                                          decompose_both=True))])
def test_layers_inside_a_stack_leave_the_others_unadapted(twins, make):
    linen, _, params, ids = twins
    method = make()
    delta = method.init(KEY, params, linen.info())
    for leaf in jax.tree.leaves(delta):  # layers 0 and 2 hold zero factors, layer 1 some non-zero
        assert float(jnp.abs(leaf[0]).max()) == 0.0 and float(jnp.abs(leaf[2]).max()) == 0.0
    delta = jax.tree.map(lambda v: v.at[1].add(0.3), delta)
    grads = jax.grad(lambda d: jnp.sum(jpeft.apply(linen, method, params, d, ids) ** 2))(delta)
    for g in jax.tree.leaves(grads):  # a fixed point of training: no gradient reaches them
        assert float(jnp.abs(g[0]).max()) == 0.0 and float(jnp.abs(g[2]).max()) == 0.0
    assert max(float(jnp.abs(g[1]).max()) for g in jax.tree.leaves(grads)) > 0.0
    merged = jpeft.merge(method, params, delta, linen.info())["layers"]["down"]["kernel"]
    kernel = params["layers"]["down"]["kernel"]
    np.testing.assert_array_equal(merged[0], kernel[0])
    np.testing.assert_array_equal(merged[2], kernel[2])
    assert float(jnp.abs(merged[1] - kernel[1]).max()) > 1e-3


@pytest.mark.parametrize("method", [loha(LohaConfig(r=2)), lokr(LokrConfig(r=2))], ids=["loha", "lokr"])
def test_trains_on_tiny_bert_and_dropouts_act_in_training_only(method):
    model, params = tiny_bert()
    train_tiny(model, method, params)
    batch = tiny_batch()
    args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    delta = perturb(method.init(KEY, params, model.info()), scale=0.5)
    out = jpeft.apply(model, method, params, delta, *args)
    base = model.apply({"params": params}, *args)
    train = ApplyContext(train=True, rng=KEY)
    factory = loha if isinstance(method.config, LohaConfig) else lokr
    for field, value in (("module_dropout", 0.999), ("rank_dropout", 0.5)):
        t = factory(dataclasses.replace(method.config, **{field: value}))
        np.testing.assert_allclose(jpeft.apply(model, t, params, delta, *args), out, **TOL)  # eval
        trained = jpeft.apply(model, t, params, delta, *args, ctx=train)
        if field == "module_dropout":  # every layer's update skipped (p = 0.999)
            np.testing.assert_allclose(trained, base, **TOL)
        else:
            assert float(jnp.abs(trained - out).max()) > 1e-4


def test_factorization_follows_peft():
    lokr_layer = pytest.importorskip("peft.tuners.lokr.layer")
    assert factorization(256) == (16, 16) and factorization(127) == (1, 127)
    for dim in (1, 2, 6, 12, 16, 24, 96, 127, 128, 384, 768, 1000, 1536, 3072):
        for factor in (-1, 1, 2, 3, 4, 8, 16, 64):
            assert factorization(dim, factor) == lokr_layer.factorization(dim, factor), (dim, factor)


def test_refusals_name_the_problem():
    model, params = tiny_bert()
    with pytest.raises(ValueError, match="loha.r must be an integer >= 1"):
        LohaConfig(r=0)
    with pytest.raises(ValueError, match=r"lokr.rank_dropout must be in \[0, 1\)"):
        LokrConfig(rank_dropout=1.0)
    with pytest.raises(ValueError, match="lokr.decompose_factor must be -1"):
        LokrConfig(decompose_factor=0)
    with pytest.raises(jpeft.core.paths.NoMatchError, match="loha.targets"):
        loha(LohaConfig(targets="no_such_layer$")).init(KEY, params, model.info())
    batch = tiny_batch()
    args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    other = loha(LohaConfig(r=2)).init(KEY, params, model.info())
    with pytest.raises(KeyError, match="not lokr's"):
        jpeft.apply(model, lokr(LokrConfig(r=2)), params, other, *args)
    with pytest.raises(ValueError, match="do not fit its kernel"):
        jpeft.apply(model, loha(LohaConfig(r=3)), params, other, *args)
