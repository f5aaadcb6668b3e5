"""Trainable tokens: identity at init, only the chosen rows move, exact gradients, merge/unmerge,
and the errors for bad token ids."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpeft.core import paths as P
from jpeft.core.transform import apply, merge, unmerge
from jpeft.methods.trainable_tokens import TrainableTokensConfig, trainable_tokens
from tests.helpers import perturb, tiny_batch, tiny_bert

MODEL, PARAMS = tiny_bert()
BATCH = tiny_batch()
TABLE = "embeddings/word_embeddings/embedding"
IDS = tuple(int(i) for i in np.unique(np.asarray(BATCH["input_ids"][0]))[:3])  # tokens of the batch


def _logits(params):
    return MODEL.apply({"params": params}, BATCH["input_ids"], BATCH["attention_mask"], BATCH["token_type_ids"])


def _adapted(t, params, delta):
    return apply(MODEL, t, params, delta, BATCH["input_ids"], BATCH["attention_mask"], BATCH["token_type_ids"])


def test_fresh_delta_is_the_identity_and_holds_only_the_rows():
    t = trainable_tokens(TrainableTokensConfig(token_indices=IDS))
    delta = t.init(jax.random.key(0), PARAMS, MODEL.info())
    assert {p: np.shape(v) for p, v in P.flatten(delta).items()} == {
        "embeddings/word_embeddings/trainable_tokens": (len(IDS), 16)}
    np.testing.assert_array_equal(_adapted(t, PARAMS, delta), _logits(PARAMS))


def test_only_the_chosen_rows_change_and_merge_unmerge():
    t = trainable_tokens(TrainableTokensConfig(token_indices=IDS))
    delta = perturb(t.init(jax.random.key(0), PARAMS, MODEL.info()), scale=0.5)
    merged = merge(t, PARAMS, delta)
    before, after = np.asarray(P.flatten(PARAMS)[TABLE]), np.asarray(P.flatten(merged)[TABLE])
    changed = np.flatnonzero(np.abs(after - before).max(axis=1) > 0)
    assert tuple(changed) == tuple(sorted(IDS))
    np.testing.assert_allclose(after[list(IDS)], before[list(IDS)]
                               + np.asarray(delta["embeddings"]["word_embeddings"]["trainable_tokens"]), atol=1e-7)
    for path, leaf in P.flatten(merged).items():  # nothing else moves
        if path != TABLE:
            np.testing.assert_array_equal(leaf, P.flatten(PARAMS)[path])
    np.testing.assert_allclose(_logits(merged), _adapted(t, PARAMS, delta), atol=1e-6)
    moved = np.abs(np.asarray(_logits(merged) - _logits(PARAMS))).max(axis=1)
    assert moved[0] > 1e-6  # the first row holds the tokens
    np.testing.assert_allclose(P.flatten(unmerge(t, merged, delta))[TABLE], before, atol=1e-6)


def test_the_gradient_is_the_embedding_rows_gradient():
    t = trainable_tokens(TrainableTokensConfig(token_indices=IDS))
    delta = t.init(jax.random.key(0), PARAMS, MODEL.info())
    loss = lambda out: jnp.sum(jnp.sin(out))
    g_delta = jax.jit(jax.grad(lambda d: loss(_adapted(t, PARAMS, d))))(delta)
    g_base = jax.grad(lambda p: loss(_logits(p)))(PARAMS)
    np.testing.assert_allclose(g_delta["embeddings"]["word_embeddings"]["trainable_tokens"],
                               np.asarray(P.flatten(g_base)[TABLE])[list(IDS)], rtol=1e-5, atol=1e-7)


def test_bad_token_ids_are_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"more than once"):
        TrainableTokensConfig(token_indices=(3, 3))
    with pytest.raises(ValueError, match=r"integers >= 0"):
        TrainableTokensConfig(token_indices=(-1,))
    with pytest.raises(ValueError, match=r"token_indices is empty"):
        trainable_tokens().init(jax.random.key(0), PARAMS, MODEL.info())
    with pytest.raises(ValueError, match=r"\[64\] are outside the vocabulary of 64 rows"):
        trainable_tokens(TrainableTokensConfig(token_indices=(1, 64))).init(jax.random.key(0), PARAMS, MODEL.info())
    t = trainable_tokens(TrainableTokensConfig(token_indices=(1, 2)))
    other = trainable_tokens(TrainableTokensConfig(token_indices=(1, 2, 3)))
    with pytest.raises(ValueError, match=r"other token_indices"):
        _adapted(t, PARAMS, other.init(jax.random.key(0), PARAMS, MODEL.info()))


@pytest.mark.real
def test_minilm_count_and_peft_s(minilm_dir):
    """[CLS] and [SEP] of MiniLM with a 2-class head: 2·384 + 770 = 1,538; PEFT's
    TRAINABLE_TOKENS trains the same 768 row entries and leaves the head frozen."""
    from jpeft.models.bert import from_pretrained
    from jpeft.train.trainer import Trainer

    model, params = from_pretrained(minilm_dir, num_labels=2)
    trainer = Trainer(model, trainable_tokens(TrainableTokensConfig(token_indices=(101, 102))), params)
    counts = trainer.counts(trainer.init_state(jax.random.key(0)))
    assert counts.trainable == 2 * 384 + 770 == 1_538

    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    hf = BertForSequenceClassification.from_pretrained(str(minilm_dir), num_labels=2)
    hf = peft.get_peft_model(hf, peft.TrainableTokensConfig(task_type="SEQ_CLS", token_indices=[101, 102]))
    assert sum(p.numel() for p in hf.parameters() if p.requires_grad) == counts.trainable - 770
