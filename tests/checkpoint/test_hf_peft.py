"""Hugging Face PEFT adapter folders <-> jpeft: same logits both ways, refusals.

Fixtures are made on the fly: a tiny random ``transformers`` BERT/RoBERTa, wrapped by
``peft.get_peft_model``, every trainable tensor refilled with random values (so a transposed or
misnamed tensor changes the logits), then ``save_pretrained``.
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

from jpeft.checkpoint.hf_peft import (
    load_peft_adapter,
    peft_target_matches,
    save_peft_adapter,
)
from jpeft.core import paths as P
from jpeft.core.transform import apply, compose
from jpeft.methods import (
    IA3Config,
    LoraConfig,
    PrefixConfig,
    PromptConfig,
    PTuningConfig,
    PTuningV2Config,
    bitfit,
    ia3,
    ln_tuning,
    lora,
    prefix,
    prompt,
    ptuning,
    ptuning2,
    trainable_tokens,
)
from jpeft.methods.trainable_tokens import TrainableTokensConfig
from jpeft.models.bert import BertConfig, BertModel, params_from_state_dict
from tests.helpers import perturb

TOL = 1e-4
MAX_DIFF: dict[str, float] = {}  # reported at the end of the session (-s)


# ----------------------------------------------------------------------------------------------
# fixtures made on the fly

def hf_config(model_type="bert", num_labels=2, layers=2):
    cls = transformers.BertConfig if model_type == "bert" else transformers.RobertaConfig
    return cls(vocab_size=64, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
               intermediate_size=24, max_position_embeddings=40, num_labels=num_labels,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
               type_vocab_size=2 if model_type == "bert" else 1,
               pad_token_id=0 if model_type == "bert" else 1)


def hf_base(model_type="bert", num_labels=2, seed=0, layers=2):
    """A random HF model with non-trivial biases and LayerNorms, and its state dict."""
    torch.manual_seed(seed)
    cfg = hf_config(model_type, num_labels, layers)
    cls = (transformers.BertForSequenceClassification if model_type == "bert"
           else transformers.RobertaForSequenceClassification)
    hf = cls(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    return hf, state


def jpeft_pair(hf, state, num_labels=2):
    config = BertConfig.from_hf(hf.config.to_dict(), num_labels=num_labels)
    model = BertModel(config)
    flat = params_from_state_dict({k: v.numpy() for k, v in state.items()})
    return model, P.unflatten({k: jnp.asarray(v) for k, v in flat.items()})


def fresh_hf(model_type, num_labels, state, layers=2):
    cls = (transformers.BertForSequenceClassification if model_type == "bert"
           else transformers.RobertaForSequenceClassification)
    hf = cls(hf_config(model_type, num_labels, layers))
    hf.load_state_dict(state)
    return hf.eval()


def randomize_trainable(pm, seed=1, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad:
                center = 1.0 if "ia3_l" in name else 0.0
                p.copy_(center + scale * torch.randn(p.shape, generator=gen))


def batch(model_type="bert", seed=0, b=3, t=7):
    rng = np.random.default_rng(seed)
    pad = 0 if model_type == "bert" else 1
    ids = rng.integers(3, 64, (b, t))
    lengths = np.maximum(t - 2 * np.arange(b), 2)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask > 0, ids, pad)
    types = np.zeros_like(ids)
    if model_type == "bert":
        types[0, 4:] = 1
    return ids, mask, types


def hf_logits(pm, data):
    ids, mask, types = (torch.tensor(x) for x in data)
    with torch.no_grad():
        return pm(input_ids=ids, attention_mask=mask, token_type_ids=types).logits.numpy()


def our_logits(model, transform, params, delta, data):
    ids, mask, types = (jnp.asarray(x, jnp.int32) for x in data)
    return np.asarray(apply(model, transform, params, delta, ids, mask, types))


def base_logits(model, params, data):
    ids, mask, types = (jnp.asarray(x, jnp.int32) for x in data)
    return np.asarray(model.apply({"params": params}, ids, mask, types))


def compare(name, ours, theirs, base=None):
    diff = float(np.abs(ours - theirs).max())
    MAX_DIFF[name] = max(diff, MAX_DIFF.get(name, 0.0))
    assert diff <= TOL, f"{name}: max |Δlogit| = {diff}"
    if base is not None:  # the adapter must matter, or the test proves nothing
        assert float(np.abs(theirs - base).max()) > 1e-2, f"{name}: the adapter changes nothing"


def make_adapter(tmp_path, peft_config, model_type="bert", num_labels=2, layers=2):
    hf, state = hf_base(model_type, num_labels, layers=layers)
    model, base = jpeft_pair(hf, state, num_labels)
    pm = peft.get_peft_model(hf, peft_config)
    randomize_trainable(pm)
    pm.eval()
    folder = tmp_path / "adapter"
    pm.save_pretrained(str(folder))
    return pm, model, base, folder


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if MAX_DIFF:
        print("\nmax |Δlogit| per case:", json.dumps(MAX_DIFF, indent=1))


# ----------------------------------------------------------------------------------------------
# PEFT -> jpeft

LORA_CASES = {
    "plain": {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]},
    "rslora_all_dense": {"r": 4, "lora_alpha": 6, "use_rslora": True,
                             "target_modules": ["query", "key", "value", "dense"]},
    "rank_alpha_pattern": {"r": 4, "lora_alpha": 8, "target_modules": ["query", "key", "value"],
                               "rank_pattern": {"key": 2, r"layer\.1\.attention\.self\.value": 3},
                               "alpha_pattern": {"value": 3.0}},
    "layers_to_transform": {"r": 2, "lora_alpha": 4, "target_modules": ["query", "intermediate.dense"],
                                "layers_to_transform": [1], "layers_pattern": "layer"},
    "regex_targets": {"r": 3, "lora_alpha": 5, "target_modules": r".*\.(query|output\.dense)",
                          "exclude_modules": ["attention.output.dense"]},
    "bias_all": {"r": 2, "lora_alpha": 4, "target_modules": ["value"], "bias": "all"},
    "bias_lora_only_pooler_saved": {"r": 2, "lora_alpha": 4, "target_modules": ["query", "value", "dense"],
                                        "bias": "lora_only", "modules_to_save": ["pooler"]},
}


@pytest.mark.parametrize("case", list(LORA_CASES))
def test_lora_import_matches_peft(tmp_path, case):
    pm, model, base, folder = make_adapter(tmp_path, peft.LoraConfig(task_type="SEQ_CLS", **LORA_CASES[case]))
    data = batch()
    transform, delta, params = load_peft_adapter(folder, model, base)
    assert transform.name == "lora" and isinstance(transform.config, LoraConfig)
    compare(f"import/lora/{case}", our_logits(model, transform, params, delta, data),
            hf_logits(pm, data), base_logits(model, base, data))
    # every LoRA tensor PEFT saved is in the delta, transposed
    n_saved = sum(1 for n, _ in pm.named_parameters() if "lora_A" in n)
    assert len([p for p in P.paths(delta) if p.endswith("lora_A")]) == n_saved


def test_lora_import_feature_extraction(tmp_path):
    """task_type FEATURE_EXTRACTION: PEFT wraps a bare BertModel (no 'bert.' prefix, no head)."""
    torch.manual_seed(0)
    hf = transformers.BertModel(hf_config(), add_pooling_layer=False).eval()
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    model = BertModel(BertConfig.from_hf(hf.config.to_dict(), head="none"))
    base = P.unflatten({k: jnp.asarray(v) for k, v in params_from_state_dict(
        {k: v.numpy() for k, v in state.items()}).items()})
    pm = peft.get_peft_model(hf, peft.LoraConfig(task_type="FEATURE_EXTRACTION", r=2,
                                                 target_modules=["query", "output.dense"]))
    randomize_trainable(pm)
    pm.eval()
    pm.save_pretrained(str(tmp_path / "fe"))
    transform, delta, params = load_peft_adapter(tmp_path / "fe", model, base)
    data = batch()
    ids, mask, types = (torch.tensor(x) for x in data)
    with torch.no_grad():
        theirs = pm(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state.numpy()
    compare("import/lora/feature_extraction", our_logits(model, transform, params, delta, data), theirs,
            base_logits(model, base, data))


def test_hub_ids_go_through_snapshot_download(tmp_path, monkeypatch):
    import huggingface_hub

    _, model, base, folder = make_adapter(tmp_path, peft.LoraConfig(task_type="SEQ_CLS", r=2,
                                                                    target_modules=["query"]))
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    transform, _, _ = load_peft_adapter("someone/tiny-lora", model, base, revision="v1")
    assert transform.name == "lora"
    (repo_id, kwargs), = calls
    assert repo_id == "someone/tiny-lora" and kwargs["revision"] == "v1"
    assert "adapter_model.safetensors" in kwargs["allow_patterns"]
    assert not any(p.endswith(".bin") for p in kwargs["allow_patterns"])


def test_lora_import_config_is_compact_when_possible(tmp_path):
    _pm, model, base, folder = make_adapter(tmp_path, peft.LoraConfig(
        task_type="SEQ_CLS", r=2, target_modules=["query", "value"], layers_to_transform=[1]))
    transform, _, _ = load_peft_adapter(folder, model, base)
    assert transform.config.targets == "(?:^|/)(?:query|value)$" and transform.config.layers == (1,)


@pytest.mark.parametrize("model_type,num_labels", [("bert", 1), ("roberta", 3)])
def test_lora_import_regression_and_roberta_heads(tmp_path, model_type, num_labels):
    pm, model, base, folder = make_adapter(
        tmp_path, peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query", "value"]),
        model_type=model_type, num_labels=num_labels)
    data = batch(model_type)
    transform, delta, params = load_peft_adapter(folder, model, base)
    compare(f"import/lora/{model_type}_{num_labels}labels",
            our_logits(model, transform, params, delta, data), hf_logits(pm, data),
            base_logits(model, base, data))
    head = [p for p in P.paths(params) if p.startswith("head/")]
    assert all(not np.array_equal(P.flatten(params)[p], P.flatten(base)[p]) for p in head)


@pytest.mark.parametrize("kwargs", [
    {},
    {"target_modules": ["query", "intermediate.dense"], "feedforward_modules": ["intermediate.dense"]},
], ids=["default", "custom_ff"])
def test_ia3_import_matches_peft(tmp_path, kwargs):
    pm, model, base, folder = make_adapter(tmp_path, peft.IA3Config(task_type="SEQ_CLS", **kwargs))
    data = batch()
    transform, delta, params = load_peft_adapter(folder, model, base)
    assert isinstance(transform.config, IA3Config)
    compare(f"import/ia3/{'custom' if kwargs else 'default'}",
            our_logits(model, transform, params, delta, data), hf_logits(pm, data),
            base_logits(model, base, data))


PROMPT_CASES = {
    "prompt_tuning": lambda: peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3),
    "ptuning_mlp": lambda: peft.PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=3,
                                                    encoder_hidden_size=8),
    "ptuning_lstm": lambda: peft.PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=2,
                                                     encoder_hidden_size=4,
                                                     encoder_reparameterization_type="LSTM"),
    "prefix": lambda: peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3),
    "prefix_projection": lambda: peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3,
                                                         prefix_projection=True, encoder_hidden_size=8),
}


@pytest.mark.parametrize("case", list(PROMPT_CASES))
def test_prompt_learning_import_matches_peft(tmp_path, case):
    pm, model, base, folder = make_adapter(tmp_path, PROMPT_CASES[case]())
    data = batch()
    transform, delta, params = load_peft_adapter(folder, model, base)
    expected = {"prompt_tuning": PromptConfig, "ptuning_mlp": PTuningConfig, "ptuning_lstm": PTuningConfig,
                "prefix": PrefixConfig, "prefix_projection": PrefixConfig}[case]
    assert isinstance(transform.config, expected)
    compare(f"import/{case}", our_logits(model, transform, params, delta, data), hf_logits(pm, data),
            base_logits(model, base, data))
    if case.startswith("prefix"):
        assert transform.config.peft_positions and transform.config.num_virtual_tokens == 3
        assert transform.config.projection == (case == "prefix_projection")


@pytest.mark.parametrize("case", ["prefix", "prompt_tuning"])
def test_prompt_learning_import_roberta(tmp_path, case):
    peft_config = (peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2) if case == "prefix"
                   else peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2))
    pm, model, base, folder = make_adapter(tmp_path, peft_config, model_type="roberta")
    data = batch("roberta")
    transform, delta, params = load_peft_adapter(folder, model, base)
    compare(f"import/{case}/roberta", our_logits(model, transform, params, delta, data),
            hf_logits(pm, data), base_logits(model, base, data))


# ----------------------------------------------------------------------------------------------
# refusals

def _plain_lora_folder(tmp_path):
    return make_adapter(tmp_path, peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"]))


def _edit_config(folder, **changes):
    file = folder / "adapter_config.json"
    cfg = json.loads(file.read_text())
    cfg.update(changes)
    file.write_text(json.dumps(cfg))


@pytest.mark.parametrize("field,value,message", [
    ("use_dora", True, "lora_magnitude_vector"),  # a DoRA config without its magnitudes
    ("init_lora_weights", "pissa_niter_4", "init_lora_weights='pissa_niter_4'"),  # randomized SVD
    ("layer_replication", [[0, 1]], "layer_replication"),
    ("lora_bias", True, "lora_bias=True"),
    ("target_modules", ["query", "LayerNorm"], "not Dense"),
    ("peft_type", "ADALORA", "peft_type='ADALORA'"),
    ("task_type", "CAUSAL_LM", "task_type='CAUSAL_LM'"),
    ("some_future_field", {"on": 1}, "some_future_field"),
])
def test_unrepresentable_configs_are_refused(tmp_path, field, value, message):
    _, model, base, folder = _plain_lora_folder(tmp_path)
    _edit_config(folder, **{field: value})
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_peft_adapter(folder, model, base)


def test_fan_in_fan_out_on_linear_layers_loads_as_peft_runs_it(tmp_path):
    """PEFT resets fan_in_fan_out per layer (False on Linear, True on Conv1D): it never changes
    the forward pass, so jpeft reads an adapter that has it set and computes PEFT's logits."""
    pm, model, base, folder = _plain_lora_folder(tmp_path)
    _edit_config(folder, fan_in_fan_out=True)
    data = batch()
    transform, delta, params = load_peft_adapter(folder, model, base)
    compare("import/lora/fan_in_fan_out", our_logits(model, transform, params, delta, data),
            hf_logits(pm, data), base_logits(model, base, data))


