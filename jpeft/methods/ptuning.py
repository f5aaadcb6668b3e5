"""P-tuning (Liu, Zheng, Du, Ding, Qian, Yang & Tang, 2021, arXiv:2103.10385).

Like prompt tuning (:mod:`jpeft.methods.prompt`), ``k`` virtual token embeddings are prepended to
the word embeddings at the ``embed.inputs`` tap (``X' = [E'; X]``, ``m' = [1 … 1; m]``,
``τ' = [0 … 0; τ]``), but ``E' (k, D)`` is the output of a *prompt encoder* applied to a trainable
input table ``E (k, D)``. The encoder mirrors Hugging Face PEFT's ``PromptEncoder``
(``peft/tuners/p_tuning/model.py``) layer for layer, with ``h = encoder_hidden``:

* ``"mlp"``: ``E' = relu(relu(E W₀ + b₀) W₁ + b₁) W₂ + b₂`` with ``W₀ (D,h)``, ``W₁ (h,h)``,
  ``W₂ (h,D)``: ``k·D + (D·h + h) + (h·h + h) + (h·D + D)`` parameters;
* ``"lstm"``: ``H = BiLSTM(E)`` (``encoder_num_layers`` layers, hidden ``h`` per direction, output
  ``[forward; backward] (k, 2h)``, dropout ``encoder_dropout`` between layers while training, as
  ``torch.nn.LSTM``), then ``E' = relu(H W₀ + b₀) W₁ + b₁`` with ``W₀ (2h,2h)``, ``W₁ (2h,D)``.
  LSTM cell (torch's gate order i, f, g, o): ``z = x W_ih + b_ih + h W_hh + b_hh``,
  ``c ← σ(f)·c + σ(i)·tanh(g)``, ``h ← σ(o)·tanh(c)``.

Delta layout (``kernel`` = the transpose of torch's ``weight``)::

    {"embedding": E (k, D),                                     # prompt_encoder.embedding
     "mlp": {"dense_0", "dense_1"[, "dense_2"]: {"kernel", "bias"}},   # mlp_head.0/.2[/.4]
     "lstm": {"layer_<l>": {"forward" | "backward":              # lstm_head.*_l<l>[_reverse]
              {"kernel_ih" (in, 4h), "kernel_hh" (h, 4h), "bias_ih" (4h,), "bias_hh" (4h,)}}}}

Init as PEFT/torch: ``E ~ normal(0, init_scale)`` (``torch.nn.Embedding``: 1), Linear kernels and
biases ``uniform(±1/√fan_in)``, LSTM weights ``uniform(±1/√h)``.

:func:`finalize_delta` (the transform's ``finalize``) runs the encoder once and keeps only
``{"prompt": E'}``, a prompt-tuning delta: the encoder is a training-time reparameterisation
(PEFT saves the same ``prompt_embeddings``). Both forms go through the same apply code, which
dispatches on the keys. All leaves are labelled ``"prompt"`` (as prompt tuning's), so
``group_lr={"prompt": m}`` sets their learning rate.

**A fresh delta is not the identity** (tokens are added, ``adds_tokens=True``); the law that
holds instead is prompt tuning's with ``E'`` as the prompt. Not mergeable.

Example::

    method = jpeft.ptuning(PTuningConfig(num_virtual_tokens=20, encoder_hidden=128))
    delta = method.init(jax.random.key(0), base, model.info())
    kept = method.finalize(delta)    # {"prompt": (20, D)}
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import chex
import jax
import jax.numpy as jnp

from jpeft.checkpoint import peft_convert as PC
from jpeft.checkpoint.peft_fields import _PTUNING_HANDLED, _refuse
from jpeft.core import paths as P
from jpeft.core.dropout import dropout as apply_dropout
from jpeft.core.capabilities import AddsTokens, AfterTraining
from jpeft.core.registry import register
from jpeft.core.transform import ApplyContext, Interceptor, ModelInfo, Transform, resolve_info
from jpeft.methods.prompt import LABEL, prompt_interceptor, validate_num_virtual_tokens
from jpeft.models.taps import EMBED_INPUTS, require_taps

ENCODERS = ("mlp", "lstm")


@dataclasses.dataclass(frozen=True)
class PTuningConfig:
    num_virtual_tokens: int = dataclasses.field(
        default=20, metadata={"help": "number k of virtual tokens prepended to every input"}
    )
    encoder: str = dataclasses.field(
        default="mlp", metadata={"help": "prompt encoder: 'mlp' (3 Linear layers) or 'lstm' "
                                         "(bidirectional LSTM + 2 Linear layers), as PEFT"}
    )
    encoder_hidden: int | None = dataclasses.field(
        default=None,
        metadata={"help": "hidden width h of the encoder (None: the model's hidden size, PEFT's "
                          "default for encoder_hidden_size)"},
    )
    encoder_num_layers: int = dataclasses.field(
        default=2, metadata={"help": "LSTM layers (lstm only; PEFT's MLP always has 3 Linear layers)"}
    )
    encoder_dropout: float = dataclasses.field(
        default=0.0, metadata={"help": "dropout between LSTM layers while training (lstm only)"}
    )
    init_scale: float = dataclasses.field(
        default=1.0, metadata={"help": "std of the input table's normal init (1: torch.nn.Embedding)"}
    )

    def __post_init__(self) -> None:
        validate_num_virtual_tokens("ptuning", self.num_virtual_tokens)
        if self.encoder not in ENCODERS:
            raise ValueError(f"ptuning.encoder must be one of {list(ENCODERS)}, got {self.encoder!r}")
        h = self.encoder_hidden
        if h is not None and (isinstance(h, bool) or not isinstance(h, int) or h < 1):
            raise ValueError(f"ptuning.encoder_hidden must be None or an integer >= 1, got {h!r}")
        n = self.encoder_num_layers
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"ptuning.encoder_num_layers must be an integer >= 1, got {n!r}")
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ValueError(f"ptuning.encoder_dropout must be in [0, 1), got {self.encoder_dropout}")
        if self.encoder == "mlp" and (n != 2 or self.encoder_dropout != 0.0):
            raise ValueError(
                "ptuning.encoder_num_layers and ptuning.encoder_dropout apply to encoder='lstm' only "
                f"(PEFT's MLP is always Linear-ReLU-Linear-ReLU-Linear without dropout); got "
                f"encoder_num_layers={n}, encoder_dropout={self.encoder_dropout}"
            )
        if not (math.isfinite(self.init_scale) and self.init_scale > 0.0):
            raise ValueError(f"ptuning.init_scale must be a finite number > 0, got {self.init_scale}")


def _uniform_leaves(key: jax.Array, specs: dict[str, tuple[tuple[int, ...], float]]) -> dict[str, jax.Array]:
    """``{path: uniform(±bound) of shape}`` for ``specs = {path: (shape, bound)}``, from a single
    draw (one random program instead of one per leaf: much faster to compile)."""
    sizes = [math.prod(shape) for shape, _ in specs.values()]
    flat = jax.random.uniform(key, (sum(sizes),), jnp.float32, -1.0, 1.0)
    out, start = {}, 0
    for (path, (shape, bound)), size in zip(specs.items(), sizes):
        out[path] = bound * flat[start:start + size].reshape(shape)
        start += size
    return out


def _linear(prefix: str, fan_in: int, fan_out: int) -> dict[str, tuple[tuple[int, ...], float]]:
    """``torch.nn.Linear``'s default init: kernel and bias ~ uniform(±1/√fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)
    return {f"{prefix}/kernel": ((fan_in, fan_out), bound), f"{prefix}/bias": ((fan_out,), bound)}


