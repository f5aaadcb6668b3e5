"""Mistral, Qwen2 and Qwen3 checkpoints through :mod:`jpeft.models.llama`: parity with their
``transformers`` classes (sliding windows, Qwen2's q/k/v biases, Qwen3's q/k norms), cached
decoding inside and past the window, loading by ``jpeft.from_pretrained`` and writing back."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jpeft  # noqa: E402
from jpeft.core.paths import flatten  # noqa: E402
from jpeft.models.llama import LlamaConfig, hf_config_dict  # noqa: E402
from tests.models.test_llama import (  # noqa: E402
    TOL,
    decode_with_cache,
    left_padded_batch,
    max_diff,
    to_flax,
    torch_logits,
)

COMMON = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, initializer_range=0.2,
              pad_token_id=0, attn_implementation="eager", tie_word_embeddings=False)
VARIANTS = {
    # a window shorter than the 9-token batch, so that it cuts every row's context
    "mistral_window3": lambda: transformers.MistralConfig(sliding_window=3, **COMMON),
    "mistral_no_window": lambda: transformers.MistralConfig(sliding_window=None, **COMMON),
    # layer 0 attends fully, layer 1 slides (max_window_layers=1)
    "qwen2_window_layer1": lambda: transformers.Qwen2Config(use_sliding_window=True, sliding_window=4,
                                                            max_window_layers=1, **COMMON),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON),
    "qwen3": lambda: transformers.Qwen3Config(head_dim=16, **COMMON),
}
CLASSES = {"mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def hf_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(VARIANTS[name]()).eval()
    with torch.no_grad():  # norms start at 1 and biases at 0: perturb everything
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.mark.parametrize("name", list(VARIANTS))
def test_parity_and_cached_decoding(name):
    hf = hf_model(name)
    model, params = to_flax(hf)
    cfg = model.config
    assert cfg.model_type == name.split("_")[0]
    leaves = flatten(params)
    assert ("model/layers_0/self_attn/q_proj/bias" in leaves) == name.startswith("qwen2")
    assert ("model/layers_0/self_attn/o_proj/bias" in leaves) is False
    assert ("model/layers_1/self_attn/k_norm/scale" in leaves) == (name == "qwen3")
    windows = [cfg.window(i) for i in range(cfg.num_hidden_layers)]
    assert windows == {"mistral_window3": [3, 3], "qwen2_window_layer1": [None, 4]}.get(name, [None, None])

    ids, mask = left_padded_batch(12)
    real = mask > 0
    full = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    assert max_diff(full, torch_logits(hf, ids, mask), real) <= TOL
    # prefill 5 tokens, then one at a time: the window moves over the cache as over the sequence
    cached = decode_with_cache(model, params, ids, mask, 5)
    assert max_diff(cached, full, real) <= 1e-5


def test_a_window_changes_the_logits():
    """The window test above can fail: without the window the logits differ from Mistral's."""
    hf = hf_model("mistral_window3")
    model, params = to_flax(hf)
    unwindowed = model.clone(config=LlamaConfig(**{**model.config.__dict__, "sliding_window": None}))
    ids, mask = left_padded_batch(12)
    real = mask > 0
    got = np.asarray(unwindowed.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    assert max_diff(got, torch_logits(hf, ids, mask), real) > 1e-2


@pytest.mark.parametrize("name", ["mistral_window3", "qwen2_window_layer1", "qwen3"])
def test_from_pretrained_and_merged_export_round_trip(tmp_path, name):
    from jpeft.checkpoint import export_merged_hf

    hf = hf_model(name)
    hf.save_pretrained(str(tmp_path / "base"))
    model, params = jpeft.from_pretrained(str(tmp_path / "base"))
    assert model.config == to_flax(hf)[0].config
    method = jpeft.lora(jpeft.LoraConfig(r=2, alpha=4, targets=r"(q_proj|v_proj)$"))
    delta = jax.tree.map(lambda x: x + 0.05, method.init(jax.random.key(1), params, model.info()))
    out = export_merged_hf(tmp_path / "merged", model, method, params, delta)
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(merged).__name__ == CLASSES[model.config.model_type]
    ids, mask = left_padded_batch()
    ours = np.asarray(jpeft.apply(model, method, params, delta, jnp.asarray(ids), jnp.asarray(mask)))
    assert max_diff(ours, torch_logits(merged, ids, mask), mask > 0) <= TOL
    assert jpeft.from_pretrained(str(out))[0].config == model.config


def test_configs_a_checkpoint_cannot_hold_are_refused():
    base = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2)
    with pytest.raises(ValueError, match="qkv_bias"):
        hf_config_dict(LlamaConfig(**base, qkv_bias=True))
    with pytest.raises(ValueError, match="sliding window"):
        hf_config_dict(LlamaConfig(**base, sliding_window=4))
    with pytest.raises(ValueError, match="layer_types must name 2 layers"):
        LlamaConfig(**base, sliding_window=4, layer_types=("sliding_attention",))
    with pytest.raises(ValueError, match="sliding_window must be an integer"):
        LlamaConfig(**base, sliding_window=0)
    with pytest.raises(ValueError, match="gemma"):
        LlamaConfig.from_hf({**base, "model_type": "gemma"})


def test_unknown_config_overrides_name_the_field_and_the_fix(tmp_path):
    hf = hf_model("qwen2")
    hf.save_pretrained(str(tmp_path / "base"))
    with pytest.raises(TypeError, match="no field 'num_labels' .num_labels and head apply to BERT"):
        jpeft.from_pretrained(str(tmp_path / "base"), num_labels=2)
    with pytest.raises(TypeError, match="did you mean 'sliding_window'"):
        jpeft.from_pretrained(str(tmp_path / "base"), sliding_windw=4)
    model, _ = jpeft.from_pretrained(str(tmp_path / "base"), matmul_dtype="bfloat16")
    assert model.config.matmul_dtype == "bfloat16"
