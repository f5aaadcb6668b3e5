"""Hugging Face PEFT adapter folders <-> jpeft transforms, for BERT-family models.

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

:func:`load_peft_adapter` turns such a folder into ``(transform, delta, params)`` — LoRA, (IA)³,
prompt tuning, prefix tuning (with or without projection) and P-tuning — and
:func:`save_peft_adapter` writes one from a jpeft transform, so that
``peft.PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base), path)``
computes the same logits. LoRA adapters with ``use_dora`` (DoRA) go both ways: PEFT's
``....lora_magnitude_vector`` ``(d_out,)`` is jpeft's ``lora_magnitude`` leaf. Anything jpeft
cannot represent exactly (another ``peft_type``,
``fan_in_fan_out``, a target that is not a Dense layer, a base-rewriting LoRA init, ...) is refused
with a ``ValueError`` naming the field and its value: an adapter is never loaded approximately.

Target selection follows PEFT's own rules (``check_target_module_exists``: a list entry matches a
module whose name equals it or ends with ``"." + entry``, a string is ``re.fullmatch``-ed, the
``modules_to_save`` are excluded, ``layers_to_transform``/``layers_pattern`` filter list targets,
``rank_pattern``/``alpha_pattern`` keys ``k`` match ``(.*\\.)?(k)$``), evaluated on the PyTorch
module names of the jpeft model. The jpeft config gets a compact regex when one selects exactly
the same modules, else an explicit alternation of the module paths.

Prefix tuning: PEFT hands the prefix to the model as ``past_key_values``, and ``transformers``'
BERT/RoBERTa then number the real tokens' positions from ``P = num_virtual_tokens`` (the cache
length) instead of 0. jpeft's :mod:`~jpeft.methods.prefix` numbers them from 0 unless its config
says ``peft_positions=True``: imported prefixes get that flag, and only a prefix (or P-tuning v2)
trained with it can be exported to PEFT.

The concerns live apart: which config fields are read, ignored or refused
(:mod:`~jpeft.checkpoint.peft_fields`), PEFT's target-module rules
(:mod:`~jpeft.checkpoint.peft_targets`), jpeft paths <-> PyTorch module names
(:mod:`~jpeft.checkpoint.peft_naming`); this module reads and writes the folders and converts each
method.

Safety: ``adapter_model.bin`` (a pickled file) is never read; re-save the adapter with
``save_pretrained(..., safe_serialization=True)``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.checkpoint.atomic import atomic_dir
from jpeft.checkpoint.peft_fields import (
    _IA3_HANDLED,
    _LORA_HANDLED,
    _LORA_IGNORED,
    _PREFIX_HANDLED,
    _PROMPT_TUNING_HANDLED,
    _PTUNING_HANDLED,
    _SAFE_LORA_INITS,
    ADAPTER_CONFIG,
    _check_fields,
    _refuse,
)
from jpeft.checkpoint.peft_naming import (
    _encoder_prefix,
    _head_entries,
    _is_roberta,
    _model_config,
    _Modules,
    _modules,
    _split_head_delta,
    torch_module_name,
)
from jpeft.checkpoint.peft_targets import (  # noqa: F401  (peft_target_matches: part of this module's API)
    _as_list,
    _exact_regex,
    _name_to_path_regex,
    _peft_pattern_value,
    _peft_targets_for,
    _resolve_targets,
    _suffix_candidates,
    peft_target_matches,
)
from jpeft.core import paths as P
from jpeft.core.transform import Transform
from jpeft.methods.dora import MAGNITUDE

ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"

SUPPORTED_PEFT_TYPES = ("LORA", "IA3", "PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING")
PROMPT_LEARNING = ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING")
# task types whose PEFT model wraps the architecture jpeft's BertModel mirrors
ENCODER_TASKS = ("SEQ_CLS", "FEATURE_EXTRACTION", None)

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
        if field in cfg and cfg[field] < 1:
            raise ValueError(f"{file}: field {field!r} is {cfg[field]!r}; it must be an integer >= 1")
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
                "have; is the base the architecture the adapter was trained on (bert/roberta, "
                "a classification head)?")
        if leaf == "weight":
            jleaf = _weight_leaf(base_flat, path)
            if jleaf is None:
                raise ValueError(f"{label}: {key!r}: module {path!r} has no weight in this model")
            target = f"{path}/{jleaf}"
            if jleaf == "kernel":
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


def _head_check(task_type: Any, config: Any) -> None:
    if task_type not in ENCODER_TASKS:
        raise _refuse("task_type", task_type,
                      "jpeft's BERT-family models are encoders with a sequence-classification head "
                      "(SEQ_CLS) or none (FEATURE_EXTRACTION)")
    if task_type == "SEQ_CLS" and config.head != "classification":
        raise ValueError(f"{ADAPTER_CONFIG}: task_type='SEQ_CLS' needs a model with a classification "
                         f"head, but this model has head={config.head!r}")


def load_peft_adapter(path: str | os.PathLike[str], model: Any, base: P.Params, *,
                      revision: str | None = None) -> tuple[Transform, Any, dict[str, Any]]:
    """Load a PEFT adapter folder (or Hub id) for a jpeft BERT-family ``model``.

    Returns ``(transform, delta, params)``: ``jpeft.apply(model, transform, params, delta, ...)``
    computes what ``PeftModel.from_pretrained(hf_base, path)`` computes. ``params`` is ``base``
    with the adapter's full-module weights put in (the ``modules_to_save`` head, trained biases);
    ``base`` itself is not modified. Raises ``ValueError`` for a config jpeft cannot represent
    exactly (naming the field and value), for ``adapter_model.bin`` and for tensors that do not
    fit the base.
    """
    config = _model_config(model)
    folder = resolve_adapter_dir(path, revision=revision)
    cfg, tensors = read_adapter(folder)
    peft_type = cfg.get("peft_type")
    if peft_type not in SUPPORTED_PEFT_TYPES:
        raise _refuse("peft_type", peft_type,
                      f"jpeft loads {', '.join(SUPPORTED_PEFT_TYPES)} adapters")
    task_type = cfg.get("task_type")
    label = str(folder)
    base_flat = P.flatten(base)
    if peft_type in PROMPT_LEARNING:
        if task_type != "SEQ_CLS":
            raise _refuse("task_type", task_type, "jpeft loads prompt-learning adapters for SEQ_CLS only "
                          "(PEFT's other task types run the prompts differently)")
        _head_check(task_type, config)
        mods = _modules(base, _encoder_prefix(config.is_roberta, task_type), with_head=True)
        transform, delta = _load_prompt_learning(peft_type, cfg, tensors, model, label)
        key_prefix = "base_model."
    else:
        _head_check(task_type, config)
        with_head = task_type == "SEQ_CLS"
        mods = _modules(base, _encoder_prefix(config.is_roberta, task_type), with_head=with_head)
        loader = _load_lora if peft_type == "LORA" else _load_ia3
        transform, delta = loader(cfg, tensors, mods, base, label)
        key_prefix = "base_model.model."
    updates = _put_base_tensors(tensors, key_prefix, mods, base_flat, label)
    params = P.unflatten({**base_flat, **updates})
    return transform, delta, params


def _take(tensors: dict[str, np.ndarray], key: str, label: str, what: str) -> np.ndarray:
    if key not in tensors:
        raise ValueError(f"{label}: {ADAPTER_WEIGHTS} lacks {key!r} ({what}); the adapter does not "
                         "match its config on this base — is it the architecture it was trained on?")
    return tensors.pop(key)


def _leftover(tensors: Mapping[str, np.ndarray], markers: Sequence[str], label: str) -> None:
    extra = [k for k in tensors if any(m in k for m in markers)]
    if extra:
        raise ValueError(f"{label}: adapter tensors for modules its config does not target on this "
                         f"base: {sorted(extra)[:10]}; is the base the architecture it was trained on?")


def _load_lora(cfg: dict[str, Any], tensors: dict[str, np.ndarray], mods: _Modules,
               base: P.Params, label: str) -> tuple[Transform, Any]:
    from jpeft.methods.lora import LoraConfig, lora, rank_and_scale, target_modules

    for field in ("fan_in_fan_out", "lora_bias"):
        if cfg.get(field):
            raise _refuse(field, cfg[field])
    init = cfg.get("init_lora_weights", True)
    if not any(init is ok or (isinstance(init, str) and init == ok) for ok in _SAFE_LORA_INITS):
        raise _refuse("init_lora_weights", init,
                      "this init rewrites the base weights (the adapter expects a modified base); "
                      "re-save it with save_pretrained(..., path_initial_model_for_weight_conversion=...) "
                      "to get a plain LoRA adapter")
    _check_fields(cfg, _LORA_HANDLED, _LORA_IGNORED)
    bias = cfg.get("bias", "none")
    if bias not in ("none", "all", "lora_only"):
        raise _refuse("bias", bias)
    r0, alpha0 = int(cfg["r"]), float(cfg.get("lora_alpha", 8))
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    use_rslora = bool(cfg.get("use_rslora", False))
    dropout = float(cfg.get("lora_dropout") or 0.0)
    use_dora = bool(cfg.get("use_dora", False))
    modules = _resolve_targets(cfg, mods, "LoRA")
    flat_base = P.flatten(base)
    flat: dict[str, Any] = {}
    ranks: dict[str, tuple[int, float]] = {}
    for path in modules:
        name = mods.name(path)
        r = int(_peft_pattern_value(rank_pattern, name, r0))
        alpha = float(_peft_pattern_value(alpha_pattern, name, alpha0))
        a = _take(tensors, f"base_model.model.{name}.lora_A.weight", label, "LoRA A")
        b = _take(tensors, f"base_model.model.{name}.lora_B.weight", label, "LoRA B")
        d_in, d_out = np.shape(flat_base[f"{path}/kernel"])
        if a.shape != (r, d_in) or b.shape != (d_out, r):
            raise ValueError(
                f"{label}: {name}: lora_A {a.shape} / lora_B {b.shape} do not fit r={r} and the base "
                f"kernel (d_in={d_in}, d_out={d_out}); expected ({r}, {d_in}) / ({d_out}, {r}). Is the "
                "base the architecture the adapter was trained on?")
        flat[f"{path}/lora_A"] = jnp.asarray(a.T)
        flat[f"{path}/lora_B"] = jnp.asarray(b.T)
        if use_dora:
            flat[f"{path}/{MAGNITUDE}"] = _dora_magnitude(tensors, name, d_out, label)
        ranks[path] = (r, alpha)
    _leftover(tensors, (".lora_A.", ".lora_B.", ".lora_embedding_", ".lora_magnitude_vector"), label)

    def patterns(index: int, default: float) -> dict[str, Any]:
        groups: dict[Any, list[str]] = {}
        for path, values in ranks.items():
            if values[index] != default:
                groups.setdefault(values[index], []).append(path)
        return {_exact_regex(paths): (int(v) if index == 0 else v) for v, paths in groups.items()}

    common = {"r": r0, "alpha": alpha0, "dropout": dropout, "use_rslora": use_rslora, "bias": bias,
              "init": "gaussian" if init == "gaussian" else "kaiming", "use_dora": use_dora,
              "rank_pattern": patterns(0, r0), "alpha_pattern": patterns(1, alpha0)}
    candidates = []
    targets = cfg.get("target_modules")
    if isinstance(targets, (list, tuple)) and not cfg.get("exclude_modules"):
        regex = "(?:^|/)(?:" + "|".join(_name_to_path_regex(t) for t in sorted(targets)) + ")$"
        layers = cfg.get("layers_to_transform")
        layers = tuple([layers] if isinstance(layers, int) else (layers or ()))
        candidates.append({"targets": regex, "layers": layers})
    candidates.append({"targets": _exact_regex(modules), "layers": ()})
    for cand in candidates:
        try:
            jcfg = LoraConfig(**common, **cand)
            chosen = sorted(target_modules(jcfg, base))
        except (ValueError, P.NoMatchError):
            continue
        if chosen == modules and all(
                rank_and_scale(jcfg, p) == (r, alpha / (math.sqrt(r) if use_rslora else r))
                for p, (r, alpha) in ranks.items()):
            return lora(jcfg), P.unflatten(flat)
    raise AssertionError("unreachable: the explicit LoRA config reproduces the PEFT targets")


def _dora_magnitude(tensors: dict[str, np.ndarray], name: str, d_out: int, label: str) -> jax.Array:
    """PEFT's ``....lora_magnitude_vector`` ``(d_out,)`` of a DoRA target."""
    m = _take(tensors, f"base_model.model.{name}.lora_magnitude_vector", label, "DoRA magnitude")
    if m.shape != (d_out,):
        raise ValueError(f"{label}: {name}.lora_magnitude_vector has shape {m.shape}, expected "
                         f"({d_out},) (one magnitude per output column); is the base the right "
                         "architecture?")
    return jnp.asarray(m)


