"""Prompt tuning (Lester, Al-Rfou & Constant, 2021, arXiv:2104.08691).

``k`` trainable embeddings ``E (k, D)`` are prepended to the word embeddings, through the
``embed.inputs`` tap of :mod:`jpeft.models.taps` (before the position and token-type embeddings
are added). For word embeddings ``X (B, T, D)``, mask ``m (B, T)`` and token types ``τ (B, T)``:

    X' = [E; X]  (B, k+T, D),    m' = [1 … 1; m],    τ' = [0 … 0; τ]     (concatenation along T)

so the model then numbers positions over the whole ``k+T`` sequence (BERT: ``0 … k+T-1``;
RoBERTa: the virtual tokens count as real tokens) and the encoder output has length ``k+T``. A
classification head reads position 0, which is the first virtual token. This is exactly Hugging
Face PEFT's prompt learning for sequence classification (``PeftModelForSequenceClassification``
concatenates the prompts to ``inputs_embeds``, ones to the mask and zeros to ``token_type_ids``).

Parameters: ``k·D`` (the task head is trained by the trainer, not counted here). The delta is
``{"prompt": E}``; every leaf is labelled ``"prompt"`` for the optimizer, so
``group_lr={"prompt": m}`` gives the prompts their own (typically much larger) learning rate.

Init (``init``):

* ``"random"``: ``E ~ normal(0, init_scale)`` (PEFT's ``RANDOM`` is ``torch.nn.Embedding``'s
  ``normal(0, 1)``: ``init_scale=1``);
* ``"vocab"``: ``k`` rows of the base model's word-embedding table (``ModelInfo.embedding_path``)
  at token ids drawn uniformly with replacement from the init rng (PEFT's ``SAMPLE_VOCAB``);
* ``"text"``: the rows at ``init_token_ids`` (PEFT's ``TEXT``). The transform stays
  tokenizer-free: :func:`token_ids_for_text` (or :func:`with_text_ids` on a config with
  ``init_text``) tokenises the text as PEFT does (special tokens included), then repeats or
  truncates the ids to ``k``; ids of another length are fitted the same way at init.

**A fresh delta is not the identity**: the extra tokens change every attention and the pooled
position (``adds_tokens=True``). The laws that hold instead: the result equals running the base
model on the concatenated embeddings above; in particular, prompts equal to the word embeddings
of ids ``i₁ … i_k`` give exactly the base model's output on the input ids ``[i₁ … i_k, ids]`` (mask
``[1 … 1, m]``, types ``[0 … 0, τ]``). Prompts act on activations: **not mergeable**.

Composition: a later prompt transform wraps an earlier one, so ``compose(prompt(name="a"),
prompt(name="b"))`` feeds ``[E_b; E_a; X]``. Mind ``max_position_embeddings``: ``k+T`` positions
are used.

Example::

    method = jpeft.prompt(PromptConfig(num_virtual_tokens=20, init="vocab"))
    delta = method.init(jax.random.key(0), base, model.info())     # {"prompt": (20, D)}
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp

from jpeft.checkpoint import peft_convert as PC
from jpeft.checkpoint.peft_fields import _PROMPT_TUNING_HANDLED
from jpeft.core import paths as P
from jpeft.core.capabilities import AddsTokens
from jpeft.core.registry import register
from jpeft.core.transform import ApplyContext, Interceptor, ModelInfo, Transform, resolve_info
from jpeft.models.taps import EMBED_INPUTS, is_tap, require_taps

INITS = ("random", "vocab", "text")
LABEL = "prompt"


def validate_num_virtual_tokens(where: str, value: Any) -> None:
    """``value`` is an integer >= 1 (``where`` names the config, e.g. ``"prompt"``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}.num_virtual_tokens must be an integer >= 1, got {value!r}")


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    num_virtual_tokens: int = dataclasses.field(
        default=20, metadata={"help": "number k of virtual tokens prepended to every input"}
    )
    init: str = dataclasses.field(
        default="random",
        metadata={"help": "'random' (normal(0, init_scale)), 'vocab' (rows of the word-embedding "
                          "table at random token ids) or 'text' (rows at init_token_ids)"},
    )
    init_scale: float = dataclasses.field(
        default=0.02,
        metadata={"help": "std of the 'random' init (PEFT's RANDOM, torch.nn.Embedding, is 1.0)"},
    )
    init_text: str = dataclasses.field(
        default="",
        metadata={"help": "text for init='text'; tokenised into init_token_ids by "
                          "jpeft.methods.prompt.with_text_ids (the transform has no tokenizer)"},
    )
    init_token_ids: tuple[int, ...] = dataclasses.field(
        default=(),
        metadata={"help": "token ids whose embeddings initialise the prompt for init='text' "
                          "(repeated/truncated to num_virtual_tokens, as PEFT does)"},
    )

    def __post_init__(self) -> None:
        validate_num_virtual_tokens("prompt", self.num_virtual_tokens)
        if self.init not in INITS:
            raise ValueError(f"prompt.init must be one of {list(INITS)}, got {self.init!r}")
        if not (math.isfinite(self.init_scale) and self.init_scale > 0.0):
            raise ValueError(f"prompt.init_scale must be a finite number > 0, got {self.init_scale}")
        ids = tuple(self.init_token_ids)
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
            raise ValueError(f"prompt.init_token_ids must be non-negative integers, got {list(ids)}")
        if self.init == "text" and not ids and not self.init_text:
            raise ValueError(
                "prompt.init='text' needs prompt.init_text (then with_text_ids(config, tokenizer)) "
                "or prompt.init_token_ids"
            )
        if self.init != "text" and (ids or self.init_text):
            raise ValueError(
                f"prompt.init_text/init_token_ids are only used with prompt.init='text', "
                f"got init={self.init!r}"
            )


