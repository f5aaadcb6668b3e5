"""PEFT methods, one per file, all behind :class:`jpeft.core.transform.Transform`.

Each method's file registers it (:func:`jpeft.core.registry.register`); importing this package
imports every method file in it, so a new method needs no line here. :data:`REGISTRY` maps a
method name to its config class and factory; :func:`build` turns a spec such as ``"lora+bitfit"``
and per-method configs into one (composed) transform.
"""

from __future__ import annotations

import importlib
import pkgutil

from jpeft.core.registry import REGISTRY, MethodSpec, build, parse_spec, register
from jpeft.methods.adapters import AdapterConfig, houlsby, pfeiffer
from jpeft.methods.bitfit import BitFitConfig, bitfit
from jpeft.methods.diff_pruning import DiffPruningConfig, diff_pruning
from jpeft.methods.freeze import FreezeConfig, freeze
from jpeft.methods.full import FullConfig, full
from jpeft.methods.hra import HraConfig, hra
from jpeft.methods.ia3 import IA3Config, ia3
from jpeft.methods.ln_tuning import LNTuningConfig, ln_tuning
from jpeft.methods.loha import LohaConfig, loha
from jpeft.methods.lokr import LokrConfig, lokr
from jpeft.methods.lora import LoraConfig, lora
from jpeft.methods.prefix import PrefixConfig, prefix
from jpeft.methods.prompt import PromptConfig, prompt, with_text_ids
from jpeft.methods.ptuning import PTuningConfig, ptuning
from jpeft.methods.ptuning2 import PTuningV2Config, ptuning2
from jpeft.methods.oft import OftConfig, oft
from jpeft.methods.trainable_tokens import TrainableTokensConfig, trainable_tokens
from jpeft.methods.vera import VeraConfig, vera

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["REGISTRY", "MethodSpec", "register", "build", "parse_spec", "full", "FullConfig",
           "lora", "LoraConfig", "houlsby", "pfeiffer", "AdapterConfig", "ia3", "IA3Config", "prompt",
           "PromptConfig", "ptuning", "PTuningConfig", "bitfit", "BitFitConfig", "freeze", "FreezeConfig",
           "diff_pruning", "DiffPruningConfig", "prefix", "PrefixConfig", "ptuning2", "PTuningV2Config",
           "trainable_tokens", "TrainableTokensConfig", "ln_tuning", "LNTuningConfig", "loha",
           "LohaConfig", "lokr", "LokrConfig", "vera", "VeraConfig", "oft",
           "OftConfig", "hra", "HraConfig", "with_text_ids"]
