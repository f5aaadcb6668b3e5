"""Inference exports: merged Hugging Face folders and small jpeft adapter files.

* :func:`export_merged_hf` folds a weight-space delta into the weights
  (:func:`jpeft.core.transform.merge`) and writes a plain ``transformers`` folder
  (``config.json`` + ``model.safetensors`` [+ tokenizer files]) that
  ``AutoModelForSequenceClassification.from_pretrained`` loads with no jpeft or PEFT at all.
* :func:`save_adapter` / :func:`load_adapter` keep the base separate: ``adapter.safetensors``
  holds the delta and the trained base leaves (the task head, LoRA's trained biases ...) keyed by
  their ``/``-joined paths (``delta/...``, ``params/...``), and ``adapter.json`` the method spec,
  the method configs (:func:`jpeft.config.to_dict`), the base model's name and its fingerprint
  (:func:`jpeft.checkpoint.fingerprint` of the base without its head). No optimizer state, no
  pickled data. Loading on a base with another fingerprint is refused unless ``allow_base_mismatch``.

Every folder is written into a temporary sibling directory and renamed into place, so an
interrupted export never leaves a half-written folder at ``path``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.checkpoint.atomic import atomic_dir
from jpeft.checkpoint.hf_peft import read_json_object
from jpeft.checkpoint.orbax_ckpt import CheckpointError, fingerprint
from jpeft.core import paths as P
from jpeft.core.check import delta_problems, expected_deltas
from jpeft.core.transform import Transform, merge
from jpeft.models.bert import hf_config_dict

ADAPTER_JSON = "adapter.json"
ADAPTER_TENSORS = "adapter.safetensors"
FORMAT = "jpeft.adapter"
FORMAT_VERSION = 1

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "sentencepiece.bpe.model", "spiece.model",
    "tokenizer.model",
)


# ----------------------------------------------------------------------------------------------
# Merged Hugging Face folder

def export_merged_hf(path: str | os.PathLike[str], model: Any, transform: Transform,
                     params: P.Params, delta: Any, tokenizer_dir: str | os.PathLike[str] | None = None,
                     *, overwrite: bool = False) -> Path:
    """Merge ``delta`` into ``params`` and write a Hugging Face model folder at ``path``.

    ``model`` is one of jpeft's own models (BERT/RoBERTa/MiniLM, Llama, GPT-2; its config becomes
    ``config.json``), ``params`` the parameters including the trained head. Raises
    :class:`~jpeft.core.transform.NotMergeableError` for activation-space methods (prompts,
    prefixes, adapters). ``tokenizer_dir``: a folder whose tokenizer files are copied alongside
    (so the export is self-contained).
    """
    import importlib

    from jpeft.checkpoint.peft_naming import model_family

    try:
        family, config = model_family(model)
    except (TypeError, ValueError) as err:
        raise TypeError(f"export_merged_hf: {err}") from None
    family_module = importlib.import_module(f"jpeft.models.{family.name}")
    merged = jax.device_get(merge(transform, params, delta))
    state = family_module.state_dict_from_params(merged, config)
    hf_config = family_module.hf_config_dict(config)
    tok_files: list[Path] = []
    if tokenizer_dir is not None:
        tok = Path(tokenizer_dir)
        tok_files = [tok / name for name in TOKENIZER_FILES if (tok / name).is_file()]
        if not tok_files:
            raise FileNotFoundError(f"tokenizer_dir {tok} holds none of {list(TOKENIZER_FILES)}")

    def write(tmp: Path) -> None:
        from safetensors.numpy import save_file

        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        save_file({k: np.ascontiguousarray(v, np.float32) for k, v in state.items()},
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for f in tok_files:
            shutil.copyfile(f, tmp / f.name)

    atomic_dir(path, write, overwrite)
    return Path(path)


# ----------------------------------------------------------------------------------------------
# jpeft adapter files

def head_paths(model: Any, params: P.Params) -> list[str]:
    """Leaf paths of ``model``'s task head in ``params`` (``ModelInfo.head_patterns``)."""
    regexes = [re.compile(p) for p in model.info().head_patterns]
    return [p for p in P.paths(params) if any(r.search(p) for r in regexes)]


