"""BERT-family encoders (BERT, MiniLM, RoBERTa) in Flax Linen, loaded from Hugging Face folders.

Parameter paths mirror the PyTorch module names (``encoder/layer_3/attention/self/query/kernel``
for ``bert.encoder.layer.3.attention.self.query.weight``), so patterns written for Hugging Face
PEFT (``query``, ``value``, ``attention.output.dense``) carry over with ``.`` → ``/``.

Heads: ``classification`` (``num_labels`` logits; regression when ``num_labels == 1``) and
``none`` (the encoder's sequence output). The model exposes the taps of :mod:`jpeft.models.taps`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jpeft.core.dropout import Dropout, dropout
from jpeft.core.transform import ModelInfo
from jpeft.models import hub
from jpeft.models.common import (
    activation,
    check_matmul_dtype,
    config_from_hf,
    dense_dot_general,
    matmul_einsum,
)
from jpeft.models.taps import ATTN_KV, ATTN_OUT, EMBED_INPUTS, EMBED_POSITIONS, FFN_HIDDEN, FFN_OUT, Tap

Array = jax.Array


HEADS = ("classification", "none")
# Batch rows per attention block (attention_in_blocks); None: the whole batch in one block.
# Measured in benchmarks/results/attention_blocks.md and not the default: blocks of 8 rows sped
# the MiniLM LoRA step up and slowed full fine-tuning down on an AMD EPYC.
ATTENTION_BLOCK_ROWS: int | None = None


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The fields of a Hugging Face BERT/RoBERTa ``config.json`` that the forward pass needs."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    model_type: str = "bert"
    classifier_dropout: float | None = None
    num_labels: int = 2
    head: str = "classification"  # or "none" (HEADS)
    dtype: str = "float32"
    matmul_dtype: str | None = None
    remat: bool = False

    def __post_init__(self) -> None:
        check_matmul_dtype(self.matmul_dtype)
        if self.head not in HEADS:
            raise ValueError(f"head={self.head!r}; choose one of {HEADS} ('classification': a task "
                             "head on the first token, 'none': the sequence output)")

    @property
    def compute_dtype(self) -> jnp.dtype:
        """The activation dtype of the encoder (``dtype``); the task head computes in float32."""
        return jnp.dtype(self.dtype)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def dot_general(self):
        """The encoder's ``nn.Dense`` matmul (:func:`dense_dot_general` of ``matmul_dtype``)."""
        return dense_dot_general(self.matmul_dtype)

    @property
    def is_roberta(self) -> bool:
        return self.model_type in ("roberta", "xlm-roberta", "camembert")

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> BertConfig:
        model_type = hf.get("model_type", "bert")
        if model_type not in ("bert", "roberta", "xlm-roberta", "camembert"):
            raise ValueError(
                f"jpeft.models.bert handles BERT/RoBERTa checkpoints, got model_type={model_type!r}"
            )
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        return config_from_hf(cls, hf, overrides)




class Embeddings(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids, deterministic: bool):
        cfg = self.config
        init = nn.initializers.normal(0.02)
        words = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, dtype=cfg.compute_dtype,
                         name="word_embeddings")(
            input_ids
        )
        words, attention_mask, token_type_ids = Tap(EMBED_INPUTS, name="inputs_tap")(
            words, attention_mask, token_type_ids
        )
        seq_len = words.shape[1]
        offset = int(Tap(EMBED_POSITIONS, name="positions_tap")(0))  # 0 unless a method shifts it
        limit = cfg.max_position_embeddings - (cfg.pad_token_id + 1 if cfg.is_roberta else 0)
        if seq_len + offset > limit:  # static: checked once at trace time
            shifted = f" numbered from {offset} (a method's virtual tokens come first)" if offset else ""
            raise ValueError(
                f"the input has {seq_len} tokens{shifted} (with any virtual tokens a method "
                f"prepends) but max_position_embeddings={cfg.max_position_embeddings} numbers at "
                f"most {limit}"
                f"{' (RoBERTa numbers positions from pad_token_id + 1)' if cfg.is_roberta else ''}; "
                "truncate the inputs (tokenizer max_length) or use fewer virtual tokens")
        if cfg.is_roberta:
            # RoBERTa numbers real tokens from padding_idx + 1 (+ offset) and gives padding padding_idx.
            real = (attention_mask > 0).astype(jnp.int32)  # masks may come as bool/float
            positions = (jnp.cumsum(real, axis=1) + offset) * real + cfg.pad_token_id
        else:
            positions = jnp.broadcast_to(jnp.arange(seq_len) + offset, words.shape[:2])
        pos = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, embedding_init=init,
                       dtype=cfg.compute_dtype, name="position_embeddings")(positions)
        types = nn.Embed(cfg.type_vocab_size, cfg.hidden_size, embedding_init=init,
                         dtype=cfg.compute_dtype, name="token_type_embeddings")(token_type_ids)
        h = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.compute_dtype, name="LayerNorm")(words + pos + types)
        h = Dropout(cfg.hidden_dropout_prob)(h, deterministic=deterministic)
        return h, attention_mask


