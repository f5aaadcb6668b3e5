"""Hugging Face PEFT adapter folders <-> jpeft transforms, for jpeft's own model families.

A PEFT adapter folder (``PeftModel.save_pretrained``) holds

* ``adapter_config.json``: the PEFT config (``peft_type``, ``task_type`` and the method's fields);
* ``adapter_model.safetensors``: the adapter tensors with the adapter name stripped, e.g. for
  LoRA on ``BertForSequenceClassification``
  ``base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight`` ``(r, d_in)`` and
  ``....lora_B.weight`` ``(d_out, r)``; (IA)³'s ``....ia3_l`` ``(d_out, 1)`` (or ``(1, d_in)`` for
  a feed-forward target); the trained head (``modules_to_save``) as
  ``base_model.model.classifier.weight``; trained biases (``bias="all"``/``"lora_only"``) as
  ``....bias`` (``....base_layer.bias`` on a LoRA target). Prompt-learning methods store one
  tensor ``prompt_embeddings`` — the prompts *after* their encoder (P-tuning's MLP/LSTM, prefix
  tuning's projection MLP are evaluated once at save time) — and the head as
  ``base_model.classifier.weight``.

On the decoders (Llama, GPT-2; ``task_type="CAUSAL_LM"``) the keys name the modules of
``LlamaForCausalLM`` / ``GPT2LMHeadModel``, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``; GPT-2's ``Conv1D`` layers
(``c_attn``, ``c_proj``, ``c_fc``) take LoRA and (IA)³ like Dense layers (PEFT's
``fan_in_fan_out`` only says how PEFT merges into them; jpeft writes it as PEFT would). Prompt
tuning, P-tuning and prefix tuning go both ways on decoders too (prefixes not on models with a
sliding window: :func:`~jpeft.checkpoint.peft_convert.require_full_attention`).

:func:`load_peft_adapter` turns such a folder into ``(transform, delta, params)`` — LoRA, (IA)³,
prompt tuning, prefix tuning (with or without projection), P-tuning, LN tuning and trainable
tokens — and
:func:`save_peft_adapter` writes one from a jpeft transform, so that
``peft.PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base), path)``
(``AutoModelForCausalLM`` for a decoder) computes the same logits. LoRA adapters with ``use_dora`` (DoRA) go both ways: PEFT's
``....lora_magnitude_vector`` ``(d_out,)`` is jpeft's ``lora_magnitude`` leaf. Anything jpeft
cannot represent exactly (another ``peft_type``,
a target that is not a Dense layer, a base-rewriting LoRA init, ...) is refused
with a ``ValueError`` naming the field and its value: an adapter is never loaded approximately.

Each method's converter lives in the method's own file and is registered with it
(:class:`~jpeft.checkpoint.peft_convert.PeftConverter`); this module finds it by ``peft_type`` or
by the transform's config class. Target selection follows PEFT's own rules (``check_target_module_exists``: a list entry matches a
module whose name equals it or ends with ``"." + entry``, a string is ``re.fullmatch``-ed, the
``modules_to_save`` are excluded, ``layers_to_transform``/``layers_pattern`` filter list targets,
``rank_pattern``/``alpha_pattern`` keys ``k`` match ``(.*\\.)?(k)$``), evaluated on the PyTorch
module names of the jpeft model. The jpeft config gets a compact regex when one selects exactly
the same modules, else an explicit alternation of the module paths.

Prefix tuning: PEFT hands the prefix to the model as ``past_key_values``, and ``transformers``
then numbers the real tokens' positions from ``P = num_virtual_tokens`` (the cache length)
instead of 0. jpeft's :mod:`~jpeft.methods.prefix` numbers them from 0 unless its config says
``peft_positions=True``: imported prefixes get that flag, and only a prefix (or P-tuning v2)
trained with it can be exported to PEFT.

The concerns live apart: which config fields are read, ignored or refused
(:mod:`~jpeft.checkpoint.peft_fields`), PEFT's target-module rules
(:mod:`~jpeft.checkpoint.peft_targets`), jpeft paths <-> PyTorch module names
(:mod:`~jpeft.checkpoint.peft_naming`), the converter contract (:mod:`~jpeft.checkpoint.peft_convert`),
each method's conversion (its own file); this module reads and writes the folders, the head and
trained biases.

Safety: ``adapter_model.bin`` (a pickled file) is never read; re-save the adapter with
``save_pretrained(..., safe_serialization=True)``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.checkpoint.atomic import atomic_dir
from jpeft.checkpoint.peft_convert import ADAPTER_WEIGHTS, MODULE_KEY, PeftContext, PeftConverter
from jpeft.checkpoint.peft_fields import ADAPTER_CONFIG, _refuse
from jpeft.checkpoint.peft_naming import (
    BERT,
    Family,
    _encoder_prefix,
    _head_entries,
    _is_roberta,
    _Modules,
    _modules,
    _split_head_delta,
    model_family,
    torch_module_name,
)
from jpeft.checkpoint.peft_targets import peft_target_matches  # noqa: F401  (part of this module's API)
from jpeft.core import paths as P
from jpeft.core.transform import Transform, compose

PICKLE_WEIGHTS = "adapter_model.bin"

# ----------------------------------------------------------------------------------------------
# Reading

def resolve_adapter_dir(path: str | os.PathLike[str], *, revision: str | None = None) -> Path:
    """A local folder holding an adapter: ``path`` itself, or a Hub snapshot (needs the network)."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise NotADirectoryError(f"{local} is a file; pass the adapter folder (with {ADAPTER_CONFIG})")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path), revision=revision,
                                      allow_patterns=[ADAPTER_CONFIG, ADAPTER_WEIGHTS, "*.md"]))
    except Exception as err:  # network errors, unknown repo ...
        raise FileNotFoundError(
            f"adapter {str(path)!r} is neither a local folder nor reachable on the Hugging Face Hub "
            f"({type(err).__name__}: {err})") from err


