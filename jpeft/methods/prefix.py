"""Prefix tuning (Li & Liang, 2021, arXiv:2101.00190).

Trainable key/value vectors are prepended to the keys and values of every attention layer
(through the ``attn.kv`` tap of :mod:`jpeft.models.taps`). For layer ``l`` with keys and values
``K, V (B, S, H, Dh)`` and mask ``m (B, S)``:

    K' = [P_k[l]; K],   V' = [P_v[l]; V],   m' = [1 … 1; m]         (concatenation along S)
    attn(Q, K', V', m') = softmax(Q K'ᵀ / √Dh + mask(m')) V'

with ``P_k[l], P_v[l] (P, H, Dh)`` broadcast over the batch and ``P = num_virtual_tokens``.
Queries are unchanged, so the sequence length of the output does not change; every original
position also attends to the ``P`` prefix positions.

The prefix table ``T (P, L·2·H·Dh)`` (``L`` = adapted layers) is laid out as Hugging Face PEFT's
``PrefixEncoder`` output: the last dimension is ``layers × (key, value) × heads × head_dim``
(PEFT views it as ``(P, 2L, H, Dh)`` and splits the ``2L`` axis in pairs), so ``T[:, l, 0]`` is
layer ``l``'s key prefix and ``T[:, l, 1]`` its value prefix once reshaped to ``(P, L, 2, H, Dh)``.

* ``projection=True`` (the paper's reparameterisation, PEFT's ``prefix_projection=True``):
  ``T = tanh(E W₁ + b₁) W₂ + b₂`` with ``E (P, token_dim)``, ``W₁ (token_dim, projection_hidden)``,
  ``W₂ (projection_hidden, L·2·H·Dh)``. Parameters: ``P·t + t·h + h + h·F + F`` with ``F = L·2·H·Dh``.
* ``projection=False`` (= P-tuning v2, :mod:`jpeft.methods.ptuning2`): ``T`` itself is trained,
  ``P·L·2·H·Dh`` parameters (PEFT's ``prefix_projection=False``).

Delta layout: ``{"embedding": E, "mlp": {"hidden": {"kernel", "bias"}, "out": {"kernel",
"bias"}}}`` with projection, ``{"prefix": T}`` without. :func:`finalize_delta` (the transform's
``finalize``) evaluates the MLP once and keeps only ``{"prefix": T}``: the MLP is a training-time
device, and the finalized delta runs through the same code path (apply dispatches on the keys).

Init (``init``): ``"normal"``: ``E`` (or ``T``) ~ ``normal(init_scale)`` (``init_scale = 1`` is
``torch.nn.Embedding``'s default, as in PEFT) and the MLP as ``torch.nn.Linear`` (uniform
``±1/√fan_in``); ``"zero"``: PEFT's ``init_weights="zero"``, the table (or the MLP's last layer) is
zero.

**A fresh delta is not the identity**: the prefix adds keys that take part in every softmax
(even zero keys and values dilute the attention), so the output changes (``adds_tokens=True``).
The laws that hold instead: each layer computes exactly the attention over the concatenated
keys/values above, and a prefix whose mask part is zero recovers the original output (see
:func:`prepend`). Prefixes act on activations: **not mergeable**.

**Positions** (``peft_positions``): by default the input tokens keep positions ``0 … T-1``. With
``peft_positions=True`` they are numbered ``P … P+T-1`` (RoBERTa: ``pad+1+P …``, padding keeps
``pad``; a decoder's cached continuation goes on from there), which is what ``transformers`` does
when Hugging Face PEFT feeds the prefix as ``past_key_values`` (:func:`shift_positions`, through
the model's ``embed.positions`` tap). Adapters imported from PEFT get it, and only a
prefix trained with it can be exported to PEFT with the same logits.

All delta leaves are labelled ``"prefix"`` for the optimizer, so ``group_lr={"prefix": k}`` sets
their learning rate separately from the task head.

Example::

    method = jpeft.prefix(PrefixConfig(num_virtual_tokens=20, projection=True))
    delta = method.init(jax.random.key(0), base, model.info())
    kept = method.finalize(delta)   # {"prefix": (20, L·2·H·Dh)}, no MLP
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import chex
import jax
import jax.numpy as jnp

from jpeft.checkpoint import peft_convert as PC
from jpeft.checkpoint.peft_fields import _PREFIX_HANDLED
from jpeft.core import paths as P
from jpeft.core.capabilities import AddsTokens, AfterTraining
from jpeft.core.registry import register
from jpeft.core.transform import ApplyContext, ModelInfo, Transform, resolve_info
from jpeft.models.taps import ATTN_KV, EMBED_POSITIONS, is_tap, layer_entry, require_taps

INITS = ("normal", "zero")
LABEL = "prefix"


def validate_prompt_fields(where: str, num_virtual_tokens: int, init: str, init_scale: float,
                           layers: tuple[int, ...]) -> None:
    """Checks shared by :class:`PrefixConfig` and P-tuning v2's config (``where`` names it)."""
    if not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
        raise ValueError(f"{where}.num_virtual_tokens must be an integer >= 1, got {num_virtual_tokens!r}")
    if init not in INITS:
        raise ValueError(f"{where}.init must be one of {list(INITS)}, got {init!r}")
    if not (math.isfinite(init_scale) and init_scale > 0.0):
        raise ValueError(f"{where}.init_scale must be a finite number > 0, got {init_scale}")
    P.check_layer_indices(where, layers)