def attention_block(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, key: jax.Array | None,
                    rate: float, matmul_dtype: str | None, start: int = 0, batch: int | None = None) -> jax.Array:
    """``dropout(softmax(q·kᵀ/√d + bias)) · v`` for heads-major ``q, k, v`` (B, H, T, d) and an
    additive key ``bias`` (B, T); rows ``start:start+B`` of a batch of ``batch`` rows (the mask
    of dropout with ``key`` is that block of the whole batch's)."""
    dh = q.shape[-1]
    scores = matmul_einsum("bhqd,bhkd->bhqk", q, k, matmul_dtype).astype(jnp.float32)
    scores = scores / np.sqrt(dh).astype(np.float32) + bias[:, None, None, :]
    probs = jax.nn.softmax(scores, axis=-1)
    if key is not None:
        full = (q.shape[0] if batch is None else batch, *probs.shape[1:])
        probs = dropout(key, probs, rate, start=(start, 0, 0, 0), full_shape=full)
    return matmul_einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v, matmul_dtype)


def attention_in_blocks(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, key: jax.Array | None,
                        rate: float, matmul_dtype: str | None, rows: int | None = None) -> jax.Array:
    """:func:`attention_block` over blocks of ``rows`` batch rows, concatenated: the same numbers
    as one block (dropout included), computed as independent batched matmuls over
    (rows·H) × T × T scores instead of (B·H) × T × T. ``rows=None``: :data:`ATTENTION_BLOCK_ROWS`
    (``None``, the default: one block; ``python -m benchmarks.attention_blocks`` times the sizes)."""
    b = q.shape[0]
    rows = rows or ATTENTION_BLOCK_ROWS or b
    if rows >= b:
        return attention_block(q, k, v, bias, key, rate, matmul_dtype)
    return jnp.concatenate([
        attention_block(q[i:i + rows], k[i:i + rows], v[i:i + rows], bias[i:i + rows], key, rate,
                        matmul_dtype, start=i, batch=b)
        for i in range(0, b, rows)])


class SelfAttention(nn.Module):
    config: BertConfig
    layer: int

    @nn.compact
    def __call__(self, h, mask, deterministic: bool):
        cfg = self.config
        b, t, _ = h.shape
        heads, dh = cfg.num_attention_heads, cfg.head_dim
        dense = lambda name: nn.Dense(cfg.hidden_size, kernel_init=nn.initializers.normal(0.02),
                                     dtype=cfg.compute_dtype, dot_general=cfg.dot_general, name=name)
        q = dense("query")(h).reshape(b, t, heads, dh)
        k = dense("key")(h).reshape(b, t, heads, dh)
        v = dense("value")(h).reshape(b, t, heads, dh)
        k, v, mask = Tap(ATTN_KV, self.layer, name="kv_tap")(k, v, mask)
        # Heads-major (B, H, T, dh) operands, so that both products are plain batched matmuls that
        # contract their operands' last or row axes: on XLA:CPU this layout and an additive mask
        # bias (instead of a select) run the attention block 1.2-1.6x faster, forward and backward.
        q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
        # Softmax in float32 whatever the compute dtype; masked keys get finfo.min added, as HF BERT.
        bias = jnp.where(mask > 0, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
        rate = cfg.attention_probs_dropout_prob
        key = Dropout(rate).key(deterministic)
        ctx = attention_in_blocks(q, k, v, bias, key, rate, cfg.matmul_dtype)
        return ctx.transpose(0, 2, 1, 3).reshape(b, t, heads * dh)


class ResidualOutput(nn.Module):
    """``LayerNorm(tap(dropout(dense(x))) + residual)``: BERT's attention and FFN outputs."""

    config: BertConfig
    layer: int
    tap_kind: str

    @nn.compact
    def __call__(self, x, residual, deterministic: bool):
        cfg = self.config
        x = nn.Dense(cfg.hidden_size, kernel_init=nn.initializers.normal(0.02), dtype=cfg.compute_dtype,
                     dot_general=cfg.dot_general, name="dense")(x)
        x = Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)
        x = Tap(self.tap_kind, self.layer, name="tap")(x)
        return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.compute_dtype, name="LayerNorm")(x + residual)