def _load_ia3(cfg: dict[str, Any], tensors: dict[str, np.ndarray], mods: _Modules,
              base: P.Params, label: str) -> tuple[Transform, Any]:
    from jpeft.methods.ia3 import IA3Config, ia3, target_modules

    if cfg.get("fan_in_fan_out"):
        raise _refuse("fan_in_fan_out", cfg["fan_in_fan_out"])
    _check_fields(cfg, _IA3_HANDLED)
    modules = _resolve_targets(cfg, mods, "(IA)³")
    ff_cfg = cfg.get("feedforward_modules")
    ff_list = _as_list(ff_cfg) or []

    def is_ff(name: str) -> bool:
        if isinstance(ff_cfg, str):
            return re.fullmatch(ff_cfg, name) is not None
        return any(name.endswith(t) for t in ff_list)

    flat_base = P.flatten(base)
    flags: dict[str, bool] = {}
    flat: dict[str, Any] = {}
    for path in modules:
        name = mods.name(path)
        ff = is_ff(name)
        value = _take(tensors, f"base_model.model.{name}.ia3_l", label, "(IA)³ vector")
        d_in, d_out = np.shape(flat_base[f"{path}/kernel"])
        want = (1, d_in) if ff else (d_out, 1)
        if value.shape != want:
            raise ValueError(f"{label}: {name}.ia3_l has shape {value.shape}, expected {want} "
                             f"({'feed-forward: input' if ff else 'output'} scaling of a "
                             f"({d_in}, {d_out}) kernel); is the base the right architecture?")
        flat[f"{path}/ia3_l"] = jnp.asarray(value.reshape(-1))
        flags[path] = ff
    _leftover(tensors, (".ia3_l",), label)
    ff_paths = [p for p, f in flags.items() if f]
    candidates = []
    targets = cfg.get("target_modules")
    if isinstance(targets, (list, tuple)) and not cfg.get("exclude_modules") and not isinstance(ff_cfg, str):
        t_regex = "(?:^|/)(?:" + "|".join(_name_to_path_regex(t) for t in sorted(targets)) + ")$"
        f_regex = ("(?:" + "|".join(_name_to_path_regex(t) for t in sorted(ff_list)) + ")$") if ff_list else ""
        candidates.append(IA3Config(targets=t_regex, feedforward=f_regex))
    candidates.append(IA3Config(targets=_exact_regex(modules),
                                feedforward=_exact_regex(ff_paths) if ff_paths else ""))
    for jcfg in candidates:
        try:
            chosen = target_modules(jcfg, base)
        except (ValueError, P.NoMatchError):
            continue
        if chosen == flags:
            return ia3(jcfg), P.unflatten(flat)
    raise AssertionError("unreachable: the explicit (IA)³ config reproduces the PEFT targets")