def read_adapter(folder: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(adapter_config, {key: float32 array})`` of a PEFT adapter folder (nothing pickled is read)."""
    cfg_file = folder / ADAPTER_CONFIG
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{folder} has no {ADAPTER_CONFIG}; is it a PEFT adapter folder?")
    cfg = _read_config(cfg_file)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        if (folder / PICKLE_WEIGHTS).is_file():
            raise ValueError(
                f"{folder} holds only {PICKLE_WEIGHTS}, a pickled file, which jpeft never unpickles. Re-save "
                "the adapter with safetensors: PeftModel.from_pretrained(base, folder)."
                "save_pretrained(out, safe_serialization=True)")
        raise FileNotFoundError(f"{folder} has no {ADAPTER_WEIGHTS}")
    from safetensors import safe_open

    tensors: dict[str, np.ndarray] = {}
    try:
        with safe_open(str(weights), framework="flax") as f:  # flax: bf16/fp16 readable without torch
            for key in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                tensors[key] = np.asarray(jax.device_get(f.get_tensor(key)), dtype=np.float32)
    except Exception as err:  # noqa: BLE001 (safetensors raises its own SafetensorError)
        raise ValueError(f"{weights} cannot be read ({type(err).__name__}: {err}); the file is "
                         "truncated or damaged") from None
    bad = sorted(k for k, v in tensors.items() if not np.isfinite(v).all())
    if bad:
        raise ValueError(f"{weights} holds non-finite values (NaN or inf) in {bad[:6]}; the adapter "
                         "is refused")
    return cfg, tensors


# The types of the config fields the loaders read (others are refused or ignored by name).
_FIELD_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "peft_type": ((str,), "a string"),
    "task_type": ((str, type(None)), "a string or null"),
    "r": ((int,), "an integer"),
    "lora_alpha": ((int, float), "a number"),
    "lora_dropout": ((int, float, type(None)), "a number"),
    "use_rslora": ((bool,), "true or false"),
    "bias": ((str,), "a string"),
    "target_modules": ((list, str, type(None)), "a list of names or a regex string"),
    "exclude_modules": ((list, str, type(None)), "a list of names or a regex string"),
    "feedforward_modules": ((list, str, type(None)), "a list of names or a regex string"),
    "rank_pattern": ((dict, type(None)), "an object"),
    "alpha_pattern": ((dict, type(None)), "an object"),
    "layers_to_transform": ((int, list, type(None)), "an integer or a list of integers"),
    "num_virtual_tokens": ((int,), "an integer"),
    "token_dim": ((int, type(None)), "an integer"),
    "num_layers": ((int, type(None)), "an integer"),
    "num_attention_heads": ((int, type(None)), "an integer"),
    "num_transformer_submodules": ((int, type(None)), "an integer"),
    "encoder_hidden_size": ((int, type(None)), "an integer"),
    "prefix_projection": ((bool,), "true or false"),
}


def read_json_object(file: Path) -> dict[str, Any]:
    """A JSON file that must hold an object; a ``ValueError`` names the file and the problem
    (not UTF-8, a syntax error with its line and column, another JSON type)."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{file} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON: {err.msg} at line {err.lineno}, column "
                         f"{err.colno}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{file} holds a JSON {type(value).__name__}, not an object")
    return value


