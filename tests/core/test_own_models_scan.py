"""Inside a scan stack (tests/own_models.py's transformer, Linen nn.scan and NNX nnx.scan):
activation-space methods at taps in the scan body, and layer freezing of single layers of the
stacked leaves."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jpeft
from jpeft.core import paths as P
from jpeft.methods import (AdapterConfig, FreezeConfig, PrefixConfig, PromptConfig, PTuningConfig,
                           PTuningV2Config, freeze, houlsby, pfeiffer, prefix, prompt, ptuning,
                           ptuning2)
from jpeft.train.optim import OptimConfig
from jpeft.train.trainer import Trainer
from tests import own_models as M
from tests.helpers import perturb

KEY = jax.random.key(0)
TOL = dict(rtol=1e-5, atol=1e-5)


def methods() -> dict[str, jpeft.Transform]:
    return {
        "houlsby": houlsby(AdapterConfig(size=4)),
        "pfeiffer_layers": pfeiffer(AdapterConfig(size=4, layers=(0, 2))),
        "prefix": prefix(PrefixConfig(num_virtual_tokens=2, projection_hidden=8)),
        "ptuning2_layers": ptuning2(PTuningV2Config(num_virtual_tokens=2, layers=(1,))),
        "prompt": prompt(PromptConfig(num_virtual_tokens=2, init="random")),
        "ptuning": ptuning(PTuningConfig(num_virtual_tokens=2, encoder_hidden=8)),
    }


@pytest.fixture(scope="module")
def models():
    """(scanned Linen, unrolled Linen, NNX, stacked params, unstacked params, ids), one set of
    weights; every model also returns each layer's output."""
    module, params, ids = M.linen_transformer()
    scanned = jpeft.from_linen(M.LinenTransformer(per_layer=True), params, ids)
    flat = M.unstack(params)
    unrolled = jpeft.from_linen(M.LinenTransformer(per_layer=True, unrolled=True), flat, ids)
    nnx_model, nnx_params = jpeft.from_nnx(M.NnxTransformer(nnx.Rngs(0), per_layer=True), ids)
    assert P.flatten(nnx_params).keys() == P.flatten(params).keys()
    return scanned, unrolled, nnx_model, params, flat, ids


def _run(model, method, params, delta, ids):
    return jax.jit(lambda p, d: jpeft.apply(model, method, p, d, ids))(params, delta)


def test_taps_in_scan_bodies_are_described(models):
    scanned, unrolled, nnx_model, *_ = models
    for info in (scanned.info(), nnx_model.info()):
        assert info.num_layers == M.LAYERS and info.hidden_size == M.D
        assert (info.num_kv_heads, info.head_dim) == (M.H, M.DH)
        assert set(info.taps) == {"embed.inputs", "attn.kv", "attn.out", "ffn.out"}
    assert unrolled.info().taps["attn.kv"] == M.LAYERS and unrolled.info().num_layers == M.LAYERS


@pytest.mark.parametrize("name", list(methods()))
def test_every_activation_method_in_a_scan_body_equals_the_unrolled_model(models, name):
    scanned, unrolled, nnx_model, params, flat, ids = models
    method = methods()[name]
    fresh = method.init(KEY, params, scanned.info())
    assert jax.tree.structure(fresh) == jax.tree.structure(method.init(KEY, flat, unrolled.info()))
    base_out, base_hs = scanned.module.apply({"params": params}, ids)
    if not method.adds_tokens:  # a fresh adapter is the identity, in the scan body too
        for model in (scanned, nnx_model):
            out, hs = _run(model, method, params, fresh, ids)
            np.testing.assert_allclose(out, base_out, **TOL)
            np.testing.assert_allclose(hs, base_hs, **TOL)
    delta = perturb(fresh, scale=0.3)
    want_out, want_hs = _run(unrolled, method, flat, delta, ids)  # static layer numbers
    assert float(jnp.abs(want_out - base_out).max()) > 1e-4
    for model in (scanned, nnx_model):
        out, hs = _run(model, method, params, delta, ids)
        np.testing.assert_allclose(out, want_out, **TOL)
        np.testing.assert_allclose(hs, want_hs, **TOL)


