"""DoRA (LoRA's use_dora): the written-out formula on every layer kind, the detached norm,
PEFT's dropout path, merge and its inverse with the merge-time norms, stacks, composition, banks,
optimizer groups and sharding."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import example, given, settings, strategies as st

import jpeft
from jpeft import bank as B
from jpeft.core import paths as P
from jpeft.core.dropout import dropout
from jpeft.core.model import group_by_module
from jpeft.core.transform import ApplyContext, apply, compose, merge, unmerge
from jpeft.methods import BitFitConfig, bitfit, dora
from jpeft.methods.lora import LoraConfig, lora, rank_and_scale
from tests import own_models as M
from tests.helpers import tiny_batch, tiny_bert, train_tiny

KEY = jax.random.key(0)
TOL = dict(rtol=1e-4, atol=1e-5)
MAG = dora.MAGNITUDE


def dora_perturb(delta, seed=1, scale=0.3):
    """A non-trivial DoRA delta: noise on A and B, magnitudes times (1 + noise) (they stay near
    the column norms, with their signs)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(delta)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = []
    for (path, x), k in zip(leaves, keys):
        noise = scale * jax.random.normal(k, x.shape, x.dtype)
        out.append(x * (1.0 + noise) if getattr(path[-1], "key", None) == MAG else x + noise)
    return jax.tree_util.tree_unflatten(treedef, out)


def _bert_logits(model, params, batch):
    return model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                       batch["token_type_ids"])


def _bert_adapted(model, t, params, delta, batch, ctx=ApplyContext()):
    return apply(model, t, params, delta, batch["input_ids"], batch["attention_mask"],
                 batch["token_type_ids"], ctx=ctx)


# -- the written-out formula, independently of jpeft.core.layers ----------------------------------

class InterleavedEinsum(nn.Module):
    """'btd,ndh->btnh': the input axis between two output axes."""

    @nn.compact
    def __call__(self, x):
        return nn.Einsum((2, 8, 4), "btd,ndh->btnh", name="q")(x)


# per layer: ΔW = A·B in the kernel's layout, and the kernel's input axes (the norm's axes)
EXPLICIT = {
    "fc1": (lambda a, b: np.einsum("ir,ro->io", a, b), (0,)),
    "proj": (lambda a, b: np.einsum("ir,rhd->ihd", a, b), (0,)),
    "ein": (lambda a, b: np.einsum("hdr,ro->hdo", a, b), (0, 1)),
    "conv": (lambda a, b: np.einsum("hwir,ro->hwio", a, b), (0, 1, 2)),
    "q": (lambda a, b: np.einsum("dr,rnh->ndh", a, b), (1,)),
}


def explicit_dora_kernel(kind, w, a, b, m, s):
    """W' = m ⊙ (W + s·AB) / ‖W + s·AB‖_c (Liu et al., 2024, Eq. 5), written out in numpy."""
    low_rank, in_axes = EXPLICIT[kind]
    v = np.asarray(w, np.float64) + s * low_rank(np.asarray(a, np.float64), np.asarray(b, np.float64))
    norm = np.sqrt((v ** 2).sum(axis=in_axes, keepdims=True))
    return np.expand_dims(np.asarray(m, np.float64), in_axes) * v / norm


def _small_model(backend, case):
    x = {"mlp": jnp.ones((3, 8)), "conv": jax.random.normal(KEY, (2, 9, 9, 3)),
         "interleaved": jax.random.normal(KEY, (2, 5, 8))}[case] * 0.5
    if backend == "linen":
        module = {"mlp": M.LinenMLP(), "conv": M.LinenConvNet(), "interleaved": InterleavedEinsum()}[case]
        params = module.init(KEY, x)["params"]
        return jpeft.from_linen(module, params, x), params, x, lambda p: module.apply({"params": p}, x)
    module = {"mlp": M.NnxMLP, "conv": M.NnxConvNet}[case](nnx.Rngs(0))
    model, params = jpeft.from_nnx(module)
    return model, params, x, lambda p: model.module(p)(x)