# PEFT types whose "r" is 0 when another field sizes the adapter (OFT: oft_block_size)
_RANK_MAY_BE_ZERO = {"OFT"}


def _read_config(file: Path) -> dict[str, Any]:
    """``adapter_config.json`` as a dict: syntax errors, a document that is not an object and
    wrongly typed or out-of-range fields name the file and the field."""
    cfg = read_json_object(file)
    for field, (types, text) in _FIELD_TYPES.items():
        if field not in cfg:
            continue
        value = cfg[field]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ValueError(f"{file}: field {field!r} is {value!r}; it must be {text}")
    for field in ("r", "num_virtual_tokens"):
        least = 0 if field == "r" and cfg.get("peft_type") in _RANK_MAY_BE_ZERO else 1
        if field in cfg and cfg[field] < least:
            raise ValueError(f"{file}: field {field!r} is {cfg[field]!r}; it must be an integer >= {least}")
    dropout = cfg.get("lora_dropout")
    if dropout is not None and not 0 <= dropout < 1:
        raise ValueError(f"{file}: field 'lora_dropout' is {dropout!r}; it must be in [0, 1)")
    return cfg


def _weight_leaf(flat: Mapping[str, Any], module: str) -> str | None:
    for leaf in ("kernel", "scale", "embedding"):
        if f"{module}/{leaf}" in flat:
            return leaf
    return None


def _put_base_tensors(tensors: dict[str, np.ndarray], key_prefix: str, mods: _Modules,
                      base_flat: dict[str, Any], label: str) -> dict[str, Any]:
    """Full module weights (``modules_to_save``, trained biases) into a copy of the base."""
    updates: dict[str, Any] = {}
    keys = sorted(tensors)
    present = set(keys)
    for key in keys:
        value = tensors.pop(key)
        if not key.startswith(key_prefix):
            raise ValueError(f"{label}: unexpected tensor {key!r} (expected keys under {key_prefix!r})")
        name = key[len(key_prefix):]
        if ".original_module." in name:
            continue  # the frozen copy of a modules_to_save module (bias="all" saves it too)
        if ".modules_to_save." in name:
            plain = name.replace(".modules_to_save.", ".")
            if key_prefix + plain in present:
                continue  # duplicate of the plain key
            name = plain
        name = name.replace(".base_layer.", ".")
        module, _, leaf = name.rpartition(".")
        path = mods.path(module)
        if path is None or path == "":
            raise ValueError(
                f"{label}: tensor {key!r} belongs to module {module!r}, which this model does not "
                f"have; is the base the architecture the adapter was trained on ({mods.family.name}"
                f"{', a classification head' if mods.head else ''})?")
        if leaf == "weight":
            jleaf = _weight_leaf(base_flat, path)
            if jleaf is None:
                raise ValueError(f"{label}: {key!r}: module {path!r} has no weight in this model")
            target = f"{path}/{jleaf}"
            if jleaf == "kernel" and not mods.is_conv1d(path):
                value = value.T
        elif leaf == "bias":
            target = f"{path}/bias"
            if target not in base_flat:
                raise ValueError(f"{label}: {key!r}: module {path!r} has no bias in this model")
        else:
            raise ValueError(f"{label}: unexpected tensor {key!r}")
        old = base_flat[target]
        if tuple(np.shape(old)) != value.shape:
            hint = ""
            if path.startswith("head"):
                hint = (" The head's shape differs: load the model with the adapter's num_labels "
                        "(jpeft.models.bert.from_pretrained(..., num_labels=N)).")
            raise ValueError(f"{label}: {key!r} has shape {value.shape} but {target} has shape "
                             f"{tuple(np.shape(old))}.{hint}")
        updates[target] = jnp.asarray(value, dtype=jnp.asarray(old).dtype)
    return updates