def _load_prompt_learning(peft_type: str, cfg: dict[str, Any], tensors: dict[str, np.ndarray],
                          model: Any, label: str) -> tuple[Transform, Any]:
    config = model.config
    info = model.info()
    handled = {"PROMPT_TUNING": _PROMPT_TUNING_HANDLED, "PREFIX_TUNING": _PREFIX_HANDLED,
               "P_TUNING": _PTUNING_HANDLED}[peft_type]
    _check_fields(cfg, handled)
    k = int(cfg["num_virtual_tokens"])
    subs = cfg.get("num_transformer_submodules") or 1
    if subs != 1:
        raise _refuse("num_transformer_submodules", subs, "an encoder has one transformer stack")
    expect = {"token_dim": info.hidden_size, "num_layers": info.num_layers,
              "num_attention_heads": info.num_heads}
    for field, want in expect.items():
        got = cfg.get(field)
        if got is not None and int(got) != want:
            raise ValueError(f"{label}: {ADAPTER_CONFIG} has {field}={got} but the model has {want}; "
                             "is the base the architecture the adapter was trained on?")
    prompts = _take(tensors, "prompt_embeddings", label, "the prompts")
    if peft_type == "PREFIX_TUNING":
        from jpeft.methods.prefix import PrefixConfig, prefix

        width = info.num_layers * 2 * info.hidden_size
        if prompts.shape != (k, width):
            raise ValueError(f"{label}: prompt_embeddings has shape {prompts.shape}, expected "
                             f"({k}, {width}) = (num_virtual_tokens, layers·2·hidden)")
        projection = bool(cfg.get("prefix_projection", False))
        hidden = cfg.get("encoder_hidden_size") or info.hidden_size
        jcfg = PrefixConfig(num_virtual_tokens=k, projection=projection,
                            projection_hidden=int(hidden), peft_positions=True,
                            init="zero" if cfg.get("init_weights") == "zero" else "normal")
        return prefix(jcfg), {"prefix": jnp.asarray(prompts)}
    if prompts.shape != (k, info.hidden_size):
        raise ValueError(f"{label}: prompt_embeddings has shape {prompts.shape}, expected "
                         f"({k}, {info.hidden_size}) = (num_virtual_tokens, hidden)")
    if peft_type == "PROMPT_TUNING":
        from jpeft.methods.prompt import PromptConfig, prompt

        return prompt(PromptConfig(num_virtual_tokens=k)), {"prompt": jnp.asarray(prompts)}
    from jpeft.methods.ptuning import PTuningConfig, ptuning

    kind = str(cfg.get("encoder_reparameterization_type") or "MLP").lower()
    if kind not in ("mlp", "lstm"):
        raise _refuse("encoder_reparameterization_type", cfg.get("encoder_reparameterization_type"))
    hidden = cfg.get("encoder_hidden_size")
    lstm = kind == "lstm"
    jcfg = PTuningConfig(num_virtual_tokens=k, encoder=kind,
                         encoder_hidden=int(hidden) if hidden else None,
                         encoder_num_layers=int(cfg.get("encoder_num_layers") or 2) if lstm else 2,
                         encoder_dropout=float(cfg.get("encoder_dropout") or 0.0) if lstm else 0.0)
    # PEFT saved the encoder's output: the finalized P-tuning delta
    return ptuning(jcfg), {"prompt": jnp.asarray(prompts)}


