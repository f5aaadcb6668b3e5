"""Diff pruning: identity at init (eval and training), hard-concrete gates, the expected-L0
penalty, sparsify/densify/finalize, merge/unmerge, counts, training lowers the expected L0."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jpeft.core import paths as P
from jpeft.core.transform import ApplyContext, apply, compose, merge, unmerge
from jpeft.methods.diff_pruning import (
    EPS,
    DiffPruningConfig,
    densify,
    diff_pruning,
    effective_delta,
    expected_density,
    hard_concrete,
    nonzero_fraction,
    open_probability,
    project,
    projection_step,
    sparsify,
)
from jpeft.methods.lora import LoraConfig, lora
from tests.helpers import perturb, tiny_batch, tiny_bert

NAME = "diff_pruning"
PATTERNS = ["", "kernel$", "attention", "layer_0/", "(bias|scale)$"]

dp_configs = st.builds(
    DiffPruningConfig,
    pattern=st.sampled_from(PATTERNS),
    embeddings=st.booleans(),
    init_logit=st.floats(-4.0, 8.0),
    beta=st.floats(0.3, 1.5),
    gamma=st.floats(-1.5, -0.05),
    zeta=st.floats(1.05, 1.5),
)


def _logits(model, params, batch):
    return model.apply({"params": params}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])


def _adapted(model, t, params, delta, batch, ctx=ApplyContext()):
    return apply(model, t, params, delta, batch["input_ids"], batch["attention_mask"],
                 batch["token_type_ids"], ctx=ctx)


def _np_gate(alpha, u, cfg):
    """Hard-concrete by hand (numpy, float64); ``u=None``: the evaluation gate."""
    alpha = np.asarray(alpha, np.float64)
    sig = lambda x: 1.0 / (1.0 + np.exp(-x))
    s = sig(alpha) if u is None else sig((np.log(u) - np.log(1 - u) + alpha) / cfg.beta)
    return np.clip(s * (cfg.zeta - cfg.gamma) + cfg.gamma, 0.0, 1.0)


def _perturbed(t, params, info, seed=0, w_scale=0.05, logit_scale=4.0):
    delta = t.init(jax.random.key(seed), params, info)
    return {"w": perturb(delta["w"], seed=seed, scale=w_scale),
            "logits": perturb(delta["logits"], seed=seed + 1, scale=logit_scale)}


@settings(max_examples=6, deadline=None)
@given(cfg=dp_configs, seed=st.integers(0, 2**16), model_type=st.sampled_from(["bert", "roberta"]))
def test_fresh_delta_changes_nothing_in_eval_and_training(cfg, seed, model_type):
    model, params = tiny_bert(model_type=model_type, seed=seed % 7)
    batch = tiny_batch(seed=seed)
    t = diff_pruning(cfg)
    delta = t.init(jax.random.key(seed), params, model.info())
    expected = _logits(model, params, batch)
    np.testing.assert_array_equal(_adapted(model, t, params, delta, batch), expected)
    train = ApplyContext(train=True, rng=jax.random.key(seed))
    np.testing.assert_array_equal(_adapted(model, t, params, delta, batch, train), expected)
    # the sampled gates do differ from 1 (unless the logit is large): w = 0 is what hides them
    gates = P.flatten(effective_delta({"w": jax.tree_util.tree_map(jnp.ones_like, delta["w"]),
                                       "logits": delta["logits"]}, cfg, train, NAME))
    assert all(float(g.min()) >= 0 and float(g.max()) <= 1 for g in gates.values())
    if cfg.init_logit <= 2.0:  # P(z < 1) per entry >= 0.14 here; hundreds of entries at least
        assert any(float(g.min()) < 1 for g in gates.values()), cfg


def test_hard_concrete_range_and_point_masses():
    cfg = DiffPruningConfig()
    key = jax.random.key(0)
    n = 20_000
    mid = hard_concrete(jnp.zeros(n), key, cfg)
    assert float(mid.min()) >= 0.0 and float(mid.max()) <= 1.0
    # stretched then clipped: exact zeros and ones both carry mass, and the interior too
    assert 0.02 < float((mid == 0).mean()) < 0.3 and 0.02 < float((mid == 1).mean()) < 0.3
    assert float(((mid > 0) & (mid < 1)).mean()) > 0.4
    assert float((hard_concrete(jnp.full(n, 12.0), key, cfg) == 1).mean()) > 0.999
    assert float((hard_concrete(jnp.full(n, -12.0), key, cfg) == 0).mean()) > 0.999
    # evaluation gate
    np.testing.assert_allclose(hard_concrete(jnp.array([-10.0, 0.0, 10.0]), None, cfg), [0.0, 0.5, 1.0],
                               atol=1e-6)


@pytest.mark.parametrize("cfg", [DiffPruningConfig(), DiffPruningConfig(beta=1.0, gamma=-1.5, zeta=1.5)])
def test_hard_concrete_matches_the_hand_formula(cfg):
    alpha = jnp.linspace(-4.0, 4.0, 33)
    key = jax.random.key(7)
    u = np.asarray(jax.random.uniform(key, alpha.shape, jnp.float32, EPS, 1.0 - EPS), np.float64)
    np.testing.assert_allclose(hard_concrete(alpha, key, cfg), _np_gate(alpha, u, cfg), atol=1e-5)
    np.testing.assert_allclose(hard_concrete(alpha, None, cfg), _np_gate(alpha, None, cfg), atol=1e-6)


def test_penalty_closed_form_and_monotone():
    cfg = DiffPruningConfig(l0_weight=2.0)
    t = diff_pruning(cfg)
    alpha = np.array([[0.0, 1.0, -2.0], [3.0, 5.0, -0.5]])
    delta = {"w": {"a": {"kernel": jnp.zeros((2, 3))}, "b": {"bias": jnp.zeros(2)}},
             "logits": {"a": {"kernel": jnp.asarray(alpha, jnp.float32)}, "b": {"bias": jnp.array([4.0, -6.0])}}}
    shift = cfg.beta * math.log(-cfg.gamma / cfg.zeta)
    every = list(alpha.ravel()) + [4.0, -6.0]
    closed = 2.0 * sum(1 / (1 + math.exp(-(a - shift))) for a in every) / 8
    assert float(t.penalty(delta, ApplyContext())) == pytest.approx(closed, rel=1e-6)
    np.testing.assert_allclose(open_probability(jnp.float32(0.0), cfg), 1 / (1 + math.exp(shift)), rtol=1e-6)
    # lower logits, lower penalty (also for tiny decrements near saturation)
    lower = jax.tree_util.tree_map(lambda x: x - 1e-3, delta)
    lower["w"] = delta["w"]
    assert float(t.penalty(lower, ApplyContext())) < float(t.penalty(delta, ApplyContext()))
    sat = {"w": {"k": jnp.zeros(4096)}, "logits": {"k": jnp.full(4096, 5.0)}}
    sat_lower = {"w": sat["w"], "logits": {"k": jnp.full(4096, 5.0 - 5e-4)}}
    assert float(t.penalty(sat_lower, ApplyContext())) < float(t.penalty(sat, ApplyContext()))
    # finalized deltas carry no penalty
    assert float(t.penalty({"w": delta["w"]}, ApplyContext())) == 0.0


def test_numerics_against_hand_gates():
    cfg = DiffPruningConfig(pattern="layer_1/")
    model, params = tiny_bert()
    batch = tiny_batch()
    t = diff_pruning(cfg)
    delta = _perturbed(t, params, model.info(), w_scale=0.3, logit_scale=2.0)
    flat = dict(P.flatten(params))
    w, alpha = P.flatten(delta["w"]), P.flatten(delta["logits"])
    rng = jax.random.key(5)
    ctx = ApplyContext(train=True, rng=rng)
    train_params, eval_params = dict(flat), dict(flat)
    for path in w:
        key = ctx.key(NAME, path)
        u = np.asarray(jax.random.uniform(key, alpha[path].shape, jnp.float32, EPS, 1 - EPS), np.float64)
        train_params[path] = flat[path] + _np_gate(alpha[path], u, cfg) * np.asarray(w[path])
        eval_params[path] = flat[path] + _np_gate(alpha[path], None, cfg) * np.asarray(w[path])
    train_out = _adapted(model, t, params, delta, batch, ctx)
    eval_out = _adapted(model, t, params, delta, batch)
    np.testing.assert_allclose(train_out, _logits(model, P.unflatten(train_params), batch), atol=1e-5)
    np.testing.assert_allclose(eval_out, _logits(model, P.unflatten(eval_params), batch), atol=1e-5)
    assert float(jnp.abs(train_out - eval_out).max()) > 1e-5
    # same rng, same gates
    np.testing.assert_array_equal(train_out, _adapted(model, t, params, delta, batch, ctx))


def test_gates_start_open():
    """z_eval = 1 at init, and ∂L/∂w = z ⊙ ∂L/∂θ ≠ 0 (the trainer test checks that w moves)."""
    model, params = tiny_bert()
    delta = diff_pruning().init(jax.random.key(0), params, model.info())
    gates = jax.tree_util.tree_map(lambda a: hard_concrete(a, None), delta["logits"])
    assert all(float(z.min()) == 1.0 for z in jax.tree_util.tree_leaves(gates))
    closed = diff_pruning(DiffPruningConfig(init_logit=-5.0)).init(jax.random.key(0), params, model.info())
    gates = jax.tree_util.tree_map(lambda a: hard_concrete(a, None), closed["logits"])
    assert all(float(z.max()) == 0.0 for z in jax.tree_util.tree_leaves(gates))


def test_counts_and_selection():
    model, params = tiny_bert(layers=2)
    info = model.info()
    flat = P.flatten(params)
    body = sum(v.size for p, v in flat.items() if not p.startswith(("head/", "embeddings/")))
    emb = sum(v.size for p, v in flat.items() if p.startswith("embeddings/"))
    d = diff_pruning().init(jax.random.key(0), params, info)
    assert P.count_params(d["w"]) == P.count_params(d["logits"]) == body
    assert body == 2 * (4 * (16 * 16 + 16) + (16 * 24 + 24) + (24 * 16 + 16) + 4 * 16) + 16 * 16 + 16
    d = diff_pruning(DiffPruningConfig(embeddings=True)).init(jax.random.key(0), params, info)
    assert P.count_params(d["w"]) == body + emb
    d = diff_pruning(DiffPruningConfig(pattern="kernel$")).init(jax.random.key(0), params, info)
    assert all(p.endswith("/kernel") for p in P.flatten(d["w"]))
    assert not any(p.startswith("head/") for p in P.flatten(d["w"]))
    np.testing.assert_array_equal(jax.tree_util.tree_leaves(d["logits"])[0], 5.0)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), pattern=st.sampled_from(PATTERNS))
def test_merge_unmerge(seed, pattern):
    model, params = tiny_bert(seed=seed % 5)
    batch = tiny_batch(seed=seed)
    t = diff_pruning(DiffPruningConfig(pattern=pattern))
    delta = _perturbed(t, params, model.info(), seed=seed)
    merged = merge(t, params, delta)
    flat_base, flat_merged = P.flatten(params), P.flatten(merged)
    changed = {p for p in flat_base if not np.array_equal(flat_base[p], flat_merged[p])}
    assert changed and changed <= set(P.flatten(delta["w"]))
    for path, leaf in P.flatten(unmerge(t, merged, delta)).items():
        scale = float(jnp.abs(flat_base[path]).max() + jnp.abs(flat_merged[path]).max())
        np.testing.assert_allclose(leaf, flat_base[path], rtol=0,
                                   atol=2 * np.finfo(np.float32).eps * max(scale, 1.0), err_msg=path)
    np.testing.assert_allclose(_adapted(model, t, params, delta, batch), _logits(model, merged, batch),
                               atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("target", [0.005, 0.01, 0.1, 0.5, 1.0])
def test_sparsify_hits_the_target_and_keeps_the_top_entries(target):
    model, params = tiny_bert()
    t = diff_pruning()
    delta = _perturbed(t, params, model.info(), logit_scale=0.0)  # gates open: d = w, dense
    d = {p: np.asarray(v) for p, v in P.flatten(effective_delta(delta)).items()}
    total = sum(v.size for v in d.values())
    sparse = sparsify(delta, target)
    assert set(sparse) == set(d)
    kept = sum(e["indices"].size for e in sparse.values())
    assert abs(kept - target * total) <= 1
    assert nonzero_fraction({"w": densify(sparse)}) == pytest.approx(kept / total)
    for path, e in sparse.items():
        assert e["indices"].dtype == np.int32 and e["values"].dtype == np.float32
        assert e["shape"] == d[path].shape and np.all(np.diff(e["indices"]) > 0)
    dense = {p: np.asarray(v) for p, v in P.flatten(densify(sparse)).items()}
    kept_mask = np.concatenate([(dense[p] != 0).ravel() for p in d])
    mags = np.concatenate([np.abs(d[p]).ravel() for p in d])
    np.testing.assert_array_equal(np.concatenate([dense[p].ravel() for p in d])[kept_mask], mags[kept_mask]
                                  * np.sign(np.concatenate([d[p].ravel() for p in d]))[kept_mask])
    if kept < total:
        assert mags[kept_mask].min() >= mags[~kept_mask].max()  # global magnitude projection


def test_sparsify_uses_eval_gates_and_skips_zeros():
    cfg = DiffPruningConfig()
    w = jnp.array([[0.5, -2.0, 0.0, 1.0]])
    delta = {"w": {"x": {"kernel": w}}, "logits": {"x": {"kernel": jnp.array([[10.0, -10.0, 10.0, 10.0]])}}}
    # d = [0.5, 0 (closed gate), 0 (w = 0), 1.0]: only two non-zeros
    sparse = sparsify(delta, 1.0, cfg)["x/kernel"]
    np.testing.assert_array_equal(sparse["indices"], [0, 3])
    np.testing.assert_allclose(sparse["values"], [0.5, 1.0])
    assert nonzero_fraction(delta, cfg) == 0.5
    top = sparsify(delta, 0.25, cfg)["x/kernel"]
    np.testing.assert_array_equal(top["indices"], [3])
    np.testing.assert_array_equal(P.flatten(densify({"x/kernel": top}))["x/kernel"], [[0, 0, 0, 1.0]])
    with pytest.raises(ValueError, match="target_sparsity"):
        sparsify(delta, 0.0)


def test_finalize_gives_a_plain_additive_delta():
    model, params = tiny_bert()
    batch = tiny_batch()
    cfg = DiffPruningConfig(target_sparsity=0.05)
    t = diff_pruning(cfg)
    delta = _perturbed(t, params, model.info(), w_scale=0.3)
    final = t.finalize(delta)
    assert set(final) == {"w"}
    assert set(P.flatten(final["w"])) == set(P.flatten(delta["w"]))
    assert nonzero_fraction(final) <= 0.05 + 1e-4 and nonzero_fraction(delta) > 0.3
    assert t.finalize(final) is final
    assert float(t.penalty(final, ApplyContext())) == 0.0
    assert set(jax.tree_util.tree_leaves(t.labels(final))) == {"default"}
    plain = dict(P.flatten(params))
    for path, v in P.flatten(final["w"]).items():
        plain[path] = plain[path] + v
    out = _adapted(model, t, params, final, batch)
    np.testing.assert_allclose(out, _logits(model, P.unflatten(plain), batch), atol=1e-6)
    np.testing.assert_allclose(out, _logits(model, merge(t, params, final), batch), atol=2e-5)
    # training mode does not sample gates for a finalized delta
    train = ApplyContext(train=True, rng=jax.random.key(0))
    np.testing.assert_array_equal(_adapted(model, t, params, final, batch, train), out)


def test_a_finalized_adapter_is_written_and_read_back(tmp_path):
    """save_adapter(finalize=True) and load_adapter check the delta against the method's
    structures, the finalized one included (diff pruning's finalize runs on the host)."""
    from jpeft.checkpoint.export import load_adapter, save_adapter

    model, params = tiny_bert()
    t = diff_pruning(DiffPruningConfig(target_sparsity=0.05))
    delta = _perturbed(t, params, model.info(), w_scale=0.3)
    folder = save_adapter(tmp_path / "a", t, delta, params, base_model="tiny", base_fingerprint="x",
                          method_spec="diff_pruning", method_configs={"diff_pruning": t.config},
                          model=model, finalize=True)
    back, loaded, _ = load_adapter(folder, model, params, allow_base_mismatch=True)
    assert set(loaded) == {"w"}
    for path, v in P.flatten(t.finalize(delta)).items():
        np.testing.assert_array_equal(P.flatten(loaded)[path], v)


def test_labels():
    model, params = tiny_bert()
    t = diff_pruning()
    labels = t.labels(t.init(jax.random.key(0), params, model.info()))
    assert set(jax.tree_util.tree_leaves(labels["w"])) == {"default"}
    assert set(jax.tree_util.tree_leaves(labels["logits"])) == {"gates_no_decay"}


def test_jit_and_no_jit_agree():
    model, params = tiny_bert()
    batch = tiny_batch()
    t = diff_pruning()
    delta = _perturbed(t, params, model.info())
    for ctx in (ApplyContext(), ApplyContext(train=True, rng=jax.random.key(3))):
        f = lambda p, d: _adapted(model, t, p, d, batch, ctx)
        np.testing.assert_allclose(jax.jit(f)(params, delta), f(params, delta), atol=1e-6)


def test_bad_config_and_patterns_raise_clearly():
    for kwargs, field in [({"beta": 0.0}, "beta"), ({"gamma": 0.1}, "gamma"), ({"zeta": 1.0}, "zeta"),
                          ({"target_sparsity": 0.0}, "target_sparsity"),
                          ({"target_sparsity": 1.5}, "target_sparsity"), ({"l0_weight": -1.0}, "l0_weight"),
                          ({"init_logit": float("nan")}, "init_logit"), ({"pattern": "(x"}, "pattern")]:
        with pytest.raises(ValueError, match=f"diff_pruning.{field}"):
            DiffPruningConfig(**kwargs)
    model, params = tiny_bert()
    with pytest.raises(P.NoMatchError) as err:
        diff_pruning(DiffPruningConfig(pattern="qkv_proj")).init(jax.random.key(0), params, model.info())
    assert "diff_pruning.pattern" in str(err.value) and "attention/self/query/kernel" in str(err.value)
    with pytest.raises(P.NoMatchError):  # embeddings only, but embeddings are excluded
        diff_pruning(DiffPruningConfig(pattern="word_embeddings")).init(jax.random.key(0), params, model.info())
    with pytest.raises(KeyError, match="diff-pruning delta"):
        diff_pruning().adapt_params(params, {"logits": {}}, ApplyContext())


def test_compose_with_lora_and_train_lowers_the_expected_l0():
    """compose(diff_pruning, lora) trains; a large λ (and a high learning rate on the gate logits,
    group "gates") lowers the expected L0 within 3 steps; w moves (the gates are open)."""
    from jpeft.train.optim import OptimConfig
    from jpeft.train.trainer import Trainer

    model, params = tiny_bert()
    batch = tiny_batch()
    cfg = DiffPruningConfig(l0_weight=100.0, init_logit=0.0, pattern="output/dense/kernel$")
    optim = OptimConfig(lr=1e-3, warmup_ratio=0.0, schedule="constant", group_lr={"gates": 100.0})
    trainer = Trainer(model, compose(diff_pruning(cfg), lora(LoraConfig(r=2))), params, total_steps=3,
                      optim=optim)
    state = trainer.init_state(jax.random.key(0))
    before = float(expected_density(state.trainable["delta"]["diff_pruning"], cfg))
    losses, penalties = [], []
    for _ in range(3):
        state, metrics = trainer.train_step(state, trainer.frozen, batch)
        losses.append(float(metrics["loss"]))
        penalties.append(float(metrics["penalty"]))
    after = float(expected_density(state.trainable["delta"]["diff_pruning"], cfg))
    assert all(np.isfinite(losses)) and losses[-1] <= losses[0]
    assert after < before - 0.02
    assert penalties == sorted(penalties, reverse=True) and penalties[-1] < penalties[0]
    w = np.asarray(state.trainable["delta"]["diff_pruning"]["w"]["encoder"]["layer_0"]["output"]["dense"]["kernel"])
    assert np.any(w)
    final = trainer.transform.finalize(state.trainable["delta"])
    assert set(final["diff_pruning"]) == {"w"} and set(final["lora"]) == set(state.trainable["delta"]["lora"])


def test_projection_stage_fixes_the_mask_and_keeps_training(tmp_path):
    """The loop's between_steps hook projects at round(project_at·T): from then on exactly the
    target fraction of entries is non-zero, the kept entries still train, the penalty is
    constant, and finalize() does not change the output."""
    from jpeft.train.logging import MetricsLog
    from jpeft.train.loop import LoopConfig, fit
    from jpeft.train.optim import OptimConfig
    from jpeft.train.trainer import Trainer

    model, params = tiny_bert()
    batch = tiny_batch()
    cfg = DiffPruningConfig(target_sparsity=0.05, project_at=0.5, init_logit=3.0)
    t = compose(diff_pruning(cfg), lora(LoraConfig(r=2)))
    total = 6
    assert projection_step(cfg, total) == 3
    optim = OptimConfig(lr=1e-2, warmup_ratio=0.0, schedule="constant", group_lr={"gates": 10.0})
    trainer = Trainer(model, t, params, total_steps=total, optim=optim)
    seen = []

    def batches(epoch, start):
        for _ in range(start, total):
            yield batch

    def evaluate(trainer, state):
        return {"loss": 0.0}

    def on_step(state, evaluated):
        delta = state.trainable["delta"][NAME]
        seen.append((nonzero_fraction(delta, cfg), jax.tree_util.tree_map(np.asarray, delta["w"])))

    state = trainer.init_state(jax.random.key(0))
    with MetricsLog(tmp_path / "m.jsonl") as log:
        state, _, _ = fit(trainer, state, batches, evaluate, LoopConfig(total, total, 1, 0, False), log,
                          on_step=on_step)
    density = [d for d, _ in seen]
    assert all(d > 0.5 for d in density[:2]), density  # before the projection: dense
    assert all(d == density[2] and abs(d - 0.05) < 1e-3 for d in density[2:]), density  # after: the target
    moved = [np.abs(a - b).max() for a, b in zip(jax.tree_util.tree_leaves(seen[-1][1]),
                                                 jax.tree_util.tree_leaves(seen[2][1]))]
    assert max(moved) > 0  # the kept entries keep training
    delta = state.trainable["delta"]
    assert np.isclose(float(trainer.transform.penalty(delta, ApplyContext())), cfg.l0_weight * density[-1], atol=1e-6)
    final = trainer.transform.finalize(delta)
    base = trainer.params(state)
    np.testing.assert_allclose(np.asarray(_adapted(model, t, base, final, batch)),
                               np.asarray(_adapted(model, t, base, delta, batch)), atol=1e-5)
    with pytest.raises(ValueError, match="finalized"):
        project(final[NAME], cfg)
    with pytest.raises(ValueError, match="project_at"):
        DiffPruningConfig(project_at=0.0)


def test_projection_starts_a_new_learning_rate_stage():
    """The fine-tuning after the projection gets its own warm-up and decay (composed or not)."""
    from jpeft.train.optim import OptimConfig
    from jpeft.train.trainer import Trainer

    model, params = tiny_bert()
    cfg = DiffPruningConfig(project_at=0.75)
    assert diff_pruning(cfg).stage_starts(800) == (600,)
    assert diff_pruning(DiffPruningConfig(project_at=1.0)).stage_starts(800) == ()
    t = compose(lora(LoraConfig(r=2)), diff_pruning(cfg))
    assert t.stage_starts(800) == (600,)
    trainer = Trainer(model, t, params, total_steps=800, optim=OptimConfig(lr=1.0, warmup_ratio=0.1))
    lr = [trainer.learning_rate(s) for s in (599, 600, 620, 800)]
    assert lr[0] < 0.02 and lr[1] == 0.0 and lr[2] == pytest.approx(1.0) and lr[3] == pytest.approx(0.0), lr


@pytest.mark.real
def test_minilm_count(minilm_dir):
    """w and α for every non-embedding, non-head weight of MiniLM: 2 × 10,794,624 + 770."""
    from jpeft.models.bert import from_pretrained
    from jpeft.train.trainer import Trainer

    model, params = from_pretrained(minilm_dir, num_labels=2)
    trainer = Trainer(model, diff_pruning(), params)
    counts = trainer.counts(trainer.init_state(jax.random.key(0)))
    body = sum(int(v.size) for p, v in P.flatten(params).items() if not p.startswith(("head/", "embeddings/")))
    layer = 4 * (384 * 384 + 384) + (384 * 1536 + 1536) + (1536 * 384 + 384) + 4 * 384
    assert body == 6 * layer + 384 * 384 + 384 == 10_794_624
    assert counts.trainable == 2 * body + 770 == 21_590_018


def test_gate_logits_are_not_decayed_by_the_default_optimizer():
    """The logits' group is ``gates`` without weight decay (a zero gradient leaves them as they
    are), while ``w`` is decayed; ``group_lr={"gates": k}`` still names the group."""
    import optax

    from jpeft.train.optim import OptimConfig, make_optimizer

    delta = {"w": {"a": jnp.ones((3,))}, "logits": {"a": jnp.full((3,), 5.0)}}
    labels = diff_pruning(DiffPruningConfig()).labels(delta)
    assert P.flatten(labels) == {"w/a": "default", "logits/a": "gates_no_decay"}
    tx = make_optimizer(OptimConfig(lr=0.1, weight_decay=0.5, warmup_ratio=0.0, schedule="constant",
                                    group_lr={"gates": 2.0}), labels, 10)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, delta)
    updates, _ = tx.update(zeros, tx.init(delta), delta)
    new = optax.apply_updates(delta, updates)
    np.testing.assert_array_equal(new["logits"]["a"], delta["logits"]["a"])
    assert float(new["w"]["a"][0]) < 1.0