def _converters() -> list[PeftConverter]:
    """The PEFT converters the methods registered (importing the methods fills the registry)."""
    from jpeft.methods import REGISTRY

    return [m.peft for m in REGISTRY.values() if m.peft is not None]


def _converter_for(transform: Transform) -> PeftConverter:
    from jpeft.methods import REGISTRY

    for method in REGISTRY.values():
        if method.peft is not None and isinstance(transform.config, method.config_cls):
            return method.peft
    writable = [m.name for m in REGISTRY.values() if m.peft is not None]
    raise ValueError(  # noqa: TRY004 (an unsupported method, not a wrong argument type)
        f"save_peft_adapter: {transform.name!r} ({type(transform.config).__name__}) has no Hugging Face "
        f"PEFT equivalent that jpeft writes (methods with one: {', '.join(writable)}). Export merged "
        "weights (export_merged_hf) or a jpeft adapter (save_adapter) instead.")


def _head_check(task_type: Any, config: Any, family: Family) -> None:
    if task_type not in family.tasks:
        kinds = ("encoders with a sequence-classification head (SEQ_CLS) or none (FEATURE_EXTRACTION)"
                 if family is BERT else "decoders with their LM head (CAUSAL_LM)")
        raise _refuse("task_type", task_type, f"jpeft's {family.name} models are {kinds}")
    if task_type == "SEQ_CLS" and config.head != "classification":
        raise ValueError(f"{ADAPTER_CONFIG}: task_type='SEQ_CLS' needs a model with a classification "
                         f"head, but this model has head={config.head!r}")


def load_peft_adapter(path: str | os.PathLike[str], model: Any, base: P.Params, *,
                      revision: str | None = None) -> tuple[Transform, Any, dict[str, Any]]:
    """Load a PEFT adapter folder (or Hub id) for a jpeft ``model`` (BERT/RoBERTa, Llama, GPT-2).

    Returns ``(transform, delta, params)``: ``jpeft.apply(model, transform, params, delta, ...)``
    computes what ``PeftModel.from_pretrained(hf_base, path)`` computes. ``params`` is ``base``
    with the adapter's full-module weights put in (the ``modules_to_save`` head, trained biases);
    ``base`` itself is not modified. Raises ``ValueError`` for a config jpeft cannot represent
    exactly (naming the field and value), for ``adapter_model.bin`` and for tensors that do not
    fit the base.
    """
    family, config = model_family(model)
    folder = resolve_adapter_dir(path, revision=revision)
    cfg, tensors = read_adapter(folder)
    peft_type = cfg.get("peft_type")
    readers = {c.peft_type: c for c in _converters() if c.peft_type and c.load}
    if peft_type not in readers:
        raise _refuse("peft_type", peft_type, f"jpeft loads {', '.join(sorted(readers))} adapters")
    converter = readers[peft_type]
    task_type = cfg.get("task_type")
    if converter.layout == "prompt" and task_type not in family.prompt_tasks:
        raise _refuse("task_type", task_type,
                      f"jpeft loads prompt-learning adapters for {list(family.prompt_tasks) or 'no task type'} "
                      f"on {family.name} models (PEFT's other task types run the prompts differently)")
    _head_check(task_type, config, family)
    with_head = converter.layout == "prompt" or task_type == "SEQ_CLS"
    mods = _modules(base, family.prefix(config, task_type), with_head=with_head, family=family,
                    head=family.head_modules(task_type))
    ctx = PeftContext(label=str(folder), mods=mods if converter.layout == "modules" else None,
                      params=base, model=model)
    tokens = _take_tokens(cfg, tensors, ctx) if converter.token_companion else None
    transform, delta, *rewritten = converter.load(cfg, tensors, ctx)
    base = rewritten[0] if rewritten else base  # PiSSA/OLoRA: PEFT's residual weights
    if tokens is not None:  # PEFT's trainable_token_indices beside the method
        transform, delta = compose(transform, tokens[0]), {transform.name: delta, tokens[0].name: tokens[1]}
    key_prefix = MODULE_KEY if converter.layout == "modules" else "base_model."
    base_flat = P.flatten(base)
    updates = _put_base_tensors(tensors, key_prefix, mods, base_flat, ctx.label)
    params = P.unflatten({**base_flat, **updates})
    return transform, delta, params


