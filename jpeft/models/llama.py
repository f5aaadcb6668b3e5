"""Llama-family decoder LMs (Llama 2/3, SmolLM, TinyLlama ...) in Flax Linen.

Architecture (as ``transformers``' ``LlamaForCausalLM``): token embeddings → ``L`` pre-norm
blocks ``h += o_proj(attn(RMSNorm(h)))``, ``h += down(silu(gate(x)) · up(x))`` with
``x = RMSNorm(h)`` → final RMSNorm → ``lm_head`` (or the transposed embedding when tied).
Attention is grouped-query (``num_key_value_heads`` key/value heads shared by
``num_attention_heads / num_key_value_heads`` query heads each), with rotary position embeddings
(``rope_theta``; the ``default`` and ``llama3`` rope types).

Parameter paths mirror the PyTorch names with ``.`` → ``/`` and ``layers.N`` → ``layers_N``:
``model/embed_tokens/embedding``, ``model/layers_0/self_attn/q_proj/kernel``,
``model/layers_0/mlp/gate_proj/kernel``, ``model/layers_0/input_layernorm/scale``,
``model/norm/scale``, ``lm_head/kernel`` (absent when tied). So Hugging Face PEFT patterns such as
``(q_proj|v_proj)$`` work for LoRA unchanged.

Call: ``model.apply({"params": p}, input_ids (B,T), attention_mask (B,T), positions=None,
cache=None, deterministic=True)`` → logits ``(B,T',V)`` (``T' = T`` unless a tap prepends tokens),
or ``(logits, new_cache)`` when a cache is given. Padding may be on the left: positions are
``cumsum(mask) - 1`` (1 on padding), as ``transformers`` computes them for generation.

KV cache (:func:`init_cache`): a pytree ``{"layers": ({"key", "value"} (B,M,Hkv,Dh) per layer),
"mask": (B,M), "index": (), "positions": (B,)}`` with fixed shapes, updated with
``lax.dynamic_update_slice``, so prefill and one-token decode steps jit once each. ``mask`` is the
key mask of the cached slots (the caller passes only the new tokens' mask), ``index`` the next
free slot, ``positions`` each row's next position id. Writing beyond ``M`` slots is not checked
(under ``jit`` it cannot be): size the cache for prompt + generated tokens (+ tokens a prompt
method prepends).

Taps (:mod:`jpeft.models.taps`): ``embed.inputs`` on the token embeddings (token types are
zeros), ``attn.kv`` on the keys/values the attention actually uses (after RoPE, the whole cache
when there is one) with their key mask — keys a tap prepends are visible to every query (the
causal mask covers the last ``S_real`` keys, the extra columns are ones) — ``attn.out`` on
``o_proj``'s output, ``ffn.hidden`` on ``silu(gate) · up`` (``down_proj``'s input) and ``ffn.out``
on ``down_proj``'s output, each before its residual add.

The module-level helpers (:func:`positions_from_mask`, :func:`rope_tables`,
:func:`causal_attention`, :func:`write_cache`, :func:`new_cache`) are shared with
:mod:`jpeft.models.gpt2`.
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
from jax import lax

from jpeft.core.dropout import Dropout
from jpeft.core.transform import ModelInfo
from jpeft.models import hub
from jpeft.models.common import activation, check_matmul_dtype, check_overrides, config_to_hf, dense_dot_general, matmul_einsum
from jpeft.models.taps import ATTN_KV, ATTN_OUT, EMBED_INPUTS, EMBED_POSITIONS, FFN_HIDDEN, FFN_OUT, Tap

Array = jax.Array
Cache = dict[str, Any]

ROPE_TYPES = ("default", "llama3")
# model types read as this family: the PyTorch class and the config fields the type implies
ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaForCausalLM", {}),
    "mistral": ("MistralForCausalLM", {}),
    "qwen2": ("Qwen2ForCausalLM", {"qkv_bias": True}),
    "qwen3": ("Qwen3ForCausalLM", {"qk_norm": True}),
}
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The fields of a Hugging Face Llama ``config.json`` that the forward pass needs."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    # llama3 rope scaling (rope_type == "llama3")
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qkv_bias: bool = False  # Qwen2: biases on q_proj, k_proj and v_proj only
    qk_norm: bool = False  # Qwen3: RMSNorm of every query and key head (over head_dim) before RoPE
    sliding_window: int | None = None  # a query sees only the last sliding_window positions
    layer_types: tuple[str, ...] | None = None  # per layer: "full_attention" / "sliding_attention"
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    initializer_range: float = 0.02
    pad_token_id: int | None = None
    model_type: str = "llama"
    dtype: str = "float32"
    matmul_dtype: str | None = None  # operand dtype of the matmuls (float32 accumulation); None: dtype
    remat: bool = False  # rematerialise each decoder layer (nn.remat) to save activation memory

    def __post_init__(self) -> None:
        check_matmul_dtype(self.matmul_dtype)
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type {self.rope_type!r} is not supported; supported: {list(ROPE_TYPES)}")
        if self.num_attention_heads % self.kv_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.kv_heads}"
            )
        if self.model_type not in ARCHITECTURES:
            raise ValueError(f"model_type {self.model_type!r} is not of the Llama family; "
                             f"supported: {sorted(ARCHITECTURES)}")
        if self.sliding_window is not None and (isinstance(self.sliding_window, bool)
                                                or not isinstance(self.sliding_window, int)
                                                or self.sliding_window < 1):
            raise ValueError(f"sliding_window must be an integer >= 1 or None, got {self.sliding_window!r}")
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
            if (len(self.layer_types) != self.num_hidden_layers
                    or any(t not in LAYER_TYPES for t in self.layer_types)):
                raise ValueError(f"layer_types must name {self.num_hidden_layers} layers, each one of "
                                 f"{LAYER_TYPES}, got {self.layer_types!r}")

    def window(self, layer: int) -> int | None:
        """Layer ``layer``'s attention window (``None``: the whole causal context)."""
        if self.sliding_window is None:
            return None
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> LlamaConfig:
        """The config of a ``config.json`` of model type llama, mistral, qwen2 or qwen3."""
        model_type = hf.get("model_type", "llama")
        if model_type not in ARCHITECTURES:
            raise ValueError(f"jpeft.models.llama handles {sorted(ARCHITECTURES)} checkpoints, got "
                             f"model_type={model_type!r}")
        derived = {"sliding_window", "layer_types", "qkv_bias", "qk_norm"}  # set by model type below
        names = {f.name for f in dataclasses.fields(cls)} - {"dtype"} - derived - {
            f.name for f in dataclasses.fields(cls) if f.name.startswith("rope_")}
        kwargs = {k: v for k, v in hf.items() if k in names}
        kwargs.update(ARCHITECTURES[model_type][1])
        if model_type == "mistral":  # every layer slides when the config has a window
            kwargs["sliding_window"] = hf.get("sliding_window")
        elif model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
            window, layers = hf.get("sliding_window"), int(hf.get("num_hidden_layers", 32))
            kwargs["sliding_window"] = window
            kwargs["layer_types"] = tuple(hf.get("layer_types") or (
                "sliding_attention" if window is not None and i >= int(hf.get("max_window_layers", 0))
                else "full_attention" for i in range(layers)))
        # transformers >= 5: rope_parameters = {"rope_type", "rope_theta", ...}; 4.x: rope_theta
        # at the top level and rope_scaling = None | {"rope_type" (or "type"), "factor", ...}.
        rope = dict(hf.get("rope_scaling") or {})
        rope.update(hf.get("rope_parameters") or {})
        theta = rope.get("rope_theta", hf.get("rope_theta"))
        if theta is not None:
            kwargs["rope_theta"] = float(theta)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        kwargs["rope_type"] = rope_type
        if rope_type == "llama3":
            kwargs.update(
                rope_factor=float(rope["factor"]),
                rope_low_freq_factor=float(rope["low_freq_factor"]),
                rope_high_freq_factor=float(rope["high_freq_factor"]),
                rope_original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
            )
        check_overrides(cls, overrides)
        kwargs.update(overrides)
        return cls(**kwargs)