def test_other_method_refused(tmp_path):
    _, model, base, folder = make_adapter(tmp_path / "boft", peft.BOFTConfig(
        task_type="SEQ_CLS", boft_block_size=4, target_modules=["query"]))
    with pytest.raises(ValueError, match="peft_type='BOFT'"):
        load_peft_adapter(folder, model, base)


def test_pickle_only_adapter_is_refused(tmp_path):
    hf, state = hf_base()
    model, base = jpeft_pair(hf, state)
    pm = peft.get_peft_model(hf, peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"]))
    folder = tmp_path / "bin"
    pm.save_pretrained(str(folder), safe_serialization=False)
    assert (folder / "adapter_model.bin").is_file() and not (folder / "adapter_model.safetensors").exists()
    with pytest.raises(ValueError, match="safe_serialization=True"):
        load_peft_adapter(folder, model, base)


def test_wrong_base_is_refused_with_clear_errors(tmp_path):
    _, _, _, folder = _plain_lora_folder(tmp_path)
    # wider model: LoRA shapes do not fit
    _hf, _state = hf_base()
    wide_cfg = hf_config()
    wide_cfg.hidden_size, wide_cfg.intermediate_size = 32, 24
    wide = transformers.BertForSequenceClassification(wide_cfg)
    model, base = jpeft_pair(wide, {k: v.detach() for k, v in wide.state_dict().items()})
    with pytest.raises(ValueError, match="do not fit"):
        load_peft_adapter(folder, model, base)
    # another number of labels: the head does not fit
    hf3, state3 = hf_base(num_labels=3)
    model3, base3 = jpeft_pair(hf3, state3, num_labels=3)
    with pytest.raises(ValueError, match="num_labels"):
        load_peft_adapter(folder, model3, base3)
    # deeper model: layer 2 has no adapter tensors
    hf4, state4 = hf_base(layers=3)
    model4, base4 = jpeft_pair(hf4, state4)
    with pytest.raises(ValueError, match="lacks"):
        load_peft_adapter(folder, model4, base4)


def test_target_rules_follow_peft():
    cfg = {"target_modules": ["query", "output.dense"], "modules_to_save": ["classifier"]}
    assert peft_target_matches(cfg, "bert.encoder.layer.0.attention.self.query")
    assert peft_target_matches(cfg, "bert.encoder.layer.0.attention.output.dense")
    assert not peft_target_matches(cfg, "bert.encoder.layer.0.attention.self.queryx")
    layered = {**cfg, "layers_to_transform": [1]}
    assert not peft_target_matches(layered, "bert.encoder.layer.0.attention.self.query")
    assert peft_target_matches(layered, "bert.encoder.layer.1.attention.self.query")
    assert not peft_target_matches({"target_modules": ["dense"], "modules_to_save": ["classifier"]},
                                   "classifier.dense")


# ----------------------------------------------------------------------------------------------
# jpeft -> PEFT

def _export_and_reload(tmp_path, transform, delta, params, model_type, num_labels, state, model=None):
    folder = tmp_path / "export"
    save_peft_adapter(folder, transform, delta, params, base_model_name_or_path="tiny-random",
                      model=model)
    hf = fresh_hf(model_type, num_labels, state)
    return peft.PeftModel.from_pretrained(hf, str(folder)).eval(), folder


def _trained_head(params, seed=3):
    flat = P.flatten(params)
    head = {p: v for p, v in flat.items() if p.startswith("head/")}
    return P.unflatten({**flat, **P.flatten(perturb(head, seed=seed, scale=0.5))})


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_lora_export_loads_in_peft(tmp_path, model_type):
    hf, state = hf_base(model_type)
    model, base = jpeft_pair(hf, state)
    cfg = LoraConfig(r=4, alpha=8, targets=r"(query|value|intermediate/dense)$", layers=(1,),
                     rank_pattern={"value": 2}, alpha_pattern={"intermediate": 3.0}, bias="lora_only",
                     init="gaussian")
    t = lora(cfg)
    delta = perturb(t.init(jax.random.key(0), base, model.info()), scale=0.3)
    params = _trained_head(base)
    flat = P.flatten(params)
    for p in t.trainable_base(params):  # trained biases
        flat[p] = flat[p] + 0.2
    params = P.unflatten(flat)
    pm, folder = _export_and_reload(tmp_path, t, delta, params, model_type, 2, state, model)
    data = batch(model_type)
    compare(f"export/lora/{model_type}", our_logits(model, t, params, delta, data), hf_logits(pm, data),
            base_logits(model, base, data))
    cfg_json = json.loads((folder / "adapter_config.json").read_text())
    assert cfg_json["target_modules"] == ["intermediate.dense", "query", "value"]
    assert cfg_json["layers_to_transform"] == [1]
    # and back: the same function
    t2, d2, p2 = load_peft_adapter(folder, model, base)
    compare(f"roundtrip/lora/{model_type}", our_logits(model, t2, p2, d2, data),
            our_logits(model, t, params, delta, data))


def test_lora_export_folds_head_lora_and_all_biases(tmp_path):
    hf, state = hf_base()
    model, base = jpeft_pair(hf, state)
    t = lora(LoraConfig(r=2, alpha=4, targets=r"(key|classifier)$", bias="all"))
    delta = perturb(t.init(jax.random.key(0), base, model.info()), scale=0.3)
    params = _trained_head(base)
    flat = P.flatten(params)
    for p in t.trainable_base(params):
        flat[p] = flat[p] - 0.1
    params = P.unflatten(flat)
    pm, _ = _export_and_reload(tmp_path, t, delta, params, "bert", 2, state)
    data = batch()
    compare("export/lora/head_and_bias_all", our_logits(model, t, params, delta, data), hf_logits(pm, data),
            base_logits(model, base, data))


def test_ia3_export_loads_in_peft(tmp_path):
    hf, state = hf_base()
    model, base = jpeft_pair(hf, state)
    t = ia3(IA3Config())
    delta = perturb(t.init(jax.random.key(0), base, model.info()), scale=0.3)
    params = _trained_head(base)
    pm, _ = _export_and_reload(tmp_path, t, delta, params, "bert", 2, state)
    data = batch()
    compare("export/ia3", our_logits(model, t, params, delta, data), hf_logits(pm, data),
            base_logits(model, base, data))


@pytest.mark.parametrize("case", ["prompt", "ptuning"])
def test_prompt_exports_load_in_peft(tmp_path, case):
    hf, state = hf_base()
    model, base = jpeft_pair(hf, state)
    t = (prompt(PromptConfig(num_virtual_tokens=3, init_scale=0.5)) if case == "prompt"
         else ptuning(PTuningConfig(num_virtual_tokens=2, encoder_hidden=6)))
    delta = perturb(t.init(jax.random.key(0), base, model.info()), scale=0.3)
    params = _trained_head(base)
    pm, _ = _export_and_reload(tmp_path, t, delta, params, "bert", 2, state, model)
    data = batch()
    compare(f"export/{case}", our_logits(model, t, params, delta, data), hf_logits(pm, data),
            base_logits(model, base, data))


def test_prefix_round_trip_and_native_prefix_refused(tmp_path):
    pm, model, base, folder = make_adapter(tmp_path, peft.PrefixTuningConfig(
        task_type="SEQ_CLS", num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=8))
    _, state = hf_base()
    t, delta, params = load_peft_adapter(folder, model, base)
    pm2, _ = _export_and_reload(tmp_path, t, delta, params, "bert", 2, state, model)
    data = batch()
    compare("export/prefix_from_peft", hf_logits(pm2, data), hf_logits(pm, data))
    native = prefix(PrefixConfig(num_virtual_tokens=3, projection=False))
    with pytest.raises(ValueError, match="peft_positions"):
        save_peft_adapter(tmp_path / "native", native, {"prefix": delta["prefix"]}, params,
                          base_model_name_or_path=None, model=model)


@pytest.mark.parametrize("case", ["prefix_projection", "ptuning2"])
@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_native_prefix_with_peft_positions_exports(tmp_path, case, model_type):
    """A prefix trained in jpeft with peft_positions=True loads in PEFT with jpeft's logits."""
    hf, state = hf_base(model_type)
    model, base = jpeft_pair(hf, state)
    t = (prefix(PrefixConfig(num_virtual_tokens=3, projection_hidden=8, peft_positions=True))
         if case == "prefix_projection" else ptuning2(PTuningV2Config(num_virtual_tokens=2, peft_positions=True)))
    delta = perturb(t.init(jax.random.key(0), base, model.info()), scale=0.3)
    params = _trained_head(base)
    pm, _ = _export_and_reload(tmp_path, t, delta, params, model_type, 2, state, model)
    data = batch(model_type)
    compare(f"export/{case}/{model_type}", our_logits(model, t, params, delta, data), hf_logits(pm, data),
            base_logits(model, base, data))


def test_unrepresentable_transforms_are_refused(tmp_path):
    hf, state = hf_base()
    model, base = jpeft_pair(hf, state)
    both = compose(lora(), bitfit())
    delta = both.init(jax.random.key(0), base, model.info())
    with pytest.raises(ValueError, match="composition"):
        save_peft_adapter(tmp_path / "a", both, delta, base, base_model_name_or_path=None)
    b = bitfit()
    with pytest.raises(ValueError, match="no Hugging Face PEFT"):
        save_peft_adapter(tmp_path / "b", b, b.init(jax.random.key(0), base, model.info()), base,
                          base_model_name_or_path=None)
    part = prefix(PrefixConfig(num_virtual_tokens=2, projection=False, layers=(0,)))
    with pytest.raises(ValueError, match="every layer"):
        save_peft_adapter(tmp_path / "c", part, part.init(jax.random.key(0), base, model.info()), base,
                          base_model_name_or_path=None, model=model)
    assert not any(p.name in ("a", "b", "c") for p in tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------
# the real MiniLM

@pytest.mark.real
def test_minilm_lora_both_ways(tmp_path, minilm_dir):
    from jpeft.models.bert import from_pretrained

    hf = transformers.BertForSequenceClassification.from_pretrained(str(minilm_dir), num_labels=2).eval()
    model, base = from_pretrained(str(minilm_dir), num_labels=2)
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    enc = tok(["a tiny test sentence", "another, rather longer sentence about adapters"],
              padding=True, return_tensors="np")
    data = (enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    # PEFT -> jpeft
    pm = peft.get_peft_model(hf, peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16,
                                                 target_modules=["query", "value"]))
    randomize_trainable(pm, scale=0.05)
    pm.eval()
    pm.save_pretrained(str(tmp_path / "in"))
    t, delta, params = load_peft_adapter(tmp_path / "in", model, base)
    compare("import/lora/minilm", our_logits(model, t, params, delta, data), hf_logits(pm, data),
            base_logits(model, base, data))
    # jpeft -> PEFT
    t = lora(LoraConfig(r=4, alpha=8, targets=r"(query|key|value|attention/output/dense)$"))
    delta = perturb(t.init(jax.random.key(0), base, model.info()), scale=0.05)
    params = _trained_head(base)
    save_peft_adapter(tmp_path / "out", t, delta, params, base_model_name_or_path=str(minilm_dir), model=model)
    hf2 = transformers.BertForSequenceClassification.from_pretrained(str(minilm_dir), num_labels=2)
    pm2 = peft.PeftModel.from_pretrained(hf2, str(tmp_path / "out")).eval()
    compare("export/lora/minilm", our_logits(model, t, params, delta, data), hf_logits(pm2, data),
            base_logits(model, base, data))


def test_trainable_tokens_both_ways(tmp_path):
    """PEFT's TRAINABLE_TOKENS stores the new rows; jpeft's delta is their difference from the
    base. (A BERT with large weights, so that a few input rows move the logits visibly.)"""
    torch.manual_seed(0)
    cfg = hf_config()
    cfg.initializer_range = 0.5
    hf = transformers.BertForSequenceClassification(cfg).eval()
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    model, base = jpeft_pair(hf, state)
    data = batch()
    ids = [int(i) for i in np.unique(data[0][0])[:3]]
    pm = peft.get_peft_model(hf, peft.TrainableTokensConfig(task_type="SEQ_CLS", token_indices=ids))
    randomize_trainable(pm, scale=1.0)
    pm.eval()
    pm.save_pretrained(str(tmp_path / "adapter"))
    transform, delta, params = load_peft_adapter(tmp_path / "adapter", model, base)
    assert transform.config == TrainableTokensConfig(token_indices=tuple(ids))
    compare("import/trainable_tokens", our_logits(model, transform, params, delta, data), hf_logits(pm, data),
            base_logits(model, base, data))

    t = trainable_tokens(TrainableTokensConfig(token_indices=tuple(ids)))
    fresh = perturb(t.init(jax.random.key(0), base, model.info()), scale=1.0)
    params = _trained_head(base)
    pm, _ = _export_and_reload(tmp_path, t, fresh, params, "bert", 2, state, model)
    compare("export/trainable_tokens", our_logits(model, t, params, fresh, data), hf_logits(pm, data),
            our_logits(model, t, params, jax.tree_util.tree_map(jnp.zeros_like, fresh), data))


def test_ln_tuning_both_ways(tmp_path):
    pm, model, base, folder = make_adapter(tmp_path, peft.LNTuningConfig(task_type="SEQ_CLS",
                                                                         target_modules=["LayerNorm"]))
    data = batch()
    transform, delta, params = load_peft_adapter(folder, model, base)
    compare("import/ln_tuning", our_logits(model, transform, params, delta, data), hf_logits(pm, data),
            base_logits(model, base, data))
    hf, state = hf_base()
    model, base = jpeft_pair(hf, state)
    t = ln_tuning()
    fresh = perturb(t.init(jax.random.key(0), base, model.info()), scale=0.3)
    params = _trained_head(base)
    pm, _ = _export_and_reload(tmp_path, t, fresh, params, "bert", 2, state, model)
    compare("export/ln_tuning", our_logits(model, t, params, fresh, data), hf_logits(pm, data),
            our_logits(model, t, params, jax.tree_util.tree_map(jnp.zeros_like, fresh), data))
