"""Hugging Face PEFT adapters on the decoders (Llama, GPT-2, ``task_type="CAUSAL_LM"``), both ways.

Each case builds a tiny random ``transformers`` decoder, saves it as a Hugging Face folder that
``jpeft.from_pretrained`` reads, wraps it with ``peft.get_peft_model``, refills every trainable
tensor with random values (so a transposed or misnamed tensor changes the logits) and compares the
logits of PEFT in PyTorch with jpeft's on the same adapter, read (PEFT -> jpeft) or written
(jpeft -> PEFT).
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import jpeft
from jpeft.checkpoint.hf_peft import load_peft_adapter, save_peft_adapter
from jpeft.core import paths as P
from jpeft.generate import generate
from tests.checkpoint.test_hf_peft import randomize_trainable
from tests.helpers import perturb

TOL = 1e-4


def hf_decoder(family: str, seed: int = 0):
    """A tiny random ``transformers`` decoder with non-trivial norms and biases."""
    torch.manual_seed(seed)
    if family == "llama":
        cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=64, tie_word_embeddings=False)
        hf = transformers.LlamaForCausalLM(cfg)
    elif family == "qwen2":  # q/k/v biases: trained biases travel as ....base_layer.bias
        cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=64, tie_word_embeddings=True)
        hf = transformers.Qwen2ForCausalLM(cfg)
    elif family == "mistral":  # a sliding window of 4 keys
        cfg = transformers.MistralConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64, sliding_window=4)
        hf = transformers.MistralForCausalLM(cfg)
    else:
        cfg = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      initializer_range=0.2)  # logits that move with the adapter
        hf = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return hf.eval()


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    """``decoders(family) -> (folder of the HF model, jpeft model, jpeft params)``, made once."""
    made: dict[str, tuple] = {}

    def get(family: str):
        if family not in made:
            folder = tmp_path_factory.mktemp(family) / "base"
            hf_decoder(family).save_pretrained(str(folder))
            made[family] = (folder, *jpeft.from_pretrained(str(folder)))
        return made[family]

    return get


def fresh_hf(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()


IDS = np.array([[5, 9, 17, 33, 2, 41, 7, 12], [3, 8, 60, 21, 14, 11, 0, 0]])
MASK = np.array([[1] * 8, [1] * 6 + [0] * 2])


def saved_peft_adapter(folder, peft_config, out, scale: float = 1.0):
    """A PEFT model on a fresh copy of the base with random trainable tensors, saved to ``out``."""
    pm = peft.get_peft_model(fresh_hf(folder), peft_config)
    randomize_trainable(pm, scale=scale)
    pm.eval()
    pm.save_pretrained(str(out))
    return pm


def hf_logits(pm) -> np.ndarray:
    with torch.no_grad():
        return pm(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()


def our_logits(model, transform, params, delta) -> np.ndarray:
    return np.asarray(jpeft.apply(model, transform, params, delta, jnp.asarray(IDS), jnp.asarray(MASK)))


def compare(ours, theirs, base):
    real = MASK > 0  # padded positions are not compared
    diff = float(np.abs(ours - theirs)[real].max())
    assert diff <= TOL, f"max |Δlogit| = {diff}"
    assert float(np.abs(theirs - base)[real].max()) > 1e-2, "the adapter changes nothing"


CASES = {
    "llama": {
        "lora": lambda: peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                        target_modules=["q_proj", "v_proj"]),
        "lora_all_linear_rslora": lambda: peft.LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=3,
                                                          use_rslora=True, target_modules="all-linear"),
        "dora_patterns_layers": lambda: peft.LoraConfig(
            task_type="CAUSAL_LM", r=4, lora_alpha=8, use_dora=True,
            target_modules=["q_proj", "k_proj", "down_proj"], rank_pattern={"k_proj": 2},
            alpha_pattern={"down_proj": 3.0}, layers_to_transform=[1], layers_pattern="layers"),
        "ia3": lambda: peft.IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                                      feedforward_modules=["down_proj"]),
    },
    "qwen2": {
        "lora_bias_all": lambda: peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, bias="all",
                                                 target_modules=["q_proj", "v_proj", "o_proj"]),
    },
    "gpt2": {
        "lora": lambda: peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["c_attn"],
                                        fan_in_fan_out=True),
        "lora_all_linear_dora": lambda: peft.LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4,
                                                        use_dora=True, target_modules="all-linear",
                                                        fan_in_fan_out=True),
        "ia3": lambda: peft.IA3Config(task_type="CAUSAL_LM", target_modules=["c_attn", "mlp.c_proj"],
                                      feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True),
        "vera": lambda: peft.VeraConfig(task_type="CAUSAL_LM", r=4, target_modules=["c_attn", "mlp.c_proj"],
                                        fan_in_fan_out=True),  # PEFT adapts Conv1D with VeRA
    },
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("family_case", [(f, c) for f in CASES for c in CASES[f]], ids="-".join)
def test_peft_adapters_import_with_peft_logits(tmp_path, decoders, family_case):
    family, case = family_case
    folder, model, params = decoders(family)
    pm = peft.get_peft_model(fresh_hf(folder), CASES[family][case]())
    randomize_trainable(pm)
    pm.eval()
    pm.save_pretrained(str(tmp_path / "adapter"))
    transform, delta, loaded = load_peft_adapter(tmp_path / "adapter", model, params)
    base = np.asarray(model.apply({"params": params}, jnp.asarray(IDS), jnp.asarray(MASK)))
    compare(our_logits(model, transform, loaded, delta), hf_logits(pm), base)
    saved = sum(1 for n, _ in pm.named_parameters() if "lora_A" in n or "ia3_l" in n)
    assert len([p for p in P.paths(delta) if p.endswith(("lora_A", "ia3_l"))]) == saved


JPEFT_METHODS = {
    "llama": {
        "lora": lambda: jpeft.lora(jpeft.LoraConfig(r=2, alpha=4, targets=r"(q_proj|v_proj)$")),
        "dora_layer1": lambda: jpeft.lora(jpeft.LoraConfig(r=2, alpha=4, targets=r"(o_proj|up_proj)$",
                                                           layers=(1,), use_dora=True)),
        "ia3": lambda: jpeft.ia3(jpeft.IA3Config(targets=r"(k_proj|v_proj|down_proj)$",
                                                 feedforward=r"down_proj$")),
    },
    "qwen2": {
        "lora_bias_all": lambda: jpeft.lora(jpeft.LoraConfig(r=2, alpha=4, targets=r"(k_proj|down_proj)$",
                                                             bias="all")),
    },
    "gpt2": {
        "lora": lambda: jpeft.lora(jpeft.LoraConfig(r=2, alpha=4, targets=r"(c_attn|c_fc)$")),
        "ia3": lambda: jpeft.ia3(jpeft.IA3Config(targets=r"(c_attn|mlp/c_proj)$", feedforward=r"mlp/c_proj$")),
        "vera": lambda: jpeft.vera(jpeft.VeraConfig(r=4, targets=r"(c_attn|c_fc)$")),
    },
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("family_case", [(f, c) for f in JPEFT_METHODS for c in JPEFT_METHODS[f]],
                         ids="-".join)
def test_jpeft_adapters_export_and_peft_computes_the_same_logits(tmp_path, decoders, family_case):
    family, case = family_case
    folder, model, base_params = decoders(family)
    transform = JPEFT_METHODS[family][case]()
    delta = perturb(transform.init(jax.random.key(0), base_params, model.info()), scale=0.3)
    params = base_params
    if getattr(transform.config, "bias", "none") != "none":  # trained biases travel in the adapter
        params = P.unflatten({k: v + 0.3 if k.endswith("/bias") else v
                              for k, v in P.flatten(base_params).items()})
    ours = our_logits(model, transform, params, delta)
    out = save_peft_adapter(tmp_path / "exported", transform, delta, params,
                            base_model_name_or_path=str(folder), model=model)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["fan_in_fan_out"] is (family == "gpt2")
    pm = peft.PeftModel.from_pretrained(fresh_hf(folder), str(out)).eval()
    base = np.asarray(model.apply({"params": base_params}, jnp.asarray(IDS), jnp.asarray(MASK)))
    compare(ours, hf_logits(pm), base)
    # and back: the folder reads into the same delta and biases
    again, delta2, params2 = load_peft_adapter(out, model, base_params)
    np.testing.assert_allclose(our_logits(model, again, params2, delta2), ours, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_decoder_refusals_name_the_task_type(tmp_path, decoders, family):
    folder, model, params = decoders(family)
    lora = jpeft.lora(jpeft.LoraConfig(r=2, alpha=4, targets=r"(q_proj|c_attn)$"))
    delta = lora.init(jax.random.key(0), params, model.info())
    with pytest.raises(ValueError, match="task_type must be one of \\['CAUSAL_LM'\\]"):
        save_peft_adapter(tmp_path / "x", lora, delta, params, base_model_name_or_path="b",
                          model=model, task_type="SEQ_CLS")


PREFIX_CASES = {  # PEFT's prefix tuning, with and without the reparameterisation MLP
    "table": (lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
              lambda: jpeft.ptuning2(jpeft.PTuningV2Config(num_virtual_tokens=3, peft_positions=True))),
    "projection": (lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                   prefix_projection=True, encoder_hidden_size=12),
                   lambda: jpeft.prefix(jpeft.PrefixConfig(num_virtual_tokens=3, projection_hidden=12,
                                                           peft_positions=True))),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("case", list(PREFIX_CASES))
def test_prefix_adapters_both_ways(tmp_path, decoders, family, case):
    """PEFT feeds the prefix as ``past_key_values``: every token sees the P prefix keys (one per
    key/value head under grouped queries) and transformers numbers the tokens from P, which
    jpeft's ``peft_positions`` reproduces through the ``embed.positions`` tap."""
    folder, model, params = decoders(family)
    peft_config, jpeft_method = PREFIX_CASES[case]
    pm = saved_peft_adapter(folder, peft_config(), tmp_path / "theirs")
    transform, delta, loaded = load_peft_adapter(tmp_path / "theirs", model, params)
    assert transform.config.peft_positions
    base = np.asarray(model.apply({"params": params}, jnp.asarray(IDS), jnp.asarray(MASK)))
    compare(our_logits(model, transform, loaded, delta), hf_logits(pm), base)

    method = jpeft_method()
    fresh = perturb(method.init(jax.random.key(0), params, model.info()), scale=1.0)
    ours = our_logits(model, method, params, fresh)
    out = save_peft_adapter(tmp_path / "ours", method, fresh, params, base_model_name_or_path=str(folder),
                            model=model)
    cfg = json.loads((out / "adapter_config.json").read_text())
    info = model.info()
    assert (cfg["token_dim"], cfg["num_attention_heads"]) == (info.kv_heads * info.head_dim, info.kv_heads)
    pm = peft.PeftModel.from_pretrained(fresh_hf(folder), str(out)).eval()
    compare(ours, hf_logits(pm), base)
    # positions from 0 give other logits: the numbering matters, and such a prefix is refused
    make = jpeft.prefix if isinstance(method.config, jpeft.PrefixConfig) else jpeft.ptuning2
    plain = make(dataclasses.replace(method.config, peft_positions=False))
    assert float(np.abs(our_logits(model, plain, params, fresh) - ours)[MASK > 0].max()) > 1e-3
    with pytest.raises(ValueError, match="peft_positions=True"):
        save_peft_adapter(tmp_path / "plain", plain, fresh, params, base_model_name_or_path="b", model=model)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prefix_generation_matches_peft(tmp_path, decoders, family):
    """Cached greedy decoding with a PEFT prefix: the prompt is numbered from P, each new token
    continues from the cache (the tap shifts a fresh input only)."""
    folder, model, params = decoders(family)
    pm = saved_peft_adapter(folder, PREFIX_CASES["table"][0](), tmp_path / "theirs")
    transform, delta, loaded = load_peft_adapter(tmp_path / "theirs", model, params)
    prompts = IDS[:, :5]
    with torch.no_grad():
        theirs = pm.generate(input_ids=torch.tensor(prompts), attention_mask=torch.ones(prompts.shape, dtype=torch.long),
                             max_new_tokens=6, do_sample=False, pad_token_id=0).numpy()[:, 5:]
    ours = generate(model, transform, loaded, delta, jnp.asarray(prompts), jnp.ones(prompts.shape, jnp.int32),
                          max_new_tokens=6)
    np.testing.assert_array_equal(np.asarray(ours), theirs)