@pytest.mark.parametrize("backend,case", [("linen", "mlp"), ("linen", "conv"), ("linen", "interleaved"),
                                          ("nnx", "mlp"), ("nnx", "conv")])
def test_dora_equals_the_written_out_formula_on_every_layer_kind(backend, case):
    model, params, x, run = _small_model(backend, case)
    targets = {"mlp": r"(fc1|proj|ein)$", "conv": r"conv\d$|pointwise$", "interleaved": "q$"}[case]
    method = lora(LoraConfig(r=2, alpha=6.0, targets=targets, use_dora=True))
    fresh = method.init(KEY, params, model.info())
    flat = P.flatten(params)
    for path, leaves in group_by_module(fresh).items():  # m₀ = ‖W‖_c
        _, in_axes = EXPLICIT.get(path, EXPLICIT["conv"])
        w = np.asarray(flat[f"{path}/kernel"], np.float64)
        np.testing.assert_allclose(leaves[MAG], np.sqrt((w ** 2).sum(axis=in_axes)), rtol=1e-6)
    np.testing.assert_array_equal(jpeft.apply(model, method, params, fresh, x), run(params))
    delta = dora_perturb(fresh)
    explicit = dict(flat)
    for path, leaves in group_by_module(delta).items():
        kind = path if path in EXPLICIT else "conv"
        explicit[f"{path}/kernel"] = explicit_dora_kernel(
            kind, flat[f"{path}/kernel"], leaves["lora_A"], leaves["lora_B"], leaves[MAG], 3.0)
    want = run(P.unflatten({k: jnp.asarray(v, jnp.float32) for k, v in explicit.items()}))
    assert float(jnp.abs(want - run(params)).max()) > 1e-3  # the delta does something
    np.testing.assert_allclose(jpeft.apply(model, method, params, delta, x), want, **TOL)
    merged = jpeft.merge(method, params, delta, model.info())
    np.testing.assert_allclose(run(merged), want, **TOL)
    # PEFT's dropout path (x̃W through the layer's kernel) with a rate that drops nothing here
    almost = lora(LoraConfig(r=2, alpha=6.0, targets=targets, use_dora=True, dropout=1e-9))
    trained = jpeft.apply(model, almost, params, delta, x, ctx=ApplyContext(train=True, rng=KEY))
    np.testing.assert_allclose(trained, want, **TOL)
    for path in group_by_module(delta):  # the merged kernel is the formula's
        np.testing.assert_allclose(P.flatten(merged)[f"{path}/kernel"], explicit[f"{path}/kernel"],
                                   rtol=1e-5, atol=1e-6)


def test_the_norm_is_detached_from_the_gradient():
    """Section 4.3: ‖W + s·AB‖_c is a constant for back-propagation (PEFT detaches it)."""
    x = jax.random.normal(KEY, (4, 8))
    wrapper = nn.Sequential([nn.Dense(5)])
    base = wrapper.init(KEY, x)["params"]
    model = jpeft.from_linen(wrapper, base, x)
    method = lora(LoraConfig(r=3, alpha=6.0, targets="layers_0$", use_dora=True))
    delta = dora_perturb(method.init(KEY, base, model.info()), scale=0.5)
    c = jax.random.normal(jax.random.key(3), (4, 5))
    w, bias = base["layers_0"]["kernel"], base["layers_0"]["bias"]

    def explicit(d, detach):
        a, b, m = d["layers_0"]["lora_A"], d["layers_0"]["lora_B"], d["layers_0"][MAG]
        v = w + 2.0 * a @ b
        norm = jnp.sqrt(jnp.sum(v ** 2, axis=0))
        norm = jax.lax.stop_gradient(norm) if detach else norm
        return jnp.sum(c * (x @ (m / norm * v) + bias))

    ours = jax.grad(lambda d: jnp.sum(c * jpeft.apply(model, method, base, d, x)))(delta)
    detached = jax.grad(lambda d: explicit(d, True))(delta)
    attached = jax.grad(lambda d: explicit(d, False))(delta)
    for leaf in ("lora_A", "lora_B", MAG):
        np.testing.assert_allclose(ours["layers_0"][leaf], detached["layers_0"][leaf], rtol=1e-4, atol=1e-6)
    gap = max(float(jnp.abs(detached["layers_0"][k] - attached["layers_0"][k]).max()) for k in ("lora_A", "lora_B"))
    assert gap > 1e-3  # the test tells the two apart


