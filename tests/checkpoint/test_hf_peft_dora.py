"""DoRA adapters between Hugging Face PEFT and jpeft: PEFT's adapters import with PEFT's logits,
jpeft's export loads in PEFT with jpeft's logits, merged kernels and gradients agree.

Fixtures are made on the fly as in ``test_hf_peft.py``: a tiny random ``transformers`` model,
``peft.get_peft_model(..., LoraConfig(use_dora=True, ...))``, every trainable tensor refilled
(magnitudes scaled by ``1 + noise`` so they keep their sign), then ``save_pretrained``.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from jpeft.checkpoint.hf_peft import load_peft_adapter, save_peft_adapter
from jpeft.core import paths as P
from jpeft.core.transform import apply, merge
from jpeft.methods import dora
from jpeft.methods.lora import LoraConfig, lora
from tests.checkpoint.test_hf_peft import (  # compare: max |Δ| <= 1e-4, recorded in MAX_DIFF
    MAX_DIFF,
    base_logits,
    batch,
    compare,
    fresh_hf,
    hf_base,
    hf_logits,
    jpeft_pair,
    our_logits,
)
from tests.helpers import perturb


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    ours = {k: v for k, v in MAX_DIFF.items() if k.startswith("dora/")}
    if ours:
        print("\nDoRA max |Δ| per case:", json.dumps(ours, indent=1))


def randomize_dora(pm, seed=1, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad:
                noise = scale * torch.randn(p.shape, generator=gen)
                p.copy_(p * (1 + noise) if "lora_magnitude_vector" in name else p + noise)


def dora_perturb(delta, seed=1, scale=0.3):
    flat = P.flatten(delta)
    noisy = P.flatten(perturb(delta, seed=seed, scale=scale))
    for k, v in flat.items():
        if k.endswith(dora.MAGNITUDE):  # m · (1 + noise): near the column norms, same sign
            noisy[k] = v * (1.0 + (noisy[k] - v))
    return P.unflatten(noisy)


def make_dora_adapter(tmp_path, model_type="bert", num_labels=2, **kwargs):
    hf, state = hf_base(model_type, num_labels)
    model, base = jpeft_pair(hf, state, num_labels)
    pm = peft.get_peft_model(hf, peft.LoraConfig(task_type="SEQ_CLS", use_dora=True, **kwargs))
    randomize_dora(pm)
    pm.eval()
    folder = tmp_path / "adapter"
    pm.save_pretrained(str(folder))
    return pm, model, base, folder


IMPORT_CASES = {
    "plain": {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]},
    "rslora_all_dense": {"r": 4, "lora_alpha": 6, "use_rslora": True,
                         "target_modules": ["query", "key", "value", "dense"]},
    "layers_to_transform": {"r": 2, "lora_alpha": 4, "target_modules": ["query", "intermediate.dense"],
                            "layers_to_transform": [1], "layers_pattern": "layer"},
    "rank_alpha_pattern": {"r": 4, "lora_alpha": 8, "target_modules": ["query", "key", "value"],
                           "rank_pattern": {"key": 2}, "alpha_pattern": {"value": 3.0}},
    "bias_all_dropout": {"r": 2, "lora_alpha": 4, "target_modules": ["value", "output.dense"],
                         "bias": "all", "lora_dropout": 0.1},
}


@pytest.mark.parametrize("case", list(IMPORT_CASES))
def test_dora_import_matches_peft(tmp_path, case):
    pm, model, base, folder = make_dora_adapter(tmp_path, **IMPORT_CASES[case])
    data = batch()
    transform, delta, params = load_peft_adapter(folder, model, base)
    assert transform.config.use_dora
    n_saved = sum(1 for n, _ in pm.named_parameters() if "lora_magnitude_vector" in n)
    assert n_saved and len([p for p in P.paths(delta) if p.endswith(dora.MAGNITUDE)]) == n_saved
    compare(f"dora/import/{case}", our_logits(model, transform, params, delta, data), hf_logits(pm, data),
            base_logits(model, base, data))
    if case == "layers_to_transform":
        assert transform.config.layers == (1,)


def test_dora_import_roberta_three_labels(tmp_path):
    pm, model, base, folder = make_dora_adapter(tmp_path, "roberta", 3, r=2, lora_alpha=4,
                                                target_modules=["query", "value"])
    data = batch("roberta")
    transform, delta, params = load_peft_adapter(folder, model, base)
    compare("dora/import/roberta_3labels", our_logits(model, transform, params, delta, data),
            hf_logits(pm, data), base_logits(model, base, data))


def test_peft_merge_and_gradients_match_jpeft(tmp_path):
    """PEFT's merge_and_unload kernels equal jpeft.merge's, and the gradients of A, B and the
    magnitude agree (both detach the norm)."""
    pm, model, base, folder = make_dora_adapter(tmp_path, r=3, lora_alpha=6, use_rslora=True,
                                                target_modules=["query", "intermediate.dense"])
    transform, delta, params = load_peft_adapter(folder, model, base)
    data = batch()
    c = np.random.default_rng(0).normal(size=(3, 2)).astype(np.float32)
    ids, mask, types = (torch.tensor(x) for x in data)
    loss = (pm(input_ids=ids, attention_mask=mask, token_type_ids=types).logits * torch.tensor(c)).sum()
    pm.zero_grad()
    loss.backward()
    theirs = {n: p.grad.numpy() for n, p in pm.named_parameters() if p.grad is not None}

    def our_loss(d):
        return jnp.sum(apply(model, transform, params, d, *(jnp.asarray(x, jnp.int32) for x in data)) * c)

    ours = P.flatten(jax.grad(our_loss)(delta))
    worst = 0.0
    for path in sorted(ours):
        module, _, leaf = path.rpartition("/")
        name = "base_model.model.bert." + module.replace("layer_", "layer.").replace("/", ".")
        torch_name = {"lora_A": f"{name}.lora_A.default.weight", "lora_B": f"{name}.lora_B.default.weight",
                      dora.MAGNITUDE: f"{name}.lora_magnitude_vector.default.weight"}[leaf]
        want = theirs[torch_name].T if leaf != dora.MAGNITUDE else theirs[torch_name]
        err = float(np.abs(np.asarray(ours[path]) - want).max() / (np.abs(want).max() + 1e-12))
        worst = max(worst, err)
        assert err < 1e-4, (path, err)
    MAX_DIFF["dora/gradients (relative)"] = worst
    merged_hf = pm.merge_and_unload().state_dict()
    ours_merged = P.flatten(merge(transform, params, delta))
    for path in {p.rpartition("/")[0] for p in ours}:
        name = "bert." + path.replace("layer_", "layer.").replace("/", ".") + ".weight"
        compare("dora/merge/kernel", ours_merged[f"{path}/kernel"], merged_hf[name].numpy().T)


EXPORT_CASES = {
    "patterns_layers_bias": LoraConfig(r=4, alpha=8, targets=r"(query|value|intermediate/dense)$",
                                       layers=(1,), rank_pattern={"value": 2},
                                       alpha_pattern={"intermediate": 3.0}, bias="lora_only",
                                       init="gaussian", use_dora=True),
    "rslora_head_bias_all": LoraConfig(r=2, alpha=4, targets=r"(key|attention/output/dense|classifier)$",
                                       use_rslora=True, bias="all", use_dora=True),
}


@pytest.mark.parametrize("case,model_type", [("patterns_layers_bias", "bert"),
                                             ("patterns_layers_bias", "roberta"),
                                             ("rslora_head_bias_all", "bert")])  # RoBERTa: no 'classifier'
def test_dora_export_loads_in_peft_and_back(tmp_path, case, model_type):
    hf, state = hf_base(model_type)
    model, base = jpeft_pair(hf, state)
    t = lora(EXPORT_CASES[case])
    delta = dora_perturb(t.init(jax.random.key(0), base, model.info()))
    flat = P.flatten(base)
    head = [p for p in flat if p.startswith("head/")]
    for i, p in enumerate(head):  # a trained head
        flat[p] = flat[p] + 0.5 * jax.random.normal(jax.random.key(10 + i), flat[p].shape)
    for p in t.trainable_base(base):  # trained biases
        flat[p] = flat[p] + 0.2
    params = P.unflatten(flat)
    folder = tmp_path / "export"
    save_peft_adapter(folder, t, delta, params, base_model_name_or_path="tiny-random", model=model)
    cfg_json = json.loads((folder / "adapter_config.json").read_text())
    assert cfg_json["use_dora"] is True
    pm = peft.PeftModel.from_pretrained(fresh_hf(model_type, 2, state), str(folder)).eval()
    data = batch(model_type)
    ours = our_logits(model, t, params, delta, data)
    compare(f"dora/export/{case}/{model_type}", ours, hf_logits(pm, data), base_logits(model, base, data))
    t2, d2, p2 = load_peft_adapter(folder, model, base)
    assert t2.config.use_dora
    compare(f"dora/roundtrip/{case}/{model_type}", our_logits(model, t2, p2, d2, data), ours)


def test_magnitudes_of_the_wrong_shape_are_refused(tmp_path):
    _, model, base, folder = make_dora_adapter(tmp_path, r=2, target_modules=["query"])
    from safetensors.numpy import load_file, save_file

    file = folder / "adapter_model.safetensors"
    tensors = load_file(str(file))
    key = next(k for k in tensors if k.endswith("lora_magnitude_vector"))
    tensors[key] = tensors[key][:-1]
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lora_magnitude_vector has shape"):
        load_peft_adapter(folder, model, base)


@pytest.mark.real
def test_minilm_dora_count_equals_peft(minilm_dir):
    """DoRA r=8 on query and value of MiniLM with a 2-class head: LoRA's 74,498 plus one
    magnitude per output column, 2 × 6 × 384 = 4,608."""
    from jpeft.models.bert import from_pretrained
    from jpeft.train.trainer import Trainer

    hf = transformers.BertForSequenceClassification.from_pretrained(str(minilm_dir), num_labels=2)
    pm = peft.get_peft_model(hf, peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, use_dora=True,
                                                 target_modules=["query", "value"]))
    theirs, _ = pm.get_nb_trainable_parameters()
    model, params = from_pretrained(str(minilm_dir), num_labels=2)
    trainer = Trainer(model, lora(LoraConfig(r=8, alpha=16, targets="(query|value)$", use_dora=True)), params)
    assert trainer.counts(trainer.init_state(jax.random.key(0))).trainable == theirs == 79_106
