"""Every weight-space method on Linen and NNX models jpeft did not write (tests/own_models.py)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jpeft
from jpeft.core import layers as L
from jpeft.core import paths as P
from jpeft.methods import (BitFitConfig, DiffPruningConfig, IA3Config, LoraConfig, bitfit,
                           diff_pruning, full, ia3, lora)
from tests import own_models as M
from tests.helpers import perturb

KEY = jax.random.key(0)
TOL = dict(rtol=1e-5, atol=1e-5)


def transformer_methods() -> dict[str, jpeft.Transform]:
    targets = r"(query|value|out|up|down)$"
    return {
        "lora": lora(LoraConfig(r=2, alpha=4.0, targets=targets)),
        "lora_rslora_patterns": lora(LoraConfig(r=2, alpha=4.0, targets=targets, use_rslora=True,
                                                rank_pattern={"up$": 3}, alpha_pattern={"down$": 1.0})),
        "lora_layers": lora(LoraConfig(r=2, alpha=4.0, targets=targets, layers=(1,))),
        "ia3": ia3(IA3Config(targets=r"(key|value|down)$", feedforward=r"down$")),
        "bitfit": bitfit(BitFitConfig()),
        "diff_pruning": diff_pruning(DiffPruningConfig(pattern=r"layers/(query|down)/kernel$")),
        "lora+bitfit": jpeft.compose(lora(LoraConfig(r=2, alpha=4.0, targets=targets)), bitfit()),
        "bitfit+ia3": jpeft.compose(bitfit(), ia3(IA3Config(targets=r"(value|out)$", feedforward=""))),
    }


@pytest.fixture(scope="module")
def twins():
    """The Linen and NNX transformers with the same weights: (linen model, nnx model, params, ids)."""
    module, params, ids = M.linen_transformer()
    linen = jpeft.from_linen(module, params, ids, head_patterns=("^head/",))
    nnx_model, nnx_params = jpeft.from_nnx(M.NnxTransformer(nnx.Rngs(0)), head_patterns=("^head/",))
    assert P.flatten(nnx_params).keys() == P.flatten(params).keys()
    return linen, nnx_model, params, ids


def test_linen_and_nnx_twins_compute_the_same_function(twins):
    linen, nnx_model, params, ids = twins
    plain = linen.module.apply({"params": params}, ids)
    rebuilt = nnx_model.module(params)(ids)
    np.testing.assert_allclose(plain, rebuilt, **TOL)


@pytest.mark.parametrize("name", list(transformer_methods()))
def test_every_method_same_on_linen_and_nnx_identity_and_merge(twins, name):
    linen, nnx_model, params, ids = twins
    method = transformer_methods()[name]
    assert linen.info().layers.keys() == nnx_model.info().layers.keys()
    fresh = method.init(KEY, params, linen.info())
    base_out = linen.module.apply({"params": params}, ids)
    for model in (linen, nnx_model):  # a fresh delta is the identity
        np.testing.assert_allclose(jpeft.apply(model, method, params, fresh, ids), base_out, **TOL)
    delta = perturb(fresh, scale=0.2)
    out_linen = jpeft.apply(linen, method, params, delta, ids)
    out_nnx = jax.jit(lambda p, d: jpeft.apply(nnx_model, method, p, d, ids))(params, delta)
    assert float(jnp.abs(out_linen - base_out).max()) > 1e-3  # the delta does something
    np.testing.assert_allclose(out_linen, out_nnx, **TOL)
    merged = jpeft.merge(method, params, delta, linen.info())
    np.testing.assert_allclose(linen.module.apply({"params": merged}, ids), out_linen, **TOL)
    np.testing.assert_allclose(nnx_model.module(merged)(ids), out_linen, **TOL)
    back = jpeft.unmerge(method, merged, delta, linen.info())
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_under_scan_layer_i_factors_change_only_layer_i(twins):
    linen, _, params, ids = twins
    method = lora(LoraConfig(r=2, alpha=2.0, targets=r"down$"))
    delta = method.init(KEY, params, linen.info())
    a = delta["layers"]["down"]["lora_A"]
    assert a.shape == (M.LAYERS, M.F, 2) and delta["layers"]["down"]["lora_B"].shape == (M.LAYERS, 2, M.D)
    b = jnp.zeros_like(delta["layers"]["down"]["lora_B"]).at[1].set(1.0)
    delta["layers"]["down"]["lora_B"] = b
    merged = jpeft.merge(method, params, delta, linen.info())
    change = jnp.abs(merged["layers"]["down"]["kernel"] - params["layers"]["down"]["kernel"])
    assert float(change[0].max()) == 0.0 and float(change[2].max()) == 0.0
    np.testing.assert_allclose(change[1], jnp.abs(a[1] @ b[1]), rtol=1e-5)
    np.testing.assert_allclose(jpeft.apply(linen, method, params, delta, ids),
                               linen.module.apply({"params": merged}, ids), **TOL)


def test_layers_selects_inside_a_stack_and_the_others_never_train(twins):
    linen, _, params, ids = twins
    method = lora(LoraConfig(r=2, alpha=2.0, targets=r"down$", layers=(1,)))
    delta = perturb(method.init(KEY, params, linen.info()), scale=0.0)
    a = delta["layers"]["down"]["lora_A"]
    assert float(jnp.abs(a[0]).max()) == 0.0 and float(jnp.abs(a[1]).max()) > 0.0

    def loss(d):
        return jnp.sum(jpeft.apply(linen, method, params, d, ids) ** 2)

    grads = jax.grad(loss)(perturb(delta, seed=3, scale=0.0))
    g = grads["layers"]["down"]
    assert float(jnp.abs(g["lora_A"][0]).max()) == 0.0 and float(jnp.abs(g["lora_B"][0]).max()) == 0.0
    assert float(jnp.abs(g["lora_B"][1]).max()) > 0.0


# -- LoRA equals the explicit W + s·ΔW on every layer kind -----------------------------------------

class InterleavedEinsum(nn.Module):
    """Gemma's query projection: 'BTD,NDH->BTNH' (input axis between two output axes)."""

    @nn.compact
    def __call__(self, x):
        return nn.Einsum((2, 8, 4), "btd,ndh->btnh", name="q")(x)


