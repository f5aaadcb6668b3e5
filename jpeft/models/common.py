"""Pieces every model family shares: activations by Hugging Face name, config field filtering."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation a Hugging Face config names (``hidden_act`` / ``activation_function``)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def config_from_hf(cls: type, hf: dict[str, Any], overrides: dict[str, Any]) -> Any:
    """``cls(**fields of hf that cls has, **overrides)``.

    ``dtype`` in a Hugging Face config is the storage dtype of the weights (``None`` in
    ``PretrainedConfig.to_dict()``): not inherited; the caller chooses jpeft's ``dtype``.
    """
    names = {f.name for f in dataclasses.fields(cls)} - {"dtype"}
    kwargs = {k: v for k, v in hf.items() if k in names}
    kwargs.update(overrides)
    return cls(**kwargs)
