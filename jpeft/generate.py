"""Cached text generation (greedy and beam search) for decoder LMs adapted by any transform.

``generate(model, transform, params, delta, input_ids, attention_mask, max_new_tokens=...)``
runs, in one jitted function per (model, transform, settings, shapes):

1. a **prefill** of the (left-padded) prompts ``(B, T)`` that fills a KV cache of
   ``M = T + E + max_new_tokens`` slots (``E``: tokens the transform prepends, e.g. prompt
   tuning's virtual tokens, found from the output shape) and gives the first token;
2. **decode steps** of one token each with ``ApplyContext(decoding=True)`` (prompt methods do not
   prepend again; their tokens are in the cache), until every row has produced ``eos_token_id``
   or ``max_new_tokens`` tokens are out (``lax.while_loop``).

Prefix tuning and P-tuning v2 prepend their keys/values to the cached keys at every step, which
computes exactly what a cache holding the prefix would. LoRA, (IA)³, adapters and the other
methods act through their interceptors as in training.

Greedy: ``y_t = argmax_v log p(v | x, y_<t)``. Beam search (``num_beams = N > 1``) keeps the
``N`` best partial sequences per row by total log-probability ``Σ log p``; a beam that produced
EOS keeps its score and emits padding, competing with the live beams; the returned beam maximises
``Σ log p / len^α`` (``α = length_penalty``, ``len`` counting tokens up to and including EOS). The
cache rows follow their beams (gathered each step).

Returns ``(B, max_new_tokens)`` int32 tokens after the prompt, ``pad_token_id`` after EOS.
The model must provide ``init_cache(batch, max_len)`` and accept ``cache=`` (the Llama and
GPT-2 models do).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp

from jpeft.core.arrays import is_concrete
from jpeft.core.transform import ApplyContext, Delta, Params, Transform, apply

_COMPILED: dict[tuple[Any, ...], tuple[Any, Any, Callable[..., jax.Array]]] = {}


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = dataclasses.field(default=64, metadata={"help": "tokens generated after the prompt"})
    num_beams: int = dataclasses.field(default=1, metadata={"help": "1: greedy; N > 1: beam search with N beams"})
    length_penalty: float = dataclasses.field(
        default=1.0, metadata={"help": "beam search ranks finished beams by score / length**length_penalty"})
    eos_token_id: int | None = dataclasses.field(default=None, metadata={"help": "stop token (None: never stop early)"})
    pad_token_id: int = dataclasses.field(default=0, metadata={"help": "token written after EOS"})

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise ValueError(f"num_beams must be an integer >= 1, got {self.num_beams!r}")
        if isinstance(self.length_penalty, bool) or not isinstance(self.length_penalty, numbers.Real) \
                or not math.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty!r}")
        for field in ("eos_token_id", "pad_token_id"):
            value = getattr(self, field)
            if (value is not None or field == "pad_token_id") and (
                    isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0):
                raise ValueError(f"{field} must be a token id (an integer >= 0), got {value!r}")


def _repeat_rows(tree: Any, batch: int, n: int) -> Any:
    """Repeat every leaf with a leading batch axis ``n`` times (row b -> rows b·n … b·n+n-1)."""
    return jax.tree_util.tree_map(
        lambda x: jnp.repeat(x, n, axis=0) if x.ndim > 0 and x.shape[0] == batch else x, tree)


def _take_rows(tree: Any, rows: jax.Array, batch: int) -> Any:
    return jax.tree_util.tree_map(lambda x: x[rows] if x.ndim > 0 and x.shape[0] == batch else x, tree)


def _build(model: Any, transform: Transform, cfg: GenerationConfig, cache_len: int
           ) -> Callable[[Params, Delta, jax.Array, jax.Array], jax.Array]:
    n_new, eos, pad = cfg.max_new_tokens, cfg.eos_token_id, cfg.pad_token_id

    def step(params, delta, cache, tokens, decoding):
        mask = jnp.ones_like(tokens)
        logits, cache = apply(model, transform, params, delta, tokens, mask, cache=cache,
                              ctx=ApplyContext(decoding=decoding))
        return jax.nn.log_softmax(logits[:, -1].astype(jnp.float32), axis=-1), cache

    def is_eos(tok):
        return jnp.zeros(tok.shape, bool) if eos is None else tok == eos

    def greedy(params, delta, input_ids, attention_mask):
        b = input_ids.shape[0]
        cache = model.init_cache(b, cache_len)
        logits, cache = apply(model, transform, params, delta, input_ids, attention_mask, cache=cache)
        tok = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        out = jnp.full((b, n_new), pad, jnp.int32).at[:, 0].set(tok)
        done = is_eos(tok)

        def cond(carry):
            i, _, _, _, done = carry
            return (i < n_new) & ~jnp.all(done)

        def body(carry):
            i, cache, tok, out, done = carry
            logp, cache = step(params, delta, cache, tok[:, None], True)
            nxt = jnp.where(done, pad, jnp.argmax(logp, axis=-1).astype(jnp.int32))
            return i + 1, cache, nxt, out.at[:, i].set(nxt), done | is_eos(nxt)

        return jax.lax.while_loop(cond, body, (jnp.int32(1), cache, tok, out, done))[3]

    def beam(params, delta, input_ids, attention_mask):
        b, n = input_ids.shape[0], cfg.num_beams
        cache = model.init_cache(b, cache_len)
        logits, cache = apply(model, transform, params, delta, input_ids, attention_mask, cache=cache)
        logp0 = jax.nn.log_softmax(logits[:, -1].astype(jnp.float32), axis=-1)  # (B, V)
        vocab = logp0.shape[-1]
        if n > vocab:
            raise ValueError(f"num_beams={n} exceeds the vocabulary size {vocab}")
        scores, tok = jax.lax.top_k(logp0, n)  # (B, N)
        tok = tok.astype(jnp.int32)
        cache = _repeat_rows(cache, b, n)
        seqs = jnp.full((b, n, n_new), pad, jnp.int32).at[:, :, 0].set(tok)
        done = is_eos(tok)
        lengths = jnp.ones((b, n), jnp.int32)
        base_rows = (jnp.arange(b) * n)[:, None]

        def cond(carry):
            i, *_, done, _ = carry
            return (i < n_new) & ~jnp.all(done)

        def body(carry):
            i, cache, tok, seqs, scores, done, lengths = carry
            logp, cache = step(params, delta, cache, tok.reshape(b * n, 1), True)
            logp = logp.reshape(b, n, vocab)
            only_pad = jnp.full((vocab,), -jnp.inf).at[pad].set(0.0)
            logp = jnp.where(done[:, :, None], only_pad, logp)
            cand = (scores[:, :, None] + logp).reshape(b, n * vocab)
            scores, idx = jax.lax.top_k(cand, n)
            origin, tok = idx // vocab, (idx % vocab).astype(jnp.int32)
            seqs = jnp.take_along_axis(seqs, origin[:, :, None], axis=1).at[:, :, i].set(tok)
            was_done = jnp.take_along_axis(done, origin, axis=1)
            lengths = jnp.take_along_axis(lengths, origin, axis=1) + (~was_done).astype(jnp.int32)
            cache = _take_rows(cache, (base_rows + origin).reshape(-1), b * n)
            return i + 1, cache, tok, seqs, scores, was_done | is_eos(tok), lengths

        init = (jnp.int32(1), cache, tok, seqs, scores, done, lengths)
        _, _, _, seqs, scores, _, lengths = jax.lax.while_loop(cond, body, init)
        normed = scores / lengths.astype(jnp.float32) ** cfg.length_penalty
        best = jnp.argmax(normed, axis=1)
        return jnp.take_along_axis(seqs, best[:, None, None], axis=1)[:, 0]

    return jax.jit(greedy if cfg.num_beams == 1 else beam)


def generate(model: Any, transform: Transform, params: Params, delta: Delta, input_ids: jax.Array,
             attention_mask: jax.Array, *, max_new_tokens: int, num_beams: int = 1,
             length_penalty: float = 1.0, eos_token_id: int | None = None,
             pad_token_id: int = 0) -> jax.Array:
    """Generate ``(B, max_new_tokens)`` tokens after left-padded prompts (see the module docstring).

    The compiled function is cached per model, transform, settings and input shape, so calling
    again with new prompts (same shape) or another delta of the same shapes does not recompile.
    """
    cfg = GenerationConfig(max_new_tokens, num_beams, length_penalty, eos_token_id, pad_token_id)
    if not jnp.issubdtype(jnp.result_type(input_ids), jnp.integer):
        raise TypeError(f"generate: input_ids must be integer token ids, got {jnp.result_type(input_ids)}")
    input_ids = jnp.asarray(input_ids, jnp.int32)
    attention_mask = jnp.asarray(attention_mask, jnp.int32)
    chex.assert_rank([input_ids, attention_mask], 2)
    chex.assert_equal_shape([input_ids, attention_mask])
    if not hasattr(model, "init_cache"):
        raise TypeError(f"{type(model).__name__} has no KV cache (init_cache); generate needs a decoder LM "
                        "(jpeft.models.llama, jpeft.models.gpt2)")
    if input_ids.shape[1] == 0:
        raise ValueError(f"generate: the prompts are empty (input_ids {input_ids.shape}); give every row "
                         "at least one token (e.g. BOS)")
    first = attention_mask[:, -1]
    if is_concrete(first) and bool(jnp.any(first == 0)):
        raise ValueError("generate: the prompts must be left-padded (the last column of attention_mask "
                         "must be 1 in every row); pad on the left")
    b, t = input_ids.shape
    shape = jax.eval_shape(functools.partial(apply, model, transform), params, delta, input_ids, attention_mask)
    extra = shape.shape[1] - t  # tokens the transform prepends (prompt family)
    vocab = shape.shape[-1]
    for field, value in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        if value is not None and value >= vocab:
            raise ValueError(f"generate: {field}={value} is not in the model's vocabulary of {vocab} "
                             "tokens; use the tokenizer of this model")
    if is_concrete(input_ids):
        low, high = int(jnp.min(input_ids)), int(jnp.max(input_ids))
        if low < 0 or high >= vocab:
            raise ValueError(f"generate: input_ids run from {low} to {high}, outside the model's vocabulary "
                             f"of {vocab} tokens (0..{vocab - 1}); use the tokenizer of this model")
    key = (id(model), id(transform), cfg, b, t)
    hit = _COMPILED.get(key)
    if hit is None or hit[0] is not model or hit[1] is not transform:
        hit = (model, transform, _build(model, transform, cfg, t + extra + max_new_tokens))
        _COMPILED[key] = hit
    return hit[2](params, delta, input_ids, attention_mask)


def compiled_count() -> int:
    """How many generation functions have been built (one per model/transform/settings/shape)."""
    return len(_COMPILED)


__all__ = ["GenerationConfig", "compiled_count", "generate"]