# ----------------------------------------------------------------------------------------------
# Writing

def _save_tensors(file: Path, tensors: Mapping[str, Any]) -> None:
    from safetensors.numpy import save_file

    arrays = {k: np.ascontiguousarray(np.asarray(jax.device_get(v), dtype=np.float32))
              for k, v in tensors.items()}
    save_file(arrays, str(file), metadata={"format": "pt"})


def _single(transform: Transform) -> None:
    if transform.parts:
        raise ValueError(
            f"save_peft_adapter: {transform.name!r} is a composition of {[t.name for t in transform.parts]}; "
            "a PEFT adapter holds one method. Export merged weights (jpeft.checkpoint.export."
            "export_merged_hf) or a jpeft adapter (save_adapter) instead.")


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
                      task_type: str = "SEQ_CLS", model: Any = None,
                      overwrite: bool = False) -> Path:
    """Write a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    ``transform`` is one jpeft LoRA, (IA)³, prompt-tuning, P-tuning or prefix transform (a
    prefix only as imported from PEFT, see the module docstring); ``delta`` its delta; ``params``
    the model's parameters with the trained head (and LoRA's trained biases). ``model`` (the jpeft
    model) is optional: it gives the head patterns, RoBERTa vs BERT naming and the attention
    head count; without it the head is ``head/...`` and RoBERTa is recognised by its head.
    Refuses (``ValueError``) what PEFT cannot represent: a composition, a prefix over a subset of
    layers, LoRA/(IA)³ target sets PEFT's rules cannot select, other methods.
    """
    _single(transform)
    if task_type not in ("SEQ_CLS", "FEATURE_EXTRACTION"):
        raise ValueError(f"save_peft_adapter: task_type must be 'SEQ_CLS' or 'FEATURE_EXTRACTION', got {task_type!r}")
    from jpeft.methods.ia3 import IA3Config
    from jpeft.methods.lora import LoraConfig
    from jpeft.methods.prefix import PrefixConfig
    from jpeft.methods.prompt import PromptConfig
    from jpeft.methods.ptuning import PTuningConfig
    from jpeft.methods.ptuning2 import PTuningV2Config

    cfg_obj = transform.config
    roberta = _is_roberta(params, model)
    head, other = _trained_paths(transform, params, model)
    if task_type == "SEQ_CLS" and not head:
        raise ValueError("save_peft_adapter: task_type='SEQ_CLS' but params have no classification head")
    common = {"base_model_name_or_path": base_model_name_or_path, "revision": None,
              "task_type": task_type, "inference_mode": True}
    if task_type != "SEQ_CLS":
        head = []
    if isinstance(cfg_obj, (LoraConfig, IA3Config)):
        prefix = _encoder_prefix(roberta, task_type)
        mods = _modules(params, prefix, with_head=task_type == "SEQ_CLS")
        if isinstance(cfg_obj, LoraConfig):
            adapter_cfg, tensors, params = _lora_to_peft(transform, cfg_obj, delta, params, mods, other)
        else:
            adapter_cfg, tensors, params = _ia3_to_peft(transform, cfg_obj, delta, params, mods)
        tensors.update(_head_entries(params, head, "base_model.model.", prefix))
        adapter_cfg = {**common, **adapter_cfg,
                       "modules_to_save": ["classifier"] if task_type == "SEQ_CLS" else None}
    elif isinstance(cfg_obj, (PromptConfig, PTuningConfig, PrefixConfig, PTuningV2Config)):
        if task_type != "SEQ_CLS":
            raise ValueError("save_peft_adapter: prompt-learning adapters are exported for SEQ_CLS only")
        if other:
            raise ValueError(f"save_peft_adapter: {transform.name!r} trains base leaves {other[:5]} "
                             "besides the head; PEFT's prompt learning cannot hold them")
        adapter_cfg, table = _prompt_to_peft(transform, cfg_obj, delta, params, model)
        tensors = {"prompt_embeddings": table}
        tensors.update(_head_entries(params, head, "base_model.", ""))
        adapter_cfg = {**common, **adapter_cfg, "modules_to_save": ["classifier"]}
    else:
        raise ValueError(  # noqa: TRY004 (an unsupported method, not a wrong argument type)
            f"save_peft_adapter: {transform.name!r} ({type(cfg_obj).__name__}) has no Hugging Face PEFT "
            "equivalent that jpeft writes (LoRA, IA3, prompt tuning, P-tuning, prefix tuning). Export "
            "merged weights (export_merged_hf) or a jpeft adapter (save_adapter) instead.")

    def write(tmp: Path) -> None:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_cfg, indent=2, sort_keys=True) + "\n")
        _save_tensors(tmp / ADAPTER_WEIGHTS, tensors)

    atomic_dir(path, write, overwrite)
    return Path(path)


