"""The method registry: every method registers itself, in its own file, under a name.

A registration holds the method's config class and factory and, optionally, what completes a
config from the tokenizer (prompt tuning's init text) and the method's Hugging Face PEFT converter
(a :class:`jpeft.checkpoint.peft_convert.PeftConverter`, which ``load_peft_adapter`` and
``save_peft_adapter`` look up here). ``--method=lora+bitfit`` and its
``--lora.r`` flags (the experiments) and saved adapters (:mod:`jpeft.checkpoint.export`) look
methods up here; none of them lists methods itself.

A method's file ends with its registration, e.g. ``register("bitfit", BitFitConfig, bitfit)``;
importing :mod:`jpeft.methods` imports every method file of the package.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from jpeft.core.transform import Transform, compose


def _unchanged(config: Any, tokenizer: Any) -> Any:
    return config


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A selectable method. ``prepare(config, tokenizer) -> config`` completes a config with
    what needs the tokenizer (prompt tuning's init text); identity for most methods. ``peft``:
    its Hugging Face PEFT converter, ``None`` when PEFT has no equivalent."""

    name: str
    config_cls: type
    factory: Callable[..., Transform]
    prepare: Callable[[Any, Any], Any] = _unchanged
    peft: Any = None


REGISTRY: dict[str, MethodSpec] = {}


def register(name: str, config_cls: type, factory: Callable[..., Transform], *,
             prepare: Callable[[Any, Any], Any] = _unchanged, peft: Any = None) -> None:
    """Make a method selectable by name (``--method=name``) and, with ``peft``, readable and
    writable as a Hugging Face PEFT adapter; called by the method's own file."""
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"register({name!r}): the config class {config_cls!r} is not a dataclass")
    spec = MethodSpec(name, config_cls, factory, prepare, peft)
    known = REGISTRY.get(name)
    if known is not None and known != spec:
        raise ValueError(f"register: the method name {name!r} is taken by {known.factory.__module__}."
                         f"{known.factory.__name__}; choose another name (registering it again must "
                         "give the same config class, factory, prepare and peft converter)")
    REGISTRY[name] = spec


def parse_spec(spec: str) -> list[str]:
    """``"lora+bitfit"`` -> ``["lora", "bitfit"]``, refusing unknown names with the known ones."""
    names = [n.strip() for n in spec.split("+") if n.strip()]
    if not names:
        raise ValueError(f"empty method spec {spec!r}; known methods: {', '.join(REGISTRY)}")
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise ValueError(
            f"unknown method(s) {unknown} in {spec!r}; known methods: {', '.join(REGISTRY)} "
            "(combine them with '+', e.g. 'lora+bitfit')"
        )
    return names


def build(spec: str, configs: Mapping[str, Any] | None = None, *, tokenizer: Any = None) -> Transform:
    """One transform for ``spec``; ``configs[name]`` overrides a part's default config. With a
    ``tokenizer``, each part's ``prepare`` completes its config first."""
    configs = configs or {}
    parts = []
    for name in parse_spec(spec):
        method = REGISTRY[name]
        config = configs.get(name) or method.config_cls()
        if tokenizer is not None:
            config = method.prepare(config, tokenizer)
        parts.append(method.factory(config))
    return compose(*parts)


__all__ = ["MethodSpec", "REGISTRY", "build", "parse_spec", "register"]