def _explicit(kind: str, a, b):
    """ΔW written out per layer kind (independently of jpeft.core.layers)."""
    return {
        "dense": lambda: np.einsum("ir,ro->io", a, b),
        "proj": lambda: np.einsum("ir,rhd->ihd", a, b),
        "ein": lambda: np.einsum("hdr,ro->hdo", a, b),
        "conv": lambda: np.einsum("hwir,ro->hwio", a, b),
        "q": lambda: np.einsum("dr,rnh->ndh", a, b),
    }[kind]()


@pytest.mark.parametrize("backend,case", [("linen", "mlp"), ("linen", "conv"), ("linen", "interleaved"),
                                          ("nnx", "mlp"), ("nnx", "conv")])
def test_lora_equals_the_explicit_weight(backend, case):
    x = {"mlp": jnp.ones((3, 8)), "conv": jax.random.normal(KEY, (2, 9, 9, 3)),
         "interleaved": jax.random.normal(KEY, (2, 5, 8))}[case] * 0.5
    if backend == "linen":
        module = {"mlp": M.LinenMLP(), "conv": M.LinenConvNet(), "interleaved": InterleavedEinsum()}[case]
        params = module.init(KEY, x)["params"]
        model = jpeft.from_linen(module, params, x)
        run = lambda p: module.apply({"params": p}, x)
    else:
        module = {"mlp": M.NnxMLP, "conv": M.NnxConvNet}[case](nnx.Rngs(0))
        model, params = jpeft.from_nnx(module)
        run = lambda p: model.module(p)(x)
    targets = {"mlp": r"(fc1|proj|ein)$", "conv": r"conv\d$|pointwise$", "interleaved": "q$"}[case]
    method = lora(LoraConfig(r=2, alpha=6.0, targets=targets))
    delta = perturb(method.init(KEY, params, model.info()), scale=0.3)
    explicit = P.flatten(params)
    for path, leaves in jpeft.core.model.group_by_module(delta).items():
        kind = {"fc1": "dense", "proj": "proj", "ein": "ein", "q": "q"}.get(path, "conv")
        explicit[f"{path}/kernel"] = explicit[f"{path}/kernel"] + 3.0 * _explicit(
            kind, np.asarray(leaves["lora_A"]), np.asarray(leaves["lora_B"]))
    want = run(P.unflatten(explicit))
    np.testing.assert_allclose(jpeft.apply(model, method, params, delta, x), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(run(jpeft.merge(method, params, delta, model.info())), want,
                               rtol=1e-4, atol=1e-5)


def test_ia3_on_conv_and_dense_general_matches_its_merge():
    x = jax.random.normal(KEY, (2, 9, 9, 3))
    module = M.LinenConvNet()
    params = module.init(KEY, x)["params"]
    model = jpeft.from_linen(module, params, x)
    method = ia3(IA3Config(targets=r"conv\d$|pointwise$", feedforward="pointwise$"))
    delta = perturb(method.init(KEY, params, model.info()), scale=0.3)
    assert delta["conv1"]["ia3_l"].shape == (6,) and delta["pointwise"]["ia3_l"].shape == (8,)
    merged = jpeft.merge(method, params, delta, model.info())
    np.testing.assert_allclose(jpeft.apply(model, method, params, delta, x),
                               module.apply({"params": merged}, x), rtol=1e-4, atol=1e-5)


# -- training: only the delta gets gradients, on an NNX model -----------------------------------

def test_trainer_on_an_nnx_model_trains_only_the_delta_and_the_head(twins):
    from jpeft.train.optim import OptimConfig
    from jpeft.train.trainer import Trainer

    _, nnx_model, params, ids = twins
    method = lora(LoraConfig(r=2, alpha=4.0, targets=r"(query|value)$"))
    trainer = Trainer(nnx_model, method, params, optim=OptimConfig(lr=5e-2, warmup_ratio=0.0),
                      total_steps=6, model_inputs=("input_ids",))
    assert set(P.flatten(trainer.frozen)) == set(P.flatten(params)) - {"head/kernel", "head/bias"}
    state = trainer.init_state(KEY)
    assert set(P.flatten(state.trainable["delta"])) == {
        f"layers/{m}/lora_{f}" for m in ("query", "value") for f in "AB"}
    batch = {"input_ids": ids, "labels": jnp.array([0, 1]), "weights": jnp.ones(2)}
    losses = []
    for _ in range(6):
        state, metrics = trainer.train_step(state, trainer.frozen, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]


# -- errors ---------------------------------------------------------------------------------------

def test_a_pattern_that_matches_nothing_lists_the_layers():
    x = jnp.ones((3, 8))
    params = M.LinenMLP().init(KEY, x)["params"]
    with pytest.raises(P.NoMatchError, match=r"(?s)nothing_here.*fc1.*proj.*ein"):
        lora(LoraConfig(targets="nothing_here")).init(KEY, params)


def test_a_kernel_of_rank_3_without_a_description_says_how_to_describe_the_model():
    x = jnp.ones((3, 8))
    params = M.LinenMLP().init(KEY, x)["params"]
    with pytest.raises(ValueError, match=r"'proj' has a 3-D kernel.*jpeft.from_linen"):
        lora(LoraConfig(targets="proj$")).init(KEY, params)
    # Dense kernels need no description at all
    delta = lora(LoraConfig(targets="fc1$")).init(KEY, params)
    assert delta["fc1"]["lora_A"].shape == (8, 8)


class WithTransposedConv(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.ConvTranspose(4, (3, 3), name="up")(nn.Dense(3, name="fc")(x))


class RawKernel(nn.Module):
    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 4))
        return x @ kernel