def base_fingerprint(model: Any, base: P.Params) -> str:
    """The fingerprint :func:`save_adapter` records: the base's weights without its task head."""
    return fingerprint(base, exclude=head_paths(model, base))


def _skeleton(tree: Any, prefix: str, out: dict[str, Any]) -> Any:
    """A JSON skeleton of a nested-dict tree (leaves -> their tensor keys), filling ``out``."""
    if isinstance(tree, Mapping):
        skel = {}
        for k, v in tree.items():
            if not isinstance(k, str) or "/" in k:
                raise TypeError(f"save_adapter: delta keys must be strings without '/', got {k!r}")
            skel[k] = _skeleton(v, f"{prefix}/{k}", out)
        return skel
    if isinstance(tree, (list, tuple)) or tree is None:
        raise TypeError(f"save_adapter: deltas are nested dicts of arrays; {prefix!r} is a {type(tree).__name__}")
    out[prefix] = tree
    return prefix


def _rebuild(skel: Any, tensors: Mapping[str, Any]) -> Any:
    if isinstance(skel, dict):
        return {k: _rebuild(v, tensors) for k, v in skel.items()}
    if skel not in tensors:
        raise CheckpointError(f"{ADAPTER_TENSORS} lacks the tensor {skel!r}")
    return tensors[skel]


def _method_configs(transform: Transform, method_spec: str,
                    method_configs: Mapping[str, Any] | None) -> dict[str, Any]:
    """The configs of ``method_spec``'s parts, checked against the transform."""
    from jpeft.methods import REGISTRY, parse_spec

    names = parse_spec(method_spec)
    parts = transform.parts or (transform,)
    if [t.name for t in parts] != names and not (len(names) == 1 and len(parts) == 1):
        raise ValueError(f"save_adapter: method_spec {method_spec!r} names {names} but the transform's "
                         f"parts are {[t.name for t in parts]}")
    method_configs = dict(method_configs or {})
    unknown = set(method_configs) - set(names)
    if unknown:
        raise ValueError(f"save_adapter: method_configs for {sorted(unknown)}, not in {method_spec!r}")
    out = {}
    for name, part in zip(names, parts):
        cfg = method_configs.get(name, part.config)
        if cfg != part.config:
            raise ValueError(f"save_adapter: method_configs[{name!r}] = {cfg!r} differs from the "
                             f"transform's config {part.config!r}")
        if type(cfg) is not REGISTRY[name].config_cls:
            raise ValueError(f"save_adapter: {name!r} expects a {REGISTRY[name].config_cls.__name__}, "
                             f"got {type(cfg).__name__}")
        out[name] = cfg
    return out