# ----------------------------------------------------------------------------------------------
# Shared decoder helpers (also used by jpeft.models.gpt2)


def positions_from_mask(mask: Array, offset: Array | None = None) -> Array:
    """Position ids ``offset + cumsum(mask) - 1`` for real tokens, 1 for padding (as
    ``transformers``' generation); ``offset (B,)`` is each row's count of earlier real tokens."""
    real = (mask > 0).astype(jnp.int32)
    pos = jnp.cumsum(real, axis=1) - 1
    if offset is not None:
        pos = pos + offset.astype(jnp.int32)[:, None]
    return jnp.where(real > 0, pos, 1)


def first_positions(offset: int, batch: int, cache: Cache | None) -> Array:
    """Each row's first position id ``(B,)``: ``offset`` (what the ``embed.positions`` tap
    returned, 0 unless a method numbers the tokens after its virtual ones) for a fresh input, the
    cache's next position once the cache holds tokens."""
    start = jnp.full((batch,), offset, jnp.int32)
    if cache is None:
        return start
    return jnp.where(cache["index"] == 0, start, cache["positions"])


def inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """RoPE's ``θ^(-2i/Dh)`` (float32), with llama3 frequency scaling when configured."""
    dim = config.dim_per_head
    inv = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    inv = inv.astype(np.float32)
    if config.rope_type == "llama3":
        factor = config.rope_factor
        low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
        old_len = config.rope_original_max_position_embeddings
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def rope_tables(positions: Array, inv_freq: np.ndarray) -> tuple[Array, Array]:
    """``cos, sin (B,T,Dh)`` for ``positions (B,T)`` (float32, halves repeated as in HF)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate ``x (B,T,H,Dh)`` by the tables of :func:`rope_tables` (``rotate_half`` layout)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return (x.astype(jnp.float32) * c + rotated.astype(jnp.float32) * s).astype(x.dtype)


def new_cache(num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int,
              dtype: Any = jnp.float32) -> Cache:
    """An empty KV cache (see the module docstring for the layout)."""
    zeros = lambda: jnp.zeros((batch, max_len, kv_heads, head_dim), dtype)
    return {
        "layers": tuple({"key": zeros(), "value": zeros()} for _ in range(num_layers)),
        "mask": jnp.zeros((batch, max_len), jnp.int32),
        "index": jnp.zeros((), jnp.int32),
        "positions": jnp.zeros((batch,), jnp.int32),
    }


def write_cache(layer_cache: dict[str, Array] | None, key: Array, value: Array,
                start: Array | int) -> tuple[Array, Array, dict[str, Array] | None]:
    """Write ``key, value (B,T,Hkv,Dh)`` at slot ``start``; returns the keys/values to attend
    over (the whole cache, or the inputs when there is no cache) and the updated layer cache."""
    if layer_cache is None:
        return key, value, None
    k = lax.dynamic_update_slice(layer_cache["key"], key.astype(layer_cache["key"].dtype), (0, start, 0, 0))
    v = lax.dynamic_update_slice(layer_cache["value"], value.astype(layer_cache["value"].dtype),
                                 (0, start, 0, 0))
    return k, v, {"key": k, "value": v}


def cache_key_mask(cache: Cache | None, mask: Array) -> tuple[Array, Array | int]:
    """The key mask ``(B,S_real)`` over which the layers attend, and the first query's slot."""
    if cache is None:
        return mask, 0
    start = cache["index"]
    full = lax.dynamic_update_slice(cache["mask"], mask.astype(cache["mask"].dtype), (0, start))
    return full, start