class Attention(nn.Module):
    config: BertConfig
    layer: int

    @nn.compact
    def __call__(self, h, mask, deterministic: bool):
        ctx = SelfAttention(self.config, self.layer, name="self")(h, mask, deterministic)
        return ResidualOutput(self.config, self.layer, ATTN_OUT, name="output")(ctx, h, deterministic)


class Intermediate(nn.Module):
    config: BertConfig
    layer: int

    @nn.compact
    def __call__(self, h):
        cfg = self.config
        x = nn.Dense(cfg.intermediate_size, kernel_init=nn.initializers.normal(0.02),
                     dtype=cfg.compute_dtype, dot_general=cfg.dot_general, name="dense")(h)
        return Tap(FFN_HIDDEN, self.layer, name="tap")(activation(cfg.hidden_act)(x))


class Layer(nn.Module):
    config: BertConfig
    layer: int

    @nn.compact
    def __call__(self, h, mask, deterministic: bool):
        cfg, i = self.config, self.layer
        h = Attention(cfg, i, name="attention")(h, mask, deterministic)
        ffn = Intermediate(cfg, i, name="intermediate")(h)
        return ResidualOutput(cfg, i, FFN_OUT, name="output")(ffn, h, deterministic)


class Encoder(nn.Module):
    """The layer stack; with ``config.remat`` each layer is rematerialised (``nn.remat``): its
    activations are recomputed in the backward pass instead of stored. ``deterministic``
    (argument 3, counting ``self``) is static; taps and ``nn.Dense`` calls inside a
    rematerialised layer are intercepted as usual (the interceptors run while it is traced)."""

    config: BertConfig

    @nn.compact
    def __call__(self, h, mask, deterministic: bool):
        layer_cls = nn.remat(Layer, static_argnums=(3,)) if self.config.remat else Layer
        for i in range(self.config.num_hidden_layers):
            h = layer_cls(self.config, i, name=f"layer_{i}")(h, mask, deterministic)
        return h


class Pooler(nn.Module):
    """``tanh(dense(h[:, 0]))`` (BERT only), computed in float32."""

    config: BertConfig

    @nn.compact
    def __call__(self, first_token):
        dense = nn.Dense(self.config.hidden_size, kernel_init=nn.initializers.normal(0.02),
                         dtype=jnp.float32, name="dense")
        return jnp.tanh(dense(first_token))


class ClassificationHead(nn.Module):
    """BERT: pooler (dense+tanh on the first token) → dropout → classifier.
    RoBERTa: dropout → dense+tanh → dropout → out_proj (no pooler). Computed in float32 (the head
    is trained; its logits feed a float32 loss) whatever ``config.dtype``."""

    config: BertConfig

    @nn.compact
    def __call__(self, first_token, deterministic: bool):
        cfg = self.config
        init = nn.initializers.normal(0.02)
        rate = cfg.classifier_dropout if cfg.classifier_dropout is not None else cfg.hidden_dropout_prob
        drop = Dropout(rate)
        if cfg.is_roberta:
            x = drop(first_token, deterministic=deterministic)
            x = jnp.tanh(nn.Dense(cfg.hidden_size, kernel_init=init, dtype=jnp.float32, name="dense")(x))
            x = drop(x, deterministic=deterministic)
            return nn.Dense(cfg.num_labels, kernel_init=init, dtype=jnp.float32, name="out_proj")(x)
        x = drop(first_token, deterministic=deterministic)
        return nn.Dense(cfg.num_labels, kernel_init=init, dtype=jnp.float32, name="classifier")(x)