def _lstm_direction(prefix: str, d_in: int, h: int) -> dict[str, tuple[tuple[int, ...], float]]:
    """``torch.nn.LSTM``'s init for one direction of one layer: all ~ uniform(±1/√h)."""
    bound = 1.0 / math.sqrt(h)
    shapes = {"kernel_ih": (d_in, 4 * h), "kernel_hh": (h, 4 * h), "bias_ih": (4 * h,), "bias_hh": (4 * h,)}
    return {f"{prefix}/{n}": (s, bound) for n, s in shapes.items()}


def init_encoder(config: PTuningConfig, rng: jax.Array, info: ModelInfo) -> dict[str, Any]:
    """A fresh P-tuning delta (see the module docstring for the layout)."""
    d, k = info.hidden_size, config.num_virtual_tokens
    h = config.encoder_hidden or d
    k_emb, k_enc = jax.random.split(rng)
    specs: dict[str, tuple[tuple[int, ...], float]] = {}
    if config.encoder == "mlp":
        for i, (fan_in, fan_out) in enumerate([(d, h), (h, h), (h, d)]):
            specs.update(_linear(f"mlp/dense_{i}", fan_in, fan_out))
    else:
        for layer in range(config.encoder_num_layers):
            d_in = d if layer == 0 else 2 * h
            for direction in ("forward", "backward"):
                specs.update(_lstm_direction(f"lstm/layer_{layer}/{direction}", d_in, h))
        specs.update(_linear("mlp/dense_0", 2 * h, 2 * h))
        specs.update(_linear("mlp/dense_1", 2 * h, d))
    delta = P.unflatten(_uniform_leaves(k_enc, specs))
    delta["embedding"] = config.init_scale * jax.random.normal(k_emb, (k, d), jnp.float32)
    return delta