@dataclasses.dataclass(frozen=True)
class PrefixConfig:
    num_virtual_tokens: int = dataclasses.field(
        default=20, metadata={"help": "prefix length P (virtual key/value positions per layer)"}
    )
    projection: bool = dataclasses.field(
        default=True,
        metadata={"help": "reparameterise the prefix by an MLP over a smaller embedding "
                          "(PEFT's prefix_projection); False is P-tuning v2"},
    )
    projection_hidden: int = dataclasses.field(
        default=512, metadata={"help": "hidden width of the projection MLP (PEFT's encoder_hidden_size)"}
    )
    token_dim: int | None = dataclasses.field(
        default=None,
        metadata={"help": "width of the embedding fed to the projection MLP (default: the model's "
                          "hidden size, as PEFT's token_dim)"},
    )
    init: str = dataclasses.field(
        default="normal",
        metadata={"help": "'normal' (table/embedding ~ normal(init_scale), MLP as torch.nn.Linear) "
                          "or 'zero' (PEFT's init_weights='zero': zero table / zero last MLP layer)"},
    )
    init_scale: float = dataclasses.field(
        default=1.0, metadata={"help": "std of the normal init of the table or embedding (1: torch's Embedding)"}
    )
    layers: tuple[int, ...] = dataclasses.field(
        default=(), metadata={"help": "only these layer indices get a prefix (empty: all layers)"}
    )
    peft_positions: bool = dataclasses.field(
        default=False,
        metadata={"help": "number the input tokens' positions from P, as transformers does "
                          "when Hugging Face PEFT passes the prefix as past_key_values; needed "
                          "to export the prefix to PEFT"},
    )

    def __post_init__(self) -> None:
        validate_prompt_fields("prefix", self.num_virtual_tokens, self.init, self.init_scale,
                               tuple(self.layers))
        if not isinstance(self.projection_hidden, int) or self.projection_hidden < 1:
            raise ValueError(f"prefix.projection_hidden must be an integer >= 1, got {self.projection_hidden!r}")
        if self.token_dim is not None and (not isinstance(self.token_dim, int) or self.token_dim < 1):
            raise ValueError(f"prefix.token_dim must be None or an integer >= 1, got {self.token_dim!r}")