class UsesRaw(nn.Module):
    @nn.compact
    def __call__(self, x):
        return RawKernel(name="raw")(x)


def test_a_layer_type_a_method_cannot_adapt_is_named():
    x = jnp.ones((1, 5, 5, 3))
    module = WithTransposedConv()
    params = module.init(KEY, x)["params"]
    model = jpeft.from_linen(module, params, x)
    assert model.info().layers["up"].kind == "unsupported"
    with pytest.raises(L.UnsupportedLayerError, match="ConvTranspose"):
        lora(LoraConfig(targets="up$")).init(KEY, params, model.info())
    # a 2-D kernel used by the model's own code: refused when the model runs
    raw = UsesRaw()
    params = raw.init(KEY, jnp.ones((2, 3)))["params"]
    method = lora(LoraConfig(targets="raw$"))
    delta = method.init(KEY, params)
    with pytest.raises(L.UnsupportedLayerError, match="'raw' is a RawKernel"):
        jpeft.apply(raw, method, params, delta, jnp.ones((2, 3)))
    # NNX: the type is known from the graph
    nnx_model, nnx_params = jpeft.from_nnx(M.NnxMLP(nnx.Rngs(0)))
    assert nnx_model.info().layers["fc1"].kind == "dense"


def test_grouped_convs_are_refused_with_the_reason():
    module = nn.Conv(4, (3, 3), feature_group_count=2)
    x = jnp.ones((1, 5, 5, 4))
    params = module.init(KEY, x)["params"]

    class Wrap(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(4, (3, 3), feature_group_count=2, name="grouped")(x)

    params = Wrap().init(KEY, x)["params"]
    model = jpeft.from_linen(Wrap(), params, x)
    with pytest.raises(L.UnsupportedLayerError, match="feature_group_count=2"):
        lora(LoraConfig(targets="grouped$")).init(KEY, params, model.info())


def test_optax_masks_gradients_with_nnx_params(twins):
    """The delta is a plain pytree: optax and jax.grad take it as it is."""
    _, nnx_model, params, ids = twins
    method = ia3(IA3Config(targets="value$", feedforward=""))
    delta = method.init(KEY, params, nnx_model.info())
    grads = jax.grad(lambda d: jnp.sum(jpeft.apply(nnx_model, method, params, d, ids)))(delta)
    opt = optax.adam(1e-2)
    updates, _ = opt.update(grads, opt.init(delta))
    assert jax.tree.structure(updates) == jax.tree.structure(delta)


def test_a_bank_on_the_nnx_model_runs_each_example_with_its_own_delta(twins):
    from jpeft.bank import bank, select

    _, nnx_model, params, ids = twins
    inner = lora(LoraConfig(r=2, alpha=4.0, targets=r"(query|down)$"))
    method = bank(inner, size=2, heads=False)
    deltas = perturb(method.init(KEY, params, nnx_model.info()), scale=0.2)
    index = jnp.array([1, 0])
    mixed = jpeft.apply(nnx_model, method, params, deltas, ids,
                        ctx=jpeft.ApplyContext(adapter_index=index))
    for row, k in enumerate(index.tolist()):
        alone = jpeft.apply(nnx_model, inner, params, select(deltas, k)["adapters"], ids[row:row + 1])
        np.testing.assert_allclose(mixed[row], alone[0], rtol=1e-4, atol=1e-5)


class NnxWithDropout(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.fc = nnx.Linear(8, 8, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.drop(self.fc(x))


class LinenWithTrainFlag(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        return nn.Dropout(0.5, deterministic=not train)(nn.Dense(8, name="fc")(x))


@pytest.mark.parametrize("backend", ["linen", "nnx"])
def test_training_mode_and_dropout_keys_come_from_the_context(backend):
    x = jnp.ones((4, 8))
    if backend == "nnx":
        model, params = jpeft.from_nnx(NnxWithDropout(nnx.Rngs(0, dropout=1)))
        plain = model.module(params)
        plain.eval()
        base_out = plain(x)
    else:
        model = LinenWithTrainFlag()
        params = model.init(KEY, x, False)["params"]
        base_out = model.apply({"params": params}, x, False)
    method = lora(LoraConfig(targets="fc$"))
    delta = method.init(KEY, params)
    run = lambda ctx: jpeft.apply(model, method, params, delta, x, ctx=ctx)
    np.testing.assert_allclose(run(jpeft.ApplyContext()), base_out, rtol=1e-6)  # eval: no dropout
    one = run(jpeft.ApplyContext(train=True, rng=jax.random.key(1)))
    again = run(jpeft.ApplyContext(train=True, rng=jax.random.key(1)))
    other = run(jpeft.ApplyContext(train=True, rng=jax.random.key(2)))
    np.testing.assert_array_equal(one, again)
    assert float(jnp.abs(one - other).max()) > 0 and float((one == 0).mean()) > 0.2


def test_an_unsplit_nnx_module_is_refused_with_the_call_to_make():
    module = M.NnxMLP(nnx.Rngs(0))
    method = lora(LoraConfig(targets="fc1$"))
    with pytest.raises(TypeError, match=r"jpeft.from_nnx"):
        jpeft.apply(module, method, {}, {}, jnp.ones((2, 8)))
