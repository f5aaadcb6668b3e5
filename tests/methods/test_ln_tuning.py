"""LN tuning: the norm modules it selects on each family, identity at init, merge/unmerge, the
MiniLM count against PEFT's, and PEFT's LN_TUNING format both ways."""

import jax
import numpy as np
import pytest

from jpeft.core import paths as P
from jpeft.core.transform import apply, merge, unmerge
from jpeft.methods.ln_tuning import LNTuningConfig, ln_tuning, norm_modules
from tests.helpers import perturb, tiny_batch, tiny_bert

MODEL, PARAMS = tiny_bert()
BATCH = tiny_batch()


def _adapted(t, params, delta):
    return apply(MODEL, t, params, delta, BATCH["input_ids"], BATCH["attention_mask"], BATCH["token_type_ids"])


def _logits(params):
    return MODEL.apply({"params": params}, BATCH["input_ids"], BATCH["attention_mask"], BATCH["token_type_ids"])


def test_selects_every_norm_outside_the_head():
    assert norm_modules(LNTuningConfig(), PARAMS, MODEL.info()) == [
        "embeddings/LayerNorm",
        "encoder/layer_0/attention/output/LayerNorm", "encoder/layer_0/output/LayerNorm",
        "encoder/layer_1/attention/output/LayerNorm", "encoder/layer_1/output/LayerNorm"]
    assert norm_modules(LNTuningConfig(pattern="layer_1/"), PARAMS, MODEL.info()) == [
        "encoder/layer_1/attention/output/LayerNorm", "encoder/layer_1/output/LayerNorm"]
    with pytest.raises(ValueError, match=r"matches pattern='nothing'; the norm modules are"):
        norm_modules(LNTuningConfig(pattern="nothing"), PARAMS, MODEL.info())
    with pytest.raises(ValueError, match="not a valid regex"):
        LNTuningConfig(pattern="(")


def test_identity_merge_and_unmerge():
    t = ln_tuning()
    fresh = t.init(jax.random.key(0), PARAMS, MODEL.info())
    assert jax.tree_util.tree_reduce(lambda n, x: n + x.size, fresh, 0) == 5 * 2 * 16
    np.testing.assert_array_equal(_adapted(t, PARAMS, fresh), _logits(PARAMS))
    delta = perturb(fresh, scale=0.5)
    merged = merge(t, PARAMS, delta)
    np.testing.assert_allclose(_logits(merged), _adapted(t, PARAMS, delta), atol=1e-6)
    assert float(np.abs(np.asarray(_logits(merged) - _logits(PARAMS))).max()) > 1e-4
    for path, leaf in P.flatten(unmerge(t, merged, delta)).items():
        np.testing.assert_allclose(leaf, P.flatten(PARAMS)[path], atol=1e-6, err_msg=path)


@pytest.mark.real
def test_minilm_count_equals_peft_s(minilm_dir):
    """13 LayerNorms of 2·384 on MiniLM (the embeddings' and two per layer) and a 2-class head."""
    from jpeft.models.bert import from_pretrained
    from jpeft.train.trainer import Trainer

    model, params = from_pretrained(minilm_dir, num_labels=2)
    trainer = Trainer(model, ln_tuning(), params)
    counts = trainer.counts(trainer.init_state(jax.random.key(0)))
    assert counts.trainable == 13 * 2 * 384 + 770 == 10_754

    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    hf = BertForSequenceClassification.from_pretrained(str(minilm_dir), num_labels=2)
    hf = peft.get_peft_model(hf, peft.LNTuningConfig(task_type="SEQ_CLS", target_modules=["LayerNorm"]))
    assert sum(p.numel() for p in hf.parameters() if p.requires_grad) == counts.trainable