def prefix_layers(config: PrefixConfig, info: ModelInfo, where: str = "prefix") -> list[int]:
    """The adapted layer indices, in table order (sorted)."""
    if not config.layers:
        return list(range(info.num_layers))
    bad = sorted(i for i in config.layers if i >= info.num_layers)
    if bad:
        raise ValueError(
            f"{where}.layers={list(config.layers)}: the model has layers 0..{info.num_layers - 1}, "
            f"no layer {bad}"
        )
    return sorted(config.layers)


def table_width(info: ModelInfo, num_layers: int) -> int:
    """``F = L·2·Hkv·Dh``: the last dimension of the prefix table."""
    return num_layers * 2 * info.kv_heads * info.head_dim


def project(delta: dict[str, Any]) -> jax.Array:
    """The prefix table ``T (P, F)`` of a delta in either form (see the module docstring)."""
    if "prefix" in delta:
        return delta["prefix"]
    if "embedding" not in delta or "mlp" not in delta:
        raise KeyError(f"a prefix delta has either 'prefix' or 'embedding' and 'mlp'; got {sorted(delta)}")
    e, mlp = delta["embedding"], delta["mlp"]
    chex.assert_rank(e, 2)
    h = jnp.tanh(e @ mlp["hidden"]["kernel"] + mlp["hidden"]["bias"])
    return h @ mlp["out"]["kernel"] + mlp["out"]["bias"]


def finalize_delta(delta: dict[str, Any]) -> dict[str, Any]:
    """``{"embedding", "mlp"}`` -> ``{"prefix": T}`` (the MLP evaluated once); ``{"prefix"}`` unchanged."""
    return {"prefix": project(delta)}


