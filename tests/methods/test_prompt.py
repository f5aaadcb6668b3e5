"""Prompt tuning: the base model on [prompt ids; ids] law, the embeddings against a hand formula,
encode's lengthened output and mask, PEFT's logits and counts, inits, errors, composition and
training."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jpeft.core import paths as P
from jpeft.core.transform import ApplyContext, NotMergeableError, apply, compose, intercepting, merge
from jpeft.methods.lora import LoraConfig, lora
from jpeft.methods.prompt import (PromptConfig, fit_token_ids, prepend_tokens, prompt,
                                  token_ids_for_text, with_text_ids)
from jpeft.models.bert import BertModel
from jpeft.models.taps import EMBED_INPUTS, is_tap
from tests.helpers import tiny_batch, tiny_bert

# Eager ops compile once per new shape: cache the tiny models and use k = 2 virtual tokens in
# most eager tests so that they share compiled ops.
_tiny_bert = functools.lru_cache(maxsize=None)(tiny_bert)
VOCAB = 64  # tiny_bert's vocabulary


def _inputs(batch):
    return batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]


def _logits(model, params, batch):
    return model.apply({"params": params}, *_inputs(batch))


def _adapted(model, t, params, delta, batch, ctx=ApplyContext(), method=None):
    return apply(model, t, params, delta, *_inputs(batch), ctx=ctx, method=method)


def _concat_batch(batch, ids):
    """The batch with the token ids ``ids`` prepended (mask ones, types zeros)."""
    b, k = batch["input_ids"].shape[0], len(ids)
    pre = jnp.broadcast_to(jnp.asarray(ids, jnp.int32)[None], (b, k))
    return {
        "input_ids": jnp.concatenate([pre, batch["input_ids"]], 1),
        "attention_mask": jnp.concatenate([jnp.ones((b, k), batch["attention_mask"].dtype),
                                           batch["attention_mask"]], 1),
        "token_type_ids": jnp.concatenate([jnp.zeros((b, k), batch["token_type_ids"].dtype),
                                           batch["token_type_ids"]], 1),
    }


def _row_ids(prompts, table):
    """The vocabulary row index of every prompt row (each must be an exact row of ``table``)."""
    prompts, table = np.asarray(prompts), np.asarray(table)
    ids = []
    for row in prompts:
        hits = np.flatnonzero((table == row).all(axis=1))
        assert hits.size >= 1, "prompt row is not a row of the word-embedding table"
        ids.append(int(hits[0]))
    return ids


def _table(params):
    return P.flatten(params)["embeddings/word_embeddings/embedding"]


def _hand_interceptor(prompts):
    """An independent re-implementation of the prepend, for reference runs."""

    def intercept(next_fun, args, kwargs, context):
        if not is_tap(context, EMBED_INPUTS):
            return next_fun(*args, **kwargs)
        x, m, tt = args
        b, k = x.shape[0], prompts.shape[0]
        x = jnp.concatenate([jnp.tile(prompts[None], (b, 1, 1)), x], axis=1)
        m = jnp.concatenate([jnp.ones((b, k), m.dtype), m], axis=1)
        tt = jnp.concatenate([jnp.zeros((b, k), tt.dtype), tt], axis=1)
        return x, m, tt

    return intercept


# Applying a prompt delta reads only the delta, so one transform serves every config here and
# each (model, k) pair compiles once.
_APPLY = prompt()


@functools.partial(jax.jit, static_argnums=0)
def _law_outputs(model, params, delta, batch, ref):
    ours = _adapted(model, _APPLY, params, delta, batch)
    encoded = _adapted(model, _APPLY, params, delta, batch, method=BertModel.encode)
    theirs = _logits(model, params, ref)
    encoded_ref = model.apply({"params": params}, *_inputs(ref), method=BertModel.encode)
    return ours, encoded, theirs, encoded_ref, _logits(model, params, batch)


prompt_cases = st.tuples(
    st.just(2),  # k: other tests vary it; one k keeps this to one compilation per model type
    st.sampled_from(["vocab", "text"]),
    st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6),  # text ids
)


@settings(max_examples=8, deadline=None)
@given(case=prompt_cases, seed=st.integers(0, 2**16), model_type=st.sampled_from(["bert", "roberta"]))
def test_vocab_prompts_equal_base_model_on_prepended_ids(case, seed, model_type):
    """The documented law replacing 'fresh delta = identity': prompts that are the embeddings of
    ids i1..ik give the base model's output on [i1..ik, ids] (positions and types line up)."""
    k, init, text_ids = case
    model, params = _tiny_bert(model_type=model_type, seed=seed % 3)
    batch = tiny_batch(seed=seed)
    cfg = PromptConfig(num_virtual_tokens=k, init=init,
                       init_token_ids=tuple(text_ids) if init == "text" else ())
    t = prompt(cfg)
    delta = t.init(jax.random.key(seed), params, model.info())
    ids = _row_ids(delta["prompt"], _table(params))
    if init == "text":  # the rows of a random table are distinct, so the ids are recovered
        assert tuple(ids) == fit_token_ids(text_ids, k)
    ref = _concat_batch(batch, ids)
    ours, (h, mask), theirs, (h_ref, mask_ref), plain = _law_outputs(model, params, delta, batch, ref)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(h, h_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(mask, mask_ref)
    assert t.adds_tokens
    assert not np.array_equal(ours, plain)  # a fresh delta changes the output


@settings(max_examples=6, deadline=None)
@given(k=st.sampled_from([1, 2]), scale=st.floats(0.01, 2.0), seed=st.integers(0, 2**16),
       model_type=st.sampled_from(["bert", "roberta"]))
def test_random_prompts_equal_hand_written_prepend(k, scale, seed, model_type):
    model, params = _tiny_bert(model_type=model_type, seed=seed % 3)
    batch = tiny_batch(seed=seed)
    t = prompt(PromptConfig(num_virtual_tokens=k, init="random", init_scale=scale))
    delta = t.init(jax.random.key(seed), params, model.info())
    assert delta["prompt"].shape == (k, 16)
    with intercepting([_hand_interceptor(delta["prompt"])]):
        ref = _logits(model, params, batch)
    np.testing.assert_array_equal(_adapted(model, t, params, delta, batch), ref)


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_embeddings_against_hand_formula(model_type):
    """LayerNorm([E; W[ids]] + pos + type) in float64, with BERT positions 0..k+T-1 and RoBERTa's
    pad+1.. over the (all-real) virtual tokens and the real tokens."""
    model, params = _tiny_bert(model_type=model_type)
    c = model.config
    batch = tiny_batch()
    k = 2
    t = prompt(PromptConfig(num_virtual_tokens=k, init="random", init_scale=0.5))
    delta = t.init(jax.random.key(3), params, model.info())
    with intercepting(t.interceptors(delta, ApplyContext())):
        h, mask = model.apply({"params": params}, *_inputs(batch), True,
                              method=lambda m, i, a, tt, d: m.embeddings(i, a, tt, d))
    f = {p: np.asarray(v, np.float64) for p, v in P.flatten(params).items()}
    ids, m0, tt0 = (np.asarray(x) for x in _inputs(batch))
    b, n = ids.shape
    words = np.concatenate([np.broadcast_to(np.asarray(delta["prompt"], np.float64), (b, k, c.hidden_size)),
                            f["embeddings/word_embeddings/embedding"][ids]], axis=1)
    m = np.concatenate([np.ones((b, k), int), m0], axis=1)
    tt = np.concatenate([np.zeros((b, k), int), tt0], axis=1)
    if model_type == "bert":
        pos = np.broadcast_to(np.arange(k + n), (b, k + n))
    else:
        pos = np.cumsum(m, 1) * m + c.pad_token_id
        assert (pos[:, :k] == c.pad_token_id + 1 + np.arange(k)).all()
    x = (words + f["embeddings/position_embeddings/embedding"][pos]
         + f["embeddings/token_type_embeddings/embedding"][tt])
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    ln = ((x - mu) / np.sqrt(var + c.layer_norm_eps) * f["embeddings/LayerNorm/scale"]
          + f["embeddings/LayerNorm/bias"])
    np.testing.assert_allclose(np.asarray(h), ln, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(mask), m)


def test_encode_output_is_longer_and_mask_extended():
    model, params = _tiny_bert()
    batch = tiny_batch()
    k = 2
    t = prompt(PromptConfig(num_virtual_tokens=k))
    delta = t.init(jax.random.key(0), params, model.info())
    h, mask = _adapted(model, t, params, delta, batch, method=BertModel.encode)
    b, n = batch["input_ids"].shape
    assert h.shape == (b, n + k, 16)
    np.testing.assert_array_equal(mask[:, :k], np.ones((b, k)))
    np.testing.assert_array_equal(mask[:, k:], batch["attention_mask"])


def test_prepend_tokens_shapes_dtypes_and_per_example_prompts():
    x = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)
    m = jnp.array([[1, 1, 0], [1, 0, 0]], jnp.int32)
    tt = jnp.array([[0, 1, 1], [0, 0, 1]], jnp.int32)
    e = -jnp.ones((2, 4), jnp.bfloat16)
    x2, m2, t2 = prepend_tokens(x, m, tt, e)
    assert x2.shape == (2, 5, 4) and x2.dtype == jnp.float32
    assert m2.dtype == m.dtype and t2.dtype == tt.dtype
    np.testing.assert_array_equal(x2[:, :2], -np.ones((2, 2, 4)))
    np.testing.assert_array_equal(x2[:, 2:], x)
    np.testing.assert_array_equal(m2, [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(t2, [[0, 0, 0, 1, 1], [0, 0, 0, 0, 1]])
    per_example = jnp.stack([jnp.zeros((2, 4)), jnp.ones((2, 4))])  # (B, k, D): a bank-ready path
    x3, _, _ = prepend_tokens(x, m, tt, per_example)
    np.testing.assert_array_equal(x3[1, :2], np.ones((2, 4)))
    with pytest.raises(ValueError, match="another model"):
        prepend_tokens(x, m, tt, jnp.ones((2, 5)))


def test_counts_labels_and_group_lr():
    from jpeft.train.optim import OptimConfig
    from jpeft.train.trainer import Trainer

    model, params = _tiny_bert()
    t = prompt(PromptConfig(num_virtual_tokens=5))
    delta = t.init(jax.random.key(0), params, model.info())
    assert P.count_params(delta) == 5 * 16
    assert set(jax.tree_util.tree_leaves(t.labels(delta))) == {"prompt"}
    trainer = Trainer(model, t, params, total_steps=3,
                      optim=OptimConfig(lr=1e-2, warmup_ratio=0.0, group_lr={"prompt": 0.0}))
    state = trainer.init_state(jax.random.key(0))
    assert trainer.counts(state).trainable == 5 * 16 + 16 * 2 + 2  # + the 2-class head
    before = np.array(state.trainable["delta"]["prompt"])
    state, _ = trainer.train_step(state, trainer.frozen, tiny_batch())
    np.testing.assert_array_equal(state.trainable["delta"]["prompt"], before)


def test_vocab_init_uses_the_rng_and_table_rows():
    model, params = _tiny_bert()
    t = prompt(PromptConfig(num_virtual_tokens=6, init="vocab"))
    a = t.init(jax.random.key(0), params, model.info())["prompt"]
    b = t.init(jax.random.key(1), params, model.info())["prompt"]
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, t.init(jax.random.key(0), params, model.info())["prompt"])
    _row_ids(a, _table(params))


def test_text_ids_repeat_and_truncate_as_peft():
    assert fit_token_ids([5, 6, 7], 7) == (5, 6, 7, 5, 6, 7, 5)
    assert fit_token_ids([5, 6, 7], 2) == (5, 6)
    assert fit_token_ids([9], 3) == (9, 9, 9)

    def tokenizer(text):  # [CLS] words [SEP], like a BERT tokenizer
        return {"input_ids": [101] + [len(w) for w in text.split()] + [102]}

    assert token_ids_for_text(tokenizer, "ab cde", 6) == (101, 2, 3, 102, 101, 2)
    cfg = PromptConfig(num_virtual_tokens=3, init="text", init_text="a bb")
    assert with_text_ids(cfg, tokenizer).init_token_ids == (101, 1, 2)
    assert with_text_ids(PromptConfig(), tokenizer) == PromptConfig()
    model, params = _tiny_bert()
    t = prompt(PromptConfig(num_virtual_tokens=5, init="text", init_token_ids=(3, 4)))
    e = t.init(jax.random.key(0), params, model.info())["prompt"]
    np.testing.assert_array_equal(e, np.asarray(_table(params))[[3, 4, 3, 4, 3]])


def test_bad_config_values_and_init_errors():
    with pytest.raises(ValueError, match="prompt.num_virtual_tokens"):
        PromptConfig(num_virtual_tokens=0)
    with pytest.raises(ValueError, match="prompt.init must"):
        PromptConfig(init="sample")
    with pytest.raises(ValueError, match="prompt.init_scale"):
        PromptConfig(init_scale=0.0)
    with pytest.raises(ValueError, match="prompt.init='text' needs"):
        PromptConfig(init="text")
    with pytest.raises(ValueError, match="only used with prompt.init='text'"):
        PromptConfig(init="vocab", init_token_ids=(1, 2))
    with pytest.raises(ValueError, match="prompt.init_token_ids must be non-negative"):
        PromptConfig(init="text", init_token_ids=(1, -2))
    model, params = _tiny_bert()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        prompt(PromptConfig(init="text", init_token_ids=(1, VOCAB))).init(jax.random.key(0), params, model.info())
    with pytest.raises(ValueError, match="with_text_ids"):
        prompt(PromptConfig(init="text", init_text="hello")).init(jax.random.key(0), params, model.info())
    import dataclasses
    info = dataclasses.replace(model.info(), embedding_path="embeddings/nope/embedding")
    with pytest.raises(KeyError, match="embeddings/word_embeddings/embedding"):
        prompt(PromptConfig(init="vocab")).init(jax.random.key(0), params, info)
    with pytest.raises(KeyError, match="'prompt'"):
        _adapted(model, prompt(), params, {"table": jnp.zeros((2, 16))}, tiny_batch())
    t = prompt()
    with pytest.raises(NotMergeableError):
        merge(t, params, t.init(jax.random.key(0), params, model.info()))


def test_jit_and_no_jit_agree():
    model, params = _tiny_bert()
    batch = tiny_batch()
    t = prompt(PromptConfig(num_virtual_tokens=2, init="random", init_scale=0.3))
    delta = t.init(jax.random.key(0), params, model.info())
    f = lambda p, d: _adapted(model, t, p, d, batch)
    np.testing.assert_allclose(jax.jit(f)(params, delta), f(params, delta), atol=1e-6)


def test_two_prompts_stack_later_outermost():
    """compose(a, b) feeds [E_b; E_a; X]: the later transform wraps the earlier one."""
    model, params = _tiny_bert()
    batch = tiny_batch()
    t = compose(prompt(PromptConfig(num_virtual_tokens=2, init="text", init_token_ids=(3, 4)), name="a"),
                prompt(PromptConfig(num_virtual_tokens=1, init="text", init_token_ids=(9,)), name="b"))
    delta = t.init(jax.random.key(0), params, model.info())
    np.testing.assert_allclose(_adapted(model, t, params, delta, batch),
                               _logits(model, params, _concat_batch(batch, [9, 3, 4])), rtol=1e-6, atol=1e-7)


def test_compose_with_lora_and_train():
    from jpeft.train.optim import OptimConfig
    from jpeft.train.trainer import Trainer

    model, params = _tiny_bert()
    batch = tiny_batch()
    t = compose(prompt(PromptConfig(num_virtual_tokens=3, init="vocab")), lora(LoraConfig(r=2)))
    assert t.adds_tokens and not t.mergeable
    trainer = Trainer(model, t, params, total_steps=3, optim=OptimConfig(lr=1e-2, warmup_ratio=0.0))
    state = trainer.init_state(jax.random.key(0))
    before = np.array(state.trainable["delta"]["prompt"]["prompt"])
    losses = []
    for _ in range(3):
        state, metrics = trainer.train_step(state, trainer.frozen, batch)
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert not np.array_equal(state.trainable["delta"]["prompt"]["prompt"], before)


# ------------------------------------------------------------------------------------------------
# Hugging Face PEFT


def hf_model(model, params):
    """The torch ``*ForSequenceClassification`` twin of a tiny jpeft model (same weights)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jpeft.models.bert import state_dict_from_params

    c = model.config
    roberta = c.is_roberta
    hf_config = (transformers.RobertaConfig if roberta else transformers.BertConfig)(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
        max_position_embeddings=c.max_position_embeddings, type_vocab_size=c.type_vocab_size,
        pad_token_id=c.pad_token_id, num_labels=c.num_labels, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)
    hf = (transformers.RobertaForSequenceClassification if roberta
          else transformers.BertForSequenceClassification)(hf_config)
    state_dict = state_dict_from_params(jax.device_get(params), c)
    hf.load_state_dict({k: torch.tensor(v) for k, v in state_dict.items()})
    return hf


def peft_logits(peft_model, batch):
    """PEFT's eval logits on a jpeft batch (RoBERTa numbers all positions from pad+1 when given
    inputs_embeds, padding included; padded positions are masked keys, so the logits agree)."""
    import torch

    ids, mask, types = (torch.tensor(np.asarray(x)).long() for x in _inputs(batch))
    peft_model.eval()
    with torch.no_grad():
        return peft_model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits.numpy()


def trainable_count(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_logits_equal_hf_peft_prompt_tuning(model_type):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    model, params = _tiny_bert(model_type=model_type)
    batch = tiny_batch()
    k = 2
    t = prompt(PromptConfig(num_virtual_tokens=k, init="random", init_scale=0.5))
    delta = t.init(jax.random.key(0), params, model.info())
    pm = peft.get_peft_model(hf_model(model, params),
                             peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=k))
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.copy_(torch.tensor(np.asarray(delta["prompt"])))
    ours = np.asarray(_adapted(model, t, params, delta, batch))
    np.testing.assert_allclose(ours, peft_logits(pm, batch), rtol=1e-4, atol=1e-6)
    # apples to apples: PEFT trains the prompt table and the classifier (modules_to_save)
    head = P.count_params({p: v for p, v in P.flatten(params).items() if p.startswith("head/")})
    assert trainable_count(pm) == P.count_params(delta) + head


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    from jpeft.models.bert import from_pretrained

    return from_pretrained(minilm_dir, num_labels=2)


@pytest.fixture(scope="module")
def hf_minilm(minilm_dir):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    return lambda: transformers.AutoModelForSequenceClassification.from_pretrained(str(minilm_dir), num_labels=2)


@pytest.mark.real
def test_minilm_count_equals_hf_peft(minilm, hf_minilm):
    """PEFT prompt tuning, 20 virtual tokens, MiniLM 2-class: 20·384 + 770 = 8,450.

    PEFT's trainable parameters are the prompt table and a trainable copy of the classifier
    (``modules_to_save``; the original is frozen and the frozen pooler is not counted); ours are
    the delta and the trainer's task head ``head/`` (the same 384·2 + 2 classifier): both sides
    count prompt + classifier.
    """
    import peft
    from jpeft.train.trainer import Trainer

    model, params = minilm
    trainer = Trainer(model, prompt(PromptConfig(num_virtual_tokens=20)), params)
    ours = trainer.counts(trainer.init_state(jax.random.key(0))).trainable
    pm = peft.get_peft_model(hf_minilm(), peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=20))
    assert ours == trainable_count(pm) == 20 * 384 + 770 == 8_450


@pytest.mark.real
def test_minilm_text_init_equals_hf_peft(minilm, hf_minilm, minilm_dir):
    """PEFT's TEXT init (its own tokenisation) gives the same prompt table as
    ``with_text_ids`` + ``init='text'``."""
    import peft
    from transformers import AutoTokenizer

    model, params = minilm
    text = "Classify whether the sentence is positive or negative"
    k = 20
    cfg = with_text_ids(PromptConfig(num_virtual_tokens=k, init="text", init_text=text),
                        AutoTokenizer.from_pretrained(str(minilm_dir)))
    assert len(cfg.init_token_ids) == k
    ours = prompt(cfg).init(jax.random.key(0), params, model.info())["prompt"]
    pm = peft.get_peft_model(hf_minilm(), peft.PromptTuningConfig(
        task_type="SEQ_CLS", num_virtual_tokens=k, prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text, tokenizer_name_or_path=str(minilm_dir)))
    theirs = pm.prompt_encoder["default"].embedding.weight.detach().numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=0, atol=1e-7)


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_inputs_past_the_position_embeddings_are_refused(model_type):
    """k virtual tokens + T inputs past max_position_embeddings (40) used to index the position
    table out of range: NaN logits, no error."""
    model, params = tiny_bert(model_type=model_type)
    t = prompt(PromptConfig(num_virtual_tokens=35, init="random"))
    delta = t.init(jax.random.key(0), params, model.info())
    batch = tiny_batch(length=7)
    with pytest.raises(ValueError, match="max_position_embeddings=40"):
        apply(model, t, params, delta, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    long = tiny_batch(length=41)
    with pytest.raises(ValueError, match="the input has 41 tokens"):
        model.apply({"params": params}, long["input_ids"], long["attention_mask"], long["token_type_ids"])
