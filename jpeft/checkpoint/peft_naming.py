"""jpeft module paths <-> the PyTorch module names of the model PEFT wraps.

BERT family: ``encoder/layer_0/attention/self/query`` is ``bert.encoder.layer.0.attention.self.query``
in ``BertForSequenceClassification`` (``roberta.`` for RoBERTa, no prefix for ``AutoModel``), and the
task head ``head/classifier`` is ``classifier``. Llama: ``model/layers_0/self_attn/q_proj`` is
``model.layers.0.self_attn.q_proj`` in ``LlamaForCausalLM``; GPT-2: ``transformer/h_0/attn/c_attn``
is ``transformer.h.0.attn.c_attn`` in ``GPT2LMHeadModel``. Kernels are stored transposed, except
GPT-2's ``Conv1D`` layers, whose PyTorch weight is ``(d_in, d_out)`` like jpeft's kernel.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jpeft.core import paths as P

_LAYER_PATH = re.compile(r"(^|/)(layer|layers|h)_(\d+)(?=/|$)")
_LAYER_NAME = re.compile(r"(^|\.)(layer|layers|h)\.(\d+)(?=\.|$)")
BERT_TYPES = ("bert", "roberta", "xlm-roberta", "camembert")


@dataclasses.dataclass(frozen=True)
class Family:
    """How one jpeft model family names the PyTorch modules of the model PEFT wraps.

    ``tasks``: PEFT task types whose wrapped model the jpeft model mirrors (``None``: a config
    without one); ``default_task`` is written when none is asked for. ``conv1d``: a regex of the
    module paths that are ``transformers`` ``Conv1D`` layers (weight ``(d_in, d_out)``, not
    transposed). ``output_layer``: the module PEFT's ``"all-linear"`` leaves out (the LM head).
    ``prompt_tasks``: task types whose prompt-learning adapters jpeft reads and writes.
    """

    name: str
    tasks: tuple[str | None, ...]
    default_task: str
    conv1d: str | None = None
    output_layer: str | None = None
    prompt_tasks: tuple[str, ...] = ()
    prefix: Callable[[Any, str | None], str] = lambda config, task_type: ""
    head_modules: Callable[[str | None], list[str]] = lambda task_type: []


def _encoder_prefix(is_roberta: bool, task_type: str | None) -> str:
    """The PyTorch name prefix of the encoder in the model PEFT wraps."""
    if task_type == "SEQ_CLS":
        return "roberta." if is_roberta else "bert."
    return ""  # AutoModel: the encoder is the root


BERT = Family("bert", ("SEQ_CLS", "FEATURE_EXTRACTION", None), "SEQ_CLS", prompt_tasks=("SEQ_CLS",),
              prefix=lambda config, task_type: _encoder_prefix(bool(config.is_roberta), task_type),
              head_modules=lambda task_type: ["classifier"] if task_type == "SEQ_CLS" else [])
# decoders: PEFT wraps the *ForCausalLM / LMHeadModel, whose module names jpeft's trees mirror
LLAMA = Family("llama", ("CAUSAL_LM", None), "CAUSAL_LM", output_layer="lm_head",
               prompt_tasks=("CAUSAL_LM",))
GPT2 = Family("gpt2", ("CAUSAL_LM", None), "CAUSAL_LM", conv1d=r"^transformer/h_\d+/(attn|mlp)/c_\w+$",
              output_layer="lm_head", prompt_tasks=("CAUSAL_LM",))
FAMILIES = {**{t: BERT for t in BERT_TYPES}, **{t: LLAMA for t in ("llama", "mistral", "qwen2", "qwen3")},
            "gpt2": GPT2}


def model_family(model: Any) -> tuple[Family, Any]:
    """``(family, config)`` of a jpeft model whose PyTorch twin PEFT wraps."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "model_type"):
        raise TypeError(f"expected one of jpeft's own models (BERT/RoBERTa, Llama, GPT-2: "
                        f"jpeft.from_pretrained), got {type(model).__name__}; a model of your own has "
                        "no PyTorch twin: save its deltas with save_adapter or Orbax checkpoints")
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise ValueError(f"PEFT adapters are supported for model types {sorted(FAMILIES)}, got "
                         f"model_type={config.model_type!r}")
    return family, config


def torch_module_name(path: str, prefix: str) -> str:
    """``encoder/layer_0/attention/self/query`` -> ``bert.encoder.layer.0.attention.self.query``;
    the head ``head/classifier`` -> ``classifier``, ``head/dense`` -> ``classifier.dense``."""
    if path == "head" or path.startswith("head/"):
        rest = path[len("head/"):] if path != "head" else ""
        if rest in ("", "classifier"):
            return "classifier"
        return "classifier." + rest.replace("/", ".")
    return prefix + _LAYER_PATH.sub(r"\1\2.\3", path).replace("/", ".")


@dataclasses.dataclass(frozen=True)
class _Modules:
    """Every module of a jpeft parameter tree under its PyTorch name."""

    by_name: dict[str, str]          # torch name -> jpeft module path
    dense: frozenset[str]            # jpeft paths of Dense layers (2-D kernel)
    prefix: str
    head: tuple[str, ...] = ()       # PEFT's modules_to_save for the task head
    family: Family = BERT

    def path(self, name: str) -> str | None:
        return self.by_name.get(name)

    def name(self, path: str) -> str:
        return torch_module_name(path, self.prefix)

    def is_conv1d(self, path: str) -> bool:
        """Whether the PyTorch module at ``path`` is a ``Conv1D`` (weight ``(d_in, d_out)``)."""
        return self.family.conv1d is not None and re.search(self.family.conv1d, path) is not None

    def all_linear(self) -> list[str]:
        """The PyTorch names PEFT's ``target_modules="all-linear"`` selects."""
        out = self.family.output_layer
        return [n for n, p in self.by_name.items()
                if p in self.dense and not p.startswith("head") and p != out]


def _modules(params: P.Params, prefix: str, with_head: bool, family: Family = BERT,
             head: Sequence[str] = ()) -> _Modules:
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
    return _Modules(by_name, frozenset(dense), prefix, tuple(head), family)


def _is_roberta(params: P.Params, model: Any) -> bool:
    if model is not None:
        return bool(model_family(model)[1].is_roberta)
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
