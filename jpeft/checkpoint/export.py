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

from jpeft.checkpoint.hf_peft import _atomic_dir
from jpeft.checkpoint.orbax_ckpt import CheckpointError, fingerprint
from jpeft.core import paths as P
from jpeft.core.transform import Transform, merge

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

def hf_config_dict(config: Any) -> dict[str, Any]:
    """A ``transformers`` ``config.json`` for a jpeft :class:`~jpeft.models.bert.BertConfig`."""
    roberta = config.is_roberta
    family = "Roberta" if roberta else "Bert"
    if config.model_type == "xlm-roberta":
        family = "XLMRoberta"
    elif config.model_type == "camembert":
        family = "Camembert"
    head = config.head == "classification"
    out: dict[str, Any] = {
        "architectures": [f"{family}ForSequenceClassification" if head else f"{family}Model"],
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "intermediate_size": config.intermediate_size,
        "hidden_act": config.hidden_act,
        "hidden_dropout_prob": config.hidden_dropout_prob,
        "attention_probs_dropout_prob": config.attention_probs_dropout_prob,
        "max_position_embeddings": config.max_position_embeddings,
        "type_vocab_size": config.type_vocab_size,
        "layer_norm_eps": config.layer_norm_eps,
        "pad_token_id": config.pad_token_id,
        "position_embedding_type": "absolute",
        "classifier_dropout": config.classifier_dropout,
        "initializer_range": 0.02,
        "dtype": "float32",
    }
    if roberta:
        out.update(bos_token_id=0, eos_token_id=2)
    if head:
        n = config.num_labels
        out["id2label"] = {str(i): f"LABEL_{i}" for i in range(n)}
        out["label2id"] = {f"LABEL_{i}": i for i in range(n)}
        if n == 1:
            out["problem_type"] = "regression"
    return out


def export_merged_hf(path: str | os.PathLike[str], model: Any, transform: Transform,
                     params: P.Params, delta: Any, tokenizer_dir: str | os.PathLike[str] | None = None,
                     *, overwrite: bool = False) -> Path:
    """Merge ``delta`` into ``params`` and write a Hugging Face model folder at ``path``.

    ``model`` is the jpeft BERT-family model (its config becomes ``config.json``), ``params`` the
    parameters including the trained head. Raises :class:`~jpeft.core.transform.NotMergeableError`
    for activation-space methods (prompts, prefixes, adapters). ``tokenizer_dir``: a folder whose
    tokenizer files are copied alongside (so the export is self-contained).
    """
    from jpeft.models.bert import state_dict_from_params

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "is_roberta"):
        raise TypeError(f"export_merged_hf expects a jpeft BERT-family model, got {model!r}")
    merged = jax.device_get(merge(transform, params, delta))
    state = state_dict_from_params(merged, config)
    hf_config = hf_config_dict(config)
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

    _atomic_dir(Path(path), write, overwrite)
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

    _atomic_dir(Path(path), write, overwrite)
    return Path(path)


def read_adapter_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``adapter.json`` of a jpeft adapter folder."""
    file = Path(path) / ADAPTER_JSON
    if not file.is_file():
        raise CheckpointError(f"{path} has no {ADAPTER_JSON}; is it a jpeft adapter (save_adapter)?")
    meta = json.loads(file.read_text())
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{file}: format {meta.get('format')!r} v{meta.get('format_version')}, "
                              f"expected {FORMAT!r} v{FORMAT_VERSION}")
    return meta


def load_adapter(path: str | os.PathLike[str], model: Any, base: P.Params, *,
                 allow_base_mismatch: bool = False) -> tuple[Transform, Any, dict[str, Any]]:
    """Load a :func:`save_adapter` folder: ``(transform, delta, params)``.

    ``params`` is ``base`` with the saved trained leaves put in. A base whose fingerprint differs
    from the saved one raises :class:`~jpeft.checkpoint.CheckpointError` (naming both) unless
    ``allow_base_mismatch``.
    """
    from safetensors.flax import load_file

    from jpeft.config import from_dict
    from jpeft.methods import REGISTRY, build, parse_spec

    meta = read_adapter_meta(path)
    found = base_fingerprint(model, base)
    saved = meta.get("base_fingerprint")
    if saved != found and not allow_base_mismatch:
        raise CheckpointError(
            f"adapter {path} was made on another base model ({meta.get('base_model')!r}): expected "
            f"base fingerprint {saved}, found {found}. Load the base it was trained on, or pass "
            "allow_base_mismatch=True to load anyway.")
    names = parse_spec(meta["method_spec"])
    configs = {name: from_dict(REGISTRY[name].config_cls, meta["method_configs"].get(name, {}))
               for name in names}
    transform = build(meta["method_spec"], configs)
    tensors = load_file(str(Path(path) / ADAPTER_TENSORS))
    delta = _rebuild(meta["delta"], tensors)
    flat = P.flatten(base)
    for p in meta["params"]:
        key = f"params/{p}"
        if key not in tensors:
            raise CheckpointError(f"{ADAPTER_TENSORS} lacks the tensor {key!r}")
        if p not in flat:
            raise CheckpointError(f"adapter leaf {p!r} is not a parameter of this model")
        value, old = tensors[key], flat[p]
        if tuple(value.shape) != tuple(np.shape(old)):
            raise CheckpointError(f"adapter leaf {p!r} has shape {tuple(value.shape)}, the model's "
                                  f"{tuple(np.shape(old))} (another num_labels or architecture?)")
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
