"""Layer classes jpeft does not ship, made adaptable with ``jpeft.register_layer``: a dense with
its own call and a raw ``w`` fed to ``jnp.einsum`` (tests/own_models.py), in Linen and NNX."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jpeft
from jpeft.core import layers as L
from jpeft.core import paths as P
from jpeft.methods import (BitFitConfig, DiffPruningConfig, FreezeConfig, IA3Config, LohaConfig,
                           HraConfig, LokrConfig, LoraConfig, OftConfig, VeraConfig, bitfit, diff_pruning,
                           freeze, full, hra, ia3, loha, lokr, lora, oft, vera)
from tests import own_models as M
from tests.helpers import perturb

KEY = jax.random.key(0)
TOL = dict(rtol=1e-5, atol=1e-5)
X = jax.random.normal(jax.random.key(3), (4, 8))

M.register_custom_layers()


def weight_methods() -> dict[str, jpeft.Transform]:
    targets = r"(fc|proj|out)$"
    return {
        "lora": lora(LoraConfig(r=2, alpha=4.0, targets=targets)),
        "lora_options": lora(LoraConfig(r=2, alpha=4.0, targets=targets, use_rslora=True,
                                        init="gaussian", rank_pattern={"proj$": 3},
                                        alpha_pattern={"out$": 1.0}, bias="all")),
        "ia3": ia3(IA3Config(targets=targets, feedforward=r"out$")),
        "loha": loha(LohaConfig(r=2, targets=targets)),
        "lokr": lokr(LokrConfig(r=1, targets=targets, decompose_both=True)),
        "vera": vera(VeraConfig(r=3, targets=targets)),
        "oft": oft(OftConfig(block_size=4, targets=targets)),
        "hra": hra(HraConfig(r=2, targets=targets)),
        "bitfit": bitfit(BitFitConfig()),
        "diff_pruning": diff_pruning(DiffPruningConfig(pattern=r"(w|kernel)$")),
        "lora+ia3": jpeft.compose(lora(LoraConfig(r=2, alpha=4.0, targets=r"proj$")),
                                  ia3(IA3Config(targets=r"fc$", feedforward=""))),
    }


@pytest.fixture(scope="module")
def twins():
    nnx_model, params = jpeft.from_nnx(M.NnxCustom(nnx.Rngs(0)))
    linen = jpeft.from_linen(M.LinenCustom(), params, X)
    return linen, nnx_model, params


def test_registered_layers_are_described(twins):
    linen, nnx_model, params = twins
    for info in (linen.info(), nnx_model.info()):
        assert {p: (s.kind, s.kernel, s.bias) for p, s in info.layers.items()} == {
            "fc": ("dense", "kernel", "bias"), "proj": ("einsum", "w", None),
            "out": ("einsum", "w", None)}
        assert info.layers["proj"].in_shape == (16,) and info.layers["proj"].out_shape == (2, 4)
    np.testing.assert_allclose(linen.module.apply({"params": params}, X), nnx_model.module(params)(X),
                               **TOL)


@pytest.mark.parametrize("name", list(weight_methods()))
def test_every_weight_method_on_registered_layers(twins, name):
    linen, nnx_model, params = twins
    method = weight_methods()[name]
    fresh = method.init(KEY, params, linen.info())
    base_out = linen.module.apply({"params": params}, X)
    for model in (linen, nnx_model):
        np.testing.assert_allclose(jpeft.apply(model, method, params, fresh, X), base_out, **TOL)
    delta = perturb(fresh, scale=0.3)
    out = jpeft.apply(linen, method, params, delta, X)
    assert float(jnp.abs(out - base_out).max()) > 1e-3
    np.testing.assert_allclose(jax.jit(lambda p, d: jpeft.apply(nnx_model, method, p, d, X))(params, delta),
                               out, **TOL)
    merged = jpeft.merge(method, params, delta, linen.info())
    np.testing.assert_allclose(nnx_model.module(merged)(X), out, rtol=1e-4, atol=1e-5)
    back = jpeft.unmerge(method, merged, delta, linen.info())
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_lora_on_a_raw_einsum_equals_the_explicit_weight(twins):
    linen, _, params = twins
    method = lora(LoraConfig(r=2, alpha=6.0, targets=r"(proj|out)$"))
    delta = perturb(method.init(KEY, params, linen.info()), scale=0.3)
    assert delta["proj"]["lora_A"].shape == (16, 2) and delta["proj"]["lora_B"].shape == (2, 2, 4)
    assert delta["out"]["lora_A"].shape == (2, 4, 2) and delta["out"]["lora_B"].shape == (2, 3)
    explicit = dict(P.flatten(params))
    explicit["proj/w"] = explicit["proj/w"] + 3.0 * np.einsum(
        "dr,rnk->dnk", delta["proj"]["lora_A"], delta["proj"]["lora_B"])
    explicit["out/w"] = explicit["out/w"] + 3.0 * np.einsum(
        "nkr,ro->nko", delta["out"]["lora_A"], delta["out"]["lora_B"])
    np.testing.assert_allclose(jpeft.apply(linen, method, params, delta, X),
                               M.LinenCustom().apply({"params": P.unflatten(explicit)}, X),
                               rtol=1e-4, atol=1e-5)


class Layered(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = jnp.tanh(M.LinenRawEinsum("bd,de->be", (8, 8), name=f"layers_{i}")(x))
        return x


def test_freeze_and_full_train_registered_layers():
    params = Layered().init(KEY, X)["params"]
    model = jpeft.from_linen(Layered(), params, X)
    assert set(model.info().layers) == {"layers_0", "layers_1"}
    method = freeze(FreezeConfig(top=1, pooler=False))
    delta = method.init(KEY, params, model.info())
    assert P.paths(delta) == ["layers_1/w"]
    grads = jax.grad(lambda d: jnp.sum(jpeft.apply(model, method, params, d, X) ** 2))(delta)
    assert float(jnp.abs(grads["layers_1"]["w"]).max()) > 0.0
    assert full().trainable_base(params) == ["layers_0/w", "layers_1/w"]
    lo = lora(LoraConfig(r=2, targets=r"layers_\d$", layers=(1,)))
    assert P.paths(lo.init(KEY, params, model.info())) == ["layers_1/lora_A", "layers_1/lora_B"]


# -- unregistered classes, and the registration's own checks -----------------------------------

class LinenUnknown(nn.Module):
    einsum_str: str = "bd,de->be"

    @nn.compact
    def __call__(self, x):
        return jnp.einsum(self.einsum_str, x, self.param("w", nn.initializers.normal(), (8, 4)))


class WithUnknown(nn.Module):
    @nn.compact
    def __call__(self, x):
        return LinenUnknown(name="mystery")(x)


class NnxUnknown(nnx.Module):
    def __init__(self, rngs):
        self.einsum_str = "bd,de->be"
        self.w = nnx.Param(jax.random.normal(rngs.params(), (8, 4)))

    def __call__(self, x):
        return jnp.einsum(self.einsum_str, x, self.w.get_value())


class NnxWithUnknown(nnx.Module):
    def __init__(self, rngs):
        self.mystery = NnxUnknown(rngs)

    def __call__(self, x):
        return self.mystery(x)


@pytest.mark.parametrize("backend", ["linen", "nnx"])
def test_an_unregistered_class_is_named_with_the_line_that_registers_it(backend):
    if backend == "linen":
        params = WithUnknown().init(KEY, X)["params"]
        info = jpeft.from_linen(WithUnknown(), params, X).info()
        cls = "LinenUnknown"
    else:
        model, params = jpeft.from_nnx(NnxWithUnknown(nnx.Rngs(0)))
        info = model.info()
        cls = "NnxUnknown"
    line = (rf'jpeft.register_layer\(tests.core.test_own_models_registered.{cls}, kind="einsum", '
            r'kernel="w", equation="einsum_str"\)')
    for method in (lora(LoraConfig(targets="mystery$")), ia3(IA3Config(targets="mystery$", feedforward=""))):
        with pytest.raises(L.UnsupportedLayerError, match=rf"(?s)'mystery' is a {cls}.*{line}"):
            method.init(KEY, params, info)


def test_register_layer_checks_its_arguments_and_takes_a_spec_function():
    with pytest.raises(ValueError, match="kind must be 'dense' or 'einsum'"):
        jpeft.register_layer(NnxUnknown, kind="conv")
    with pytest.raises(ValueError, match="equation="):
        jpeft.register_layer(NnxUnknown, kind="einsum", kernel="w")
    with pytest.raises(TypeError, match="pass the layer class"):
        jpeft.register_layer(NnxUnknown(nnx.Rngs(0)))

    class Transposed(nnx.Module):  # y = x @ w.T: the kernel is stored (d_out, d_in)
        def __init__(self, rngs):
            self.w = nnx.Param(jax.random.normal(rngs.params(), (4, 8)))

        def __call__(self, x):
            return x @ self.w.get_value().T

    class Holder(nnx.Module):
        def __init__(self, rngs):
            self.t = Transposed(rngs)

        def __call__(self, x):
            return self.t(x)

    jpeft.register_layer(Transposed, kernel="w", spec=lambda module, shape: L.LayerSpec(
        "einsum", shape, (1,), (0,), einsum="bi,oi->bo"))
    model, params = jpeft.from_nnx(Holder(nnx.Rngs(0)))
    assert (model.info().layers["t"].kind, model.info().layers["t"].kernel) == ("einsum", "w")
    method = lora(LoraConfig(r=2, targets="t$"))
    delta = perturb(method.init(KEY, params, model.info()), scale=0.3)
    assert delta["t"]["lora_A"].shape == (8, 2) and delta["t"]["lora_B"].shape == (2, 4)
    out = jpeft.apply(model, method, params, delta, X)
    merged = jpeft.merge(method, params, delta, model.info())
    np.testing.assert_allclose(model.module(merged)(X), out, rtol=1e-4, atol=1e-5)
