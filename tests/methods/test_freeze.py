"""Layer freezing (and the shared additive machinery): identity at init, top-k selection, exact
gradients, merge/unmerge, counts, labels, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jpeft.core import paths as P
from jpeft.core.transform import ApplyContext, apply, compose, merge, unmerge
from jpeft.methods import additive
from jpeft.methods.freeze import FreezeConfig, freeze, trained_paths
from jpeft.methods.lora import LoraConfig, layer_index, lora
from tests.helpers import perturb, tiny_batch, tiny_bert

D, I = 16, 24  # tiny_bert's hidden and intermediate sizes


def _logits(model, params, batch):
    return model.apply({"params": params}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])


def _adapted(model, t, params, delta, batch, ctx=ApplyContext()):
    return apply(model, t, params, delta, batch["input_ids"], batch["attention_mask"],
                 batch["token_type_ids"], ctx=ctx)


def _layer_size(d=D, i=I):
    return 4 * (d * d + d) + (d * i + i) + (i * d + d) + 2 * 2 * d


@settings(max_examples=10, deadline=None)
@given(data=st.data(), seed=st.integers(0, 2**16), model_type=st.sampled_from(["bert", "roberta"]),
       layers=st.integers(1, 3))
def test_fresh_delta_changes_nothing(data, seed, model_type, layers):
    cfg = FreezeConfig(top=data.draw(st.integers(0, layers)), pooler=data.draw(st.booleans()),
                       embeddings=data.draw(st.booleans()))
    model, params = tiny_bert(model_type=model_type, seed=seed % 7, layers=layers)
    batch = tiny_batch(seed=seed)
    t = freeze(cfg)
    delta = t.init(jax.random.key(seed), params, model.info())
    expected = _logits(model, params, batch)
    np.testing.assert_array_equal(_adapted(model, t, params, delta, batch), expected)
    train = ApplyContext(train=True, rng=jax.random.key(seed))
    np.testing.assert_array_equal(_adapted(model, t, params, delta, batch, train), expected)


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
@pytest.mark.parametrize("top,pooler,embeddings", [(0, False, False), (0, True, False), (1, True, False),
                                                   (2, False, False), (3, True, True)])
def test_selection_and_counts_equal_the_formula(model_type, top, pooler, embeddings):
    layers = 3
    model, params = tiny_bert(model_type=model_type, layers=layers)
    cfg = FreezeConfig(top=top, pooler=pooler, embeddings=embeddings)
    delta = freeze(cfg).init(jax.random.key(0), params, model.info())
    flat = P.flatten(delta)
    assert {layer_index(p) for p in flat} - {None} == set(range(layers - top, layers))
    assert not any(p.startswith("head/") for p in flat)
    has_pooler = model_type == "bert"
    emb = sum(v.size for p, v in P.flatten(params).items() if p.startswith("embeddings/"))
    expected = top * _layer_size() + (D * D + D) * (pooler and has_pooler) + emb * embeddings
    assert P.count_params(delta) == expected
    # the same count from the param tree: every leaf of the chosen modules
    chosen = [v.size for p, v in P.flatten(params).items()
              if (layer_index(p) is not None and layer_index(p) >= layers - top)
              or (pooler and p.startswith("pooler/")) or (embeddings and p.startswith("embeddings/"))]
    assert sum(chosen) == expected


def test_numerics_against_plain_weight_update():
    model, params = tiny_bert(layers=3)
    batch = tiny_batch()
    t = freeze(FreezeConfig(top=2))
    delta = perturb(t.init(jax.random.key(0), params, model.info()), scale=0.05)
    flat = dict(P.flatten(params))
    for path, d in P.flatten(delta).items():
        flat[path] = flat[path] + d
    adapted = _adapted(model, t, params, delta, batch)
    np.testing.assert_allclose(adapted, _logits(model, P.unflatten(flat), batch), atol=1e-6, rtol=1e-6)
    assert float(jnp.abs(adapted - _logits(model, params, batch)).max()) > 1e-3


def test_gradient_wrt_delta_equals_gradient_wrt_weights():
    model, params = tiny_bert(seed=2, layers=2)
    batch = tiny_batch(seed=2)
    t = freeze(FreezeConfig(top=1, embeddings=True))
    delta = t.init(jax.random.key(0), params, model.info())

    def loss_delta(d):
        return jnp.sum(_adapted(model, t, params, d, batch) ** 2)

    def loss_params(p):
        return jnp.sum(_logits(model, p, batch) ** 2)

    g_delta = P.flatten(jax.grad(loss_delta)(delta))
    g_params = P.flatten(jax.grad(loss_params)(params))
    assert any(p.endswith("/kernel") for p in g_delta) and any("embeddings" in p for p in g_delta)
    for path, g in g_delta.items():
        np.testing.assert_allclose(g, g_params[path], rtol=1e-6, atol=1e-9, err_msg=path)
    assert any(float(jnp.abs(g).max()) > 1e-4 for g in g_delta.values())


@settings(max_examples=6, deadline=None)
@given(top=st.integers(1, 2), pooler=st.booleans(), seed=st.integers(0, 2**16))
def test_merge_unmerge(top, pooler, seed):
    model, params = tiny_bert(seed=seed % 5)
    batch = tiny_batch(seed=seed)
    t = freeze(FreezeConfig(top=top, pooler=pooler))
    delta = perturb(t.init(jax.random.key(seed), params, model.info()), seed=seed, scale=0.05)
    merged = merge(t, params, delta)
    flat_base, flat_merged = P.flatten(params), P.flatten(merged)
    changed = {p for p in flat_base if not np.array_equal(flat_base[p], flat_merged[p])}
    assert changed == set(P.flatten(delta))
    for path, leaf in P.flatten(unmerge(t, merged, delta)).items():
        scale = float(jnp.abs(flat_base[path]).max() + jnp.abs(flat_merged[path]).max())
        np.testing.assert_allclose(leaf, flat_base[path], rtol=0,
                                   atol=2 * np.finfo(np.float32).eps * max(scale, 1.0), err_msg=path)
    np.testing.assert_allclose(_adapted(model, t, params, delta, batch), _logits(model, merged, batch),
                               atol=2e-5, rtol=1e-5)


def test_jit_and_no_jit_agree():
    model, params = tiny_bert()
    batch = tiny_batch()
    t = freeze(FreezeConfig(top=1))
    delta = perturb(t.init(jax.random.key(0), params, model.info()), scale=0.05)
    f = lambda p, d: _adapted(model, t, p, d, batch)
    np.testing.assert_allclose(jax.jit(f)(params, delta), f(params, delta), atol=1e-6)


def test_labels_follow_the_trainer_rule():
    model, params = tiny_bert()
    t = freeze(FreezeConfig(top=1, embeddings=True))
    labels = P.flatten(t.labels(t.init(jax.random.key(0), params, model.info())))
    for path, label in labels.items():
        no_decay = path.endswith("/bias") or "LayerNorm" in path
        assert label == ("no_decay" if no_decay else "default"), path
    assert {"no_decay", "default"} == set(labels.values())


def test_bad_top_raises_naming_the_number_of_layers():
    with pytest.raises(ValueError, match="freeze.top"):
        FreezeConfig(top=-1)
    with pytest.raises(ValueError, match="freeze.top"):
        FreezeConfig(top=True)
    model, params = tiny_bert(layers=3)
    with pytest.raises(ValueError, match=r"freeze.top=4 but the model has 3 layers"):
        freeze(FreezeConfig(top=4)).init(jax.random.key(0), params, model.info())
    assert trained_paths(FreezeConfig(top=3, pooler=False), params, model.info())


def test_top_zero_without_pooler_is_an_empty_delta_and_trains():
    """Linear probing: nothing but the head; the trainer copes with an empty delta."""
    from jpeft.train.trainer import Trainer

    model, params = tiny_bert()
    t = freeze(FreezeConfig(top=0, pooler=False))
    assert t.init(jax.random.key(0), params, model.info()) == {}
    trainer = Trainer(model, t, params, total_steps=2)
    state = trainer.init_state(jax.random.key(0))
    state, metrics = trainer.train_step(state, trainer.frozen, tiny_batch())
    assert np.isfinite(float(metrics["loss"]))
    assert trainer.counts(state).trainable == D * 2 + 2


def test_additive_add_refuses_foreign_deltas():
    model, params = tiny_bert()
    with pytest.raises(KeyError, match="another model"):
        additive.add(params, {"encoder": {"layer_9": {"output": {"dense": {"bias": jnp.zeros(D)}}}}})
    with pytest.raises(ValueError, match="shape"):
        additive.add(params, {"pooler": {"dense": {"bias": jnp.zeros(D + 1)}}})
    # a selection made only of head leaves is refused
    t = additive.additive("probe", None, lambda base, info: ["head/classifier/bias"])
    with pytest.raises(ValueError, match="task head"):
        t.init(jax.random.key(0), params, model.info())


def test_additive_keeps_the_leaf_dtype():
    model, params = tiny_bert()
    half = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    t = freeze(FreezeConfig(top=1))
    delta = perturb(t.init(jax.random.key(0), half, model.info()), scale=0.05)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(delta))
    adapted = t.adapt_params(half, delta, ApplyContext())
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(adapted))


def test_compose_with_lora_and_train():
    from jpeft.train.trainer import Trainer

    model, params = tiny_bert()
    batch = tiny_batch()
    trainer = Trainer(model, compose(freeze(FreezeConfig(top=1)), lora(LoraConfig(r=2))), params,
                      total_steps=3)
    state = trainer.init_state(jax.random.key(0))
    losses = []
    for _ in range(3):
        state, metrics = trainer.train_step(state, trainer.frozen, batch)
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses)) and losses[-1] <= losses[0]
    k = np.asarray(state.trainable["delta"]["freeze"]["encoder"]["layer_1"]["output"]["dense"]["kernel"])
    assert np.any(k)
    assert "layer_0" not in state.trainable["delta"]["freeze"]["encoder"]
    # merge of the composition = apply (both additive on the same kernels)
    t = trainer.transform
    delta = state.trainable["delta"]
    base = trainer.params(state)
    np.testing.assert_allclose(_adapted(model, t, base, delta, batch),
                               _logits(model, merge(t, base, delta), batch), atol=2e-5, rtol=1e-5)


@pytest.mark.real
def test_minilm_count(minilm_dir):
    """FT-Top2 on MiniLM: two layers (2 × 1,774,464) + pooler (147,840) + head (770)."""
    from jpeft.models.bert import from_pretrained
    from jpeft.train.trainer import Trainer

    model, params = from_pretrained(minilm_dir, num_labels=2)
    trainer = Trainer(model, freeze(FreezeConfig(top=2)), params)
    counts = trainer.counts(trainer.init_state(jax.random.key(0)))
    layer = _layer_size(384, 1536)
    from_tree = sum(int(v.size) for p, v in P.flatten(params).items() if "layer_4/" in p or "layer_5/" in p)
    assert layer == 1_774_464 and from_tree == 2 * layer
    assert counts.trainable == 2 * layer + 384 * 384 + 384 + 770 == 3_697_538
    with pytest.raises(ValueError, match="has 6 layers"):
        freeze(FreezeConfig(top=7)).init(jax.random.key(0), params, model.info())