def fit_token_ids(ids: Sequence[int], k: int) -> tuple[int, ...]:
    """``ids`` repeated (cyclically) or truncated to exactly ``k`` entries, as PEFT's TEXT init."""
    ids = [int(i) for i in ids]
    if not ids:
        raise ValueError("cannot initialise prompts from an empty list of token ids")
    reps = math.ceil(k / len(ids))
    return tuple((ids * reps)[:k])


def token_ids_for_text(tokenizer: Any, text: str, k: int) -> tuple[int, ...]:
    """The ``k`` token ids PEFT's ``prompt_tuning_init="TEXT"`` uses for ``text``.

    ``tokenizer(text)["input_ids"]`` (so special tokens such as ``[CLS]``/``[SEP]`` are included,
    as in PEFT), then repeated or truncated to ``k`` ids (:func:`fit_token_ids`).
    """
    if not text:
        raise ValueError("token_ids_for_text: empty text")
    return fit_token_ids(tokenizer(text)["input_ids"], k)


def with_text_ids(config: PromptConfig, tokenizer: Any) -> PromptConfig:
    """``config`` with ``init_token_ids`` filled from ``init_text`` (unchanged unless
    ``init="text"`` with text and no ids yet)."""
    if config.init != "text" or config.init_token_ids or not config.init_text:
        return config
    ids = token_ids_for_text(tokenizer, config.init_text, config.num_virtual_tokens)
    return dataclasses.replace(config, init_token_ids=ids)


def word_embeddings(base: P.Params, info: ModelInfo, where: str = "prompt") -> jax.Array:
    """The base model's word-embedding table ``(vocab, D)`` at ``info.embedding_path``."""
    flat = P.flatten(base)
    table = flat.get(info.embedding_path)
    if table is None:
        raise KeyError(
            f"{where}: no word-embedding table at ModelInfo.embedding_path="
            f"{info.embedding_path!r}; parameters with 'embed' in their path: "
            f"{[p for p in flat if 'embed' in p]}"
        )
    chex.assert_rank(table, 2)
    return table


def init_prompts(config: PromptConfig, rng: jax.Array, base: P.Params, info: ModelInfo,
                 where: str = "prompt") -> jax.Array:
    """The initial prompt ``E (k, D)`` for ``config.init`` (see the module docstring)."""
    k, d = config.num_virtual_tokens, info.hidden_size
    if config.init == "random":
        return config.init_scale * jax.random.normal(rng, (k, d), jnp.float32)
    table = word_embeddings(base, info, where)
    vocab = table.shape[0]
    if config.init == "vocab":
        ids = jax.random.randint(rng, (k,), 0, vocab)
    else:
        if not config.init_token_ids:
            raise ValueError(
                f"{where}.init='text' with init_text={config.init_text!r} but no init_token_ids: "
                "fill them with jpeft.methods.prompt.with_text_ids(config, tokenizer) first"
            )
        bad = sorted({i for i in config.init_token_ids if i >= vocab})
        if bad:
            raise ValueError(f"{where}.init_token_ids {bad} are outside the vocabulary (size {vocab})")
        ids = jnp.asarray(fit_token_ids(config.init_token_ids, k), jnp.int32)
    return jnp.asarray(table, jnp.float32)[ids]