def _lora_to_peft(transform: Transform, cfg: Any, delta: Any, params: P.Params, mods: _Modules,
                  other: Sequence[str]) -> tuple[dict[str, Any], dict[str, np.ndarray], P.Params]:
    from jpeft.methods.lora import _pattern_value, rank_and_scale

    head_delta, body = _split_head_delta(delta)
    if head_delta:  # PEFT trains the head whole: fold the head's LoRA into it
        params = transform.merge(params, P.unflatten(head_delta))
    modules = sorted(k[: -len("/lora_A")] for k in body if k.endswith("/lora_A"))
    if not modules:
        raise ValueError("save_peft_adapter: the LoRA delta adapts no encoder module")
    names = [mods.name(m) for m in modules]
    universe = list(mods.by_name)
    sel = _peft_targets_for(names, universe, ["classifier"] if mods.prefix else [])
    tensors: dict[str, np.ndarray] = {}
    ranks: dict[str, tuple[int, float]] = {}
    for path, name in zip(modules, names):
        a = np.asarray(jax.device_get(body[f"{path}/lora_A"]), np.float32)
        b = np.asarray(jax.device_get(body[f"{path}/lora_B"]), np.float32)
        r, _ = rank_and_scale(cfg, path)
        if a.shape[1] != r or b.shape[0] != r:
            raise ValueError(f"save_peft_adapter: {path} has rank {a.shape[1]} but the config gives r={r}")
        ranks[name] = (r, float(_pattern_value(cfg.alpha_pattern, path, cfg.alpha)))
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.T
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.T
        if cfg.use_dora:
            tensors[f"base_model.model.{name}.lora_magnitude_vector"] = np.asarray(
                jax.device_get(body[f"{path}/{MAGNITUDE}"]), np.float32)
    targeted = set(modules)
    flat = P.flatten(params)
    for path in other:  # trained biases (bias="all" / "lora_only")
        module = path.rpartition("/")[0]
        name = mods.name(module)
        inner = ".base_layer" if module in targeted else ""
        tensors[f"base_model.model.{name}{inner}.bias"] = np.asarray(jax.device_get(flat[path]), np.float32)

    def pattern(index: int, default: float) -> dict[str, Any]:
        groups: dict[Any, list[str]] = {}
        for name, values in ranks.items():
            if values[index] != default:
                groups.setdefault(values[index], []).append(name)
        return {"(?:" + "|".join(re.escape(n) for n in sorted(ns)) + ")": v for v, ns in groups.items()}

    adapter_cfg = {
        "peft_type": "LORA", "r": int(cfg.r), "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "use_rslora": bool(cfg.use_rslora), "bias": cfg.bias, "fan_in_fan_out": False,
        "init_lora_weights": "gaussian" if cfg.init == "gaussian" else True,
        "use_dora": bool(cfg.use_dora),
        "rank_pattern": pattern(0, cfg.r), "alpha_pattern": pattern(1, cfg.alpha),
        "layers_pattern": None, **sel,
    }
    return adapter_cfg, tensors, params


