"""LoRA: low-rank adaptation of linear layers (Hu et al., 2021, arXiv:2106.09685).

For a target ``Dense`` with kernel ``W (d_in, d_out)`` the adapted layer computes

    h = x W + b + s · (dropout(x) A) B,      A (d_in, r),  B (r, d_out),  s = α / r

(``s = α / √r`` with ``use_rslora``, Kalajdzievski 2023). ``B = 0`` at init, so a fresh delta
leaves the model unchanged. Training uses the factored form and never builds ``W + s·AB``;
:func:`merge` folds it into the kernel for zero-overhead inference and :func:`unmerge` takes it
back out. The delta mirrors the parameter tree: ``{..., "query": {"lora_A": A, "lora_B": B}}``.

Example::

    method = jpeft.lora(LoraConfig(r=8, alpha=16, targets=r"(query|value)$"))
    delta = method.init(jax.random.key(0), base, model.info())
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import chex
import jax
import jax.numpy as jnp

from jpeft.core import paths as P
from jpeft.core.dropout import dropout
from jpeft.core.transform import ApplyContext, ModelInfo, Transform, dense_interceptor
from jpeft.models.common import linear


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    r: int = dataclasses.field(default=8, metadata={"help": "rank of the update"})
    alpha: float = dataclasses.field(default=8.0, metadata={"help": "scaling numerator: s = alpha / r"})
    dropout: float = dataclasses.field(default=0.0, metadata={"help": "dropout on the LoRA input"})
    targets: str = dataclasses.field(
        default=r"(query|value)$",
        metadata={"help": "regex searched in Dense module paths (e.g. 'attention/self/(query|value)$')"},
    )
    layers: tuple[int, ...] = dataclasses.field(
        default=(), metadata={"help": "only these layer indices (empty: all layers)"}
    )
    use_rslora: bool = dataclasses.field(default=False, metadata={"help": "s = alpha / sqrt(r)"})
    init: str = dataclasses.field(
        default="kaiming", metadata={"help": "A init: 'kaiming' (HF PEFT default) or 'gaussian' (std 1/r)"}
    )
    rank_pattern: dict[str, int] = dataclasses.field(
        default_factory=dict, metadata={"help": "per-target rank: {regex: r}"}
    )
    alpha_pattern: dict[str, float] = dataclasses.field(
        default_factory=dict, metadata={"help": "per-target alpha: {regex: alpha}"}
    )
    bias: str = dataclasses.field(
        default="none", metadata={"help": "train biases too: 'none', 'all' or 'lora_only'"}
    )

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora.r must be >= 1, got {self.r}")
        if self.init not in ("kaiming", "gaussian"):
            raise ValueError(f"lora.init must be 'kaiming' or 'gaussian', got {self.init!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"lora.bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")


_LAYER = re.compile(r"(?:^|/)(?:layer|layers|h)_(\d+)(?:/|$)")


def layer_index(path: str) -> int | None:
    """The layer number in a module path (``encoder/layer_3/...`` -> 3), if any."""
    m = _LAYER.search(path)
    return int(m.group(1)) if m else None


def _pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
    for pattern, value in patterns.items():
        if re.search(pattern, path):
            return value
    return default


def target_modules(config: LoraConfig, base: P.Params) -> list[str]:
    """Module paths of the Dense layers this config adapts."""
    modules = P.select_modules(base, config.targets, what="lora.targets")
    if config.layers:
        modules = [m for m in modules if layer_index(m) in set(config.layers)]
        if not modules:
            raise P.no_match_error(
                f"lora.layers={list(config.layers)}", config.targets,
                P.select_modules(base, config.targets),
            )
    return modules


def rank_and_scale(config: LoraConfig, path: str) -> tuple[int, float]:
    r = int(_pattern_value(config.rank_pattern, path, config.r))
    alpha = float(_pattern_value(config.alpha_pattern, path, config.alpha))
    return r, alpha / (math.sqrt(r) if config.use_rslora else r)


def lora(config: LoraConfig = LoraConfig(), *, name: str = "lora") -> Transform:
    """LoRA as a :class:`~jpeft.core.transform.Transform` (see the module docstring)."""

    def init(rng: jax.Array, base: P.Params, info: ModelInfo) -> dict[str, Any]:
        flat_base = P.flatten(base)
        flat: dict[str, jax.Array] = {}
        modules = target_modules(config, base)
        for key, path in zip(jax.random.split(rng, len(modules)), modules):
            kernel = flat_base[f"{path}/kernel"]
            chex.assert_rank(kernel, 2)
            d_in, d_out = kernel.shape
            r, _ = rank_and_scale(config, path)
            if config.init == "kaiming":
                # kaiming_uniform(a=sqrt(5)) on torch's (r, d_in) weight: bound = 1 / sqrt(d_in)
                bound = 1.0 / math.sqrt(d_in)
                a = jax.random.uniform(key, (d_in, r), jnp.float32, -bound, bound)
            else:
                a = jax.random.normal(key, (d_in, r), jnp.float32) / r
            flat[f"{path}/lora_A"] = a
            flat[f"{path}/lora_B"] = jnp.zeros((r, d_out), jnp.float32)
        return P.unflatten(flat)

    def interceptors(delta: Any, ctx: ApplyContext) -> list[Any]:
        flat = P.flatten(delta)

        def lookup(path: str) -> tuple[jax.Array, jax.Array] | None:
            a = flat.get(f"{path}/lora_A")
            return None if a is None else (a, flat[f"{path}/lora_B"])

        def adapt(dense, x, path, factors):
            a, b = factors
            _, scale = rank_and_scale(config, path)
            y = dense(x)
            if ctx.train and config.dropout > 0.0 and ctx.rng is not None:
                x = dropout(ctx.key(name, path), x, config.dropout)
            update = linear(linear(x, a.astype(x.dtype)), b.astype(x.dtype))
            return y + (scale * update).astype(y.dtype)

        return [dense_interceptor(lookup, adapt)]

    def trainable_base(base: P.Params) -> list[str]:
        if config.bias == "none":
            return []
        biases = [p for p in P.paths(base) if p.endswith("/bias") and not p.startswith("head/")]
        if config.bias == "lora_only":
            modules = set(target_modules(config, base))
            biases = [p for p in biases if p[: -len("/bias")] in modules]
        return biases

    def _fold(params: P.Params, delta: Any, sign: float) -> P.Params:
        flat = P.flatten(params)
        flat_delta = P.flatten(delta)
        for key, a in flat_delta.items():
            if not key.endswith("/lora_A"):
                continue
            path = key[: -len("/lora_A")]
            b = flat_delta[f"{path}/lora_B"]
            _, scale = rank_and_scale(config, path)
            kernel = flat[f"{path}/kernel"]
            flat[f"{path}/kernel"] = (kernel + sign * scale * (a @ b)).astype(kernel.dtype)
        return P.unflatten(flat)

    return Transform(
        name=name,
        config=config,
        init=init,
        interceptors=interceptors,
        trainable_base=trainable_base,
        merge=lambda params, delta: _fold(params, delta, 1.0),
        unmerge=lambda params, delta: _fold(params, delta, -1.0),
    )
