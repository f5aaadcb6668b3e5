"""(IA)³: identity at init, PEFT's input/output scaling, merge/unmerge, counts, stacking with LoRA."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jpeft.core import paths as P
from jpeft.core.transform import ApplyContext, apply, compose, merge, module_path, unmerge
from jpeft.methods.ia3 import IA3Config, ia3, target_modules
from jpeft.methods.lora import LoraConfig, lora, rank_and_scale
from tests.helpers import perturb, tiny_batch, tiny_bert

# (targets, feedforward) pairs where feedforward selects only targets
PATTERNS = [
    (r"(key|value|output/dense)$", r"output/dense$"),
    (r"(key|value|output/dense)$", r"layer_\d+/output/dense$"),
    (r"(query|value)$", ""),
    (r"(query|intermediate/dense|output/dense)$", r"intermediate/dense$"),
    (r"dense$", r"attention/output/dense$"),
]

ia3_configs = st.builds(
    lambda pair, layers: IA3Config(targets=pair[0], feedforward=pair[1], layers=layers),
    pair=st.sampled_from(PATTERNS),
    layers=st.sampled_from([(), (0,), (1,)]),
)


def _logits(model, params, batch):
    return model.apply({"params": params}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])


def _adapted(model, t, params, delta, batch, ctx=ApplyContext()):
    return apply(model, t, params, delta, batch["input_ids"], batch["attention_mask"],
                 batch["token_type_ids"], ctx=ctx)


def _record_dense(model, t, params, delta, batch, path):
    """(input, output) of the Dense at ``path``, seen from outside every transform interceptor."""
    seen = {}

    def recorder(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, nn.Dense) and module_path(context) == path:
            seen["io"] = (args[0], out)
        return out

    with nn.intercept_methods(recorder):  # installed first: outermost
        _adapted(model, t, params, delta, batch)
    return seen["io"]


@settings(max_examples=10, deadline=None)
@given(cfg=ia3_configs, seed=st.integers(0, 2**16), model_type=st.sampled_from(["bert", "roberta"]))
def test_fresh_delta_changes_nothing(cfg, seed, model_type):
    model, params = tiny_bert(model_type=model_type, seed=seed % 7)
    batch = tiny_batch(seed=seed)
    t = ia3(cfg)
    delta = t.init(jax.random.key(seed), params, model.info())
    assert all(np.all(np.asarray(v) == 1.0) for v in jax.tree_util.tree_leaves(delta))
    np.testing.assert_array_equal(_adapted(model, t, params, delta, batch), _logits(model, params, batch))


@pytest.mark.parametrize("path,ff", [
    ("encoder/layer_0/attention/self/key", False),
    ("encoder/layer_1/attention/self/value", False),
    ("encoder/layer_0/attention/output/dense", True),
    ("encoder/layer_1/output/dense", True),
])
def test_numerics_against_hand_formula(path, ff):
    model, params = tiny_bert(layers=2, hidden=16)
    params = perturb(params, scale=0.05)  # non-zero biases: scaled for outputs, not for inputs
    batch = tiny_batch()
    t = ia3()
    delta = perturb(t.init(jax.random.key(0), params, model.info()), scale=0.5)
    l = np.asarray(P.flatten(delta)[f"{path}/ia3_l"], np.float64)
    w = np.asarray(P.flatten(params)[f"{path}/kernel"], np.float64)
    b = np.asarray(P.flatten(params)[f"{path}/bias"], np.float64)
    assert l.shape == ((w.shape[0],) if ff else (w.shape[1],))
    x, y = _record_dense(model, t, params, delta, batch, path)
    x = np.asarray(x, np.float64)
    expected = (x * l) @ w + b if ff else (x @ w + b) * l
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    assert float(np.abs(x @ w + b - expected).max()) > 1e-3  # the scaling does something


def test_targets_feedforward_flags_and_counts():
    model, params = tiny_bert(layers=2, hidden=16)  # intermediate_size 24
    modules = target_modules(IA3Config(), params)
    assert modules == {
        f"encoder/layer_{i}/{m}": ff for i in (0, 1) for m, ff in
        [("attention/self/key", False), ("attention/self/value", False),
         ("attention/output/dense", True), ("output/dense", True)]
    }
    delta = ia3().init(jax.random.key(0), params, model.info())
    assert P.count_params(delta) == 2 * (16 + 16 + 16 + 24)
    assert P.flatten(delta)["encoder/layer_1/output/dense/ia3_l"].shape == (24,)
    for layers, hidden in [(3, 8), (1, 32)]:
        model, params = tiny_bert(layers=layers, hidden=hidden, heads=2)
        delta = ia3().init(jax.random.key(0), params, model.info())
        assert P.count_params(delta) == layers * (3 * hidden + 24)
    only = ia3(IA3Config(targets="value$", feedforward="", layers=(0,))).init(
        jax.random.key(0), params, model.info())
    assert list(P.flatten(only)) == ["encoder/layer_0/attention/self/value/ia3_l"]


@settings(max_examples=6, deadline=None)
@given(cfg=ia3_configs, seed=st.integers(0, 2**16))
def test_merge_unmerge_and_scaled_equals_merged(cfg, seed):
    model, params = tiny_bert(seed=seed % 5)
    params = perturb(params, seed=seed, scale=0.05)  # non-zero biases, so bias scaling shows
    batch = tiny_batch(seed=seed)
    t = ia3(cfg)
    assert t.mergeable
    delta = perturb(t.init(jax.random.key(seed), params, model.info()), seed=seed, scale=0.3)
    merged = merge(t, params, delta)
    flat_base, flat_merged = P.flatten(params), P.flatten(merged)
    changed = {p for p in flat_base if not np.array_equal(flat_base[p], flat_merged[p])}
    targets = target_modules(cfg, params)
    expected = {f"{m}/kernel" for m in targets} | {f"{m}/bias" for m, ff in targets.items() if not ff}
    assert changed == expected
    for path, leaf in P.flatten(unmerge(t, merged, delta)).items():
        np.testing.assert_allclose(leaf, flat_base[path], rtol=4 * np.finfo(np.float32).eps,
                                   atol=1e-30, err_msg=path)
    np.testing.assert_allclose(_adapted(model, t, params, delta, batch), _logits(model, merged, batch),
                               atol=2e-5, rtol=1e-5)


def test_merge_formulas():
    model, params = tiny_bert()
    params = perturb(params, scale=0.05)
    t = ia3()
    delta = perturb(t.init(jax.random.key(0), params, model.info()), scale=0.5)
    fd, fp, fm = P.flatten(delta), P.flatten(params), P.flatten(merge(t, params, delta))
    key, ffn = "encoder/layer_0/attention/self/key", "encoder/layer_0/output/dense"
    np.testing.assert_allclose(fm[f"{key}/kernel"], fp[f"{key}/kernel"] * fd[f"{key}/ia3_l"][None, :], rtol=1e-6)
    np.testing.assert_allclose(fm[f"{key}/bias"], fp[f"{key}/bias"] * fd[f"{key}/ia3_l"], rtol=1e-6)
    np.testing.assert_allclose(fm[f"{ffn}/kernel"], fd[f"{ffn}/ia3_l"][:, None] * fp[f"{ffn}/kernel"], rtol=1e-6)
    np.testing.assert_array_equal(fm[f"{ffn}/bias"], fp[f"{ffn}/bias"])


def test_unmerge_refuses_a_zero_entry():
    model, params = tiny_bert()
    t = ia3()
    delta = t.init(jax.random.key(0), params, model.info())
    flat = P.flatten(delta)
    key = "encoder/layer_1/attention/self/value/ia3_l"
    flat[key] = flat[key].at[3].set(0.0)
    delta = P.unflatten(flat)
    merged = merge(t, params, delta)
    with pytest.raises(ValueError, match=r"layer_1/attention/self/value/ia3_l.*exactly 0"):
        unmerge(t, merged, delta)


def test_labels_are_no_decay():
    model, params = tiny_bert()
    t = ia3()
    labels = t.labels(t.init(jax.random.key(0), params, model.info()))
    assert set(jax.tree_util.tree_leaves(labels)) == {"no_decay"}
    assert t.name == "ia3"


def test_bad_config_and_patterns_raise_clearly():
    model, params = tiny_bert()
    with pytest.raises(ValueError, match=r"ia3.feedforward 'output/dense\$'.*ia3.targets '\(key\|value\)\$'"):
        ia3(IA3Config(targets=r"(key|value)$")).init(jax.random.key(0), params, model.info())
    with pytest.raises(ValueError) as err:
        ia3(IA3Config(targets="qkv_proj$")).init(jax.random.key(0), params, model.info())
    assert "ia3.targets" in str(err.value) and "attention/self/key" in str(err.value)
    with pytest.raises(ValueError, match="ia3.feedforward"):
        ia3(IA3Config(feedforward="mlp/fc2$")).init(jax.random.key(0), params, model.info())
    with pytest.raises(ValueError, match="ia3.layers"):
        ia3(IA3Config(layers=(7,))).init(jax.random.key(0), params, model.info())
    with pytest.raises(ValueError, match="ia3.targets is not a valid regex"):
        IA3Config(targets="(key")
    with pytest.raises(ValueError, match="ia3.targets must be a non-empty"):
        IA3Config(targets="")
    with pytest.raises(ValueError, match="ia3.layers"):
        IA3Config(layers=(-1,))


def test_jit_and_no_jit_agree():
    model, params = tiny_bert()
    batch = tiny_batch()
    t = ia3()
    delta = perturb(t.init(jax.random.key(0), params, model.info()), scale=0.3)
    f = lambda p, d: _adapted(model, t, p, d, batch)
    eager = f(params, delta)
    assert float(jnp.abs(eager - _logits(model, params, batch)).max()) > 1e-5
    np.testing.assert_allclose(jax.jit(f)(params, delta), eager, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("path,ia3_cfg", [
    ("encoder/layer_0/attention/self/value", IA3Config(targets="value$", feedforward="")),
    ("encoder/layer_1/output/dense",
     IA3Config(targets="layer_1/output/dense$", feedforward="layer_1/output/dense$")),
])
def test_stacking_with_lora_on_the_same_dense(path, ia3_cfg):
    """compose(lora, ia3): ia3 wraps lora. Output scaling: (xW + b + s·xAB) ⊙ l;
    input scaling: (x⊙l)W + b + s·(x⊙l)AB. Merging folds the same function."""
    model, params = tiny_bert(layers=2)
    params = perturb(params, scale=0.05)
    batch = tiny_batch()
    lcfg = LoraConfig(r=2, alpha=4.0, targets=path + "$")
    t = compose(lora(lcfg), ia3(ia3_cfg))
    delta = perturb(t.init(jax.random.key(0), params, model.info()), scale=0.5)
    fd, fp = P.flatten(delta), P.flatten(params)
    a, b_ = (np.asarray(fd[f"lora/{path}/lora_{k}"], np.float64) for k in "AB")
    l = np.asarray(fd[f"ia3/{path}/ia3_l"], np.float64)
    w, b = (np.asarray(fp[f"{path}/{k}"], np.float64) for k in ("kernel", "bias"))
    s = rank_and_scale(lcfg, path)[1]
    x, y = _record_dense(model, t, params, delta, batch, path)
    x = np.asarray(x, np.float64)
    if ia3_cfg.feedforward:
        expected = (x * l) @ w + b + s * ((x * l) @ a) @ b_
    else:
        expected = (x @ w + b + s * (x @ a) @ b_) * l
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    # the other order is a different function: the stacking order matters
    if ia3_cfg.feedforward:
        other = (x * l) @ w + b + s * (x @ a) @ b_
    else:
        other = (x @ w + b) * l + s * (x @ a) @ b_
    assert float(np.abs(other - expected).max()) > 1e-3
    merged = merge(t, params, delta)
    np.testing.assert_allclose(_adapted(model, t, params, delta, batch), _logits(model, merged, batch),
                               atol=2e-5, rtol=1e-5)
    back = P.flatten(unmerge(t, merged, delta))
    np.testing.assert_allclose(back[f"{path}/kernel"], fp[f"{path}/kernel"], atol=1e-6)


def test_compose_with_lora_and_train():
    from jpeft.train.trainer import Trainer

    model, params = tiny_bert()
    batch = tiny_batch()
    trainer = Trainer(model, compose(ia3(), lora(LoraConfig(r=2))), params, total_steps=3)
    state = trainer.init_state(jax.random.key(0))
    delta0 = jax.tree_util.tree_map(np.asarray, state.trainable["delta"])
    losses = []
    for _ in range(3):
        state, metrics = trainer.train_step(state, trainer.frozen, batch)
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses)) and losses[-1] <= losses[0]
    v0 = delta0["ia3"]["encoder"]["layer_0"]["output"]["dense"]["ia3_l"]
    v3 = np.asarray(state.trainable["delta"]["ia3"]["encoder"]["layer_0"]["output"]["dense"]["ia3_l"])
    assert not np.array_equal(v0, v3)


@pytest.mark.real
def test_minilm_count_equals_hf_peft(minilm_dir):
    """(IA)³ with PEFT's BERT defaults on MiniLM with a 2-class head: PEFT counts 16,898."""
    from jpeft.models.bert import from_pretrained
    from jpeft.train.trainer import Trainer

    model, params = from_pretrained(minilm_dir, num_labels=2)
    trainer = Trainer(model, ia3(), params)
    counts = trainer.counts(trainer.init_state(jax.random.key(0)))
    assert counts.trainable == 6 * (384 + 384 + 384 + 1536) + 770 == 16_898

    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    hf = BertForSequenceClassification.from_pretrained(str(minilm_dir), num_labels=2)
    hf = peft.get_peft_model(hf, peft.IA3Config(task_type="SEQ_CLS"))
    peft_trainable = sum(p.numel() for p in hf.parameters() if p.requires_grad)
    assert counts.trainable == peft_trainable


def test_a_vector_of_another_shape_is_refused():
    """A (1,)-shaped or other model's vector used to broadcast silently (or fail in a broadcast)."""
    model, params = tiny_bert()
    t = ia3(IA3Config())
    delta = P.flatten(t.init(jax.random.key(0), params, model.info()))
    key = sorted(delta)[0]
    delta[key] = delta[key][:1]
    batch = tiny_batch()
    with pytest.raises(ValueError, match=r"ia3_l .* has shape \(1,\).*expected \(16,\)"):
        apply(model, t, params, P.unflatten(delta), batch["input_ids"], batch["attention_mask"],
              batch["token_type_ids"])
    with pytest.raises(ValueError, match="another model"):
        merge(t, params, P.unflatten(delta))
