"""Vocabulary resizing (jpeft.models.resize_vocab): the logits of transformers'
``resize_token_embeddings(mean_resizing=True)`` on Llama (untied head) and GPT-2 (tied), new
tokens trained with trainable_tokens, shrinking, and refusals."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import jpeft
from jpeft.core import paths as P
from jpeft.methods.trainable_tokens import TrainableTokensConfig, trainable_tokens
from jpeft.models.vocab import resize_vocab
from tests.checkpoint.test_hf_peft_decoders import hf_decoder

IDS = np.array([[5, 9, 64, 65, 66, 2], [7, 66, 3, 64, 1, 8]])  # 64-66: the new tokens


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_resize_matches_transformers_and_new_tokens_train(tmp_path, family):
    hf = hf_decoder(family)
    hf.save_pretrained(str(tmp_path))
    model, params = jpeft.from_pretrained(str(tmp_path))
    before = jax.tree.map(np.asarray, params)
    grown_model, grown = resize_vocab(model, params, 67)
    assert grown_model.config.vocab_size == 67 and model.config.vocab_size == 64  # nothing given changes
    jax.tree.map(np.testing.assert_array_equal, params, before)
    table = np.asarray(P.flatten(grown)[model.info().embedding_path])
    np.testing.assert_array_equal(table[:64], P.flatten(params)[model.info().embedding_path])
    np.testing.assert_allclose(table[64:], np.broadcast_to(table[:64].mean(0), (3, table.shape[1])), atol=1e-7)
    hf.resize_token_embeddings(67, mean_resizing=True)  # new rows: N(mean, 1e-9 cov) samples
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(IDS), attention_mask=torch.ones(IDS.shape, dtype=torch.long)).logits
    ours = grown_model.apply({"params": grown}, jnp.asarray(IDS), jnp.ones(IDS.shape, jnp.int32))
    assert ours.shape == (2, 6, 67)
    np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=5e-4)
    method = trainable_tokens(TrainableTokensConfig(token_indices=(64, 66)))
    delta = method.init(jax.random.key(0), grown, grown_model.info())

    def loss(d):
        logits = jpeft.apply(grown_model, method, grown, d, jnp.asarray(IDS), jnp.ones(IDS.shape, jnp.int32))
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 64])

    grads = jax.grad(loss)(delta)
    assert float(jnp.abs(jax.tree.leaves(grads)[0]).min(axis=1).max()) > 0.0  # both rows get gradients


def test_shrinking_keeps_the_first_rows_and_refusals_name_the_fix(tmp_path):
    hf_decoder("llama").save_pretrained(str(tmp_path))
    model, params = jpeft.from_pretrained(str(tmp_path))
    small_model, small = resize_vocab(model, params, 60)
    flat = P.flatten(small)
    assert flat["model/embed_tokens/embedding"].shape == (60, 16) and flat["lm_head/kernel"].shape == (16, 60)
    np.testing.assert_array_equal(flat["lm_head/kernel"], P.flatten(params)["lm_head/kernel"][:, :60])
    with pytest.raises(ValueError, match="new_size must be an integer >= 1"):
        resize_vocab(model, params, 0)
    with pytest.raises(ValueError, match="are the parameters this model's"):
        resize_vocab(small_model, params, 70)
    with pytest.raises(TypeError, match="declares its vocabulary itself"):
        resize_vocab(object(), params, 70)
    with pytest.raises(ValueError, match="jpeft.models.resize_vocab"):
        trainable_tokens(TrainableTokensConfig(token_indices=(64,))).init(jax.random.key(0), params, model.info())
