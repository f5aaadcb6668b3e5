"""The contract between :mod:`~jpeft.checkpoint.hf_peft` and a method's Hugging Face PEFT
converter, and the helpers converters share.

A method that has a PEFT equivalent registers a :class:`PeftConverter` beside itself
(``register("lora", LoraConfig, lora, peft=PeftConverter(...))`` at the end of its file);
``load_peft_adapter`` and ``save_peft_adapter`` find it by the folder's ``peft_type`` or by the
transform's config class and hold no method-specific code. The converter receives the adapter's
config and tensors (or the jpeft delta) and a :class:`PeftContext` with the model's module naming;
the folder I/O, the head (``modules_to_save``) and trained biases are handled by ``hf_peft``.

Two layouts exist in PEFT: ``"modules"`` (LoRA, (IA)³: tensors per targeted module under
``base_model.model.<module>``) and ``"prompt"`` (prompt learning: one ``prompt_embeddings``
tensor, the head under ``base_model.``, sequence classification only).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import jax
import numpy as np

from jpeft.checkpoint.peft_fields import ADAPTER_CONFIG
from jpeft.checkpoint.peft_naming import _Modules
from jpeft.checkpoint.peft_targets import _exact_regex, _name_to_path_regex
from jpeft.core import paths as P
from jpeft.core.transform import Transform

ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODULE_KEY = "base_model.model."  # tensors of the "modules" layout: MODULE_KEY + torch module name


@dataclasses.dataclass(frozen=True)
class PeftContext:
    """What a converter may read besides the adapter itself.

    ``label``: the folder, for error messages. ``mods``: jpeft module paths <-> PyTorch module
    names of this model (``None`` for the "prompt" layout). ``params``: on load the base, on save
    the model's parameters (with the trained head). ``model``: the jpeft model (may be ``None``
    on save). ``trained_base``: on save, the base leaves the transform trains besides the head
    (LoRA's ``bias="all"``).
    """

    label: str
    mods: _Modules | None
    params: P.Params
    model: Any = None
    trained_base: Sequence[str] = ()


LoadFn = Callable[[dict[str, Any], dict[str, np.ndarray], PeftContext],
                  "tuple[Transform, Any] | tuple[Transform, Any, P.Params]"]
SaveFn = Callable[[Transform, Any, PeftContext], tuple[dict[str, Any], dict[str, np.ndarray], P.Params]]


@dataclasses.dataclass(frozen=True)
class PeftConverter:
    """A method's Hugging Face PEFT format, both ways.

    ``peft_type``: the ``peft_type`` it reads (``None``: it only writes, e.g. P-tuning v2 writes
    PEFT's ``PREFIX_TUNING``, which reads back as prefix tuning). ``layout``: ``"modules"`` or
    ``"prompt"`` (see the module docstring). ``load(adapter_config, tensors, ctx) ->
    (transform, delta)`` pops the tensors it uses (``hf_peft`` puts the rest into the base:
    head, biases) and raises ``ValueError`` naming the field for anything it cannot represent
    exactly; an adapter that expects rewritten base weights (LoRA's PiSSA, OLoRA) returns
    ``(transform, delta, base)`` with the base as PEFT rewrites it. ``save(transform, delta, ctx) -> (adapter_config fields, tensors, params)`` returns
    the method's config fields and tensors (keys as PEFT names them) and ``params`` with whatever
    it folded in (a LoRA on the head is merged, PEFT trains the head whole). ``token_companion``:
    PEFT's config of this type carries ``trainable_token_indices``, which reads as (and is written
    from) a composition with :mod:`~jpeft.methods.trainable_tokens`.
    """

    peft_type: str | None
    layout: Literal["modules", "prompt"]
    load: LoadFn | None
    save: SaveFn
    token_companion: bool = False  # PEFT's config takes trainable_token_indices (LoRA)


def take(tensors: dict[str, np.ndarray], key: str, label: str, what: str) -> np.ndarray:
    """Pop ``tensors[key]``; a missing key is a mismatch between the adapter and this base."""
    if key not in tensors:
        raise ValueError(f"{label}: {ADAPTER_WEIGHTS} lacks {key!r} ({what}); the adapter does not "
                         "match its config on this base — is it the architecture it was trained on?")
    return tensors.pop(key)


def refuse_leftover(tensors: Mapping[str, np.ndarray], markers: Sequence[str], label: str) -> None:
    """Refuse method tensors (keys containing a marker) for modules the config does not target."""
    extra = [k for k in tensors if any(m in k for m in markers)]
    if extra:
        raise ValueError(f"{label}: adapter tensors for modules its config does not target on this "
                         f"base: {sorted(extra)[:10]}; is the base the architecture it was trained on?")


def bias_tensors(ctx: "PeftContext", modules: Sequence[str]) -> dict[str, np.ndarray]:
    """PEFT's tensors of the biases a transform trains (``bias="all"`` / ``"<method>_only"``):
    ``<module>.base_layer.bias`` for an adapted module, ``<module>.bias`` for another."""
    assert ctx.mods is not None
    flat, adapted = P.flatten(ctx.params), set(modules)
    tensors = {}
    for path in ctx.trained_base:
        module = path.rpartition("/")[0]
        inner = ".base_layer" if module in adapted else ""
        tensors[f"{MODULE_KEY}{ctx.mods.name(module)}{inner}.bias"] = to_numpy(flat[path])
    return tensors


def to_numpy(x: Any) -> np.ndarray:
    """A float32 host copy of a delta leaf."""
    return np.asarray(jax.device_get(x), np.float32)


def list_targets_regex(targets: Iterable[str]) -> str:
    """The jpeft path regex selecting what PEFT's list ``target_modules`` selects (suffix match)."""
    return "(?:^|/)(?:" + "|".join(_name_to_path_regex(t) for t in sorted(targets)) + ")$"


def target_candidates(cfg: Mapping[str, Any], modules: Sequence[str]) -> list[dict[str, Any]]:
    """``{"targets": regex, "layers": (...)}`` selections to try, in order, for a loaded config
    that must adapt exactly ``modules``: PEFT's own list of suffixes first (readable), else every
    module by its path."""
    candidates = []
    targets = cfg.get("target_modules")
    if isinstance(targets, (list, tuple)) and not cfg.get("exclude_modules"):
        layers = cfg.get("layers_to_transform")
        layers = tuple([layers] if isinstance(layers, int) else (layers or ()))
        candidates.append({"targets": list_targets_regex(targets), "layers": layers})
    candidates.append({"targets": _exact_regex(modules), "layers": ()})
    return candidates


def delta_modules(delta: Any, what: str) -> list[str]:
    """The module paths a delta adapts (sorted), refusing an empty delta."""
    modules = sorted({key.rpartition("/")[0] for key in P.flatten(delta)})
    if not modules:
        raise ValueError(f"save_peft_adapter: the {what} delta adapts no module of the model")
    return modules


def linear_only(mods: _Modules, modules: list[str], where: str, what: str) -> list[str]:
    """``modules``, refusing transformers ``Conv1D`` layers (GPT-2's), whose PEFT adapters of
    ``what`` jpeft does not read or write."""
    conv1d = [mods.name(m) for m in modules if mods.is_conv1d(m)]
    if conv1d:
        raise ValueError(f"{where}: {conv1d[:3]} are transformers Conv1D layers; jpeft reads and writes "
                         f"{what} adapters of Linear layers only (target other layers)")
    return modules


def pattern_groups(values: Mapping[str, Any], default: Any, key: Callable[[list[str]], str]) -> dict[str, Any]:
    """``{key(names): value}`` for the names whose value differs from ``default`` (PEFT's and
    jpeft's ``rank_pattern``/``alpha_pattern``: one regex per distinct value)."""
    groups: dict[Any, list[str]] = {}
    for name, value in values.items():
        if value != default:
            groups.setdefault(value, []).append(name)
    return {key(sorted(names)): value for value, names in groups.items()}


def torch_names_regex(names: Sequence[str]) -> str:
    """A PEFT pattern key matching exactly these module names."""
    return "(?:" + "|".join(re.escape(n) for n in names) + ")"


def read_prompts(cfg: dict[str, Any], tensors: dict[str, np.ndarray], ctx: PeftContext,
                 handled: Iterable[str], width: int, what: str, key_value: bool = False) -> np.ndarray:
    """The checks every prompt-learning adapter shares, then its ``prompt_embeddings``
    ``(num_virtual_tokens, width)`` (``what`` names the width in the error; ``key_value``: the
    fields of a prefix, see :func:`prompt_fields`)."""
    from jpeft.checkpoint.peft_fields import _check_fields, _refuse

    _check_fields(cfg, handled)
    subs = cfg.get("num_transformer_submodules") or 1
    if subs != 1:
        raise _refuse("num_transformer_submodules", subs, "the model has one transformer stack")
    k = int(cfg["num_virtual_tokens"])
    expect = prompt_fields(k, ctx, key_value)
    for field in ("token_dim", "num_layers", "num_attention_heads"):
        got, want = cfg.get(field), expect[field]
        if got is not None and want is not None and int(got) != want:
            raise ValueError(f"{ctx.label}: {ADAPTER_CONFIG} has {field}={got} but the model has {want}; "
                             "is the base the architecture the adapter was trained on?")
    prompts = take(tensors, "prompt_embeddings", ctx.label, "the prompts")
    if prompts.shape != (k, width):
        raise ValueError(f"{ctx.label}: prompt_embeddings has shape {prompts.shape}, expected "
                         f"({k}, {width}) = (num_virtual_tokens, {what})")
    return prompts


def prompt_fields(num_virtual_tokens: int, ctx: PeftContext, key_value: bool = False) -> dict[str, Any]:
    """The config fields every prompt-learning adapter writes: from the model's
    :class:`~jpeft.core.transform.ModelInfo`, or read off a BERT-family tree without a model.

    ``key_value`` (prefix tuning): PEFT sizes a prefix by the key/value heads, ``token_dim =
    kv_heads · head_dim`` and ``num_attention_heads = kv_heads`` (the hidden size and the query
    heads unless the model groups its queries)."""
    fields = {"num_virtual_tokens": num_virtual_tokens, "num_transformer_submodules": 1}
    if ctx.model is not None:
        info = ctx.model.info()
        if key_value:
            return {**fields, "token_dim": info.kv_heads * info.head_dim, "num_layers": info.num_layers,
                    "num_attention_heads": info.kv_heads}
        return {**fields, "token_dim": info.hidden_size, "num_layers": info.num_layers,
                "num_attention_heads": info.num_heads}
    flat = P.flatten(ctx.params)
    layers = {m.group(1) for p in flat for m in [re.match(r"encoder/layer_(\d+)/", p)] if m}
    return {**fields, "token_dim": encoder_width(ctx.params), "num_layers": len(layers),
            "num_attention_heads": None}


def require_full_attention(ctx: PeftContext, what: str) -> None:
    """Refuse a prefix in PEFT's format on a model with a sliding attention window: PEFT's prefix
    sits in the KV cache at positions ``0 … P-1``, so ``transformers``' window drops it from the
    later queries' view, while jpeft's prefix stays visible to every query."""
    config = getattr(ctx.model, "config", None)
    window = getattr(config, "window", None)
    layers = getattr(config, "num_hidden_layers", 0)
    windowed = [i for i in range(layers) if window(i) is not None] if callable(window) else []
    if windowed:
        raise ValueError(
            f"{ctx.label}: {what} on a model with a sliding attention window (layers {windowed}): "
            "PEFT keeps the prefix in the KV cache, where the window hides it from later tokens, "
            "and jpeft's prefix is seen by every token, so the logits would differ on long "
            "inputs; keep the delta as a jpeft adapter (save_adapter)")


def encoder_width(params: P.Params) -> int:
    """The hidden size of a BERT-family parameter tree (its word embeddings' width)."""
    return int(np.shape(P.flatten(params)["embeddings/word_embeddings/embedding"])[1])


def prompt_tensors(table: Any, num_virtual_tokens: int) -> dict[str, np.ndarray]:
    """``{"prompt_embeddings": table}``, refusing a table with another number of rows."""
    table = to_numpy(table)
    if table.shape[0] != num_virtual_tokens:
        raise ValueError(f"save_peft_adapter: {table.shape[0]} prompts but num_virtual_tokens={num_virtual_tokens}")
    return {"prompt_embeddings": table}


__all__ = ["ADAPTER_WEIGHTS", "MODULE_KEY", "PeftContext", "PeftConverter", "encoder_width",
           "list_targets_regex", "pattern_groups", "prompt_fields", "prompt_tensors", "read_prompts",
           "refuse_leftover", "require_full_attention", "take", "to_numpy", "torch_names_regex"]