# ----------------------------------------------------------------------------------------------
# Writing

def _save_tensors(file: Path, tensors: Mapping[str, Any]) -> None:
    from safetensors.numpy import save_file

    arrays = {k: np.ascontiguousarray(np.asarray(jax.device_get(v), dtype=np.float32))
              for k, v in tensors.items()}
    save_file(arrays, str(file), metadata={"format": "pt"})


def _take_tokens(cfg: dict[str, Any], tensors: dict[str, np.ndarray], ctx: PeftContext) -> Any:
    from jpeft.methods.trainable_tokens import take_companion

    return take_companion(cfg, tensors, ctx)


def _split_tokens(transform: Transform) -> tuple[Transform, Transform | None]:
    """``(the method, its trainable tokens)`` of a composition of one method with
    :mod:`~jpeft.methods.trainable_tokens` whose PEFT format carries them; else ``(transform, None)``."""
    from jpeft.methods.trainable_tokens import TrainableTokensConfig

    parts = transform.parts
    if len(parts) != 2:
        return transform, None
    tokens = [t for t in parts if isinstance(t.config, TrainableTokensConfig)]
    main = [t for t in parts if not isinstance(t.config, TrainableTokensConfig)]
    if len(tokens) != 1 or len(main) != 1 or main[0].parts:
        return transform, None
    try:
        companion = _converter_for(main[0]).token_companion
    except ValueError:
        return transform, None
    return (main[0], tokens[0]) if companion else (transform, None)


def _single(transform: Transform) -> None:
    if transform.parts:
        raise ValueError(
            f"save_peft_adapter: {transform.name!r} is a composition of {[t.name for t in transform.parts]}; "
            "a PEFT adapter holds one method (LoRA with trainable tokens aside). Export merged "
            "weights (jpeft.checkpoint.export.export_merged_hf) or a jpeft adapter (save_adapter) "
            "instead.")


def _trained_paths(transform: Transform, params: P.Params, model: Any) -> tuple[list[str], list[str]]:
    """(head leaf paths, other trained base leaf paths) of ``params``."""
    patterns = model.info().head_patterns if model is not None else (r"^head/",)
    regexes = [re.compile(p) for p in patterns]
    flat = P.flatten(params)
    head = [p for p in flat if any(r.search(p) for r in regexes)]
    other = [p for p in transform.trainable_base(params) if p not in set(head)]
    return head, other