def test_dropout_follows_peft_base_output_undropped_correction_dropped():
    """PEFT's DoRA with dropout: y = xW + b + (g − 1)(x̃W) + g·s·x̃AB, x̃ = dropout(x)."""
    x = jax.random.normal(KEY, (6, 8))
    wrapper = nn.Sequential([nn.Dense(5)])
    base = wrapper.init(KEY, x)["params"]
    model = jpeft.from_linen(wrapper, base, x)
    method = lora(LoraConfig(r=2, alpha=4.0, targets="layers_0$", dropout=0.5, use_dora=True))
    delta = dora_perturb(method.init(KEY, base, model.info()), scale=0.5)
    ctx = ApplyContext(train=True, rng=jax.random.key(7))
    ours = jpeft.apply(model, method, base, delta, x, ctx=ctx)
    d, w, bias = delta["layers_0"], base["layers_0"]["kernel"], base["layers_0"]["bias"]
    x_drop = dropout(ctx.key("lora", "layers_0"), x, 0.5)
    v = w + 2.0 * d["lora_A"] @ d["lora_B"]
    g = d[MAG] / jnp.sqrt(jnp.sum(v ** 2, axis=0))
    want = x @ w + bias + (g - 1) * (x_drop @ w) + g * 2.0 * (x_drop @ d["lora_A"] @ d["lora_B"])
    np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-5)
    evaluated = jpeft.apply(model, method, base, delta, x)  # no dropout outside training
    np.testing.assert_allclose(evaluated, x @ (g * v) + bias, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(ours - evaluated).max()) > 1e-3


# -- merge and unmerge --------------------------------------------------------------------------

dora_configs = st.builds(
    LoraConfig, r=st.integers(1, 5), alpha=st.floats(0.5, 16.0),
    targets=st.sampled_from(["(query|value)$", "dense$", "(query|key|value|dense)$"]),
    use_rslora=st.booleans(), init=st.sampled_from(["kaiming", "gaussian"]),
    layers=st.sampled_from([(), (1,)]), use_dora=st.just(True))


@settings(max_examples=3, deadline=None)
@given(cfg=dora_configs, seed=st.integers(0, 2**16))
@example(cfg=LoraConfig(r=1, alpha=10.0, targets="(query|value)$", init="gaussian", use_dora=True),
         seed=150)  # s·AB ten times |W|: the unmerge round-off follows |s·AB|, not |W|