def prepend_tokens(embeds: jax.Array, mask: jax.Array, types: jax.Array,
                   prompts: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Prepend virtual token embeddings to one ``embed.inputs`` triple.

    ``embeds (B,T,D)``, ``mask (B,T)``, ``types (B,T)``, ``prompts (k,D)`` (shared) or
    ``(B,k,D)`` (per example) -> ``embeds' (B,k+T,D)``, ``mask' (B,k+T)`` (ones first, in
    ``mask``'s dtype) and ``types' (B,k+T)`` (zeros first).
    """
    chex.assert_rank([embeds, mask, types], [3, 2, 2])
    chex.assert_equal_shape([mask, types])
    chex.assert_equal_shape_prefix([embeds, mask], 2)
    b = embeds.shape[0]
    if prompts.ndim == 2:
        prompts = jnp.broadcast_to(prompts[None], (b, *prompts.shape))
    chex.assert_rank(prompts, 3)
    chex.assert_axis_dimension(prompts, 0, b)
    if prompts.shape[2] != embeds.shape[2]:
        raise ValueError(
            f"prompt width {prompts.shape[2]} != embedding width {embeds.shape[2]}; "
            "was the delta made for another model?"
        )
    k = prompts.shape[1]
    return (jnp.concatenate([prompts.astype(embeds.dtype), embeds], axis=1),
            jnp.concatenate([jnp.ones((b, k), mask.dtype), mask], axis=1),
            jnp.concatenate([jnp.zeros((b, k), types.dtype), types], axis=1))


def prompt_interceptor(prompts: jax.Array) -> Interceptor:
    """An interceptor that prepends ``prompts`` at the ``embed.inputs`` tap (see
    :func:`prepend_tokens`); used by prompt tuning and P-tuning."""

    def intercept(next_fun, args, kwargs, context):
        if not is_tap(context, EMBED_INPUTS):
            return next_fun(*args, **kwargs)
        embeds, mask, types = next_fun(*args, **kwargs)
        return prepend_tokens(embeds, mask, types, prompts)

    return intercept


def prompt(config: PromptConfig = PromptConfig(), *, name: str = "prompt") -> Transform:
    """Prompt tuning as a :class:`~jpeft.core.transform.Transform` (see the module docstring)."""

    def init(rng: jax.Array, base: P.Params, info: ModelInfo | None = None) -> dict[str, Any]:
        info = resolve_info(info)
        require_taps(info.taps, name, (EMBED_INPUTS,))
        info.require(name, "hidden_size")
        return {"prompt": init_prompts(config, rng, base, info, name)}

    def interceptors(delta: Any, ctx: ApplyContext) -> list[Interceptor]:
        if "prompt" not in delta:
            raise KeyError(f"{name}: a prompt-tuning delta is {{'prompt': (k, D)}}, got keys {sorted(delta)}")
        if ctx.decoding:  # the prompts went into the KV cache with the prefill
            return []
        return [prompt_interceptor(delta["prompt"])]

    return Transform(
        name=name,
        config=config,
        init=init,
        interceptors=interceptors,
        labels=lambda delta: jax.tree_util.tree_map(lambda _: LABEL, delta),
        capabilities=(AddsTokens(),),
    )


# -- Hugging Face PEFT format ------------------------------------------------------------------

def _from_peft(cfg: dict[str, Any], tensors: dict[str, Any], ctx: PC.PeftContext) -> tuple[Transform, Any]:
    """A PEFT ``PROMPT_TUNING`` adapter: its ``prompt_embeddings (P, H)`` is the delta's prompt."""
    hidden = ctx.model.info().hidden_size
    table = PC.read_prompts(cfg, tensors, ctx, _PROMPT_TUNING_HANDLED, hidden, "hidden")
    return prompt(PromptConfig(num_virtual_tokens=int(cfg["num_virtual_tokens"]))), {LABEL: jnp.asarray(table)}


def _to_peft(transform: Transform, delta: Any, ctx: PC.PeftContext) -> tuple[dict[str, Any], dict[str, Any], P.Params]:
    k = transform.config.num_virtual_tokens
    fields = {"peft_type": "PROMPT_TUNING", "prompt_tuning_init": "RANDOM", **PC.prompt_fields(k, ctx)}
    return fields, PC.prompt_tensors(delta[LABEL], k), ctx.params


register("prompt", PromptConfig, prompt, prepare=with_text_ids,
         peft=PC.PeftConverter(peft_type="PROMPT_TUNING", layout="prompt", load=_from_peft, save=_to_peft))
