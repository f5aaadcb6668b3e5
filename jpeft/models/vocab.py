"""Resizing the vocabulary of jpeft's own models (``transformers``' ``resize_token_embeddings``).

New tokens (a chat template's special tokens, a domain's words) need rows in the input embedding
table, and in the output layer when it is not tied to it, before
:mod:`~jpeft.methods.trainable_tokens` or full fine-tuning can train them.
:func:`resize_vocab` returns a new model (its config's ``vocab_size`` changed) and new parameters:

    E' = [E ; μ_E 1ᵀ]   (V + n, D),      W' = [W | μ_W 1]   (D, V + n)   (an untied LM head)

with the new rows (columns) the mean of the old ones, as ``transformers`` does with
``mean_resizing=True`` (which also adds noise of covariance ``10⁻⁹·Σ``: below float32's
resolution for these sizes). A smaller ``new_size`` keeps the first rows. Nothing given is
changed; a tied LM head (GPT-2's) follows the table.

Example::

    model2, params2 = resize_vocab(model, base, model.config.vocab_size + 2)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from jpeft import quant as Q
from jpeft.core import paths as P

LM_HEAD = "lm_head/kernel"


def _grown(table: Any, new_size: int, axis: int) -> Any:
    """``table`` cut or grown to ``new_size`` along ``axis``, new entries the mean of the old."""
    old = table.shape[axis]
    if new_size <= old:
        return jnp.take(table, jnp.arange(new_size), axis=axis)
    mean = jnp.mean(table.astype(jnp.float32), axis=axis, keepdims=True).astype(table.dtype)
    reps = [1] * table.ndim
    reps[axis] = new_size - old
    return jnp.concatenate([table, jnp.tile(mean, reps)], axis=axis)


def resize_vocab(model: Any, params: P.Params, new_size: int) -> tuple[Any, P.Params]:
    """``(model', params')`` with ``new_size`` tokens (module docstring); ``model`` is one of
    jpeft's own models (BERT/RoBERTa, Llama and its kin, GPT-2)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "vocab_size") or not hasattr(model, "clone"):
        raise TypeError(f"resize_vocab: expected one of jpeft's own models (jpeft.from_pretrained), got "
                        f"{type(model).__name__}; a model of your own declares its vocabulary itself: "
                        "change it there (e.g. nn.Embed(num_embeddings=...)) and pad its embedding "
                        "parameters to match")
    if not (isinstance(new_size, (int, np.integer)) and not isinstance(new_size, bool) and new_size >= 1):
        raise ValueError(f"resize_vocab: new_size must be an integer >= 1, got {new_size!r}")
    info = model.info()
    flat = dict(P.flatten(params))
    paths = [info.embedding_path] + ([LM_HEAD] if LM_HEAD in flat else [])
    for path, axis in zip(paths, (0, 1)):
        if path not in flat:
            raise KeyError(f"resize_vocab: the parameters have no '{path}' (the model's "
                           f"{'embedding table' if axis == 0 else 'LM head'}); are they this model's?")
        if Q.is_quantized(flat[path]):
            raise ValueError(f"resize_vocab: '{path}' is quantized; resize the float parameters, then "
                             "quantize (jpeft.quantize_base)")
        if flat[path].shape[axis] != config.vocab_size:
            raise ValueError(f"resize_vocab: '{path}' has {flat[path].shape[axis]} tokens, the model's "
                             f"config {config.vocab_size}; are the parameters this model's?")
        flat[path] = _grown(flat[path], int(new_size), axis)
    return model.clone(config=dataclasses.replace(config, vocab_size=int(new_size))), P.unflatten(flat)
