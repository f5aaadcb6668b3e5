"""Trainable tokens: retrain the embeddings of a few chosen tokens (Hugging Face PEFT's
``TrainableTokens``), e.g. special tokens added for a chat template.

For the model's input embedding table ``E (V, D)`` (``ModelInfo.embedding_path``) and token ids
``t_1 … t_n`` (``token_indices``):

    E'[t_i] = E[t_i] + δ_i,      δ (n, D) = 0 at init,      every other row unchanged.

Only ``δ`` is trained and saved (``n·D`` parameters). A weight-space rewrite
(``adapt_params``): a fresh delta is **exactly the identity**, the method **merges** (``E'``)
and unmerges (``E' − δ`` at the rows, exact up to float rounding), and ``∂L/∂δ_i = ∂L/∂E[t_i]``,
so training ``δ`` is training those rows (decoupled weight decay pulls them towards ``E[t_i]``).
A model whose output layer reads the same table (tied embeddings: GPT-2, tied Llama/Qwen2)
scores the retrained tokens with the new rows too, as PEFT's tied adapter does.

Hugging Face PEFT stores the rows themselves, ``<embedding module>.trainable_tokens_delta
(n, D)`` ``= E[t_i] + δ_i`` (and the same tensor under the tied output layer); import takes
``δ = rows − E[t_i]`` from the base, export writes ``E[t_i] + δ_i``.

Example::

    method = jpeft.trainable_tokens(jpeft.TrainableTokensConfig(token_indices=(5, 6)))
    delta = method.init(jax.random.key(0), base, model.info())   # {..: {"trainable_tokens": (2, D)}}
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.checkpoint import peft_convert as PC
from jpeft.checkpoint import peft_fields as F
from jpeft.core import paths as P
from jpeft.core.registry import register
from jpeft.core.transform import ApplyContext, ModelInfo, Transform, resolve_info
from jpeft.methods.prompt import word_embeddings

LEAF = "trainable_tokens"
TABLE = "embedding"  # the Flax leaf name of an embedding table (nn.Embed, nnx.Embed)
PEFT_LEAF = "trainable_tokens_delta"


@dataclasses.dataclass(frozen=True)
class TrainableTokensConfig:
    token_indices: tuple[int, ...] = dataclasses.field(
        default=(), metadata={"help": "ids of the tokens whose input embeddings are trained (at least one)"}
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "token_indices", tuple(self.token_indices))
        bad = [t for t in self.token_indices
               if not isinstance(t, numbers.Integral) or isinstance(t, bool) or t < 0]
        if bad:
            raise ValueError(f"trainable_tokens.token_indices must be token ids (integers >= 0), got {bad}")
        repeated = sorted({t for t in self.token_indices if self.token_indices.count(t) > 1})
        if repeated:
            raise ValueError(f"trainable_tokens.token_indices lists {repeated} more than once; give each "
                             "token once")


def _table_paths(delta: Any) -> dict[str, jax.Array]:
    """``{embedding table path: δ}`` of a delta."""
    out = {}
    for path, value in P.flatten(delta).items():
        if not path.endswith(f"/{LEAF}"):
            raise KeyError(f"trainable_tokens: the delta holds {path!r}, not '<module>/{LEAF}'; was it "
                           "made by another method? Apply a delta with the transform that made it")
        out[f"{path[: -len(LEAF)]}{TABLE}"] = value
    return out


def _add_rows(params: P.Params, delta: Any, indices: tuple[int, ...], sign: float) -> P.Params:
    """``params`` with ``E[t_i] + sign·δ_i`` in every table the delta names."""
    flat = P.flatten(params)
    rows = jnp.asarray(indices, jnp.int32)
    for path, d in _table_paths(delta).items():
        table = flat.get(path)
        if table is None:
            raise KeyError(f"trainable_tokens: the model has no embedding table at {path!r}; was the "
                           "delta made for another model?")
        if jnp.shape(d) != (len(indices), jnp.shape(table)[1]):
            raise ValueError(f"trainable_tokens: the delta for {path!r} has shape {jnp.shape(d)}, expected "
                             f"({len(indices)}, {jnp.shape(table)[1]}) = (len(token_indices), the table's "
                             "width); was it made with other token_indices or for another model?")
        update = table[rows].astype(jnp.float32) + sign * d.astype(jnp.float32)
        flat[path] = table.at[rows].set(update.astype(table.dtype))
    return P.unflatten(flat)


def trainable_tokens(config: TrainableTokensConfig = TrainableTokensConfig(), *,
                     name: str = "trainable_tokens") -> Transform:
    """Trainable tokens as a :class:`~jpeft.core.transform.Transform` (see the module docstring)."""

    def init(rng: jax.Array, base: P.Params, info: ModelInfo | None = None) -> dict[str, Any]:
        del rng  # zeros: the identity
        info = resolve_info(info)
        if not config.token_indices:
            raise ValueError(f"{name}: token_indices is empty; name the token ids to train, e.g. "
                             "TrainableTokensConfig(token_indices=(32000, 32001)) "
                             "(--trainable-tokens.token-indices 32000 32001)")
        vocab, width = np.shape(word_embeddings(base, info, name))  # (V, D), or a KeyError naming the paths
        outside = [t for t in config.token_indices if t >= vocab]
        if outside:
            raise ValueError(f"{name}: token ids {outside} are outside the vocabulary of {vocab} rows; "
                             "resize the vocabulary first (new tokens need rows): model, base = "
                             "jpeft.models.resize_vocab(model, base, new_size)")
        module = info.embedding_path[: -len(TABLE) - 1]
        return P.unflatten({f"{module}/{LEAF}": jnp.zeros((len(config.token_indices), width), jnp.float32)})

    def adapt_params(base: P.Params, delta: Any, ctx: ApplyContext) -> P.Params:
        return _add_rows(base, delta, config.token_indices, 1.0)

    return Transform(
        name=name,
        config=config,
        init=init,
        adapt_params=adapt_params,
        merge=lambda params, delta, info=None: _add_rows(params, delta, config.token_indices, 1.0),
        unmerge=lambda params, delta, info=None: _add_rows(params, delta, config.token_indices, -1.0),
        labels=lambda delta: jax.tree_util.tree_map(lambda _: "default", delta),
        new_params=lambda delta: 0,  # E + δ at n rows: no parameter beyond the base's
    )


# -- Hugging Face PEFT format ------------------------------------------------------------------
# PEFT's TRAINABLE_TOKENS: ``<embedding module>.trainable_tokens_delta (n, D)``, the new rows
# themselves, and the same tensor under the output layer when it is tied to the embeddings.

_HANDLED = {"token_indices", "target_modules", "init_weights"}


def _input_embedding(ctx: PC.PeftContext) -> tuple[str, str]:
    """``(jpeft module path, PyTorch name)`` of the model's input embedding table."""
    if ctx.model is not None:
        path = ctx.model.info().embedding_path
    else:  # a BERT-family tree without its model
        path = "embeddings/word_embeddings/embedding"
    module = path[: -len(TABLE) - 1]
    assert ctx.mods is not None
    return module, ctx.mods.name(module)


