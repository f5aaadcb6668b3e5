"""HRA (jpeft.methods.hra): the written-out chain of reflections, identity at init, Hᵀ W on every
layer kind, merge/unmerge, stacks with ``layers=``, PEFT both ways, the MiniLM count."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.methods.hra import HraConfig, hra, reflections
from tests import own_models as M
from tests.helpers import minilm_trainable_counts, perturb

KEY = jax.random.key(0)
TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("apply_gs", [False, True])
def test_reflections_are_the_written_out_product_and_orthogonal(apply_gs):
    u = np.asarray(jax.random.normal(KEY, (6, 4)), np.float64)
    h = np.asarray(reflections(HraConfig(r=4, apply_gs=apply_gs), jnp.asarray(u, jnp.float32)), np.float64)
    if apply_gs:
        q, _ = np.linalg.qr(u)  # the same orthonormal basis up to signs, which cancel in q qᵀ
        want = np.eye(6) - 2 * q @ q.T
    else:
        want = np.eye(6)
        for i in range(4):
            v = u[:, i:i + 1] / np.linalg.norm(u[:, i])
            want = want @ (np.eye(6) - 2 * v @ v.T)
    np.testing.assert_allclose(h, want, atol=1e-5)
    np.testing.assert_allclose(h @ h.T, np.eye(6), atol=1e-5)


def test_every_layer_kind_linen_nnx_merge_unmerge_and_stacks():
    linen, nnx_model, params, ids = M.transformer_twins()
    method = hra(HraConfig(r=2, targets=r"(query|out|up|down)$"))
    fresh = method.init(KEY, params, linen.info())
    base_out = linen.module.apply({"params": params}, ids)
    np.testing.assert_allclose(jpeft.apply(linen, method, params, fresh, ids), base_out, **TOL)
    delta = perturb(fresh, scale=0.5)
    out = jpeft.apply(linen, method, params, delta, ids)
    assert float(jnp.abs(out - base_out).max()) > 1e-3
    np.testing.assert_allclose(jpeft.apply(nnx_model, method, params, delta, ids), out, **TOL)
    merged = jpeft.merge(method, params, delta, linen.info())
    np.testing.assert_allclose(linen.module.apply({"params": merged}, ids), out, **TOL)
    u = np.asarray(delta["layers"]["down"]["hra_u"][1], np.float64)  # down: kernel (L, F, D)
    h = np.asarray(reflections(method.config, jnp.asarray(u, jnp.float32)), np.float64)
    np.testing.assert_allclose(merged["layers"]["down"]["kernel"][1],
                               h.T @ np.asarray(params["layers"]["down"]["kernel"][1]), rtol=1e-4, atol=1e-5)
    back = jpeft.unmerge(method, merged, delta, linen.info())
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
    only = hra(HraConfig(r=2, targets=r"down$", layers=(1,)))
    d = perturb(only.init(KEY, params, linen.info()), scale=0.5)
    grads = jax.grad(lambda dd: jnp.sum(jpeft.apply(linen, only, params, dd, ids) ** 2))(d)
    g = grads["layers"]["down"]["hra_u"]
    assert float(jnp.abs(g[0]).max()) == 0.0 and float(jnp.abs(g[2]).max()) == 0.0
    assert float(jnp.abs(g[1]).max()) > 0.0 and bool(jnp.isfinite(g).all())
    np.testing.assert_array_equal(jpeft.merge(only, params, d, linen.info())["layers"]["down"]["kernel"][0],
                                  params["layers"]["down"]["kernel"][0])


def test_odd_ranks_are_refused():
    with pytest.raises(ValueError, match="hra.r must be an even integer"):
        HraConfig(r=3)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("apply_gs", [False, True])
def test_peft_adapters_both_ways(tmp_path, apply_gs):
    peft = pytest.importorskip("peft")
    pytest.importorskip("torch")
    from jpeft.checkpoint.hf_peft import load_peft_adapter, save_peft_adapter
    from tests.checkpoint.test_hf_peft import (
        _trained_head, base_logits, batch, compare, fresh_hf, hf_base, hf_logits, jpeft_pair, make_adapter,
        our_logits)

    pm, model, base, folder = make_adapter(tmp_path, peft.HRAConfig(
        task_type="SEQ_CLS", r=4, apply_GS=apply_gs, target_modules=["query", "value", "output.dense"]))
    data = batch()
    transform, delta, params = load_peft_adapter(folder, model, base)
    compare("hra/import", our_logits(model, transform, params, delta, data), hf_logits(pm, data),
            base_logits(model, base, data))
    hf, state = hf_base()
    model, base = jpeft_pair(hf, state)
    method = hra(HraConfig(r=2, apply_gs=apply_gs, targets=r"(query|value|dense)$"))
    delta = perturb(method.init(KEY, base, model.info()), scale=2.0)
    params = _trained_head(base)
    out = save_peft_adapter(tmp_path / "ours", method, delta, params, base_model_name_or_path="tiny",
                            model=model)
    loaded = peft.PeftModel.from_pretrained(fresh_hf("bert", 2, state), str(out)).eval()
    compare("hra/export", our_logits(model, method, params, delta, data), hf_logits(loaded, data),
            our_logits(model, method, params, method.init(KEY, base, model.info()), data))


@pytest.mark.real
def test_minilm_count_equals_peft_s(minilm_dir):
    peft = pytest.importorskip("peft")
    assert minilm_trainable_counts(minilm_dir, hra(HraConfig()), peft.HRAConfig(
        task_type="SEQ_CLS", r=8, target_modules=["query", "value"])) == (12 * 384 * 8 + 770,) * 2
