"""PiSSA and OLoRA initialisations (jpeft.methods.lora_init): identity at init on the residual
base, PEFT's factors and residual weights, conversion to a plain rank-2r LoRA that PEFT reads
(both PEFT's own conversion and jpeft's), stacks with ``layers=``, refusals."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.core import paths as P
from jpeft.methods.lora import LoraConfig, lora, rank_and_scale
from jpeft.methods.lora_init import olora, pissa, to_plain_lora
from tests import own_models as M
from tests.helpers import perturb, tiny_batch, tiny_bert

INITS = {"pissa": pissa, "olora": olora}


def _args(batch):
    return batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]


@pytest.mark.parametrize("name", list(INITS))
@pytest.mark.parametrize("config", [LoraConfig(r=2, alpha=4, targets=r"(query|value|dense)$"),
                                    LoraConfig(r=3, alpha=2, use_rslora=True, rank_pattern={"value": 2})],
                         ids=["dense_targets", "rslora_rank_pattern"])
def test_identity_at_init_low_rank_split_and_plain_lora_equivalence(name, config):
    model, base = tiny_bert()
    args = _args(tiny_batch())
    reference = model.apply({"params": base}, *args)
    residual, delta0 = INITS[name](config, base, model.info())
    method = lora(config)
    np.testing.assert_allclose(jpeft.apply(model, method, residual, delta0, *args), reference, atol=2e-5)
    flat, res = P.flatten(base), P.flatten(residual)
    for module, leaves in jpeft.core.model.group_by_module(delta0).items():
        r, s = rank_and_scale(config, module)
        kernel = np.asarray(flat[f"{module}/kernel"], np.float64)
        low = s * np.asarray(leaves["lora_A"], np.float64) @ np.asarray(leaves["lora_B"], np.float64)
        np.testing.assert_allclose(low + np.asarray(res[f"{module}/kernel"]), kernel, atol=1e-5)
        assert np.linalg.matrix_rank(low, tol=1e-6) == r
        if name == "pissa":  # the top r singular values of W, and the residual keeps the rest
            sv = np.linalg.svd(kernel, compute_uv=False)
            np.testing.assert_allclose(np.linalg.svd(low, compute_uv=False)[:r], sv[:r], rtol=1e-4)
            np.testing.assert_allclose(np.linalg.svd(kernel - low, compute_uv=False)[: len(sv) - r], sv[r:],
                                       rtol=1e-3, atol=1e-5)
    trained = perturb(delta0, scale=0.2)
    out = jpeft.apply(model, method, residual, trained, *args)
    assert float(jnp.abs(out - reference).max()) > 1e-4
    plain_config, plain = to_plain_lora(config, trained, delta0, base, model.info())
    assert plain_config.r == 2 * config.r
    np.testing.assert_allclose(jpeft.apply(model, lora(plain_config), base, plain, *args), out, atol=2e-5)


def test_stacked_layers_outside_layers_keep_their_kernels():
    linen, _, params, ids = M.transformer_twins()
    config = LoraConfig(r=2, alpha=4, targets=r"(query|out|up)$", layers=(1,))
    residual, delta0 = pissa(config, params, linen.info())
    method = lora(config)
    np.testing.assert_allclose(jpeft.apply(linen, method, residual, delta0, ids),
                               linen.module.apply({"params": params}, ids), rtol=1e-4, atol=1e-5)
    for name in ("query", "out", "up"):
        before, after = params["layers"][name]["kernel"], residual["layers"][name]["kernel"]
        np.testing.assert_array_equal(after[0], before[0])
        np.testing.assert_array_equal(after[2], before[2])
        assert float(jnp.abs(after[1] - before[1]).max()) > 1e-3
        assert float(jnp.abs(delta0["layers"][name]["lora_A"][0]).max()) == 0.0
    trained = perturb(delta0, scale=0.1)
    plain_config, plain = to_plain_lora(config, trained, delta0, params, linen.info())
    np.testing.assert_allclose(jpeft.apply(linen, lora(plain_config), params, plain, ids),
                               jpeft.apply(linen, method, residual, trained, ids), rtol=1e-4, atol=1e-5)


def test_refusals_name_the_problem():
    model, base = tiny_bert()
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        pissa(LoraConfig(use_dora=True), base, model.info())
    with pytest.raises(ValueError, match="exceeds the rank"):
        olora(LoraConfig(r=17), base, model.info())  # tiny BERT's query is 16 x 16
    quantized = jpeft.quantize_base(base, "int8", info=model.info())
    with pytest.raises(ValueError, match="is quantized"):
        pissa(LoraConfig(r=2), quantized, model.info())
    _, delta0 = pissa(LoraConfig(r=2), base, model.info())
    with pytest.raises(ValueError, match="different leaves"):
        to_plain_lora(LoraConfig(r=2), {"x": delta0["encoder"]}, delta0, base, model.info())


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", list(INITS))
def test_peft_init_residual_and_both_conversions_agree(tmp_path, name):
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    from jpeft.checkpoint.hf_peft import load_peft_adapter, save_peft_adapter
    from tests.checkpoint.test_hf_peft import batch, fresh_hf, hf_base, hf_logits, jpeft_pair, our_logits

    hf, state = hf_base()
    model, base = jpeft_pair(hf, state)
    pm = peft.get_peft_model(hf, peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, init_lora_weights=name,
                                                 target_modules=["query", "value"]))
    config = LoraConfig(r=2, alpha=4, targets=r"(query|value)$")
    residual, delta0 = INITS[name](config, base, model.info())
    s = rank_and_scale(config, "encoder/layer_0/attention/self/query")[1]
    for i in range(2):
        for proj in ("query", "value"):
            layer = pm.base_model.model.bert.encoder.layer[i].attention.self.__getattr__(proj)
            ours = delta0["encoder"][f"layer_{i}"]["attention"]["self"][proj]
            np.testing.assert_allclose(  # PEFT's weight is our residual kernel transposed
                layer.base_layer.weight.detach().numpy().T,
                residual["encoder"][f"layer_{i}"]["attention"]["self"][proj]["kernel"], atol=2e-5)
            theirs = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach().numpy().T
            np.testing.assert_allclose(s * theirs, s * np.asarray(ours["lora_A"] @ ours["lora_B"]), atol=2e-5)
    # PEFT's conversion: the initial adapter saved first (as PEFT's docs say), then the trained one
    pm.peft_config["default"].init_lora_weights = True
    pm.save_pretrained(str(tmp_path / "init"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    pm.eval()
    data = batch()
    trained_logits = hf_logits(pm, data)
    pm.save_pretrained(str(tmp_path / "plain"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    transform, delta, params = load_peft_adapter(tmp_path / "plain", model, base)  # the original base
    np.testing.assert_allclose(our_logits(model, transform, params, delta, data), trained_logits, atol=1e-4)
    # unconverted, as PEFT loads it: the init reruns on the original base, then the trained factors
    pm.peft_config["default"].init_lora_weights = name
    pm.save_pretrained(str(tmp_path / "raw"))
    transform, delta, params = load_peft_adapter(tmp_path / "raw", model, base)
    np.testing.assert_allclose(our_logits(model, transform, params, delta, data), trained_logits, atol=1e-4)
    reloaded = peft.PeftModel.from_pretrained(fresh_hf("bert", 2, state), str(tmp_path / "raw")).eval()
    np.testing.assert_allclose(hf_logits(reloaded, data), trained_logits, atol=1e-4)  # PEFT's own reading
    # jpeft's conversion of its own trained delta loads in PEFT on the original weights
    trained = perturb(delta0, seed=2, scale=0.2)
    plain_config, plain = to_plain_lora(config, trained, delta0, base, model.info())
    ours = our_logits(model, lora(config), residual, trained, data)
    out = save_peft_adapter(tmp_path / "ours", lora(plain_config), plain, base,
                            base_model_name_or_path="tiny-random", model=model)
    loaded = peft.PeftModel.from_pretrained(fresh_hf("bert", 2, state), str(out)).eval()
    np.testing.assert_allclose(hf_logits(loaded, data), ours, atol=1e-4)