def _ia3_to_peft(transform: Transform, cfg: Any, delta: Any, params: P.Params,
                 mods: _Modules) -> tuple[dict[str, Any], dict[str, np.ndarray], P.Params]:
    from jpeft.methods.ia3 import is_feedforward

    head_delta, body = _split_head_delta(delta)
    if head_delta:
        params = transform.merge(params, P.unflatten(head_delta))
    modules = sorted(k[: -len("/ia3_l")] for k in body if k.endswith("/ia3_l"))
    if not modules:
        raise ValueError("save_peft_adapter: the (IA)³ delta scales no encoder module")
    names = {m: mods.name(m) for m in modules}
    ff = {names[m] for m in modules if is_feedforward(cfg, m)}
    universe = list(mods.by_name)
    mts = ["classifier"] if mods.prefix else []
    want = set(names.values())
    chosen = None
    for suffixes in _suffix_candidates(list(want)):
        tcfg = {"target_modules": suffixes, "modules_to_save": mts}
        if {n for n in universe if peft_target_matches(tcfg, n)} != want:
            continue
        # feedforward_modules: suffixes that are themselves target entries (PEFT checks the subset)
        ff_entries = sorted({s for s in suffixes if any(n.endswith(s) for n in ff)})
        if {n for n in want if any(n.endswith(s) for s in ff_entries)} == ff:
            chosen = (suffixes, ff_entries)
            break
    if chosen is None:
        raise ValueError("save_peft_adapter: PEFT's target rules cannot select exactly these (IA)³ "
                         "targets and feed-forward targets")
    tensors = {}
    for m in modules:
        v = np.asarray(jax.device_get(body[f"{m}/ia3_l"]), np.float32)
        shape = (1, v.shape[0]) if names[m] in ff else (v.shape[0], 1)
        tensors[f"base_model.model.{names[m]}.ia3_l"] = v.reshape(shape)
    adapter_cfg = {"peft_type": "IA3", "target_modules": chosen[0], "feedforward_modules": chosen[1],
                   "fan_in_fan_out": False, "init_ia3_weights": True}
    return adapter_cfg, tensors, params