def test_fresh_identity_merge_equals_factored_and_unmerge_with_norms_is_exact(cfg, seed):
    model, params = tiny_bert(seed=seed % 5)
    batch = tiny_batch(seed=seed)
    t = lora(cfg)
    fresh = t.init(jax.random.key(seed), params, model.info())
    np.testing.assert_array_equal(_bert_adapted(model, t, params, fresh, batch),
                                  _bert_logits(model, params, batch))
    delta = dora_perturb(fresh, seed=seed)
    merged = merge(t, params, delta, model.info())
    np.testing.assert_allclose(_bert_adapted(model, t, params, delta, batch),
                               _bert_logits(model, merged, batch), atol=2e-5, rtol=1e-5)
    flat_base, flat_merged = P.flatten(params), P.flatten(merged)
    changed = {p for p in flat_base if not np.array_equal(flat_base[p], flat_merged[p])}
    assert changed == {f"{m}/kernel" for m in group_by_module(delta)}
    # each merged column has norm |m| (Eq. 5)
    for path, leaves in group_by_module(delta).items():
        np.testing.assert_allclose(jnp.linalg.norm(flat_merged[f"{path}/kernel"], axis=0),
                                   jnp.abs(leaves[MAG]), rtol=1e-5)
    norms = dora.weight_norms(cfg, params, delta, model.info())
    back = P.flatten(dora.unmerge_with_norms(cfg, merged, delta, norms, model.info()))
    lora_terms = {f"{m}/kernel": rank_and_scale(cfg, m)[1] * jnp.abs(d["lora_A"] @ d["lora_B"]).max()
                  for m, d in group_by_module(delta).items()}
    for path, leaf in flat_base.items():
        # the round-off of W = merged·‖V‖/|m| − s·AB grows with the largest of |W|, |merged|, |s·AB|
        scale = float(jnp.abs(leaf).max() + jnp.abs(flat_merged[path]).max()
                      + lora_terms.get(path, 0.0))
        np.testing.assert_allclose(back[path], leaf, rtol=0,
                                   atol=32 * np.finfo(np.float32).eps * max(scale, 1.0), err_msg=path)


def test_unmerge_without_norms_is_refused_and_says_how():
    """Merged columns have norm |m| whatever ‖W + s·AB‖_c was: a rescaled base merges to the
    same weights, so jpeft.unmerge cannot know which base to return."""
    model, params = tiny_bert()
    cfg = LoraConfig(r=2, targets="query$", use_dora=True)
    t = lora(cfg)
    delta = dora_perturb(t.init(KEY, params, model.info()))
    path = "encoder/layer_0/attention/self/query"
    flat = P.flatten(params)
    d = group_by_module(delta)[path]
    _, s = rank_and_scale(cfg, path)
    v = flat[f"{path}/kernel"] + s * d["lora_A"] @ d["lora_B"]
    rescaled = dict(flat)  # W₂ = 3(W + s·AB) − s·AB: the same direction, three times the norm
    rescaled[f"{path}/kernel"] = 3.0 * v - s * d["lora_A"] @ d["lora_B"]
    single = {k: v for k, v in P.flatten(delta).items() if k.startswith(path)}
    m1 = P.flatten(merge(t, params, P.unflatten(single)))[f"{path}/kernel"]
    m2 = P.flatten(merge(t, P.unflatten(rescaled), P.unflatten(single)))[f"{path}/kernel"]
    np.testing.assert_allclose(m1, m2, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="weight_norms"):
        unmerge(t, merge(t, params, delta), delta)
    both = compose(t, bitfit(BitFitConfig()))
    with pytest.raises(ValueError, match="unmerge_with_norms"):
        unmerge(both, params, both.init(KEY, params, model.info()))


# -- stacks (nn.scan / nnx.scan) ----------------------------------------------------------------

@pytest.fixture(scope="module")
def twins():
    return M.transformer_twins()


