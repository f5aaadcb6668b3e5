"""GPT-2 decoder LMs in Flax Linen (as ``transformers``' ``GPT2LMHeadModel``).

Token + learned position embeddings → ``L`` pre-LayerNorm blocks
``h += c_proj(attn(ln_1(h)))``, ``h += mlp.c_proj(gelu_new(c_fc(ln_2(h))))`` → ``ln_f`` → LM head
(the transposed ``wte`` when tied, GPT-2's default; ``lm_head/kernel`` otherwise).

Parameter paths mirror the PyTorch names: ``transformer/wte/embedding``,
``transformer/wpe/embedding``, ``transformer/h_0/attn/c_attn/kernel`` (the fused q/k/v
projection, one ``Dense`` split after the call, so LoRA's ``c_attn`` pattern adapts all three as
in Hugging Face PEFT), ``transformer/h_0/attn/c_proj``, ``transformer/h_0/mlp/c_fc``,
``transformer/h_0/mlp/c_proj``, ``transformer/h_0/ln_1/{scale,bias}``, ``transformer/ln_f``.
HF's ``Conv1D`` stores its weight as ``(in, out)``, which is already a Flax kernel: no transpose.

Call signature, KV cache and taps are those of :mod:`jpeft.models.llama` (the same helpers):
``__call__(input_ids, attention_mask=None, positions=None, cache=None, deterministic=True)``;
positions are ``cumsum(mask) - 1`` (left padding allowed) and index ``wpe`` after the
``embed.inputs`` tap (so prepended prompt tokens get positions too); ``attn.kv`` sees the keys and
values attended over (the cache when there is one); ``attn.out`` / ``ffn.out`` the ``c_proj``
outputs (after residual dropout) before the residual add; ``ffn.hidden`` the GELU activation.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jpeft.core.dropout import Dropout
from jpeft.core.transform import ModelInfo
from jpeft.models import hub
from jpeft.models.common import activation, check_matmul_dtype, config_from_hf, config_to_hf, dense_dot_general
from jpeft.models.llama import (
    Cache,
    advance_cache,
    assemble_params,
    cache_key_mask,
    causal_attention,
    first_positions,
    new_cache,
    positions_from_mask,
    write_cache,
)
from jpeft.models.taps import ATTN_KV, ATTN_OUT, EMBED_INPUTS, EMBED_POSITIONS, FFN_HIDDEN, FFN_OUT, Tap


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """The fields of a Hugging Face GPT-2 ``config.json`` that the forward pass needs."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    model_type: str = "gpt2"
    dtype: str = "float32"
    matmul_dtype: str | None = None  # operand dtype of the matmuls (float32 accumulation); None: dtype
    remat: bool = False  # rematerialise each block (nn.remat) to save activation memory

    def __post_init__(self) -> None:
        check_matmul_dtype(self.matmul_dtype)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> GPT2Config:
        model_type = hf.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ValueError(f"jpeft.models.gpt2 handles GPT-2 checkpoints, got model_type={model_type!r}")
        if hf.get("add_cross_attention"):
            raise ValueError("GPT-2 with cross-attention is not supported")
        return config_from_hf(cls, hf, overrides)




class GPT2Attention(nn.Module):
    config: GPT2Config
    layer: int

    @nn.compact
    def __call__(self, h, key_mask, start, layer_cache, deterministic: bool):
        cfg = self.config
        b, t, d = h.shape
        heads, dh = cfg.n_head, cfg.head_dim
        init = nn.initializers.normal(cfg.initializer_range)
        dot_general = dense_dot_general(cfg.matmul_dtype)
        qkv = nn.Dense(3 * d, kernel_init=init, dot_general=dot_general, name="c_attn")(h)
        q, k, v = (x.reshape(b, t, heads, dh) for x in jnp.split(qkv, 3, axis=-1))
        k, v, layer_cache = write_cache(layer_cache, k, v, start)
        s_real = k.shape[1]
        k, v, mask = Tap(ATTN_KV, self.layer, name="kv_tap")(k, v, key_mask)
        scale = 1.0 / math.sqrt(dh) if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= float(self.layer + 1)
        drop = None
        if cfg.attn_pdrop > 0.0 and not deterministic:
            drop = lambda p: Dropout(cfg.attn_pdrop)(p, deterministic=False)
        ctx = causal_attention(q, k, v, mask, start, s_real, scale, drop, cfg.matmul_dtype)
        out = nn.Dense(d, kernel_init=init, dot_general=dot_general, name="c_proj")(ctx)
        out = Dropout(cfg.resid_pdrop)(out, deterministic=deterministic)
        return Tap(ATTN_OUT, self.layer, name="out_tap")(out), layer_cache