def test_prefix_on_a_sliding_window_is_refused_with_the_reason(tmp_path, decoders):
    folder, model, params = decoders("mistral")
    pm = peft.get_peft_model(fresh_hf(folder), PREFIX_CASES["table"][0]())
    pm.save_pretrained(str(tmp_path / "theirs"))
    with pytest.raises(ValueError, match="sliding attention window \\(layers \\[0, 1\\]\\).*save_adapter"):
        load_peft_adapter(tmp_path / "theirs", model, params)
    method = PREFIX_CASES["table"][1]()
    with pytest.raises(ValueError, match="sliding attention window"):
        save_peft_adapter(tmp_path / "ours", method, method.init(jax.random.key(0), params, model.info()),
                          params, base_model_name_or_path=str(folder), model=model)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_trainable_tokens_both_ways_untied_and_tied(tmp_path, decoders, family):
    """Llama (untied here): only the input embeddings' rows; GPT-2 (tied): PEFT writes the rows
    under wte and lm_head, and the output layer scores with the new rows too."""
    folder, model, params = decoders(family)
    pm = saved_peft_adapter(folder, peft.TrainableTokensConfig(task_type="CAUSAL_LM", token_indices=[5, 17]),
                            tmp_path / "theirs")
    transform, delta, loaded = load_peft_adapter(tmp_path / "theirs", model, params)
    base = np.asarray(model.apply({"params": params}, jnp.asarray(IDS), jnp.asarray(MASK)))
    compare(our_logits(model, transform, loaded, delta), hf_logits(pm), base)

    method = jpeft.trainable_tokens(jpeft.TrainableTokensConfig(token_indices=(9, 33)))
    fresh = perturb(method.init(jax.random.key(0), params, model.info()), scale=1.0)
    out = save_peft_adapter(tmp_path / "ours", method, fresh, params, base_model_name_or_path=str(folder),
                            model=model)
    from safetensors.numpy import load_file
    keys = set(load_file(str(out / "adapter_model.safetensors")))
    assert any("lm_head" in k for k in keys) == (family == "gpt2")
    pm = peft.PeftModel.from_pretrained(fresh_hf(folder), str(out)).eval()
    compare(our_logits(model, method, params, fresh), hf_logits(pm), base)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_with_trainable_token_indices_both_ways(tmp_path, decoders, family):
    """PEFT's LoraConfig(trainable_token_indices=...) (new chat tokens beside LoRA) reads as
    lora + trainable_tokens, and that composition writes the same format."""
    folder, model, params = decoders(family)
    target = "q_proj" if family == "llama" else "c_attn"
    pm = saved_peft_adapter(folder, peft.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=[target],
                                                    trainable_token_indices=[5, 17]), tmp_path / "theirs")
    transform, delta, loaded = load_peft_adapter(tmp_path / "theirs", model, params)
    assert [t.name for t in transform.parts] == ["lora", "trainable_tokens"]
    base = np.asarray(model.apply({"params": params}, jnp.asarray(IDS), jnp.asarray(MASK)))
    ours = our_logits(model, transform, loaded, delta)
    compare(ours, hf_logits(pm), base)
    no_tokens = {**delta, "trainable_tokens": jax.tree_util.tree_map(jnp.zeros_like, delta["trainable_tokens"])}
    assert float(np.abs(our_logits(model, transform, loaded, no_tokens) - ours)[MASK > 0].max()) > 1e-3

    method = jpeft.compose(jpeft.trainable_tokens(jpeft.TrainableTokensConfig(token_indices=(9, 33))),
                           JPEFT_METHODS[family]["lora"]())
    fresh = perturb(method.init(jax.random.key(0), params, model.info()), scale=1.0)
    out = save_peft_adapter(tmp_path / "ours", method, fresh, params, base_model_name_or_path=str(folder),
                            model=model)
    assert json.loads((out / "adapter_config.json").read_text())["trainable_token_indices"] == [9, 33]
    pm = peft.PeftModel.from_pretrained(fresh_hf(folder), str(out)).eval()
    compare(our_logits(model, method, params, fresh), hf_logits(pm), base)
    with pytest.raises(ValueError, match="composition of"):  # tokens beside (IA)³: no PEFT format
        both = jpeft.compose(JPEFT_METHODS[family]["ia3"](),
                             jpeft.trainable_tokens(jpeft.TrainableTokensConfig(token_indices=(9,))))
        save_peft_adapter(tmp_path / "x", both, both.init(jax.random.key(0), params, model.info()), params,
                          base_model_name_or_path="b", model=model)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_ln_tuning_both_ways(tmp_path, decoders, family):
    """PEFT's LN_TUNING stores each norm's trained values (RMSNorm: weight; LayerNorm: weight and
    bias); jpeft's delta is their difference from the base."""
    folder, model, params = decoders(family)
    pm = saved_peft_adapter(folder, peft.LNTuningConfig(task_type="CAUSAL_LM"), tmp_path / "theirs", scale=0.5)
    transform, delta, loaded = load_peft_adapter(tmp_path / "theirs", model, params)
    assert len(P.flatten(delta)) == {"llama": 5, "gpt2": 10}[family]
    base = np.asarray(model.apply({"params": params}, jnp.asarray(IDS), jnp.asarray(MASK)))
    compare(our_logits(model, transform, loaded, delta), hf_logits(pm), base)

    method = jpeft.ln_tuning(jpeft.LNTuningConfig(pattern="layers_1|h_1"))
    fresh = perturb(method.init(jax.random.key(0), params, model.info()), scale=0.5)
    out = save_peft_adapter(tmp_path / "ours", method, fresh, params, base_model_name_or_path=str(folder),
                            model=model)
    pm = peft.PeftModel.from_pretrained(fresh_hf(folder), str(out)).eval()
    compare(our_logits(model, method, params, fresh), hf_logits(pm), base)