def split_table(table: jax.Array, heads: int, head_dim: int) -> jax.Array:
    """``T (P, L·2·H·Dh)`` -> ``(L, 2, P, H, Dh)`` (layer, key/value, position, head, dim)."""
    chex.assert_rank(table, 2)
    p, f = table.shape
    per_layer = 2 * heads * head_dim
    if f % per_layer:
        raise ValueError(
            f"prefix table width {f} is not a multiple of 2·heads·head_dim = {per_layer} "
            f"(heads={heads}, head_dim={head_dim}); was the delta made for another model?"
        )
    return table.reshape(p, f // per_layer, 2, heads, head_dim).transpose(1, 2, 0, 3, 4)


def prepend(key: jax.Array, value: jax.Array, mask: jax.Array, pk: jax.Array,
            pv: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Prepend a prefix to one layer's keys, values and mask along the sequence axis.

    ``key, value (B,S,H,Dh)``, ``mask (B,S)``, ``pk, pv (P,H,Dh)`` (or ``(B,P,H,Dh)`` per
    example) -> ``key', value' (B,P+S,H,Dh)`` and ``mask' (B,P+S)`` whose first ``P`` entries are
    ones of ``mask``'s dtype. Zeroing ``mask'[:, :P]`` makes the attention ignore the prefix, which
    recovers the original output exactly.
    """
    chex.assert_rank([key, value, mask], [4, 4, 2])
    chex.assert_equal_shape([key, value])
    chex.assert_equal_shape_prefix([key, mask], 2)
    b = key.shape[0]
    if pk.ndim == 3:
        pk = jnp.broadcast_to(pk[None], (b, *pk.shape))
        pv = jnp.broadcast_to(pv[None], (b, *pv.shape))
    chex.assert_rank([pk, pv], 4)
    chex.assert_equal_shape([pk, pv])
    chex.assert_equal_shape_suffix([pk, key], 2)
    chex.assert_axis_dimension(pk, 0, b)
    ones = jnp.ones((b, pk.shape[1]), mask.dtype)
    return (jnp.concatenate([pk.astype(key.dtype), key], axis=1),
            jnp.concatenate([pv.astype(value.dtype), value], axis=1),
            jnp.concatenate([ones, mask], axis=1))


def shift_positions(offset: int) -> Any:
    """An interceptor of the ``embed.positions`` tap numbering the input tokens from ``offset``
    more, as transformers numbers them after PEFT's ``past_key_values`` (BERT ``t -> t + P``,
    RoBERTa's real tokens ``pad+1+t -> pad+1+P+t``, decoders ``t -> t + P`` for a fresh input).
    The model refuses positions past its table (``max_position_embeddings``, ``n_positions``)."""
    offset = int(offset)

    def shift(next_fun, args, kwargs, context):
        result = next_fun(*args, **kwargs)
        return result + offset if is_tap(context, EMBED_POSITIONS) else result

    return shift


def _linear_init(key: jax.Array, fan_in: int, fan_out: int) -> dict[str, jax.Array]:
    """``torch.nn.Linear``'s default init: kernel and bias ~ uniform(±1/√fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)
    k1, k2 = jax.random.split(key)
    return {"kernel": jax.random.uniform(k1, (fan_in, fan_out), jnp.float32, -bound, bound),
            "bias": jax.random.uniform(k2, (fan_out,), jnp.float32, -bound, bound)}


def prefix(config: PrefixConfig = PrefixConfig(), *, name: str = "prefix") -> Transform:
    """Prefix tuning as a :class:`~jpeft.core.transform.Transform` (see the module docstring)."""
    wanted = tuple(sorted(config.layers))

    def init(rng: jax.Array, base: P.Params, info: ModelInfo | None = None) -> dict[str, Any]:
        info = resolve_info(info)
        require_taps(info.taps, name, (ATTN_KV, EMBED_POSITIONS) if config.peft_positions else (ATTN_KV,))
        info.require(name, "num_layers", "num_heads", "head_dim")
        layers = prefix_layers(config, info, name)
        n_tok, width = config.num_virtual_tokens, table_width(info, len(layers))
        k_emb, k_hidden, k_out = jax.random.split(rng, 3)
        if not config.projection:
            if config.init == "zero":
                return {"prefix": jnp.zeros((n_tok, width), jnp.float32)}
            return {"prefix": config.init_scale * jax.random.normal(k_emb, (n_tok, width), jnp.float32)}
        t = config.token_dim or info.hidden_size
        hidden = config.projection_hidden
        out = _linear_init(k_out, hidden, width)
        if config.init == "zero":
            out = jax.tree_util.tree_map(jnp.zeros_like, out)
        return {
            "embedding": config.init_scale * jax.random.normal(k_emb, (n_tok, t), jnp.float32),
            "mlp": {"hidden": _linear_init(k_hidden, t, hidden), "out": out},
        }

    def interceptors(delta: Any, ctx: ApplyContext) -> list[Any]:
        table = project(delta)  # evaluated once per forward pass, outside the layers

        def intercept(next_fun, args, kwargs, context):
            if not is_tap(context, ATTN_KV) or context.module.layer is None:
                return next_fun(*args, **kwargs)
            layer = context.module.layer
            if isinstance(layer, jax.Array):  # a tap in a scan body: the traced layer number
                return _scanned(next_fun(*args, **kwargs), layer)
            if wanted and layer not in wanted:
                return next_fun(*args, **kwargs)
            key, value, mask = next_fun(*args, **kwargs)
            chex.assert_rank(key, 4)
            per_layer = split_table(table, key.shape[2], key.shape[3])
            row = wanted.index(layer) if wanted else layer
            if row >= per_layer.shape[0]:
                raise ValueError(
                    f"{name}: the prefix table has {per_layer.shape[0]} layers but the model "
                    f"calls layer {layer}; was the delta made for another model?"
                )
            return prepend(key, value, mask, per_layer[row, 0], per_layer[row, 1])

        def _scanned(kv_mask, layer):
            """Every layer of a scan gets P positions (shapes are the same in each step); a
            layer without a prefix gets zeros with its mask part zero, which changes nothing."""
            key, value, mask = kv_mask
            chex.assert_rank(key, 4)
            per_layer = split_table(table, key.shape[2], key.shape[3])
            rows = wanted or range(per_layer.shape[0])
            entry, present = layer_entry({l: per_layer[r] for r, l in enumerate(rows)}, layer)
            key, value, mask = prepend(key, value, mask, entry[0], entry[1])
            n = config.num_virtual_tokens
            return key, value, mask.at[:, :n].set(present.astype(mask.dtype))

        if config.peft_positions:
            return [intercept, shift_positions(config.num_virtual_tokens)]
        return [intercept]

    return Transform(
        name=name,
        config=config,
        init=init,
        interceptors=interceptors,
        labels=lambda delta: jax.tree_util.tree_map(lambda _: LABEL, delta),
        capabilities=(AddsTokens(), AfterTraining(finalize=finalize_delta)),
    )


# -- Hugging Face PEFT format ------------------------------------------------------------------
# PEFT's ``prompt_embeddings (P, L·2·H)``: the prefix table after its projection. PEFT feeds it as
# ``past_key_values``, so transformers numbers the real tokens from P (``peft_positions``).

def _from_peft(cfg: dict[str, Any], tensors: dict[str, Any], ctx: PC.PeftContext) -> tuple[Transform, Any]:
    """A PEFT ``PREFIX_TUNING`` adapter as a prefix with ``peft_positions=True``."""
    PC.require_full_attention(ctx, "PREFIX_TUNING")
    info = ctx.model.info()
    table = PC.read_prompts(cfg, tensors, ctx, _PREFIX_HANDLED, table_width(info, info.num_layers),
                            "layers·2·kv_heads·head_dim", key_value=True)
    config = PrefixConfig(num_virtual_tokens=int(cfg["num_virtual_tokens"]),
                          projection=bool(cfg.get("prefix_projection", False)),
                          projection_hidden=int(cfg.get("encoder_hidden_size") or info.kv_heads * info.head_dim),
                          peft_positions=True, init="zero" if cfg.get("init_weights") == "zero" else "normal")
    return prefix(config), {"prefix": jnp.asarray(table)}


def to_peft(transform: Transform, delta: Any, ctx: PC.PeftContext) -> tuple[dict[str, Any], dict[str, Any], P.Params]:
    """A prefix (or P-tuning v2: ``transform.config.to_prefix()``) as PEFT's ``PREFIX_TUNING``;
    only a prefix on every layer trained with ``peft_positions=True`` computes PEFT's logits."""
    config = transform.config
    config = config if isinstance(config, PrefixConfig) else config.to_prefix()
    PC.require_full_attention(ctx, "a prefix in PEFT's PREFIX_TUNING format")
    k = config.num_virtual_tokens
    if config.layers:
        raise ValueError(f"save_peft_adapter: a prefix on layers {list(config.layers)} only cannot be "
                         "written: PEFT's prefix tuning covers every layer")
    if not config.peft_positions:
        raise ValueError(
            "save_peft_adapter: PEFT runs a prefix through past_key_values, and transformers then "
            f"numbers the input positions from num_virtual_tokens={k}; this jpeft prefix was "
            "trained with positions from 0, so PEFT would compute other logits. Train with "
            "peft_positions=True (--prefix.peft_positions=true) to export to PEFT, or keep this "
            "one as a jpeft adapter (jpeft.checkpoint.export.save_adapter).")
    fields = PC.prompt_fields(k, ctx, key_value=True)
    width = fields["num_layers"] * 2 * fields["token_dim"]
    table = project(delta)
    if table.shape != (k, width):
        raise ValueError(f"save_peft_adapter: prefix table {table.shape} != ({k}, {width})")
    fields = {"peft_type": "PREFIX_TUNING", "prefix_projection": bool(config.projection),
              "encoder_hidden_size": config.projection_hidden if config.projection else fields["token_dim"],
              **fields}
    return fields, PC.prompt_tensors(table, k), ctx.params


register("prefix", PrefixConfig, prefix,
         peft=PC.PeftConverter(peft_type="PREFIX_TUNING", layout="prompt", load=_from_peft, save=to_peft))