def advance_cache(cache: Cache, layers: list[dict[str, Array]], key_mask: Array, mask: Array,
                  positions: Array) -> Cache:
    """The cache after a step that wrote ``mask.shape[1]`` slots."""
    real = mask > 0
    next_pos = jnp.max(jnp.where(real, positions + 1, cache["positions"][:, None]), axis=1)
    return {
        "layers": tuple(layers),
        "mask": key_mask,
        "index": cache["index"] + mask.shape[1],
        "positions": next_pos.astype(jnp.int32),
    }


def causal_attention(q: Array, k: Array, v: Array, key_mask: Array, start: Array | int, s_real: int,
                     scale: float, dropout=None, matmul_dtype: str | None = None,
                     window: int | None = None) -> Array:
    """Grouped-query causal attention.

    ``q (B,T,H,Dh)``, ``k, v (B,S,Hkv,Dh)`` with ``H`` a multiple of ``Hkv`` (query head ``h``
    uses key head ``h // (H/Hkv)``), ``key_mask (B,S)``. The last ``s_real`` keys sit in slots
    ``0 … s_real-1``; query ``t`` sits in slot ``start + t`` and sees the slots ``≤`` its own
    (with a ``window``: only the slots ``> start + t - window``, as ``transformers``' sliding
    window). The first ``S - s_real`` keys (prepended by a tap) are visible to every query.
    Softmax in float32. Returns ``(B,T,H·Dh)``.
    """
    b, t, h, dh = q.shape
    s, hkv = k.shape[1], k.shape[2]
    chex.assert_shape(key_mask, (b, s))
    extra = s - s_real
    if extra < 0:
        raise ValueError(f"a tap removed keys: {s} keys, expected at least {s_real}")
    q_slots = start + jnp.arange(t)
    causal = jnp.arange(s_real)[None, :] <= q_slots[:, None]  # (T, S_real)
    if window is not None:
        causal = causal & (jnp.arange(s_real)[None, :] > q_slots[:, None] - window)
    if extra:
        causal = jnp.concatenate([jnp.ones((t, extra), bool), causal], axis=1)
    allowed = causal[None, :, :] & (key_mask[:, None, :] > 0)  # (B,T,S)
    qg = q.reshape(b, t, hkv, h // hkv, dh)
    scores = matmul_einsum("bthgd,bshd->bhgts", qg, k, matmul_dtype).astype(jnp.float32) * scale
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    if dropout is not None:
        probs = dropout(probs)
    ctx = matmul_einsum("bhgts,bshd->bthgd", probs.astype(v.dtype), v, matmul_dtype)
    return ctx.reshape(b, t, h * dh)


# ----------------------------------------------------------------------------------------------
# Modules




class RMSNorm(nn.Module):
    """``scale · x / sqrt(mean(x²) + eps)``, computed in float32 (as ``LlamaRMSNorm``)."""

    eps: float

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        normed = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale * normed.astype(x.dtype)


class LlamaAttention(nn.Module):
    config: LlamaConfig
    layer: int

    @nn.compact
    def __call__(self, h, cos, sin, key_mask, start, layer_cache, deterministic: bool):
        cfg = self.config
        b, t, _ = h.shape
        heads, kv, dh = cfg.num_attention_heads, cfg.kv_heads, cfg.dim_per_head
        init = nn.initializers.normal(cfg.initializer_range)
        dense = lambda n, name, bias: nn.Dense(n, use_bias=bias, kernel_init=init,
                                               dot_general=dense_dot_general(cfg.matmul_dtype), name=name)
        qkv_bias = cfg.attention_bias or cfg.qkv_bias
        q = dense(heads * dh, "q_proj", qkv_bias)(h).reshape(b, t, heads, dh)
        k = dense(kv * dh, "k_proj", qkv_bias)(h).reshape(b, t, kv, dh)
        v = dense(kv * dh, "v_proj", qkv_bias)(h).reshape(b, t, kv, dh)
        if cfg.qk_norm:
            q = RMSNorm(cfg.rms_norm_eps, name="q_norm")(q)
            k = RMSNorm(cfg.rms_norm_eps, name="k_norm")(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v, layer_cache = write_cache(layer_cache, k, v, start)
        s_real = k.shape[1]
        k, v, mask = Tap(ATTN_KV, self.layer, name="kv_tap")(k, v, key_mask)
        drop = None
        if cfg.attention_dropout > 0.0 and not deterministic:
            drop = lambda p: Dropout(cfg.attention_dropout)(p, deterministic=False)
        ctx = causal_attention(q, k, v, mask, start, s_real, 1.0 / math.sqrt(dh), drop, cfg.matmul_dtype,
                               cfg.window(self.layer))
        out = dense(cfg.hidden_size, "o_proj", cfg.attention_bias)(ctx)
        return Tap(ATTN_OUT, self.layer, name="out_tap")(out), layer_cache


class LlamaMLP(nn.Module):
    config: LlamaConfig
    layer: int

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)
        dense = lambda n, name: nn.Dense(n, use_bias=cfg.mlp_bias, kernel_init=init,
                                         dot_general=dense_dot_general(cfg.matmul_dtype), name=name)
        gate = dense(cfg.intermediate_size, "gate_proj")(x)
        up = dense(cfg.intermediate_size, "up_proj")(x)
        hidden = Tap(FFN_HIDDEN, self.layer, name="hidden_tap")(activation(cfg.hidden_act)(gate) * up)
        out = dense(cfg.hidden_size, "down_proj")(hidden)
        return Tap(FFN_OUT, self.layer, name="out_tap")(out)


class LlamaDecoderLayer(nn.Module):
    config: LlamaConfig
    layer: int

    @nn.compact
    def __call__(self, h, cos, sin, key_mask, start, layer_cache, deterministic: bool):
        cfg, i = self.config, self.layer
        x = RMSNorm(cfg.rms_norm_eps, name="input_layernorm")(h)
        a, layer_cache = LlamaAttention(cfg, i, name="self_attn")(
            x, cos, sin, key_mask, start, layer_cache, deterministic)
        h = h + a
        x = RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm")(h)
        return h + LlamaMLP(cfg, i, name="mlp")(x), layer_cache


class LlamaModel(nn.Module):
    """The decoder stack (``model`` in the tree): embeddings, layers, final norm."""

    config: LlamaConfig

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size,
                                     embedding_init=nn.initializers.normal(cfg.initializer_range))
        self.inputs_tap = Tap(EMBED_INPUTS)
        self.positions_tap = Tap(EMBED_POSITIONS)
        # remat: ``deterministic`` (argument 7, counting self) is static; the cache and ``start``
        # are traced. Taps and nn.Dense calls inside are intercepted as usual.
        layer_cls = nn.remat(LlamaDecoderLayer, static_argnums=(7,)) if cfg.remat else LlamaDecoderLayer
        self.layers = [layer_cls(cfg, i) for i in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps)

    def __call__(self, input_ids, attention_mask=None, positions=None, cache: Cache | None = None,
                 deterministic: bool = True):
        """Final hidden states ``(B,T',D)`` and the updated cache (``None`` without one)."""
        chex.assert_rank(input_ids, 2)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        chex.assert_equal_shape([input_ids, attention_mask])
        embeds = self.embed_tokens(input_ids)
        embeds, attention_mask, _ = self.inputs_tap(embeds, attention_mask, jnp.zeros_like(input_ids))
        mask = (attention_mask > 0).astype(jnp.int32)
        offset = int(self.positions_tap(0))  # 0 unless a method shifts the numbering
        if positions is None:
            positions = positions_from_mask(mask, first_positions(offset, mask.shape[0], cache))
        elif positions.shape != mask.shape:
            raise ValueError(
                f"positions {positions.shape} do not match the (tapped) input {mask.shape}; "
                "leave positions=None when a method prepends tokens"
            )
        cos, sin = rope_tables(positions, inverse_frequencies(self.config))
        key_mask, start = cache_key_mask(cache, mask)
        layer_caches = cache["layers"] if cache is not None else (None,) * len(self.layers)
        h, new_layers = embeds, []
        for layer, layer_cache in zip(self.layers, layer_caches):
            h, layer_cache = layer(h, cos, sin, key_mask, start, layer_cache, deterministic)
            new_layers.append(layer_cache)
        h = self.norm(h)
        if cache is None:
            return h, None
        return h, advance_cache(cache, new_layers, key_mask, mask, positions)

    def attend(self, h):
        return self.embed_tokens.attend(h)


