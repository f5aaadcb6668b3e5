"""P-tuning: the prompt encoder (MLP, bidirectional LSTM) against a float64 hand formula and
PEFT's PromptEncoder, the model-level law (= prompt tuning with the encoded prompt), finalize,
counts, dropout, errors, composition and training."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jpeft.core import paths as P
from jpeft.core.transform import ApplyContext, NotMergeableError, apply, compose, merge
from jpeft.methods.lora import LoraConfig, lora
from jpeft.methods.prompt import prompt
from jpeft.methods.ptuning import PTuningConfig, encode, finalize_delta, ptuning
from tests.helpers import perturb, tiny_batch, tiny_bert
from tests.methods.test_prompt import hf_model, peft_logits, trainable_count

_tiny_bert = functools.lru_cache(maxsize=None)(tiny_bert)
D = 16  # tiny_bert's hidden size


def _inputs(batch):
    return batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]


def _logits(model, params, batch):
    return model.apply({"params": params}, *_inputs(batch))


def _adapted(model, t, params, delta, batch, ctx=ApplyContext()):
    return apply(model, t, params, delta, *_inputs(batch), ctx=ctx)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _hand_lstm_direction(p, x, reverse):
    """torch.nn.LSTM's recurrence for one direction, float64, written out step by step."""
    w_ih, w_hh = p["kernel_ih"].T, p["kernel_hh"].T  # torch layout (4h, in), (4h, h)
    hdim = w_hh.shape[1]
    h, c = np.zeros(hdim), np.zeros(hdim)
    out = np.zeros((x.shape[0], hdim))
    order = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    for t in order:
        z = w_ih @ x[t] + p["bias_ih"] + w_hh @ h + p["bias_hh"]
        i, f, g, o = z[:hdim], z[hdim:2 * hdim], z[2 * hdim:3 * hdim], z[3 * hdim:]
        c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
        h = _sigmoid(o) * np.tanh(c)
        out[t] = h
    return out


def _hand_encode(delta):
    """The P-tuning encoder re-implemented in float64 numpy from the module docstring."""
    d = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), delta)
    x = d["embedding"]
    if "lstm" in d:
        for layer in range(len(d["lstm"])):
            p = d["lstm"][f"layer_{layer}"]
            x = np.concatenate([_hand_lstm_direction(p["forward"], x, False),
                                _hand_lstm_direction(p["backward"], x, True)], axis=1)
        mlp = d["mlp"]
        x = np.maximum(x @ mlp["dense_0"]["kernel"] + mlp["dense_0"]["bias"], 0)
        return x @ mlp["dense_1"]["kernel"] + mlp["dense_1"]["bias"]
    mlp = d["mlp"]
    x = np.maximum(x @ mlp["dense_0"]["kernel"] + mlp["dense_0"]["bias"], 0)
    x = np.maximum(x @ mlp["dense_1"]["kernel"] + mlp["dense_1"]["bias"], 0)
    return x @ mlp["dense_2"]["kernel"] + mlp["dense_2"]["bias"]


def _expected_count(cfg, d=D):
    k, h = cfg.num_virtual_tokens, cfg.encoder_hidden or d
    if cfg.encoder == "mlp":
        return k * d + (d * h + h) + (h * h + h) + (h * d + d)
    lstm = sum(2 * (d_in * 4 * h + h * 4 * h + 8 * h)
               for d_in in [d] + [2 * h] * (cfg.encoder_num_layers - 1))
    return k * d + lstm + (2 * h * 2 * h + 2 * h) + (2 * h * d + d)


# Few distinct shapes: every new one compiles the init and the encoder's scan again.
ptuning_configs = st.one_of(
    st.builds(PTuningConfig, num_virtual_tokens=st.sampled_from([2, 3]), encoder=st.just("mlp"),
              encoder_hidden=st.sampled_from([None, 3]), init_scale=st.floats(0.1, 2.0)),
    st.builds(PTuningConfig, num_virtual_tokens=st.sampled_from([2, 3]), encoder=st.just("lstm"),
              encoder_hidden=st.sampled_from([None, 3]), encoder_num_layers=st.sampled_from([1, 2, 3]),
              encoder_dropout=st.sampled_from([0.0, 0.3]), init_scale=st.floats(0.1, 2.0)),
)