PROMPT_CASES = {
    "prompt": (lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
               lambda: jpeft.prompt(jpeft.PromptConfig(num_virtual_tokens=3))),
    "ptuning_mlp": (lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                     encoder_hidden_size=12),
                    lambda: jpeft.ptuning(jpeft.PTuningConfig(num_virtual_tokens=3, encoder_hidden=12))),
}
ONES = np.ones_like(IDS)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("case", list(PROMPT_CASES))
def test_prompt_learning_adapters_both_ways(tmp_path, decoders, family, case):
    """PEFT prepends the prompts to the input embeddings and returns P + T logits; positions run
    0 … P+T-1 (unpadded rows: transformers numbers positions by slot when PEFT drops position_ids)."""
    folder, model, params = decoders(family)
    peft_config, jpeft_method = PROMPT_CASES[case]
    pm = saved_peft_adapter(folder, peft_config(), tmp_path / "theirs")
    with torch.no_grad():
        theirs = pm(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(ONES)).logits.numpy()
    transform, delta, loaded = load_peft_adapter(tmp_path / "theirs", model, params)
    ours = np.asarray(jpeft.apply(model, transform, loaded, delta, jnp.asarray(IDS), jnp.asarray(ONES)))
    assert ours.shape == theirs.shape == (2, 3 + IDS.shape[1], 64)
    base = np.asarray(model.apply({"params": params}, jnp.asarray(IDS), jnp.asarray(ONES)))
    assert float(np.abs(theirs[:, 3:] - base).max()) > 1e-2  # the prompts matter
    assert float(np.abs(ours - theirs).max()) <= TOL

    method = jpeft_method()
    fresh = perturb(method.init(jax.random.key(0), params, model.info()), scale=1.0)
    ours = np.asarray(jpeft.apply(model, method, params, fresh, jnp.asarray(IDS), jnp.asarray(ONES)))
    out = save_peft_adapter(tmp_path / "ours", method, fresh, params, base_model_name_or_path=str(folder),
                            model=model)
    pm = peft.PeftModel.from_pretrained(fresh_hf(folder), str(out)).eval()
    with torch.no_grad():
        theirs = pm(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(ONES)).logits.numpy()
    assert float(np.abs(ours - theirs).max()) <= TOL


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merged_export_loads_in_transformers_with_the_adapted_logits(tmp_path, decoders, family):
    from jpeft.checkpoint import export_merged_hf

    folder, model, params = decoders(family)
    transform = JPEFT_METHODS[family]["lora"]()
    delta = perturb(transform.init(jax.random.key(0), params, model.info()), scale=0.3)
    out = export_merged_hf(tmp_path / "merged", model, transform, params, delta)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(hf).__name__ == {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}[family]
    base = np.asarray(model.apply({"params": params}, jnp.asarray(IDS), jnp.asarray(MASK)))
    compare(our_logits(model, transform, params, delta), hf_logits(hf), base)
    # the written config reads back into the same jpeft config
    again, _ = jpeft.from_pretrained(str(out))
    assert again.config == model.config