def _tied_output(ctx: PC.PeftContext) -> str | None:
    """The PyTorch name of an output layer that reads the input embeddings (tied), if any."""
    assert ctx.mods is not None
    out = ctx.mods.family.output_layer
    if out is None:
        return None
    return None if any(p.startswith(f"{out}/") for p in P.flatten(ctx.params)) else ctx.mods.name(out)


def _table(ctx: PC.PeftContext, module: str) -> np.ndarray:
    return np.asarray(P.flatten(ctx.params)[f"{module}/{TABLE}"], np.float32)


def _read(indices: list[int], key: str, tensors: dict[str, np.ndarray], ctx: PC.PeftContext
          ) -> tuple[Transform, Any]:
    """``(trainable_tokens, δ = rows − E[t])`` from the rows PEFT stored under ``key``."""
    config = TrainableTokensConfig(token_indices=tuple(int(t) for t in indices))
    module, name = _input_embedding(ctx)
    rows = PC.take(tensors, key, ctx.label, "the trained token rows")
    table = _table(ctx, module)
    if rows.shape != (len(config.token_indices), table.shape[1]):
        raise ValueError(f"{ctx.label}: {key} has shape {rows.shape}, expected "
                         f"({len(config.token_indices)}, {table.shape[1]}) = (len(token_indices), the "
                         "embedding width); is the base the architecture it was trained on?")
    delta = {f"{module}/{LEAF}": jnp.asarray(rows - table[list(config.token_indices)])}
    return trainable_tokens(config), P.unflatten(delta)


def _rows(transform: Transform, delta: Any, ctx: PC.PeftContext) -> tuple[str, np.ndarray]:
    """``(PyTorch name of the input embeddings, rows E[t_i] + δ_i)`` of a delta."""
    module, name = _input_embedding(ctx)
    flat = P.flatten(delta)
    if set(flat) != {f"{module}/{LEAF}"}:
        raise ValueError(f"save_peft_adapter: the trainable-tokens delta holds {sorted(flat)}, expected "
                         f"the input embeddings' {module}/{LEAF}")
    indices = list(transform.config.token_indices)
    return name, _table(ctx, module)[indices] + PC.to_numpy(flat[f"{module}/{LEAF}"])