def _random_delta(t, model, params, seed, scale=0.7):
    """A random delta of ``t``'s layout (from ``eval_shape``: nothing to compile per shape)."""
    shapes = jax.eval_shape(lambda: t.init(jax.random.key(0), params, model.info()))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype), shapes)


@settings(max_examples=8, deadline=None)
@given(cfg=ptuning_configs, seed=st.integers(0, 2**16))
def test_encoder_against_hand_formula_and_counts(cfg, seed):
    model, params = _tiny_bert()
    t = ptuning(cfg)
    delta = _random_delta(t, model, params, seed)
    assert P.count_params(delta) == _expected_count(cfg)
    ours = jax.jit(encode)(delta)
    assert ours.shape == (cfg.num_virtual_tokens, D)
    np.testing.assert_allclose(np.asarray(ours, np.float64), _hand_encode(delta), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(finalize_delta({"prompt": ours})["prompt"], ours)


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_init_as_torch(encoder):
    """Table ~ normal(init_scale); Linear ~ uniform(±1/√fan_in); LSTM ~ uniform(±1/√h); leaves
    independent; the rng decides."""
    model, params = _tiny_bert()
    h = 64
    cfg = PTuningConfig(num_virtual_tokens=50, encoder=encoder, encoder_hidden=h, init_scale=0.5)
    delta = ptuning(cfg).init(jax.random.key(0), params, model.info())
    assert 0.4 < float(jnp.std(delta["embedding"])) < 0.6
    flat = {p: np.asarray(v) for p, v in P.flatten(delta).items()}
    for path, leaf in flat.items():
        if path == "embedding":
            continue
        if path.startswith("lstm/"):
            bound = 1 / np.sqrt(h)
        else:
            bound = 1 / np.sqrt(flat[path.rsplit("/", 1)[0] + "/kernel"].shape[0])
        assert np.abs(leaf).max() <= bound + 1e-7, path
        if leaf.size >= 64:
            assert np.abs(leaf).max() > 0.8 * bound, path
    values = [v.ravel()[:8] for v in flat.values()]
    assert len({tuple(v) for v in values}) == len(values)  # no two leaves share their draws
    other = ptuning(cfg).init(jax.random.key(1), params, model.info())
    assert not np.array_equal(other["mlp"]["dense_0"]["kernel"], flat["mlp/dense_0/kernel"])


@settings(max_examples=4, deadline=None)
@given(cfg=ptuning_configs, seed=st.integers(0, 2**16), model_type=st.sampled_from(["bert", "roberta"]))
def test_output_equals_prompt_tuning_with_encoded_prompt(cfg, seed, model_type):
    """The documented law replacing 'fresh delta = identity' (tokens are added): the model sees
    prompt tuning's [E'; X] with E' the (hand-computed) encoder output; finalize keeps exactly
    that."""
    import dataclasses

    cfg = dataclasses.replace(cfg, num_virtual_tokens=2)  # one sequence length: fewer compilations
    model, params = _tiny_bert(model_type=model_type, seed=seed % 3)
    batch = tiny_batch(seed=seed)
    t = ptuning(cfg)
    delta = _random_delta(t, model, params, seed)
    ours = _adapted(model, t, params, delta, batch)
    hand = {"prompt": jnp.asarray(_hand_encode(delta), jnp.float32)}
    reference = _adapted(model, prompt(), params, hand, batch)
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(_adapted(model, t, params, t.finalize(delta), batch), ours)
    assert t.adds_tokens and not np.array_equal(ours, _logits(model, params, batch))


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_logits_and_counts_equal_hf_peft(encoder, model_type):
    """Same weights in PEFT's PromptEncoder -> same prompts and logits: PEFT's layout is ours."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    model, params = _tiny_bert(model_type=model_type)
    batch = tiny_batch()
    k, h = 2, 5
    t = ptuning(PTuningConfig(num_virtual_tokens=k, encoder=encoder, encoder_hidden=h))
    delta = t.init(jax.random.key(0), params, model.info())
    pm = peft.get_peft_model(hf_model(model, params), peft.PromptEncoderConfig(
        task_type="SEQ_CLS", num_virtual_tokens=k, encoder_hidden_size=h,
        encoder_reparameterization_type=encoder.upper()))
    enc = pm.prompt_encoder["default"]
    d = jax.tree_util.tree_map(lambda x: torch.tensor(np.asarray(x)), delta)
    mlp = [m for m in enc.mlp_head if isinstance(m, torch.nn.Linear)]
    assert len(mlp) == len(d["mlp"])
    with torch.no_grad():
        enc.embedding.weight.copy_(d["embedding"])
        for i, linear in enumerate(mlp):
            linear.weight.copy_(d["mlp"][f"dense_{i}"]["kernel"].T)
            linear.bias.copy_(d["mlp"][f"dense_{i}"]["bias"])
        if encoder == "lstm":
            for layer, directions in d["lstm"].items():
                n = layer.rsplit("_", 1)[1]
                for direction, suffix in (("forward", ""), ("backward", "_reverse")):
                    p = directions[direction]
                    getattr(enc.lstm_head, f"weight_ih_l{n}{suffix}").copy_(p["kernel_ih"].T)
                    getattr(enc.lstm_head, f"weight_hh_l{n}{suffix}").copy_(p["kernel_hh"].T)
                    getattr(enc.lstm_head, f"bias_ih_l{n}{suffix}").copy_(p["bias_ih"])
                    getattr(enc.lstm_head, f"bias_hh_l{n}{suffix}").copy_(p["bias_hh"])
        enc.eval()
        theirs_prompt = enc(torch.arange(k)[None])[0].numpy()
    np.testing.assert_allclose(np.asarray(encode(delta)), theirs_prompt, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(_adapted(model, t, params, delta, batch)), peft_logits(pm, batch),
                               rtol=1e-4, atol=1e-6)
    # apples to apples: PEFT trains the encoder and a classifier copy (modules_to_save)
    head = P.count_params({p: v for p, v in P.flatten(params).items() if p.startswith("head/")})
    assert trainable_count(pm) == P.count_params(delta) + head


def test_lstm_dropout_between_layers_only_while_training():
    model, params = _tiny_bert()
    batch = tiny_batch()
    t = ptuning(PTuningConfig(num_virtual_tokens=2, encoder="lstm", encoder_hidden=4, encoder_dropout=0.5))
    delta = t.init(jax.random.key(0), params, model.info())
    train = ApplyContext(train=True, rng=jax.random.key(1))
    eval_out = _adapted(model, t, params, delta, batch)
    a = _adapted(model, t, params, delta, batch, train)
    np.testing.assert_array_equal(a, _adapted(model, t, params, delta, batch, train))
    assert float(jnp.abs(a - eval_out).max()) > 1e-6
    np.testing.assert_array_equal(eval_out, _adapted(model, t, params, delta, batch, ApplyContext(train=True)))
    # one layer: torch.nn.LSTM drops nothing (no layer after it)
    one = ptuning(PTuningConfig(num_virtual_tokens=2, encoder="lstm", encoder_hidden=4,
                                encoder_num_layers=1, encoder_dropout=0.5))
    d1 = one.init(jax.random.key(0), params, model.info())
    np.testing.assert_array_equal(_adapted(model, one, params, d1, batch, train),
                                  _adapted(model, one, params, d1, batch))


def test_finalize_labels_and_group_lr():
    from jpeft.train.optim import OptimConfig
    from jpeft.train.trainer import Trainer

    model, params = _tiny_bert()
    t = ptuning(PTuningConfig(num_virtual_tokens=3, encoder_hidden=4))
    delta = t.init(jax.random.key(0), params, model.info())
    kept = t.finalize(delta)
    assert list(kept) == ["prompt"] and kept["prompt"].shape == (3, D)
    assert list(t.finalize(kept)) == ["prompt"]
    np.testing.assert_array_equal(t.finalize(kept)["prompt"], kept["prompt"])
    assert set(jax.tree_util.tree_leaves(t.labels(delta))) == {"prompt"}
    assert set(jax.tree_util.tree_leaves(t.labels(kept))) == {"prompt"}
    trainer = Trainer(model, t, params, total_steps=3,
                      optim=OptimConfig(lr=1e-2, warmup_ratio=0.0, group_lr={"prompt": 0.0}))
    state = trainer.init_state(jax.random.key(0))
    assert trainer.counts(state).trainable == _expected_count(t.config) + D * 2 + 2
    before = jax.tree_util.tree_map(np.array, state.trainable["delta"])
    state, _ = trainer.train_step(state, trainer.frozen, tiny_batch())
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(state.trainable["delta"])):
        np.testing.assert_array_equal(a, b)


def test_jit_and_no_jit_agree():
    model, params = _tiny_bert()
    batch = tiny_batch()
    t = ptuning(PTuningConfig(num_virtual_tokens=2, encoder="lstm", encoder_hidden=3))
    delta = perturb(t.init(jax.random.key(0), params, model.info()))
    f = lambda p, d: _adapted(model, t, p, d, batch)
    np.testing.assert_allclose(jax.jit(f)(params, delta), f(params, delta), atol=1e-6)


def test_bad_config_values_and_deltas():
    with pytest.raises(ValueError, match="ptuning.num_virtual_tokens"):
        PTuningConfig(num_virtual_tokens=0)
    with pytest.raises(ValueError, match="ptuning.encoder must"):
        PTuningConfig(encoder="gru")
    with pytest.raises(ValueError, match="ptuning.encoder_hidden"):
        PTuningConfig(encoder_hidden=0)
    with pytest.raises(ValueError, match="ptuning.encoder_num_layers must"):
        PTuningConfig(encoder="lstm", encoder_num_layers=0)
    with pytest.raises(ValueError, match="ptuning.encoder_dropout must"):
        PTuningConfig(encoder="lstm", encoder_dropout=1.0)
    with pytest.raises(ValueError, match="encoder='lstm' only"):
        PTuningConfig(encoder="mlp", encoder_dropout=0.1)
    with pytest.raises(ValueError, match="encoder='lstm' only"):
        PTuningConfig(encoder="mlp", encoder_num_layers=3)
    with pytest.raises(ValueError, match="ptuning.init_scale"):
        PTuningConfig(init_scale=float("nan"))
    with pytest.raises(KeyError, match="'embedding' and 'mlp'"):
        encode({"embedding": jnp.zeros((2, D))})
    model, params = _tiny_bert()
    t = ptuning()
    with pytest.raises(NotMergeableError):
        merge(t, params, t.init(jax.random.key(0), params, model.info()))


def test_compose_with_lora_and_train():
    """LSTM encoder (the MLP's training step is compiled in test_finalize_labels_and_group_lr)."""
    encoder = "lstm"
    from jpeft.train.optim import OptimConfig
    from jpeft.train.trainer import Trainer

    model, params = _tiny_bert()
    batch = tiny_batch()
    t = compose(ptuning(PTuningConfig(num_virtual_tokens=3, encoder=encoder, encoder_hidden=4)),
                lora(LoraConfig(r=2)))
    assert t.adds_tokens and not t.mergeable
    trainer = Trainer(model, t, params, total_steps=3, optim=OptimConfig(lr=1e-2, warmup_ratio=0.0))
    state = trainer.init_state(jax.random.key(0))
    before = jax.tree_util.tree_map(np.array, state.trainable["delta"]["ptuning"])
    losses = []
    for _ in range(3):
        state, metrics = trainer.train_step(state, trainer.frozen, batch)
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    after = state.trainable["delta"]["ptuning"]
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)):
        assert not np.array_equal(a, b)  # the table and every encoder weight get gradients