class GPT2MLP(nn.Module):
    config: GPT2Config
    layer: int

    @nn.compact
    def __call__(self, x, deterministic: bool):
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)
        fc = nn.Dense(cfg.inner, kernel_init=init, dot_general=dense_dot_general(cfg.matmul_dtype), name="c_fc")
        hidden = activation(cfg.activation_function)(fc(x))
        hidden = Tap(FFN_HIDDEN, self.layer, name="hidden_tap")(hidden)
        out = nn.Dense(cfg.n_embd, kernel_init=init, dot_general=dense_dot_general(cfg.matmul_dtype),
                       name="c_proj")(hidden)
        out = Dropout(cfg.resid_pdrop)(out, deterministic=deterministic)
        return Tap(FFN_OUT, self.layer, name="out_tap")(out)


class GPT2Block(nn.Module):
    config: GPT2Config
    layer: int

    @nn.compact
    def __call__(self, h, key_mask, start, layer_cache, deterministic: bool):
        cfg, i = self.config, self.layer
        x = nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, name="ln_1")(h)
        a, layer_cache = GPT2Attention(cfg, i, name="attn")(x, key_mask, start, layer_cache, deterministic)
        h = h + a
        x = nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, name="ln_2")(h)
        return h + GPT2MLP(cfg, i, name="mlp")(x, deterministic), layer_cache


class GPT2Model(nn.Module):
    """The decoder stack (``transformer`` in the tree)."""

    config: GPT2Config

    def setup(self):
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)
        self.wte = nn.Embed(cfg.vocab_size, cfg.n_embd, embedding_init=init)
        self.wpe = nn.Embed(cfg.n_positions, cfg.n_embd, embedding_init=init)
        self.inputs_tap = Tap(EMBED_INPUTS)
        self.positions_tap = Tap(EMBED_POSITIONS)
        self.drop = Dropout(cfg.embd_pdrop)
        # remat: ``deterministic`` (argument 5, counting self) is static; the cache and ``start``
        # are traced. Taps and nn.Dense calls inside are intercepted as usual.
        block_cls = nn.remat(GPT2Block, static_argnums=(5,)) if cfg.remat else GPT2Block
        self.h = [block_cls(cfg, i) for i in range(cfg.n_layer)]
        self.ln_f = nn.LayerNorm(epsilon=cfg.layer_norm_epsilon)

    def __call__(self, input_ids, attention_mask=None, positions=None, cache: Cache | None = None,
                 deterministic: bool = True):
        chex.assert_rank(input_ids, 2)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        chex.assert_equal_shape([input_ids, attention_mask])
        embeds = self.wte(input_ids)
        embeds, attention_mask, _ = self.inputs_tap(embeds, attention_mask, jnp.zeros_like(input_ids))
        mask = (attention_mask > 0).astype(jnp.int32)
        offset = int(self.positions_tap(0))  # 0 unless a method shifts the numbering
        # static shapes, checked once at trace time: positions past n_positions would index wpe
        # out of range (NaN embeddings)
        length = (mask.shape[1] if cache is None else cache["mask"].shape[1]) + offset
        if length > self.config.n_positions:
            shifted = f", numbered from {offset} (a method's virtual tokens come first)" if offset else ""
            raise ValueError(
                f"GPT-2 numbers at most n_positions={self.config.n_positions} positions, but "
                + (f"the input has {length - offset} tokens (with any virtual tokens a method "
                   f"prepends){shifted}; truncate the inputs" if cache is None else
                   f"the KV cache has {length - offset} slots (prompt length + prepended virtual "
                   f"tokens + max_new_tokens in generation){shifted}; shorten the prompts or "
                   "max_new_tokens"))
        if positions is None:
            positions = positions_from_mask(mask, first_positions(offset, mask.shape[0], cache))
        elif positions.shape != mask.shape:
            raise ValueError(
                f"positions {positions.shape} do not match the (tapped) input {mask.shape}; "
                "leave positions=None when a method prepends tokens"
            )
        h = self.drop(embeds + self.wpe(positions), deterministic=deterministic)
        key_mask, start = cache_key_mask(cache, mask)
        layer_caches = cache["layers"] if cache is not None else (None,) * len(self.h)
        new_layers = []
        for block, layer_cache in zip(self.h, layer_caches):
            h, layer_cache = block(h, key_mask, start, layer_cache, deterministic)
            new_layers.append(layer_cache)
        h = self.ln_f(h)
        if cache is None:
            return h, None
        return h, advance_cache(cache, new_layers, key_mask, mask, positions)

    def attend(self, h):
        return self.wte.attend(h)