@pytest.mark.parametrize("name", ["houlsby", "ptuning2"])
def test_layer_i_parameters_change_only_layer_i(models, name):
    scanned, _, nnx_model, params, _, ids = models
    method = {"houlsby": houlsby(AdapterConfig(size=4)),
              "ptuning2": ptuning2(PTuningV2Config(num_virtual_tokens=2, layers=(1,)))}[name]
    delta = method.init(KEY, params, scanned.info())
    if name == "houlsby":  # only layer 1's adapters do something
        delta["layer_1"] = perturb(delta["layer_1"], scale=0.5)
    _, base_hs = scanned.module.apply({"params": params}, ids)
    for model in (scanned, nnx_model):
        _, hs = _run(model, method, params, delta, ids)
        np.testing.assert_allclose(hs[0], base_hs[0], **TOL)  # layer 0: untouched
        assert float(jnp.abs(hs[1] - base_hs[1]).max()) > 1e-3  # layer 1: adapted
    # the gradient reaches layer 1's parameters only
    grads = jax.grad(lambda d: jnp.sum(jpeft.apply(scanned, method, params, d, ids)[1] ** 2))(delta)
    if name == "houlsby":
        assert float(jnp.abs(grads["layer_1"]["ffn_out"]["up"]["kernel"]).max()) > 0.0
        assert set(grads) == {f"layer_{i}" for i in range(M.LAYERS)}
    else:
        assert grads["prefix"].shape == (2, 1 * 2 * M.H * M.DH)  # one layer's table
        assert float(jnp.abs(grads["prefix"]).max()) > 0.0


# -- freezing single layers of a stacked leaf -----------------------------------------------------

@pytest.mark.parametrize("backend,config", [("linen", FreezeConfig(top=1, pooler=False)),
                                            ("nnx", FreezeConfig(layers=(0, 1), pooler=False))])
def test_freeze_trains_only_the_selected_slices_of_a_scan_stack(models, backend, config):
    _, _, nnx_model, params, _, ids = models
    module, _, _ = M.linen_transformer()
    model = (jpeft.from_linen(module, params, ids, head_patterns=("^head/",)) if backend == "linen"
             else jpeft.from_nnx(M.NnxTransformer(nnx.Rngs(0)), head_patterns=("^head/",))[0])
    method = freeze(config)
    rows = config.trained_layers(M.LAYERS)
    delta = method.init(KEY, params, model.info())
    stacked = P.flatten(params["layers"])
    assert {p: d.shape for p, d in P.flatten(delta["layers"]).items()} == {
        p: (len(rows), *v.shape[1:]) for p, v in stacked.items()}  # the trained rows only
    assert "embed" not in delta and "head" not in delta
    trainer = Trainer(model, method, params, optim=OptimConfig(lr=1e-2, warmup_ratio=0.0),
                      total_steps=3, model_inputs=("input_ids",))
    state = trainer.init_state(KEY)
    batch = {"input_ids": ids, "labels": jnp.array([0, 1]), "weights": jnp.ones(2)}
    for _ in range(3):
        state, _ = trainer.train_step(state, trainer.frozen, batch)
    trained = state.trainable["delta"]
    merged = P.flatten(jpeft.merge(method, params, trained, model.info())["layers"])
    changed = set()
    for path, before in stacked.items():
        after = np.asarray(merged[path])
        for i in range(M.LAYERS):
            if i in rows and not np.array_equal(after[i], np.asarray(before[i])):
                changed.add(i)
            elif i not in rows:
                np.testing.assert_array_equal(after[i], np.asarray(before[i]))  # bit-identical
    assert changed == set(rows)
    out = jpeft.apply(model, method, params, trained, ids)
    np.testing.assert_allclose(out, module.apply({"params": P.unflatten({
        **P.flatten(params), **{f"layers/{p}": v for p, v in merged.items()}})}, ids), **TOL)
    back = jpeft.unmerge(method, jpeft.merge(method, params, trained, model.info()), trained)
    np.testing.assert_allclose(back["layers"]["down"]["kernel"], params["layers"]["down"]["kernel"],
                               rtol=1e-5, atol=1e-6)


def test_freeze_without_layer_numbers_or_a_description_says_what_to_pass(models):
    params = models[3]
    with pytest.raises(ValueError, match=r"no leaf is stacked.*jpeft.from_linen"):
        freeze(FreezeConfig(top=1)).init(KEY, params)
    with pytest.raises(ValueError, match=r"freeze.layers=\[5\].*3 layers"):
        freeze(FreezeConfig(layers=(5,))).init(KEY, params, models[0].info())
