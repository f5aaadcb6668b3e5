"""jpeft module paths <-> the PyTorch module names of the model PEFT wraps (BERT family).

``encoder/layer_0/attention/self/query`` is ``bert.encoder.layer.0.attention.self.query`` in
``BertForSequenceClassification`` (``roberta.`` for RoBERTa, no prefix for ``AutoModel``), and the
task head ``head/classifier`` is ``classifier``; kernels are stored transposed.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jpeft.core import paths as P

_LAYER_PATH = re.compile(r"(^|/)layer_(\d+)(?=/|$)")
_LAYER_NAME = re.compile(r"(^|\.)layer\.(\d+)(?=\.|$)")


def _model_config(model: Any) -> Any:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "model_type"):
        raise TypeError(f"expected a jpeft BERT-family model (jpeft.models.bert.BertModel), got {model!r}")
    if config.model_type not in ("bert", "roberta", "xlm-roberta", "camembert"):
        raise ValueError(f"PEFT adapters are supported for BERT-family models, got model_type={config.model_type!r}")
    return config


def _encoder_prefix(is_roberta: bool, task_type: str | None) -> str:
    """The PyTorch name prefix of the encoder in the model PEFT wraps."""
    if task_type == "SEQ_CLS":
        return "roberta." if is_roberta else "bert."
    return ""  # AutoModel: the encoder is the root


def torch_module_name(path: str, prefix: str) -> str:
    """``encoder/layer_0/attention/self/query`` -> ``bert.encoder.layer.0.attention.self.query``;
    the head ``head/classifier`` -> ``classifier``, ``head/dense`` -> ``classifier.dense``."""
    if path == "head" or path.startswith("head/"):
        rest = path[len("head/"):] if path != "head" else ""
        if rest in ("", "classifier"):
            return "classifier"
        return "classifier." + rest.replace("/", ".")
    return prefix + _LAYER_PATH.sub(r"\1layer.\2", path).replace("/", ".")


@dataclasses.dataclass(frozen=True)
class _Modules:
    """Every module of a jpeft parameter tree under its PyTorch name."""

    by_name: dict[str, str]          # torch name -> jpeft module path
    dense: frozenset[str]            # jpeft paths of Dense layers (2-D kernel)
    prefix: str

    def path(self, name: str) -> str | None:
        return self.by_name.get(name)

    def name(self, path: str) -> str:
        return torch_module_name(path, self.prefix)


def _modules(params: P.Params, prefix: str, with_head: bool) -> _Modules:
    flat = P.flatten(params)
    paths: dict[str, None] = {}
    dense = set()
    for leaf_path, value in flat.items():
        parts = leaf_path.split("/")
        if not with_head and parts[0] == "head":
            continue
        for i in range(1, len(parts)):
            paths["/".join(parts[:i])] = None
        if parts[-1] == "kernel" and np.ndim(value) == 2:
            dense.add("/".join(parts[:-1]))
    by_name: dict[str, str] = {}
    for p in paths:  # "head" and "head/classifier" are both torch's "classifier": keep the layer
        name = torch_module_name(p, prefix)
        if name not in by_name or len(p) > len(by_name[name]):
            by_name[name] = p
    if prefix:
        by_name.setdefault(prefix[:-1], "")  # the encoder root ("bert"), never a Dense layer
    return _Modules(by_name, frozenset(dense), prefix)


def _is_roberta(params: P.Params, model: Any) -> bool:
    if model is not None:
        return bool(_model_config(model).is_roberta)
    return "head/out_proj/kernel" in P.flatten(params)


def _leaf_tensor(path: str, value: Any) -> tuple[str, np.ndarray]:
    """A jpeft leaf as (torch leaf name, array): kernels transposed; scale/embedding -> weight."""
    module, _, leaf = path.rpartition("/")
    value = np.asarray(jax.device_get(value), np.float32)
    return module, (value.T if leaf == "kernel" else value)


def _head_entries(params: P.Params, head: Sequence[str], key_prefix: str,
                  prefix: str) -> dict[str, np.ndarray]:
    flat = P.flatten(params)
    out = {}
    for path in head:
        module, value = _leaf_tensor(path, flat[path])
        leaf = "bias" if path.endswith("/bias") else "weight"
        out[f"{key_prefix}{torch_module_name(module, prefix)}.{leaf}"] = value
    return out


def _split_head_delta(delta: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(head part, encoder part) of a weight-space delta, as flat dicts."""
    flat = P.flatten(delta)
    head = {k: v for k, v in flat.items() if k.startswith("head/")}
    body = {k: v for k, v in flat.items() if not k.startswith("head/")}
    return head, body
