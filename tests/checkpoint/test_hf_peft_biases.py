"""Trained biases (PEFT's ``bias="all"`` / ``"<method>_only"``) beside VeRA, OFT and HRA: PEFT's
adapters load with PEFT's logits, and jpeft's load in PEFT with jpeft's."""

from __future__ import annotations

import json

import jax
import pytest

from jpeft.core import paths as P
from jpeft.methods.hra import HraConfig, hra
from jpeft.methods.oft import OftConfig, oft
from jpeft.methods.vera import VeraConfig, vera
from tests.helpers import perturb

peft = pytest.importorskip("peft")
pytest.importorskip("torch")

from jpeft.checkpoint.hf_peft import load_peft_adapter  # noqa: E402
from tests.checkpoint.test_hf_peft import (  # noqa: E402
    _export_and_reload, _trained_head, base_logits, batch, compare, hf_base, hf_logits, jpeft_pair,
    make_adapter, our_logits)

TARGETS = ["query", "intermediate.dense"]
CASES = {
    "vera": (lambda bias: peft.VeraConfig(task_type="SEQ_CLS", r=4, target_modules=TARGETS, bias=bias),
             lambda bias: vera(VeraConfig(r=4, targets=r"(key|output/dense)$", bias=bias))),
    "oft": (lambda bias: peft.OFTConfig(task_type="SEQ_CLS", oft_block_size=4, target_modules=TARGETS, bias=bias),
            lambda bias: oft(OftConfig(block_size=4, targets=r"(key|output/dense)$", bias=bias))),
    "hra": (lambda bias: peft.HRAConfig(task_type="SEQ_CLS", r=2, target_modules=TARGETS, bias=bias),
            lambda bias: hra(HraConfig(r=2, targets=r"(key|output/dense)$", bias=bias))),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", sorted(CASES))
def test_trained_biases_both_ways(tmp_path, method):
    theirs, ours = CASES[method]
    pm, model, base, folder = make_adapter(tmp_path, theirs(f"{method}_only"))
    data = batch()
    transform, delta, params = load_peft_adapter(folder, model, base)
    assert transform.config.bias == f"{method}_only"
    trained = transform.trainable_base(params)
    assert trained and all(p.endswith("/bias") and ("query" in p or "intermediate" in p) for p in trained)
    compare(f"{method}/bias-import", our_logits(model, transform, params, delta, data), hf_logits(pm, data),
            base_logits(model, base, data))

    hf, state = hf_base()
    model, base = jpeft_pair(hf, state)
    t = ours("all")
    fresh = t.init(jax.random.key(0), base, model.info())  # the identity (HRA's zero vectors are not)
    delta = perturb(fresh, scale=0.3)
    flat = P.flatten(_trained_head(base))
    for p in t.trainable_base(base):  # every bias outside the head
        flat[p] = flat[p] + 0.2
    params = P.unflatten(flat)
    pm, folder = _export_and_reload(tmp_path / "ours", t, delta, params, "bert", 2, state, model)
    assert json.loads((folder / "adapter_config.json").read_text())["bias"] == "all"
    compare(f"{method}/bias-export", our_logits(model, t, params, delta, data), hf_logits(pm, data),
            our_logits(model, t, P.unflatten({**P.flatten(params), **{
                p: P.flatten(base)[p] for p in t.trainable_base(base)}}), fresh, data))