def save_adapter(path: str | os.PathLike[str], transform: Transform, delta: Any, params: P.Params,
                 *, base_model: str, base_fingerprint: str, method_spec: str,
                 method_configs: Mapping[str, Any] | None = None, model: Any = None,
                 finalize: bool = False, overwrite: bool = False) -> Path:
    """Write the delta and the trained base leaves of ``params`` as a jpeft adapter folder.

    The trained leaves are the task head (``model.info().head_patterns``; ``head/...`` without
    ``model``) and ``transform.trainable_base(params)`` (e.g. LoRA's biases). ``method_spec`` and
    ``method_configs`` are what :func:`jpeft.methods.build` takes (checked against the
    transform); ``base_fingerprint`` is :func:`base_fingerprint` of the base. ``finalize=True``
    stores ``transform.finalize(delta)`` (prefix tuning's table instead of its MLP ...).
    """
    from safetensors.flax import save_file

    from jpeft.config import to_dict

    configs = _method_configs(transform, method_spec, method_configs)
    if finalize:
        delta = transform.finalize(delta)
    if model is not None:  # what load_adapter would refuse is not written (another rank, method, base)
        _check_delta(str(path), delta, _expected_deltas(transform, model, params),
                     ", ".join(f"{n}: {to_dict(c)}" for n, c in configs.items()))
    tensors: dict[str, Any] = {}
    skeleton = _skeleton(delta, "delta", tensors)
    flat = P.flatten(params)
    if model is not None:
        heads = head_paths(model, params)
    else:
        heads = [p for p in flat if p.startswith("head/")]
    trained = list(dict.fromkeys([*heads, *transform.trainable_base(params)]))
    for p in trained:
        tensors[f"params/{p}"] = flat[p]
    _check_finite(str(path), tensors, saving=True)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method_spec": method_spec,
        "method_configs": {name: to_dict(cfg) for name, cfg in configs.items()},
        "base_model": base_model,
        "base_fingerprint": base_fingerprint,
        "delta": skeleton,
        "params": trained,
    }
    try:
        from jpeft import __version__ as version
        meta["jpeft_version"] = version
    except ImportError:  # pragma: no cover
        pass

    def write(tmp: Path) -> None:
        arrays = {k: jnp.asarray(v) for k, v in tensors.items()}
        save_file(arrays, str(tmp / ADAPTER_TENSORS), metadata={"format": FORMAT})
        (tmp / ADAPTER_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    atomic_dir(path, write, overwrite)
    return Path(path)


def _bad(file: Path, field: str, why: str) -> CheckpointError:
    return CheckpointError(f"{file}: field {field!r} {why}; re-export the adapter with save_adapter")


def read_adapter_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``adapter.json`` of a jpeft adapter folder, its fields' types checked: a syntax error,
    a document that is not an object or a wrongly typed field names the file and the field."""
    file = Path(path) / ADAPTER_JSON
    if not file.is_file():
        raise CheckpointError(f"{path} has no {ADAPTER_JSON}; is it a jpeft adapter (save_adapter)?")
    try:
        meta = read_json_object(file)
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{file}: format {meta.get('format')!r} v{meta.get('format_version')}, "
                              f"expected {FORMAT!r} v{FORMAT_VERSION}")
    for field in ("method_spec", "base_fingerprint"):
        if not isinstance(meta.get(field), str):
            raise _bad(file, field, f"is {meta.get(field)!r}, not a string")
    configs = meta.get("method_configs", {})
    if not isinstance(configs, dict) or not all(isinstance(v, dict) for v in configs.values()):
        raise _bad(file, "method_configs", "is not an object of objects (one per method)")
    if not isinstance(meta.get("params", []), list) or not all(isinstance(p, str) for p in meta.get("params", [])):
        raise _bad(file, "params", "is not a list of parameter paths")

    def check_skeleton(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                check_skeleton(value, f"{where}.{key}")
        elif not isinstance(node, str):
            raise _bad(file, where, f"is {node!r}; delta entries are tensor names")

    if not isinstance(meta.get("delta"), dict):
        raise _bad(file, "delta", f"is {type(meta.get('delta')).__name__}, not an object")
    check_skeleton(meta["delta"], "delta")
    return meta


def _expected_deltas(transform: Transform, model: Any, base: P.Params) -> list[dict[str, Any]]:
    return expected_deltas(transform, base, model.info())


def _check_delta(label: str, delta: Any, expected: list[dict[str, Any]], configs: str) -> None:
    """Refuse a delta whose keys, shapes or dtypes differ from every expected structure."""
    problems = delta_problems(delta, expected)
    if problems:
        raise CheckpointError(f"adapter {label} does not fit its method on this base ({configs}): "
                              + "; ".join(problems) + ". Is the config's rank (or size) the one "
                              "the tensors were trained with, and the base the one it was made on?")


def _check_finite(label: str, tensors: Mapping[str, Any], saving: bool = False) -> None:
    bad = [k for k, v in tensors.items()
           if jnp.issubdtype(jnp.asarray(v).dtype, jnp.inexact) and not bool(jnp.isfinite(v).all())]
    if bad:
        what = ("is not written: the state is non-finite (a diverged run)" if saving else
                "is refused: it was saved from a diverged run or damaged")
        raise CheckpointError(f"adapter {label} holds non-finite values (NaN or inf) in "
                              f"{sorted(bad)[:6]} and {what}")


def load_adapter(path: str | os.PathLike[str], model: Any, base: P.Params, *,
                 allow_base_mismatch: bool = False) -> tuple[Transform, Any, dict[str, Any]]:
    """Load a :func:`save_adapter` folder: ``(transform, delta, params)``.

    ``params`` is ``base`` with the saved trained leaves put in. A base whose fingerprint differs
    from the saved one raises :class:`~jpeft.checkpoint.CheckpointError` (naming both) unless
    ``allow_base_mismatch``. So does an adapter whose ``adapter.json`` is malformed, whose tensors
    are missing, unexpected, non-finite, or of another shape or dtype than the method (with its
    saved config, e.g. LoRA's rank) makes on this base, or which lacks a trained leaf.
    """
    from safetensors.flax import load_file

    from jpeft.config import ConfigError, from_dict
    from jpeft.methods import REGISTRY, build, parse_spec

    meta = read_adapter_meta(path)
    file = Path(path) / ADAPTER_JSON
    found = base_fingerprint(model, base)
    saved = meta.get("base_fingerprint")
    if saved != found and not allow_base_mismatch:
        raise CheckpointError(
            f"adapter {path} was made on another base model ({meta.get('base_model')!r}): expected "
            f"base fingerprint {saved}, found {found}. Load the base it was trained on, or pass "
            "allow_base_mismatch=True to load anyway.")
    try:
        names = parse_spec(meta["method_spec"])
    except ValueError as err:
        raise _bad(file, "method_spec", f"is not a method spec ({err})") from None
    configs = {}
    for name in names:
        try:
            configs[name] = from_dict(REGISTRY[name].config_cls, meta["method_configs"].get(name, {}))
        except (ConfigError, ValueError, TypeError) as err:
            raise _bad(file, f"method_configs.{name}", f"is invalid ({err})") from None
    transform = build(meta["method_spec"], configs)
    weights = Path(path) / ADAPTER_TENSORS
    try:
        tensors = load_file(str(weights))
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no {ADAPTER_TENSORS}") from None
    except Exception as err:  # noqa: BLE001 (safetensors raises its own SafetensorError)
        raise CheckpointError(f"{weights} cannot be read ({type(err).__name__}: {err}); the file is "
                              "truncated or damaged") from None
    referenced = set(P.flatten(meta["delta"]).values()) | {f"params/{p}" for p in meta["params"]}
    missing, unexpected = sorted(referenced - set(tensors)), sorted(set(tensors) - referenced)
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not match {file}: missing tensors {missing[:6]}, "
                              f"unexpected tensors {unexpected[:6]}")
    _check_finite(str(path), tensors)
    delta = _rebuild(meta["delta"], tensors)
    described = ", ".join(f"{n}: {meta['method_configs'].get(n, {})}" for n in names)
    _check_delta(str(path), delta, _expected_deltas(transform, model, base), described)
    flat = P.flatten(base)
    trained = set(head_paths(model, base)) | set(transform.trainable_base(base))
    lacking = sorted(trained - set(meta["params"]))
    if lacking:
        raise CheckpointError(f"adapter {path} lacks trained leaves {lacking[:6]} that {meta['method_spec']!r} "
                              "trains on this model (another num_labels or architecture?)")
    for p in meta["params"]:
        key = f"params/{p}"
        if p not in flat:
            raise CheckpointError(f"adapter leaf {p!r} is not a parameter of this model")
        value, old = tensors[key], flat[p]
        if tuple(value.shape) != tuple(np.shape(old)):
            raise CheckpointError(f"adapter leaf {p!r} has shape {tuple(value.shape)}, the model's "
                                  f"{tuple(np.shape(old))} (another num_labels or architecture?)")
        if jnp.issubdtype(value.dtype, jnp.inexact) != jnp.issubdtype(jnp.asarray(old).dtype, jnp.inexact):
            raise CheckpointError(f"adapter leaf {p!r} is {value.dtype}, the model's is {jnp.asarray(old).dtype}")
        flat[p] = jnp.asarray(value, dtype=jnp.asarray(old).dtype)
    return transform, delta, P.unflatten(flat)


__all__ = [
    "base_fingerprint",
    "export_merged_hf",
    "head_paths",
    "hf_config_dict",
    "load_adapter",
    "read_adapter_meta",
    "save_adapter",
]