class BertModel(nn.Module):
    """A BERT-family encoder with an optional classification/regression head.

    ``__call__(input_ids (B,T), attention_mask (B,T), token_type_ids (B,T)|None)`` returns the
    logits ``(B, num_labels)`` (head ``classification``; always float32) or the sequence output
    ``(B,T',D)`` (head ``none``; in ``config.dtype``). ``T' = T`` unless a transform prepends
    tokens. ``config.dtype`` is the encoder's compute dtype (``"bfloat16"``: a bf16 base);
    ``config.remat`` rematerialises each layer (see :class:`Encoder`); ``config.matmul_dtype``
    (``"bfloat16"``) multiplies in bf16 with float32 accumulation (:func:`mixed_einsum`).
    """

    config: BertConfig

    def setup(self):
        cfg = self.config
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        if cfg.head == "classification":
            if not cfg.is_roberta:
                self.pooler = Pooler(cfg)
            self.head = ClassificationHead(cfg)

    def encode(self, input_ids, attention_mask=None, token_type_ids=None, deterministic: bool = True):
        """Sequence output ``(B,T',D)`` and the (possibly extended) mask ``(B,T')``."""
        chex.assert_rank(input_ids, 2)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        chex.assert_equal_shape([input_ids, attention_mask, token_type_ids])
        h, mask = self.embeddings(input_ids, attention_mask, token_type_ids, deterministic)
        return self.encoder(h, mask, deterministic), mask

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, deterministic: bool = True):
        h, _ = self.encode(input_ids, attention_mask, token_type_ids, deterministic)
        if self.config.head != "classification":
            return h
        first = h[:, 0].astype(jnp.float32)
        if not self.config.is_roberta:
            first = self.pooler(first)
        return self.head(first, deterministic)

    def info(self) -> ModelInfo:
        cfg = self.config
        head = (r"^head/",) if cfg.head == "classification" else ()
        return ModelInfo(
            family=cfg.model_type,
            num_layers=cfg.num_hidden_layers,
            hidden_size=cfg.hidden_size,
            num_heads=cfg.num_attention_heads,
            head_dim=cfg.head_dim,
            intermediate_size=cfg.intermediate_size,
            vocab_size=cfg.vocab_size,
            embedding_path="embeddings/word_embeddings/embedding",
            head_patterns=head,
            matmul_dtype=cfg.matmul_dtype,
        )


# ----------------------------------------------------------------------------------------------
# Conversion between PyTorch state dicts and the Flax tree.

_PREFIXES = ("bert.", "roberta.", "model.")


def _flax_key(torch_key: str) -> tuple[str, str] | None:
    """Map a PyTorch key to (flax module path, leaf name), or None to skip it."""
    key = torch_key
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    if key.endswith("position_ids") or key.startswith(("lm_head", "cls.")):
        return None
    module, _, leaf = key.rpartition(".")
    module = module.replace("encoder.layer.", "encoder.layer_")
    if module == "classifier" :
        module = "head.classifier"
    elif module.startswith("classifier."):
        module = "head." + module[len("classifier."):]
    path = module.replace(".", "/")
    if leaf == "weight":
        if path.endswith("LayerNorm"):
            leaf = "scale"
        elif path.endswith("embeddings"):
            leaf = "embedding"
        else:
            leaf = "kernel"
    return path, leaf