def test_stacked_dense_general_einsum_dense_linen_and_nnx_agree_and_merge(twins):
    linen, nnx_model, params, ids = twins
    method = lora(LoraConfig(r=2, alpha=4.0, targets=r"(query|value|out|up|down)$", use_dora=True))
    fresh = method.init(KEY, params, linen.info())
    assert fresh["layers"]["query"][MAG].shape == (M.LAYERS, M.H, M.DH)
    assert fresh["layers"]["out"][MAG].shape == (M.LAYERS, M.D)
    assert fresh["layers"]["up"][MAG].shape == (M.LAYERS, M.F)
    base_out = linen.module.apply({"params": params}, ids)
    np.testing.assert_allclose(jpeft.apply(nnx_model, method, params, fresh, ids), base_out, **TOL)
    delta = dora_perturb(fresh)
    out = jpeft.apply(linen, method, params, delta, ids)
    assert float(jnp.abs(out - base_out).max()) > 1e-3
    np.testing.assert_allclose(jax.jit(lambda d: jpeft.apply(nnx_model, method, params, d, ids))(delta),
                               out, **TOL)
    merged = jpeft.merge(method, params, delta, linen.info())
    np.testing.assert_allclose(linen.module.apply({"params": merged}, ids), out, **TOL)
    almost = lora(dataclasses.replace(method.config, dropout=1e-9))  # PEFT's dropout path
    ctx = ApplyContext(train=True, rng=KEY)
    for model in (linen, nnx_model):
        np.testing.assert_allclose(jpeft.apply(model, almost, params, delta, ids, ctx=ctx), out, **TOL)
    norms = dora.weight_norms(method.config, params, delta, linen.info())
    back = dora.unmerge_with_norms(method.config, merged, delta, norms, linen.info())
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_layers_inside_a_stack_leave_the_others_unadapted_even_if_m_drifts(twins):
    """``layers=(1,)`` on a stacked kernel: layers 0 and 2 keep g = 1 (their magnitudes get no
    gradient, and a magnitude changed by weight decay changes nothing)."""
    linen, _, params, ids = twins
    method = lora(LoraConfig(r=2, alpha=2.0, targets=r"down$", layers=(1,), use_dora=True))
    delta = method.init(KEY, params, linen.info())
    d = delta["layers"]["down"]
    d["lora_B"] = d["lora_B"].at[1].set(0.5)
    reference = jpeft.apply(linen, method, params, delta, ids)
    d[MAG] = d[MAG] * jnp.array([2.0, 1.0, 0.5])[:, None]  # drift in layers 0 and 2
    np.testing.assert_allclose(jpeft.apply(linen, method, params, delta, ids), reference, **TOL)
    grads = jax.grad(lambda dd: jnp.sum(jpeft.apply(linen, method, params, dd, ids) ** 2))(delta)
    g = grads["layers"]["down"][MAG]
    assert float(jnp.abs(g[0]).max()) == 0.0 and float(jnp.abs(g[2]).max()) == 0.0
    assert float(jnp.abs(g[1]).max()) > 0.0
    merged = jpeft.merge(method, params, delta, linen.info())["layers"]["down"]["kernel"]
    kernel = params["layers"]["down"]["kernel"]
    np.testing.assert_array_equal(merged[0], kernel[0])
    np.testing.assert_array_equal(merged[2], kernel[2])
    assert float(jnp.abs(merged[1] - kernel[1]).max()) > 1e-3


# -- composition, banks, training, optimizer groups ----------------------------------------------

def test_composes_with_bitfit_merges_and_trains():
    model, params = tiny_bert()
    batch = tiny_batch()
    t = compose(lora(LoraConfig(r=2, alpha=4.0, targets="(query|value)$", use_dora=True)), bitfit())
    fresh = t.init(KEY, params, model.info())
    np.testing.assert_array_equal(_bert_adapted(model, t, params, fresh, batch),
                                  _bert_logits(model, params, batch))
    delta = {"lora": dora_perturb(fresh["lora"]), "bitfit": jax.tree.map(lambda b: b + 0.1, fresh["bitfit"])}
    merged = merge(t, params, delta, model.info())
    np.testing.assert_allclose(_bert_adapted(model, t, params, delta, batch),
                               _bert_logits(model, merged, batch), atol=2e-5, rtol=1e-5)
    state, _ = train_tiny(model, t, params, steps=6)
    flat = P.flatten(state.trainable["delta"]["lora"])
    moved = [k for k, v in flat.items() if k.endswith(MAG) and not np.allclose(
        v, P.flatten(t.init(jax.random.key(0), params, model.info())["lora"])[k])]
    assert moved  # the magnitudes train


