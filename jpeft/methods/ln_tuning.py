"""LN tuning: train only the normalisation layers (Qi et al., 2022, arXiv:2211.03344; Hugging
Face PEFT's ``LN_TUNING``).

Every LayerNorm / RMSNorm of the base model outside the task head is adapted additively,

    γ' = γ + δ_γ,   β' = β + δ_β,       δ = 0 at init,

through :mod:`jpeft.methods.additive`: a fresh delta is **exactly the identity**, the method
**merges** and unmerges, and the delta holds ``2·D`` numbers per LayerNorm (``D`` per RMSNorm).
A norm module is one whose name contains ``norm`` or is ``ln_*`` (``LayerNorm``,
``input_layernorm``, ``norm``, ``ln_f``, ``q_norm`` ...); ``pattern`` narrows the selection (a
regex searched in the module paths). The deltas are labelled ``"no_decay"`` (norms are not
decayed, as the Hugging Face Trainer does).

Hugging Face PEFT trains a copy of each norm module and stores its values,
``<module>.ln_tuning_layers.weight`` (and ``.bias``); import takes ``δ = value − base``, export
writes ``base + δ``.

Example::

    method = jpeft.ln_tuning()
    delta = method.init(jax.random.key(0), base, model.info())
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from jpeft.checkpoint import peft_convert as PC
from jpeft.checkpoint import peft_fields as F
from jpeft.checkpoint import peft_targets as T
from jpeft.core import paths as P
from jpeft.core.registry import register
from jpeft.core.transform import ModelInfo, Transform
from jpeft.methods.additive import additive, exclude_head

_NORM = re.compile(r"(?:norm[^/]*|(?:^|/)ln_[^/]*)$", re.IGNORECASE)  # the module's own name
_LEAVES = ("scale", "bias")  # Flax names; PyTorch's weight, bias
_TORCH = {"scale": "weight", "bias": "bias"}


@dataclasses.dataclass(frozen=True)
class LNTuningConfig:
    pattern: str = dataclasses.field(
        default="", metadata={"help": "regex searched in the norm modules' paths to narrow the selection "
                                      "('' = every norm outside the task head)"}
    )

    def __post_init__(self) -> None:
        try:
            re.compile(self.pattern)
        except re.error as err:
            raise ValueError(f"ln_tuning.pattern is not a valid regex: {self.pattern!r} ({err})") from None


def norm_modules(config: LNTuningConfig, base: P.Params, info: ModelInfo) -> list[str]:
    """The norm module paths LN tuning trains (head excluded); raises when none is selected."""
    leaves = exclude_head((p for p in P.paths(base) if p.rsplit("/", 1)[-1] in _LEAVES), info)
    modules = sorted({p.rsplit("/", 1)[0] for p in leaves if _NORM.search(p.rsplit("/", 1)[0])})
    chosen = [m for m in modules if re.search(config.pattern, m)] if config.pattern else modules
    if not chosen:
        raise ValueError(
            "ln_tuning: no LayerNorm/RMSNorm module outside the task head"
            + (f" matches pattern={config.pattern!r}; the norm modules are {modules[:8]}" if modules else
               " (a norm module's name contains 'norm' or is 'ln_*'); choose another method"))
    return chosen


def ln_tuning(config: LNTuningConfig = LNTuningConfig(), *, name: str = "ln_tuning") -> Transform:
    """LN tuning as a :class:`~jpeft.core.transform.Transform` (see the module docstring)."""

    def select(base: P.Params, info: ModelInfo) -> list[str]:
        modules = set(norm_modules(config, base, info))
        return [p for p in P.paths(base) if p.rsplit("/", 1)[0] in modules and p.rsplit("/", 1)[-1] in _LEAVES]

    return additive(name, config, select, label="no_decay")


# -- Hugging Face PEFT format ------------------------------------------------------------------
# PEFT's LN_TUNING: ``<module>.ln_tuning_layers.weight`` (and ``.bias``), the trained values.

_HANDLED = {"target_modules", "exclude_modules"}
_KEY = "ln_tuning_layers"


def _from_peft(cfg: dict[str, Any], tensors: dict[str, np.ndarray], ctx: PC.PeftContext) -> tuple[Transform, Any]:
    """A PEFT ``LN_TUNING`` adapter as ``(ln_tuning(config), δ)`` over exactly PEFT's modules."""
    F._check_fields(cfg, _HANDLED)
    mods = ctx.mods
    assert mods is not None
    if cfg.get("target_modules") is None:
        raise F._refuse("target_modules", None, "the saved config must name its target modules")
    flat = P.flatten(ctx.params)
    modules = sorted(mods.by_name[n] for n in mods.by_name if T.peft_target_matches(cfg, n))
    delta: dict[str, Any] = {}
    for module in modules:
        name = mods.name(module)
        for leaf in _LEAVES:
            if f"{module}/{leaf}" not in flat:
                continue
            value = PC.take(tensors, f"{PC.MODULE_KEY}{name}.{_KEY}.{_TORCH[leaf]}", ctx.label, "a norm's values")
            base = np.asarray(flat[f"{module}/{leaf}"], np.float32)
            if value.shape != base.shape:
                raise ValueError(f"{ctx.label}: {name}.{_KEY}.{_TORCH[leaf]} has shape {value.shape}, the "
                                 f"model's {base.shape}; is the base the architecture it was trained on?")
            delta[f"{module}/{leaf}"] = jnp.asarray(value - base)
    if not delta:
        raise ValueError(f"{ctx.label}: target_modules={cfg['target_modules']!r} selects no norm module "
                         "of this model")
    PC.refuse_leftover(tensors, (f".{_KEY}.",), ctx.label)
    config = LNTuningConfig(pattern=T._exact_regex(modules))
    return ln_tuning(config), P.unflatten(delta)


def _to_peft(transform: Transform, delta: Any, ctx: PC.PeftContext) -> tuple[dict[str, Any], dict[str, np.ndarray], P.Params]:
    """LN tuning as PEFT's ``LN_TUNING`` fields and values ``base + δ``."""
    mods = ctx.mods
    assert mods is not None
    body, flat = P.flatten(delta), P.flatten(ctx.params)
    modules = sorted({p.rsplit("/", 1)[0] for p in body})
    if not modules:
        raise ValueError("save_peft_adapter: the LN-tuning delta adapts no module")
    names = [mods.name(m) for m in modules]
    chosen = next((s for s in T._suffix_candidates(names)
                   if {n for n in mods.by_name if T.peft_target_matches({"target_modules": s}, n)} == set(names)),
                  None)
    if chosen is None:
        raise ValueError("save_peft_adapter: PEFT's target rules cannot select exactly these norm modules")
    tensors = {f"{PC.MODULE_KEY}{mods.name(p.rsplit('/', 1)[0])}.{_KEY}.{_TORCH[p.rsplit('/', 1)[1]]}":
               np.asarray(flat[p], np.float32) + PC.to_numpy(d) for p, d in body.items()}
    return {"peft_type": "LN_TUNING", "target_modules": chosen}, tensors, ctx.params


register("ln_tuning", LNTuningConfig, ln_tuning,
         peft=PC.PeftConverter(peft_type="LN_TUNING", layout="modules", load=_from_peft, save=_to_peft))