class LlamaForCausalLM(nn.Module):
    """A Llama decoder with its LM head; see the module docstring for the call signature."""

    config: LlamaConfig

    def setup(self):
        cfg = self.config
        self.model = LlamaModel(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False,
                                    kernel_init=nn.initializers.normal(cfg.initializer_range))

    def __call__(self, input_ids, attention_mask=None, positions=None, cache: Cache | None = None,
                 deterministic: bool = True):
        h, new = self.model(input_ids, attention_mask, positions, cache, deterministic)
        if self.config.tie_word_embeddings:
            logits = self.model.attend(h)
        else:
            logits = self.lm_head(h)
        return logits if cache is None else (logits, new)

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> Cache:
        return init_cache(self.config, batch, max_len, dtype)

    def info(self) -> ModelInfo:
        cfg = self.config
        return ModelInfo(
            family="llama",
            num_layers=cfg.num_hidden_layers,
            hidden_size=cfg.hidden_size,
            num_heads=cfg.num_attention_heads,
            head_dim=cfg.dim_per_head,
            intermediate_size=cfg.intermediate_size,
            vocab_size=cfg.vocab_size,
            num_kv_heads=cfg.kv_heads,
            embedding_path="model/embed_tokens/embedding",
            head_patterns=(),
            has_bias=cfg.attention_bias or cfg.qkv_bias or cfg.mlp_bias,
            matmul_dtype=cfg.matmul_dtype,
        )


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype: Any = None) -> Cache:
    """An empty KV cache for ``batch`` rows of up to ``max_len`` tokens (``dtype``: the
    config's by default)."""
    return new_cache(config.num_hidden_layers, batch, max_len, config.kv_heads, config.dim_per_head,
                     jnp.dtype(dtype or config.dtype))