def _prompt_to_peft(transform: Transform, cfg: Any, delta: Any, params: P.Params,
                    model: Any) -> tuple[dict[str, Any], np.ndarray]:
    from jpeft.methods.prefix import project
    from jpeft.methods.prompt import PromptConfig
    from jpeft.methods.ptuning import PTuningConfig, encode
    from jpeft.methods.ptuning2 import PTuningV2Config

    flat = P.flatten(params)
    hidden = int(np.shape(flat["embeddings/word_embeddings/embedding"])[1])
    layers = len({m.group(1) for p in flat for m in [re.match(r"encoder/layer_(\d+)/", p)] if m})
    heads = int(model.config.num_attention_heads) if model is not None else None
    k = cfg.num_virtual_tokens
    shared = {"num_virtual_tokens": k, "token_dim": hidden, "num_layers": layers,
              "num_attention_heads": heads, "num_transformer_submodules": 1}
    if isinstance(cfg, PromptConfig):
        table = np.asarray(jax.device_get(delta["prompt"]), np.float32)
        adapter_cfg = {"peft_type": "PROMPT_TUNING", "prompt_tuning_init": "RANDOM", **shared}
    elif isinstance(cfg, PTuningConfig):
        table = np.asarray(jax.device_get(encode(delta)), np.float32)
        adapter_cfg = {"peft_type": "P_TUNING", "encoder_reparameterization_type": cfg.encoder.upper(),
                       "encoder_hidden_size": cfg.encoder_hidden or hidden,
                       "encoder_num_layers": cfg.encoder_num_layers,
                       "encoder_dropout": cfg.encoder_dropout, **shared}
    else:
        pcfg = cfg.to_prefix() if isinstance(cfg, PTuningV2Config) else cfg
        if pcfg.layers:
            raise ValueError(f"save_peft_adapter: a prefix on layers {list(pcfg.layers)} only cannot be "
                             "written: PEFT's prefix tuning covers every layer")
        if not pcfg.peft_positions:
            raise ValueError(
                "save_peft_adapter: PEFT runs a prefix through past_key_values, and transformers then "
                f"numbers the input positions from num_virtual_tokens={k}; this jpeft prefix was "
                "trained with positions from 0, so PEFT would compute other logits. Train with "
                "peft_positions=True (--prefix.peft_positions=true) to export to PEFT, or keep this "
                "one as a jpeft adapter (jpeft.checkpoint.export.save_adapter).")
        table = np.asarray(jax.device_get(project(delta)), np.float32)
        if table.shape != (k, layers * 2 * hidden):
            raise ValueError(f"save_peft_adapter: prefix table {table.shape} != ({k}, {layers * 2 * hidden})")
        adapter_cfg = {"peft_type": "PREFIX_TUNING", "prefix_projection": bool(pcfg.projection),
                       "encoder_hidden_size": pcfg.projection_hidden if pcfg.projection else hidden,
                       **shared}
    if table.shape[0] != k:
        raise ValueError(f"save_peft_adapter: {table.shape[0]} prompts but num_virtual_tokens={k}")
    return adapter_cfg, table


__all__ = [
    "load_peft_adapter",
    "peft_target_matches",
    "read_adapter",
    "resolve_adapter_dir",
    "save_peft_adapter",
    "torch_module_name",
]