def test_llama3_rope_and_gqa_configs_round_trip_through_config_json():
    from jpeft.models.llama import LlamaConfig, hf_config_dict

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=5e5,
                         rope_type="llama3", rope_factor=4.0, rope_original_max_position_embeddings=64,
                         tie_word_embeddings=True, mlp_bias=True, matmul_dtype="bfloat16")
    written = hf_config_dict(config)
    assert "matmul_dtype" not in written and written["rope_scaling"]["factor"] == 4.0
    assert LlamaConfig.from_hf(written, matmul_dtype="bfloat16") == config
    hf = transformers.LlamaConfig(**written)  # transformers reads it as the same model
    assert (hf.num_key_value_heads, hf.head_dim, hf.tie_word_embeddings) == (2, 16, True)


@pytest.mark.real
@pytest.mark.slow
def test_smollm2_lora_adapters_both_ways_with_peft_on_the_real_model(tmp_path):
    """SmolLM2-135M (30 layers, 9 query and 3 key/value heads, tied embeddings): a jpeft LoRA on
    every attention and MLP projection, exported, gives PEFT's logits on transformers' model of
    the same GGUF file; a PEFT LoRA read into jpeft gives jpeft the same logits as PEFT."""
    pytest.importorskip("gguf", reason="GGUF loading needs the gguf package")
    from tests.models.test_gguf import smollm2_gguf

    path = smollm2_gguf()
    model, params = jpeft.from_pretrained(str(path))
    ids = jnp.asarray([[1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2]])
    import copy

    hf = transformers.AutoModelForCausalLM.from_pretrained(  # dequantised once (slow): copied below
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()

    def torch_logits(pm):
        with torch.no_grad():
            return pm(torch.from_numpy(np.asarray(ids))).logits.numpy()

    method = jpeft.lora(jpeft.LoraConfig(r=4, alpha=8, targets=r"(q|k|v|o|gate|up|down)_proj$"))
    delta = perturb(method.init(jax.random.key(0), params, model.info()), scale=0.05)
    ours = np.asarray(jpeft.apply(model, method, params, delta, ids))
    base = np.asarray(model.apply({"params": params}, ids))
    save_peft_adapter(tmp_path / "ours", method, delta, params,
                      base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct", model=model)
    theirs = torch_logits(peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "ours")).eval())
    assert float(np.abs(theirs - base).max()) > 0.5  # the adapter moves the logits
    assert float(np.abs(ours - theirs).max()) <= 1e-3  # the base's own agreement (test_gguf)

    pm = peft.get_peft_model(hf, peft.LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4,
                                                        target_modules=["q_proj", "v_proj", "up_proj"]))
    randomize_trainable(pm, scale=0.05)
    pm.save_pretrained(str(tmp_path / "theirs"))
    expected = torch_logits(pm.eval())
    transform, loaded, _ = load_peft_adapter(tmp_path / "theirs", model, params)
    assert len(P.paths(loaded)) == 2 * 3 * 30
    assert float(np.abs(np.asarray(jpeft.apply(model, transform, params, loaded, ids)) - expected).max()) <= 1e-3