def test_a_bank_runs_each_example_with_its_own_dora_delta():
    model, params = tiny_bert()
    inner = lora(LoraConfig(r=2, alpha=4.0, targets="(query|value)$", use_dora=True, dropout=0.1))
    method = B.bank(inner, 3, heads=False)
    bank_delta = method.init(KEY, params, model.info())
    bank_delta = {**bank_delta, B.ADAPTERS: dora_perturb(bank_delta[B.ADAPTERS])}
    batch = tiny_batch(batch=5)
    index = jnp.array([2, 0, 1, 2, 0])
    out = _bert_adapted(model, method, params, bank_delta, batch, ApplyContext(adapter_index=index))
    for i, k in enumerate(np.asarray(index)):
        one = _bert_adapted(model, inner, params, B.select(bank_delta[B.ADAPTERS], int(k)), batch)
        np.testing.assert_allclose(out[i], one[i], rtol=1e-5, atol=1e-5)


def test_magnitude_is_decayed_and_follows_b_under_lora_plus():
    delta = {"q": {"lora_A": jnp.ones((4, 2)), "lora_B": jnp.ones((2, 3)), MAG: jnp.ones(3)}}
    plain = lora(LoraConfig(use_dora=True))
    assert set(jax.tree.leaves(plain.labels(delta))) == {"default"}  # decayed, like PEFT + HF Trainer
    plus = lora(LoraConfig(use_dora=True, lr_ratio=16.0))
    labels = plus.labels(delta)["q"]
    assert labels == {"lora_A": "default", "lora_B": "lora_B", MAG: "lora_B"}
    assert plain.delta_layout("q", MAG) == ("stack", "out")


def test_refusals_name_the_problem():
    class SummedKernelAxis(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Einsum((8, 4, 3), "bd,dok->bo", name="e")(x)

    x = jnp.ones((2, 8))
    module = SummedKernelAxis()
    params = module.init(KEY, x)["params"]
    model = jpeft.from_linen(module, params, x)
    with pytest.raises(jpeft.core.layers.UnsupportedLayerError, match="use_dora"):
        lora(LoraConfig(targets="e$", use_dora=True)).init(KEY, params, model.info())
    bert, bert_params = tiny_bert()
    plain = lora(LoraConfig(targets="query$")).init(KEY, bert_params, bert.info())
    with pytest.raises(KeyError, match="lora_magnitude"):
        _bert_adapted(bert, lora(LoraConfig(targets="query$", use_dora=True)), bert_params, plain,
                      tiny_batch())


# -- under a mesh (8 forced CPU devices, in a subprocess) ---------------------------------------

def test_under_a_mesh_the_magnitude_takes_the_output_partition_and_losses_match():
    """test_delta_sharding's run (an NNX transformer split over data=2, fsdp=4, against one
    device) with its LoRA part made DoRA."""
    from tests.train import test_delta_sharding as S

    plain = 'LoraConfig(r=2, alpha=4.0, targets=r"(query|out)$")'
    assert S.SCRIPT.count(plain) == 1
    script = S.SCRIPT.replace(plain, plain[:-1] + ", use_dora=True, dropout=0.1)")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "PYTHONPATH": str(S.ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=900, cwd=S.ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))[6:])
    mesh, single = runs["data=2,fsdp=4"], runs["data=1,fsdp=1"]
    assert mesh["kernels"]["layers/out/kernel"] == ["None", "None", "None", "fsdp"]
    m_out, m_query = mesh["leaves"][f"lora/layers/out/{MAG}"], mesh["leaves"][f"lora/layers/query/{MAG}"]
    assert m_out["spec"] == ["None", "fsdp"] and m_out["bytes_per_device"] * 4 == m_out["bytes"]
    assert set(m_query["spec"]) <= {"None"}  # query's output axes (2, 8) are not split
    np.testing.assert_allclose(mesh["losses"], single["losses"], rtol=1e-4)
    assert mesh["losses"][-1] < mesh["losses"][0]
