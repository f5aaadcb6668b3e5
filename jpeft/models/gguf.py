"""Llama, Qwen2 and Qwen3 checkpoints from GGUF files (llama.cpp's format) into :mod:`jpeft.models.llama`.

Reads the file with the ``gguf`` package's ``GGUFReader`` and dequantises every tensor to float32
numpy with ``gguf.quants.dequantize`` (so a Q4/Q8 file gives the float weights that llama.cpp
computes with; the quantisation error itself stays). ``general.architecture`` is ``llama``
(Mistral files are written as ``llama`` too), ``qwen2`` or ``qwen3``; the config comes from the
``<architecture>.*`` metadata; tensor names map as

==============================  ==============================================================
GGUF                            Flax path (``jpeft.models.llama``)
==============================  ==============================================================
``token_embd.weight``           ``model/embed_tokens/embedding``
``blk.N.attn_q/k/v.weight``     ``model/layers_N/self_attn/{q,k,v}_proj/kernel`` (q/k rows
                                un-permuted, see below)
``blk.N.attn_output.weight``    ``model/layers_N/self_attn/o_proj/kernel``
``blk.N.ffn_gate/up/down``      ``model/layers_N/mlp/{gate,up,down}_proj/kernel``
``blk.N.attn_norm.weight``      ``model/layers_N/input_layernorm/scale``
``blk.N.ffn_norm.weight``       ``model/layers_N/post_attention_layernorm/scale``
``output_norm.weight``          ``model/norm/scale``
``output.weight``               ``lm_head/kernel`` (absent: tied embeddings)
``blk.N.attn_q/k/v.bias``       ``model/layers_N/self_attn/{q,k,v}_proj/bias`` (Qwen2)
``blk.N.attn_q/k_norm.weight``  ``model/layers_N/self_attn/{q,k}_norm/scale`` (Qwen3)
==============================  ==============================================================

llama.cpp's converter permutes the rows of ``q`` and ``k`` per head from the ``rotate_half``
layout (first half / second half of each head) to interleaved pairs; :func:`unpermute_rows`
undoes it (as ``transformers``' ``LlamaTensorProcessor._reverse_permute_weights``). Qwen2/Qwen3
files keep PyTorch's rows (llama.cpp runs them with NeoX-style rotary embeddings).

Not handled: files with a ``rope_freqs.weight`` tensor (Llama 3.1+ frequency factors), other
architectures, partial rotary dimensions, sliding windows (a Qwen2 GGUF file does not say
whether its model used one; Qwen2/2.5 releases do not).
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any

import numpy as np

from jpeft.models.common import check_overrides
from jpeft.models.llama import ARCHITECTURES as ARCH_FIELDS
from jpeft.models.llama import LlamaConfig, LlamaForCausalLM, assemble_params


def _reader(path: str | os.PathLike[str]):
    try:
        from gguf import GGUFReader
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("reading GGUF files needs the gguf package: pip install gguf") from err
    return GGUFReader(str(path))


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    if hasattr(field, "contents"):
        return field.contents()
    value = field.parts[field.data[0]]  # older gguf: a numpy array (or bytes for strings)
    return value.tobytes().decode() if value.dtype == np.uint8 else value.item()


ARCHITECTURES = ("llama", "qwen2", "qwen3")  # general.architecture values read (= LlamaConfig.model_type)


def config_from_gguf(reader, **overrides: Any) -> LlamaConfig:
    """A :class:`LlamaConfig` from a reader's ``<architecture>.*`` metadata."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"jpeft.models.gguf loads GGUF files of the architectures {list(ARCHITECTURES)}, "
                         f"this one is {arch!r}")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise NotImplementedError("GGUF files with rope_freqs (Llama 3.1+ rope scaling) are not supported")
    get = lambda key, default=None: _field(reader, f"{arch}.{key}", default)
    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    kv = int(get("attention.head_count_kv", heads))
    head_dim = int(get("attention.key_length", hidden // heads))
    rope_dim = int(get("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise NotImplementedError(f"partial rotary embeddings (rope dim {rope_dim} != head dim {head_dim})")
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    vocab = int(embd.shape[-1])  # GGUF shapes are (in, out)-ordered: (hidden, vocab)
    declared = get("vocab_size")
    if declared is not None and int(declared) != vocab:
        raise ValueError(f"{arch}.vocab_size={declared} but token_embd has {vocab} rows")
    kwargs = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        max_position_embeddings=int(get("context_length", 2048)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in names,
        model_type=arch,
        **ARCH_FIELDS[arch][1],
    )
    check_overrides(LlamaConfig, overrides)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def unpermute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation: ``(heads·Dh, in)`` rows from interleaved rotary pairs
    back to the ``rotate_half`` layout (``heads`` = the tensor's own head count)."""
    half = weight.shape[0] // heads // 2
    w = weight.reshape(heads, half, 2, *weight.shape[1:])
    return w.swapaxes(2, 1).reshape(weight.shape)


_BLOCK = {
    "attn_q": "self_attn/q_proj/kernel",
    "attn_k": "self_attn/k_proj/kernel",
    "attn_v": "self_attn/v_proj/kernel",
    "attn_output": "self_attn/o_proj/kernel",
    "ffn_gate": "mlp/gate_proj/kernel",
    "ffn_up": "mlp/up_proj/kernel",
    "ffn_down": "mlp/down_proj/kernel",
    "attn_norm": "input_layernorm/scale",
    "ffn_norm": "post_attention_layernorm/scale",
    "attn_q_norm": "self_attn/q_norm/scale",
    "attn_k_norm": "self_attn/k_norm/scale",
}
_TOP = {
    "token_embd": "model/embed_tokens/embedding",
    "output_norm": "model/norm/scale",
    "output": "lm_head/kernel",
}
_NAME = re.compile(r"^(?:blk\.(\d+)\.)?(\w+)\.(weight|bias)$")
_BIASES = {"attn_q", "attn_k", "attn_v"}  # Qwen2's q/k/v projections


def dequantized(tensor) -> np.ndarray:
    """A reader tensor as float32 numpy in PyTorch order (``(out, in)`` for matrices)."""
    from gguf.quants import dequantize

    return np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)


def params_from_gguf(reader, config: LlamaConfig) -> dict[str, np.ndarray]:
    """Flat ``{path: float32 array}`` Flax leaves for ``config`` from a reader."""
    flat: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        m = _NAME.match(tensor.name)
        if m is None:
            raise KeyError(f"unexpected GGUF tensor {tensor.name!r}")
        block, kind, leaf = m.groups()
        table = _BLOCK if block is not None else _TOP
        if kind not in table or (leaf == "bias" and kind not in _BIASES):
            raise KeyError(f"unexpected GGUF tensor {tensor.name!r}")
        path = table[kind] if block is None else f"model/layers_{block}/{table[kind]}"
        if leaf == "bias":
            path = path.replace("/kernel", "/bias")
        value = dequantized(tensor)
        permuted = config.model_type == "llama" and leaf == "weight"  # llama.cpp permutes llama's q/k only
        if kind == "attn_q" and permuted:
            value = unpermute_rows(value, config.num_attention_heads)
        elif kind == "attn_k" and permuted:
            value = unpermute_rows(value, config.kv_heads)
        if path.endswith("/kernel"):
            value = np.ascontiguousarray(value.T)
        flat[path] = value
    return flat


def matmul_tensor_types(path: str | os.PathLike[str]) -> dict[str, int]:
    """How many of a GGUF file's matmul weights (the ``blk.N.*`` matrices and ``output``) are
    stored in each GGML type, e.g. ``{"Q4_1": 210}``: what precision the file's weights had.
    Remembered per file version (path, size, modification time): parsing a header takes seconds."""
    stat = os.stat(path)
    return dict(_matmul_tensor_types(os.path.realpath(path), stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=8)
def _matmul_tensor_types(path: str, size: int, mtime_ns: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    for tensor in _reader(path).tensors:
        m = _NAME.match(tensor.name)
        if m is None or len(tensor.shape) != 2 or m.group(2) == "token_embd":
            continue
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return counts


def from_gguf(path: str | os.PathLike[str], *, dtype: str = "float32", **config_overrides: Any
              ) -> tuple[LlamaForCausalLM, dict[str, Any]]:
    """``(model, params)`` from a llama, qwen2 or qwen3 GGUF file (weights dequantised to float32, then cast to
    ``dtype``)."""
    reader = _reader(path)
    config = config_from_gguf(reader, dtype=dtype, **config_overrides)
    model = LlamaForCausalLM(config)
    return model, assemble_params(model, params_from_gguf(reader, config), config.dtype, str(path))