def _from_peft(cfg: dict[str, Any], tensors: dict[str, np.ndarray], ctx: PC.PeftContext) -> tuple[Transform, Any]:
    """A PEFT ``TRAINABLE_TOKENS`` adapter on the input embeddings as ``(trainable_tokens, δ)``."""
    F._check_fields(cfg, _HANDLED)
    _, name = _input_embedding(ctx)
    targets = cfg.get("target_modules")
    named = [targets] if isinstance(targets, str) else list(targets or [name])
    if any(not (name == t or name.endswith(f".{t}")) for t in named):
        raise ValueError(f"{ctx.label}: target_modules={targets!r}: jpeft trains tokens of the input "
                         f"embeddings ({name!r}) only")
    rows_key = f"{PC.MODULE_KEY}{name}.{PEFT_LEAF}"
    tied = _tied_output(ctx)
    if tied is not None:
        copy = tensors.pop(f"{PC.MODULE_KEY}{tied}.{PEFT_LEAF}", None)
        if copy is not None and rows_key in tensors and not np.array_equal(copy, tensors[rows_key]):
            raise ValueError(f"{ctx.label}: the tied {tied!r} rows differ from {name!r}'s; jpeft's tied "
                             "output layer reads the input embeddings")
    transform, delta = _read(list(cfg.get("token_indices") or ()), rows_key, tensors, ctx)
    PC.refuse_leftover(tensors, (f".{PEFT_LEAF}",), ctx.label)
    return transform, delta


def _to_peft(transform: Transform, delta: Any, ctx: PC.PeftContext) -> tuple[dict[str, Any], dict[str, np.ndarray], P.Params]:
    """Trainable tokens as PEFT's ``TRAINABLE_TOKENS`` fields and rows ``E[t_i] + δ_i``."""
    name, rows = _rows(transform, delta, ctx)
    tensors = {f"{PC.MODULE_KEY}{name}.{PEFT_LEAF}": rows}
    tied = _tied_output(ctx)
    if tied is not None:
        tensors[f"{PC.MODULE_KEY}{tied}.{PEFT_LEAF}"] = rows.copy()
    fields = {"peft_type": "TRAINABLE_TOKENS", "token_indices": list(transform.config.token_indices),
              "target_modules": name, "init_weights": True}
    return fields, tensors, ctx.params


# PEFT's ``trainable_token_indices`` on another method's config (LoRA): the same rows under
# ``<embedding module>.token_adapter.trainable_tokens_delta``, nothing under a tied output layer.

COMPANION_FIELD = "trainable_token_indices"


def take_companion(cfg: dict[str, Any], tensors: dict[str, np.ndarray], ctx: PC.PeftContext
                   ) -> tuple[Transform, Any] | None:
    """Pop ``trainable_token_indices`` (a list, or ``{input embedding module: list}``) from ``cfg``
    and its rows from ``tensors``: ``(trainable_tokens, δ)``, or ``None`` without the field."""
    indices = cfg.pop(COMPANION_FIELD, None)
    if not indices:
        return None
    _, name = _input_embedding(ctx)
    if isinstance(indices, dict):
        other = [k for k in indices if not (name == k or name.endswith(f".{k}"))]
        if other or len(indices) != 1:
            raise ValueError(f"{ctx.label}: {COMPANION_FIELD}={indices!r}: jpeft trains tokens of the input "
                             f"embeddings ({name!r}) only")
        indices = next(iter(indices.values()))
    return _read(list(indices), f"{PC.MODULE_KEY}{name}.token_adapter.{PEFT_LEAF}", tensors, ctx)


def companion_entries(transform: Transform, delta: Any, ctx: PC.PeftContext
                      ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The config field and tensors trainable tokens add to another method's PEFT adapter."""
    name, rows = _rows(transform, delta, ctx)
    return ({COMPANION_FIELD: list(transform.config.token_indices)},
            {f"{PC.MODULE_KEY}{name}.token_adapter.{PEFT_LEAF}": rows})


register("trainable_tokens", TrainableTokensConfig, trainable_tokens,
         peft=PC.PeftConverter(peft_type="TRAINABLE_TOKENS", layout="modules", load=_from_peft, save=_to_peft))