def init_params(model: LlamaForCausalLM, rng: jax.Array) -> dict[str, Any]:
    """Random parameters (the ``params`` collection) for ``model``."""
    ids = jnp.ones((1, 4), jnp.int32)
    return model.init(rng, ids, jnp.ones_like(ids))["params"]


# ----------------------------------------------------------------------------------------------
# Conversion between PyTorch state dicts and the Flax tree.


def _flax_key(torch_key: str) -> tuple[str, str] | None:
    if "rotary_emb" in torch_key:
        return None
    module, _, leaf = torch_key.rpartition(".")
    module = module.replace("layers.", "layers_")
    path = module.replace(".", "/")
    if leaf == "weight":
        if path.endswith("norm"):
            leaf = "scale"
        elif path.endswith("embed_tokens"):
            leaf = "embedding"
        else:
            leaf = "kernel"
    return path, leaf


def params_from_state_dict(state_dict: dict[str, Any], config: LlamaConfig | None = None
                           ) -> dict[str, np.ndarray]:
    """A flat ``{path: array}`` dict of Flax leaves from a ``LlamaForCausalLM`` state dict
    (``lm_head.weight`` is dropped when ``config`` ties the embeddings)."""
    flat: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        mapped = _flax_key(key)
        if mapped is None:
            continue
        path, leaf = mapped
        if path == "lm_head" and config is not None and config.tie_word_embeddings:
            continue
        value = np.asarray(value, dtype=np.float32)
        if leaf == "kernel":
            value = value.T
        flat[f"{path}/{leaf}"] = value
    return flat