class GPT2LMHeadModel(nn.Module):
    """GPT-2 with its LM head; see the module docstring for the call signature."""

    config: GPT2Config

    def setup(self):
        cfg = self.config
        self.transformer = GPT2Model(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False,
                                    kernel_init=nn.initializers.normal(cfg.initializer_range))

    def __call__(self, input_ids, attention_mask=None, positions=None, cache: Cache | None = None,
                 deterministic: bool = True):
        h, new = self.transformer(input_ids, attention_mask, positions, cache, deterministic)
        logits = self.transformer.attend(h) if self.config.tie_word_embeddings else self.lm_head(h)
        return logits if cache is None else (logits, new)

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> Cache:
        return init_cache(self.config, batch, max_len, dtype)

    def info(self) -> ModelInfo:
        cfg = self.config
        return ModelInfo(
            family="gpt2",
            num_layers=cfg.n_layer,
            hidden_size=cfg.n_embd,
            num_heads=cfg.n_head,
            head_dim=cfg.head_dim,
            intermediate_size=cfg.inner,
            vocab_size=cfg.vocab_size,
            num_kv_heads=cfg.n_head,
            embedding_path="transformer/wte/embedding",
            head_patterns=(),
            has_bias=True,
            matmul_dtype=cfg.matmul_dtype,
        )


def init_cache(config: GPT2Config, batch: int, max_len: int, dtype: Any = None) -> Cache:
    """An empty KV cache (layout of :func:`jpeft.models.llama.new_cache`). Positions index
    ``wpe``: keep ``max_len <= n_positions``."""
    return new_cache(config.n_layer, batch, max_len, config.n_head, config.head_dim,
                     jnp.dtype(dtype or config.dtype))


def init_params(model: GPT2LMHeadModel, rng: jax.Array) -> dict[str, Any]:
    ids = jnp.ones((1, 4), jnp.int32)
    return model.init(rng, ids, jnp.ones_like(ids))["params"]


# ----------------------------------------------------------------------------------------------
# Conversion between PyTorch state dicts and the Flax tree.


def _flax_key(torch_key: str) -> tuple[str, str] | None:
    module, _, leaf = torch_key.rpartition(".")
    if not module.startswith(("transformer", "lm_head")):
        module = "transformer." + module  # a bare GPT2Model state dict
    if module.endswith(".attn") and leaf in ("bias", "masked_bias"):
        return None  # the causal-mask buffers of older transformers versions
    module = module.replace(".h.", ".h_")
    path = module.replace(".", "/")
    if leaf == "weight":
        if path.endswith(("ln_1", "ln_2", "ln_f")):
            leaf = "scale"
        elif path.endswith(("wte", "wpe")):
            leaf = "embedding"
        else:
            leaf = "kernel"
    return path, leaf


def params_from_state_dict(state_dict: dict[str, Any], config: GPT2Config | None = None
                           ) -> dict[str, np.ndarray]:
    """Flat Flax leaves from a ``GPT2LMHeadModel`` state dict. Conv1D weights are ``(in, out)``
    already; only an untied ``lm_head`` (an ``nn.Linear``) is transposed."""
    flat: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        mapped = _flax_key(key)
        if mapped is None:
            continue
        path, leaf = mapped
        if path == "lm_head":
            if config is None or config.tie_word_embeddings:
                continue
            value = np.asarray(value, dtype=np.float32).T
        flat[f"{path}/{leaf}"] = np.asarray(value, dtype=np.float32)
    return flat


def state_dict_from_params(params: dict[str, Any], config: GPT2Config | None = None
                           ) -> dict[str, np.ndarray]:
    """The inverse of :func:`params_from_state_dict`."""
    from jpeft.core.paths import flatten

    out: dict[str, np.ndarray] = {}
    for path, value in flatten(params).items():
        module, _, leaf = path.rpartition("/")
        value = np.asarray(value, dtype=np.float32)
        if leaf == "kernel":
            if module == "lm_head":
                value = value.T
            leaf = "weight"
        elif leaf in ("scale", "embedding"):
            leaf = "weight"
        name = module.replace("/h_", "/h/").replace("/", ".")
        out[f"{name}.{leaf}"] = np.ascontiguousarray(value)
    return out


def hf_config_dict(config: GPT2Config) -> dict[str, Any]:
    """A ``transformers`` ``config.json`` for ``config`` (``GPT2LMHeadModel``)."""
    return config_to_hf(config, "GPT2LMHeadModel")


def from_pretrained(name_or_path: str | os.PathLike[str], **config_overrides: Any
                    ) -> tuple[GPT2LMHeadModel, dict[str, Any]]:
    """Load a GPT-2 checkpoint folder (``config.json`` + ``*.safetensors``) as ``(model, params)``."""
    model_dir = hub.resolve_model_dir(name_or_path)
    config = GPT2Config.from_hf(hub.read_config(model_dir), **config_overrides)
    model = GPT2LMHeadModel(config)
    loaded = params_from_state_dict(hub.read_safetensors(model_dir), config)
    return model, assemble_params(model, loaded, config.dtype, str(model_dir))