@pytest.mark.real
def test_minilm_counts_equal_hf_peft(minilm_dir):
    """PEFT P-tuning on MiniLM with a 2-class head, 20 virtual tokens, encoder_hidden_size=128.
    Both sides count the encoder (input table + MLP/LSTM) and the 384·2 + 2 classifier (PEFT's
    trainable ``modules_to_save`` copy; the trainer's ``head/``). MLP: 20·384 + (384·128 + 128) +
    (128·128 + 128) + (128·384 + 384) + 770 = 123,778."""
    import copy

    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from jpeft.models.bert import from_pretrained
    from jpeft.train.trainer import Trainer

    model, params = from_pretrained(minilm_dir, num_labels=2)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(minilm_dir), num_labels=2)
    for encoder in ("mlp", "lstm"):
        trainer = Trainer(model, ptuning(PTuningConfig(num_virtual_tokens=20, encoder=encoder,
                                                       encoder_hidden=128)), params)
        # counts are shapes: the abstract state gives them without running the init
        ours = trainer.counts(jax.eval_shape(trainer.init_state, jax.random.key(0))).trainable
        pm = peft.get_peft_model(copy.deepcopy(hf), peft.PromptEncoderConfig(
            task_type="SEQ_CLS", num_virtual_tokens=20, encoder_hidden_size=128,
            encoder_reparameterization_type=encoder.upper()))
        assert ours == trainable_count(pm), encoder
        if encoder == "mlp":
            assert ours == 123_778