def state_dict_from_params(params: dict[str, Any], config: LlamaConfig | None = None
                           ) -> dict[str, np.ndarray]:
    """The inverse of :func:`params_from_state_dict` (tied checkpoints carry no ``lm_head``)."""
    from jpeft.core.paths import flatten

    out: dict[str, np.ndarray] = {}
    for path, value in flatten(params).items():
        module, _, leaf = path.rpartition("/")
        value = np.asarray(value, dtype=np.float32)
        if leaf == "kernel":
            value, leaf = value.T, "weight"
        elif leaf in ("scale", "embedding"):
            leaf = "weight"
        name = module.replace("layers_", "layers.").replace("/", ".")
        out[f"{name}.{leaf}"] = np.ascontiguousarray(value)
    return out


def assemble_params(model: nn.Module, loaded: dict[str, np.ndarray], dtype: str, where: str
                    ) -> dict[str, Any]:
    """Check ``loaded`` (flat) against the model's fresh layout and build the param tree."""
    from jpeft.core.paths import flatten, unflatten

    fresh = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    fresh = flatten(fresh)
    missing = sorted(set(fresh) - set(loaded))
    if missing:
        raise KeyError(f"{where}: checkpoint lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    params = {}
    for path, spec in fresh.items():
        value = loaded[path]
        if tuple(value.shape) != tuple(spec.shape):
            raise ValueError(f"{where}: {path}: checkpoint shape {value.shape} != model shape {spec.shape}")
        params[path] = jnp.asarray(value, dtype=jnp.dtype(dtype))
    return unflatten(params)


def hf_config_dict(config: LlamaConfig) -> dict[str, Any]:
    """A ``transformers`` ``config.json`` for ``config`` (``LlamaForCausalLM``); RoPE as
    ``rope_theta`` and ``rope_scaling`` (what :meth:`LlamaConfig.from_hf` reads back)."""
    architecture, implied = ARCHITECTURES[config.model_type]
    for field in ("qkv_bias", "qk_norm"):
        if getattr(config, field) != implied.get(field, False):
            raise ValueError(f"a {config.model_type} checkpoint cannot hold {field}="
                             f"{getattr(config, field)} (model types: {ARCHITECTURES})")
    if config.model_type == "llama" and config.sliding_window is not None:
        raise ValueError("a llama checkpoint has no sliding window; use model_type='mistral'")
    if config.model_type == "mistral" and config.layer_types is not None:
        raise ValueError("a mistral checkpoint slides in every layer; layer_types needs qwen2/qwen3")
    out = config_to_hf(config, architecture)
    for field in ("qkv_bias", "qk_norm", "layer_types", "sliding_window"):
        out.pop(field)
    if out["head_dim"] is None:  # transformers' Qwen2 reads a null head_dim as given
        out.pop("head_dim")
    if config.model_type == "mistral":
        out["sliding_window"] = config.sliding_window
    elif config.model_type in ("qwen2", "qwen3"):
        sliding = config.sliding_window is not None
        out.update(use_sliding_window=sliding, sliding_window=config.sliding_window,
                   max_window_layers=config.num_hidden_layers,
                   layer_types=list(config.layer_types or
                                    ("sliding_attention" if sliding else "full_attention",) * config.num_hidden_layers))
    rope = {k: out.pop(k) for k in list(out) if k.startswith("rope_")}
    scaling = None
    if rope["rope_type"] == "llama3":
        scaling = {"rope_type": "llama3", "factor": rope["rope_factor"],
                   "low_freq_factor": rope["rope_low_freq_factor"],
                   "high_freq_factor": rope["rope_high_freq_factor"],
                   "original_max_position_embeddings": rope["rope_original_max_position_embeddings"]}
    out.update(rope_theta=rope["rope_theta"], rope_scaling=scaling)
    return out


def from_pretrained(name_or_path: str | os.PathLike[str], **config_overrides: Any
                    ) -> tuple[LlamaForCausalLM, dict[str, Any]]:
    """Load a Llama, Mistral, Qwen2 or Qwen3 checkpoint folder (``config.json`` +
    ``*.safetensors``) as ``(model, params)``."""
    model_dir = hub.resolve_model_dir(name_or_path)
    config = LlamaConfig.from_hf(hub.read_config(model_dir), **config_overrides)
    model = LlamaForCausalLM(config)
    loaded = params_from_state_dict(hub.read_safetensors(model_dir), config)
    return model, assemble_params(model, loaded, config.dtype, str(model_dir))