def lstm_direction(params: dict[str, jax.Array], x: jax.Array, reverse: bool = False) -> jax.Array:
    """One direction of one ``torch.nn.LSTM`` layer over ``x (k, d_in)`` from zero states:
    the hidden states ``(k, h)`` in input order."""
    chex.assert_rank(x, 2)
    h = params["kernel_hh"].shape[0]
    x_proj = x @ params["kernel_ih"] + params["bias_ih"] + params["bias_hh"]  # (k, 4h)

    def step(carry, z):
        h_prev, c_prev = carry
        z = z + h_prev @ params["kernel_hh"]
        i, f, g, o = jnp.split(z, 4)
        c = jax.nn.sigmoid(f) * c_prev + jax.nn.sigmoid(i) * jnp.tanh(g)
        h_new = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h_new, c), h_new

    zeros = jnp.zeros((h,), x.dtype)
    _, hs = jax.lax.scan(step, (zeros, zeros), x_proj, reverse=reverse)
    return hs


def bilstm(layers: dict[str, Any], x: jax.Array, dropout: float = 0.0,
           key: jax.Array | None = None) -> jax.Array:
    """A bidirectional multi-layer LSTM (``torch.nn.LSTM(bidirectional=True)``): ``(k, d_in)`` ->
    ``(k, 2h)``, ``[forward; backward]`` per position; dropout on every layer's output but the
    last when ``dropout > 0`` and ``key`` is given (training)."""
    names = sorted(layers, key=lambda n: int(n.rsplit("_", 1)[1]))
    for idx, name in enumerate(names):
        layer = layers[name]
        x = jnp.concatenate([lstm_direction(layer["forward"], x),
                             lstm_direction(layer["backward"], x, reverse=True)], axis=-1)
        if dropout > 0.0 and key is not None and idx < len(names) - 1:
            x = apply_dropout(jax.random.fold_in(key, idx), x, dropout)
    return x


def mlp_head(mlp: dict[str, Any], x: jax.Array) -> jax.Array:
    """``Linear (→ ReLU → Linear)*``: ReLU between the ``dense_<i>`` layers, none after the last."""
    names = sorted(mlp, key=lambda n: int(n.rsplit("_", 1)[1]))
    for idx, name in enumerate(names):
        x = x @ mlp[name]["kernel"] + mlp[name]["bias"]
        if idx < len(names) - 1:
            x = jax.nn.relu(x)
    return x


def encode(delta: dict[str, Any], dropout: float = 0.0, key: jax.Array | None = None) -> jax.Array:
    """The virtual token embeddings ``E' (k, D)`` of a delta in either form."""
    if "prompt" in delta:
        return delta["prompt"]
    if "embedding" not in delta or "mlp" not in delta:
        raise KeyError(
            f"a P-tuning delta has either 'prompt' (finalized) or 'embedding' and 'mlp' "
            f"(and 'lstm'); got {sorted(delta)}"
        )
    x = delta["embedding"]
    chex.assert_rank(x, 2)
    if "lstm" in delta:
        x = bilstm(delta["lstm"], x, dropout, key)
    return mlp_head(delta["mlp"], x)


