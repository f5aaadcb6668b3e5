"""LoHa and LoKr adapters between Hugging Face PEFT and jpeft: PEFT's adapters import with PEFT's
logits, jpeft's export loads in PEFT with jpeft's logits (max |Δlogit| <= 1e-4).

Fixtures are made on the fly as in ``test_hf_peft.py``: a tiny random BERT, ``peft.get_peft_model``
with a ``LoHaConfig`` / ``LoKrConfig``, every trainable tensor refilled, ``save_pretrained``.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest

peft = pytest.importorskip("peft")
pytest.importorskip("torch")

from jpeft.checkpoint.hf_peft import load_peft_adapter
from jpeft.core.model import group_by_module
from jpeft.methods.loha import LohaConfig, loha
from jpeft.methods.lokr import LokrConfig, lokr
from jpeft.methods.lora import rank_and_scale
from tests.checkpoint.test_hf_peft import (  # compare: max |Δ| <= 1e-4, recorded in MAX_DIFF
    MAX_DIFF,
    _export_and_reload,
    _trained_head,
    base_logits,
    batch,
    compare,
    hf_base,
    hf_logits,
    jpeft_pair,
    make_adapter,
    our_logits,
)
from tests.helpers import minilm_trainable_counts, perturb


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    ours = {k: v for k, v in MAX_DIFF.items() if k.startswith("lycoris/")}
    if ours:
        print("\nLoHa/LoKr max |Δlogit| per case:", json.dumps(ours, indent=1))


# hidden 16 = 4 x 4, intermediate 24 = 4 x 6: r=8 gives LoKr full W2, r=1 factored W2 (and W1
# with decompose_both); decompose_factor=2 splits 16 as 2 x 8
IMPORT_CASES = {
    "loha": lambda: peft.LoHaConfig(task_type="SEQ_CLS", r=4, alpha=8, target_modules=["query", "value"]),
    "loha_patterns_layers": lambda: peft.LoHaConfig(
        task_type="SEQ_CLS", r=3, alpha=5, target_modules=["query", "key", "intermediate.dense"],
        rank_pattern={"key": 2}, alpha_pattern={"intermediate.dense": 2.0}, layers_to_transform=[1],
        layers_pattern="layer"),
    "lokr_full_w2": lambda: peft.LoKrConfig(task_type="SEQ_CLS", r=8, alpha=4, target_modules=["query", "value"]),
    "lokr_low_rank_w2": lambda: peft.LoKrConfig(task_type="SEQ_CLS", r=1, alpha=2,
                                                 target_modules=["value", "intermediate.dense"]),
    "lokr_decompose_both_factor": lambda: peft.LoKrConfig(
        task_type="SEQ_CLS", r=1, alpha=3, decompose_both=True, decompose_factor=2,
        target_modules=["query", "output.dense"]),
}


@pytest.mark.parametrize("case", list(IMPORT_CASES))
def test_peft_adapters_import_with_peft_logits(tmp_path, case):
    pm, model, base, folder = make_adapter(tmp_path, IMPORT_CASES[case]())
    data = batch()
    transform, delta, params = load_peft_adapter(folder, model, base)
    assert transform.name == case.split("_")[0]
    compare(f"lycoris/import/{case}", our_logits(model, transform, params, delta, data),
            hf_logits(pm, data), base_logits(model, base, data))


EXPORT_CASES = {
    "loha": lambda: loha(LohaConfig(r=2, alpha=3.0, targets=r"(query|intermediate/dense)$",
                                    rank_pattern={"query": 3})),
    "lokr": lambda: lokr(LokrConfig(r=1, alpha=2.0, targets=r"(value|output/dense)$", layers=(0,))),
    "lokr_decompose_both": lambda: lokr(LokrConfig(r=1, alpha=2.0, decompose_both=True,
                                                   targets=r"intermediate/dense$")),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_jpeft_adapters_load_in_peft_with_jpeft_logits(tmp_path, case):
    hf, state = hf_base()
    model, base = jpeft_pair(hf, state)
    t = EXPORT_CASES[case]()
    delta = perturb(t.init(jax.random.key(0), base, model.info()), scale=1.0)
    params = _trained_head(base)
    data = batch()
    pm, folder = _export_and_reload(tmp_path, t, delta, params, "bert", 2, state, model)
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved["peft_type"] == ("LOHA" if case == "loha" else "LOKR")
    compare(f"lycoris/export/{case}", our_logits(model, t, params, delta, data), hf_logits(pm, data),
            our_logits(model, t, params, jax.tree_util.tree_map(jnp.zeros_like, delta), data))
    back, again, _ = load_peft_adapter(folder, model, base)  # and back: the same factors, scales
    assert jax.tree.structure(again) == jax.tree.structure(delta)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(delta)):
        assert a.shape == b.shape and float(jnp.abs(a - b).max()) < 1e-6
    for module in group_by_module(delta):
        assert rank_and_scale(back.config, module) == rank_and_scale(t.config, module), module


def test_an_adapter_whose_factors_do_not_fit_its_config_is_refused(tmp_path):
    pm, model, base, folder = make_adapter(
        tmp_path, peft.LoKrConfig(task_type="SEQ_CLS", r=1, alpha=2, target_modules=["value"]))
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["r"] = 8  # PEFT would hold a full W2 at r=8; the file holds lokr_w2_a / lokr_w2_b
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"lokr_w2.*the adapter holds"):
        load_peft_adapter(folder, model, base)


@pytest.mark.real
def test_minilm_counts_equal_peft_s(minilm_dir):
    """r=8 on query and value of all-MiniLM-L6-v2 (384 → 384) with a 2-class head (770):
    LoHa 4·8·384 per module; LoKr 384 = 16·24, W₁ (16, 16) whole, W₂ factored at r=8 < 24/2."""
    targets = dict(task_type="SEQ_CLS", r=8, alpha=8, target_modules=["query", "value"])
    assert minilm_trainable_counts(minilm_dir, loha(LohaConfig(r=8)), peft.LoHaConfig(**targets)) == \
        (12 * 4 * 8 * 384 + 770,) * 2
    assert minilm_trainable_counts(minilm_dir, lokr(LokrConfig(r=8)), peft.LoKrConfig(**targets)) == \
        (12 * (16 * 16 + 2 * 8 * 24) + 770,) * 2