def params_from_state_dict(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A flat ``{path: array}`` dict of Flax leaves from a Hugging Face PyTorch state dict."""
    flat: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        mapped = _flax_key(key)
        if mapped is None:
            continue
        path, leaf = mapped
        value = np.asarray(value, dtype=np.float32)
        if leaf == "kernel":
            value = value.T
        flat[f"{path}/{leaf}"] = value
    return flat


def hf_config_dict(config: BertConfig) -> dict[str, Any]:
    """A ``transformers`` ``config.json`` for a jpeft :class:`~jpeft.models.bert.BertConfig`."""
    roberta = config.is_roberta
    family = "Roberta" if roberta else "Bert"
    if config.model_type == "xlm-roberta":
        family = "XLMRoberta"
    elif config.model_type == "camembert":
        family = "Camembert"
    head = config.head == "classification"
    out: dict[str, Any] = {
        "architectures": [f"{family}ForSequenceClassification" if head else f"{family}Model"],
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "intermediate_size": config.intermediate_size,
        "hidden_act": config.hidden_act,
        "hidden_dropout_prob": config.hidden_dropout_prob,
        "attention_probs_dropout_prob": config.attention_probs_dropout_prob,
        "max_position_embeddings": config.max_position_embeddings,
        "type_vocab_size": config.type_vocab_size,
        "layer_norm_eps": config.layer_norm_eps,
        "pad_token_id": config.pad_token_id,
        "position_embedding_type": "absolute",
        "classifier_dropout": config.classifier_dropout,
        "initializer_range": 0.02,
        "dtype": "float32",
    }
    if roberta:
        out.update(bos_token_id=0, eos_token_id=2)
    if head:
        n = config.num_labels
        out["id2label"] = {str(i): f"LABEL_{i}" for i in range(n)}
        out["label2id"] = {f"LABEL_{i}": i for i in range(n)}
        if n == 1:
            out["problem_type"] = "regression"
    return out


def state_dict_from_params(params: dict[str, Any], config: BertConfig) -> dict[str, np.ndarray]:
    """The inverse of :func:`params_from_state_dict`, with the ``transformers`` key prefix."""
    from jpeft.core.paths import flatten

    prefix = "roberta." if config.is_roberta else "bert."
    out: dict[str, np.ndarray] = {}
    for path, value in flatten(params).items():
        module, _, leaf = path.rpartition("/")
        value = np.asarray(value, dtype=np.float32)
        if leaf == "kernel":
            value, leaf = value.T, "weight"
        elif leaf in ("scale", "embedding"):
            leaf = "weight"
        name = module.replace("/", ".").replace("layer_", "layer.")
        if name.startswith("head."):
            name = "classifier" if name == "head.classifier" else "classifier." + name[len("head."):]
            out[f"{name}.{leaf}"] = np.ascontiguousarray(value)
        else:
            out[f"{prefix}{name}.{leaf}"] = np.ascontiguousarray(value)
    return out


def init_params(model: BertModel, rng: jax.Array) -> dict[str, Any]:
    """Random parameters (the ``params`` collection) for ``model``."""
    ids = jnp.ones((1, 4), jnp.int32)
    return model.init(rng, ids, jnp.ones_like(ids), jnp.zeros_like(ids))["params"]


def from_pretrained(
    name_or_path: str | os.PathLike[str] = hub.DEFAULT_MODEL,
    *,
    num_labels: int = 2,
    head: str = "classification",
    seed: int = 0,
    **config_overrides: Any,
) -> tuple[BertModel, dict[str, Any]]:
    """Load a BERT/RoBERTa/MiniLM checkpoint (folder or Hub id) as ``(model, params)``.

    Weights absent from the checkpoint (the task head; the pooler of checkpoints saved without
    one) are initialised as ``transformers`` does (normal(0.02), zero bias) from ``seed``.
    """
    from jpeft.core.paths import flatten, unflatten

    model_dir = hub.resolve_model_dir(name_or_path)
    config = BertConfig.from_hf(hub.read_config(model_dir), num_labels=num_labels, head=head,
                                **config_overrides)
    model = BertModel(config)
    key = jax.random.key(seed)
    shapes = flatten(jax.eval_shape(lambda k: init_params(model, k), key))
    loaded = params_from_state_dict(hub.read_safetensors(model_dir))
    missing = [path for path in shapes if path not in loaded]
    for path in missing:
        if not path.startswith(("head/", "pooler/")):
            raise KeyError(f"{model_dir}: checkpoint lacks {path}; is it a {config.model_type} model?")
    # Only the missing leaves are drawn (XLA drops the rest of the init), with the values the
    # full init would give them: Flax derives each parameter's key from its path.
    fresh = jax.device_get(jax.jit(lambda k: {p: flatten(init_params(model, k))[p] for p in missing})(key))
    params: dict[str, Any] = {}
    for path, shape in shapes.items():
        value = loaded.pop(path, None)  # each host copy is freed once its device copy exists
        if value is None:
            value = np.zeros(shape.shape, np.float32) if path.endswith("bias") else np.asarray(fresh[path])
        elif value.shape != shape.shape:
            raise ValueError(f"{path}: checkpoint shape {value.shape} != model shape {shape.shape}")
        params[path] = jnp.asarray(value, dtype=jnp.dtype(config.dtype))
    return model, unflatten(params)