LYCORIS = {
    "loha": lambda: peft.LoHaConfig(task_type="CAUSAL_LM", r=2, alpha=3,
                                    target_modules=["q_proj", "k_proj", "down_proj"]),
    "lokr": lambda: peft.LoKrConfig(task_type="CAUSAL_LM", r=1, alpha=2, decompose_both=True,
                                    target_modules=["v_proj", "up_proj"]),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", list(LYCORIS))
def test_loha_lokr_both_ways_on_llama_and_refused_on_gpt2_conv1d(tmp_path, decoders, case):
    """Llama's k/v projections (grouped queries: 32 → 16) and MLP; PEFT adapts no Conv1D."""
    folder, model, params = decoders("llama")
    pm = saved_peft_adapter(folder, LYCORIS[case](), tmp_path / "adapter")
    transform, delta, loaded = load_peft_adapter(tmp_path / "adapter", model, params)
    assert transform.name == case
    base = np.asarray(model.apply({"params": params}, jnp.asarray(IDS), jnp.asarray(MASK)))
    compare(our_logits(model, transform, loaded, delta), hf_logits(pm), base)
    delta = perturb(delta, seed=4, scale=0.5)  # jpeft -> PEFT
    ours = our_logits(model, transform, loaded, delta)
    out = save_peft_adapter(tmp_path / "exported", transform, delta, loaded,
                            base_model_name_or_path=str(folder), model=model)
    pm = peft.PeftModel.from_pretrained(fresh_hf(folder), str(out)).eval()
    compare(ours, hf_logits(pm), base)
    folder, model, params = decoders("gpt2")
    make = jpeft.loha(jpeft.LohaConfig(r=2, targets="c_attn$")) if case == "loha" else \
        jpeft.lokr(jpeft.LokrConfig(r=1, targets="c_attn$"))
    delta = make.init(jax.random.key(0), params, model.info())
    with pytest.raises(ValueError, match="Conv1D layers; jpeft reads and writes"):
        save_peft_adapter(tmp_path / "gpt2", make, delta, params, base_model_name_or_path=str(folder),
                          model=model)