def save_peft_adapter(path: str | os.PathLike[str], transform: Transform, delta: Any,
                      params: P.Params, *, base_model_name_or_path: str | None,
                      task_type: str | None = None, model: Any = None,
                      overwrite: bool = False) -> Path:
    """Write a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    ``transform`` is one jpeft transform whose method registered a PEFT converter (LoRA with or
    without DoRA, (IA)³, prompt tuning, P-tuning, prefix tuning and P-tuning v2 trained with
    ``peft_positions``, see the module docstring); ``delta`` its delta; ``params``
    the model's parameters with the trained head (and LoRA's trained biases). ``model`` (the jpeft
    model) gives the family (BERT/RoBERTa, Llama, GPT-2), the head patterns and the attention head
    count; without it the model is taken for a BERT-family encoder whose head is ``head/...``
    (RoBERTa recognised by its head). ``task_type``: ``"SEQ_CLS"`` or ``"FEATURE_EXTRACTION"`` on
    an encoder (default ``"SEQ_CLS"``), ``"CAUSAL_LM"`` on a decoder (the default there).
    A composition of LoRA with :mod:`~jpeft.methods.trainable_tokens` is written as PEFT's LoRA
    with ``trainable_token_indices`` (and read back as that composition).
    Refuses (``ValueError``) what PEFT cannot represent: other compositions, a prefix over a subset of
    layers, LoRA/(IA)³ target sets PEFT's rules cannot select, a prefix on a sliding-window model,
    other methods.
    """
    from jpeft.checkpoint.export import _check_delta, _check_finite, _expected_deltas
    from jpeft.methods.trainable_tokens import companion_entries

    if model is not None:  # a delta of another rank, method or model is not written
        _check_delta(str(path), delta, _expected_deltas(transform, model, params),
                     f"{transform.name}: {transform.config}")
    transform, tokens = _split_tokens(transform)
    tokens_base = params  # the rows are E[t] + δ on the embeddings as given
    if tokens is not None:
        delta, tokens_delta = delta[transform.name], delta[tokens.name]
    _single(transform)
    family, config = model_family(model) if model is not None else (BERT, None)
    task_type = family.default_task if task_type is None else task_type
    if task_type not in family.tasks:
        raise ValueError(f"save_peft_adapter: task_type must be one of "
                         f"{[t for t in family.tasks if t]} for a {family.name} model, got {task_type!r}")
    converter = _converter_for(transform)
    head, other = _trained_paths(transform, params, model)
    if task_type == "SEQ_CLS" and not head:
        raise ValueError("save_peft_adapter: task_type='SEQ_CLS' but params have no classification head")
    common = {"base_model_name_or_path": base_model_name_or_path, "revision": None,
              "task_type": task_type, "inference_mode": True}
    if task_type != "SEQ_CLS":
        head = []
    if converter.layout == "modules":
        prefix = (family.prefix(config, task_type) if config is not None
                  else _encoder_prefix(_is_roberta(params, None), task_type))
        head_delta, body = _split_head_delta(delta)
        if head_delta:  # PEFT trains the head whole: fold the method's head part into it
            params = transform.merge(params, P.unflatten(head_delta))
        ctx = PeftContext(label="save_peft_adapter", params=params, model=model, trained_base=other,
                          mods=_modules(params, prefix, with_head=task_type == "SEQ_CLS", family=family,
                                        head=family.head_modules(task_type)))
        fields, tensors, params = converter.save(transform, P.unflatten(body), ctx)
        if tokens is not None:
            extra_fields, extra = companion_entries(tokens, tokens_delta,
                                                    dataclasses.replace(ctx, params=tokens_base))
            fields, tensors = {**fields, **extra_fields}, {**tensors, **extra}
        tensors.update(_head_entries(params, head, MODULE_KEY, prefix))
        modules_to_save = family.head_modules(task_type) or None
    else:
        if task_type not in family.prompt_tasks:
            raise ValueError(f"save_peft_adapter: prompt-learning adapters are exported for "
                             f"{list(family.prompt_tasks) or 'no task type'} on {family.name} models "
                             "(PEFT runs the prompts of other task types differently); save a jpeft "
                             "adapter (save_adapter) instead")
        if other:
            raise ValueError(f"save_peft_adapter: {transform.name!r} trains base leaves {other[:5]} "
                             "besides the head; PEFT's prompt learning cannot hold them")
        ctx = PeftContext(label="save_peft_adapter", mods=None, params=params, model=model)
        fields, tensors, params = converter.save(transform, delta, ctx)
        tensors.update(_head_entries(params, head, "base_model.", ""))
        modules_to_save = family.head_modules(task_type) or None
    adapter_cfg = {**common, **fields, "modules_to_save": modules_to_save}
    _check_finite(str(path), tensors, saving=True)

    def write(tmp: Path) -> None:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_cfg, indent=2, sort_keys=True) + "\n")
        _save_tensors(tmp / ADAPTER_WEIGHTS, tensors)

    atomic_dir(path, write, overwrite)
    return Path(path)


__all__ = [
    "load_peft_adapter",
    "peft_target_matches",
    "read_adapter",
    "resolve_adapter_dir",
    "save_peft_adapter",
    "torch_module_name",
]