def finalize_delta(delta: dict[str, Any]) -> dict[str, Any]:
    """``{"embedding", "mlp"[, "lstm"]}`` -> ``{"prompt": E'}`` (the encoder evaluated once, in
    eval mode); a finalized delta is returned unchanged."""
    return {"prompt": encode(delta)}


def ptuning(config: PTuningConfig = PTuningConfig(), *, name: str = "ptuning") -> Transform:
    """P-tuning as a :class:`~jpeft.core.transform.Transform` (see the module docstring)."""

    def init(rng: jax.Array, base: P.Params, info: ModelInfo | None = None) -> dict[str, Any]:
        info = resolve_info(info)
        require_taps(info.taps, name, (EMBED_INPUTS,))
        info.require(name, "hidden_size")
        return init_encoder(config, rng, info)

    def interceptors(delta: Any, ctx: ApplyContext) -> list[Interceptor]:
        if ctx.decoding:  # the virtual tokens went into the KV cache with the prefill
            return []
        train_dropout = config.encoder_dropout if ctx.train else 0.0
        # the encoder runs once per forward pass, outside the model
        return [prompt_interceptor(encode(delta, train_dropout, ctx.key(name, "lstm")))]

    return Transform(
        name=name,
        config=config,
        init=init,
        interceptors=interceptors,
        labels=lambda delta: jax.tree_util.tree_map(lambda _: LABEL, delta),
        capabilities=(AddsTokens(), AfterTraining(finalize=finalize_delta)),
    )


# -- Hugging Face PEFT format ------------------------------------------------------------------
# PEFT saves P-tuning's prompts after its encoder: the finalized delta (``prompt`` alone).

def _from_peft(cfg: dict[str, Any], tensors: dict[str, Any], ctx: PC.PeftContext) -> tuple[Transform, Any]:
    """A PEFT ``P_TUNING`` adapter as the finalized P-tuning delta ``{"prompt": (P, H)}``."""
    hidden = ctx.model.info().hidden_size
    table = PC.read_prompts(cfg, tensors, ctx, _PTUNING_HANDLED, hidden, "hidden")
    kind = str(cfg.get("encoder_reparameterization_type") or "MLP").lower()
    if kind not in ("mlp", "lstm"):
        raise _refuse("encoder_reparameterization_type", cfg.get("encoder_reparameterization_type"))
    encoder_hidden = cfg.get("encoder_hidden_size")
    lstm = kind == "lstm"
    config = PTuningConfig(num_virtual_tokens=int(cfg["num_virtual_tokens"]), encoder=kind,
                           encoder_hidden=int(encoder_hidden) if encoder_hidden else None,
                           encoder_num_layers=int(cfg.get("encoder_num_layers") or 2) if lstm else 2,
                           encoder_dropout=float(cfg.get("encoder_dropout") or 0.0) if lstm else 0.0)
    return ptuning(config), {LABEL: jnp.asarray(table)}


def _to_peft(transform: Transform, delta: Any, ctx: PC.PeftContext) -> tuple[dict[str, Any], dict[str, Any], P.Params]:
    config = transform.config
    shared = PC.prompt_fields(config.num_virtual_tokens, ctx)
    fields = {"peft_type": "P_TUNING", "encoder_reparameterization_type": config.encoder.upper(),
              "encoder_hidden_size": config.encoder_hidden or shared["token_dim"],
              "encoder_num_layers": config.encoder_num_layers, "encoder_dropout": config.encoder_dropout,
              **shared}
    return fields, PC.prompt_tensors(encode(delta), config.num_virtual_tokens), ctx.params


register("ptuning", PTuningConfig, ptuning,
         peft=PC.PeftConverter(peft_type="P_TUNING", layout="prompt", load=_from_peft, save=_to_peft))
