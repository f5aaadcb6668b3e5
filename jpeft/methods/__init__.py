"""PEFT methods, one per file, all behind :class:`jpeft.core.transform.Transform`.

``REGISTRY`` maps a method name to its config dataclass and factory; :func:`build` turns a
spec such as ``"lora+bitfit"`` and per-method configs into one (composed) transform.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from jpeft.core.transform import Transform, compose
from jpeft.methods.adapters import AdapterConfig, houlsby, pfeiffer
from jpeft.methods.bitfit import BitFitConfig, bitfit
from jpeft.methods.diff_pruning import DiffPruningConfig, diff_pruning
from jpeft.methods.freeze import FreezeConfig, freeze
from jpeft.methods.full import FullConfig, full
from jpeft.methods.ia3 import IA3Config, ia3
from jpeft.methods.lora import LoraConfig, lora
from jpeft.methods.prefix import PrefixConfig, prefix
from jpeft.methods.prompt import PromptConfig, prompt, with_text_ids
from jpeft.methods.ptuning import PTuningConfig, ptuning
from jpeft.methods.ptuning2 import PTuningV2Config, ptuning2


def _unchanged(config: Any, tokenizer: Any) -> Any:
    return config


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A selectable method. ``prepare(config, tokenizer) -> config`` completes a config with
    what needs the tokenizer (prompt tuning's init text); identity for most methods."""

    name: str
    config_cls: type
    factory: Callable[..., Transform]
    prepare: Callable[[Any, Any], Any] = _unchanged


REGISTRY: dict[str, MethodSpec] = {}


def register(name: str, config_cls: type, factory: Callable[..., Transform],
             prepare: Callable[[Any, Any], Any] = _unchanged) -> None:
    """Make a method selectable by name (``--method=name``)."""
    REGISTRY[name] = MethodSpec(name, config_cls, factory, prepare)


register("full", FullConfig, full)
register("lora", LoraConfig, lora)
register("houlsby", AdapterConfig, houlsby)
register("pfeiffer", AdapterConfig, pfeiffer)
register("ia3", IA3Config, ia3)
register("prompt", PromptConfig, prompt, prepare=with_text_ids)
register("ptuning", PTuningConfig, ptuning)
register("prefix", PrefixConfig, prefix)
register("ptuning2", PTuningV2Config, ptuning2)
register("bitfit", BitFitConfig, bitfit)
register("freeze", FreezeConfig, freeze)
register("diff_pruning", DiffPruningConfig, diff_pruning)


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


__all__ = ["REGISTRY", "MethodSpec", "register", "build", "parse_spec", "full", "FullConfig",
           "lora", "LoraConfig", "houlsby", "pfeiffer", "AdapterConfig", "ia3", "IA3Config", "prompt", "PromptConfig", "ptuning", "PTuningConfig",
           "bitfit", "BitFitConfig", "freeze", "FreezeConfig", "diff_pruning", "DiffPruningConfig",
           "prefix", "PrefixConfig", "ptuning2", "PTuningV2Config"]
