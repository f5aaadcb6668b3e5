"""Which fields of a Hugging Face PEFT ``adapter_config.json`` jpeft reads, ignores or refuses.

A field is *handled* (it changes what the adapter computes and jpeft represents it exactly),
*ignored* (bookkeeping or training-time settings with no effect on a loaded adapter), or refused
with a ``ValueError`` naming it, its value and why, unless it is at a neutral value (``None``,
``False``, empty): an adapter is never loaded approximately.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ADAPTER_CONFIG = "adapter_config.json"

# Fields with no effect on what a loaded adapter computes (bookkeeping, training-time settings).
_COMMON_IGNORED = {
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode",
    "auto_mapping", "peft_version", "modules_to_save",
}
_LORA_HANDLED = {
    "r", "lora_alpha", "use_rslora", "target_modules", "exclude_modules", "rank_pattern",
    "alpha_pattern", "layers_to_transform", "layers_pattern", "bias", "lora_dropout",
    "fan_in_fan_out", "init_lora_weights", "use_dora",
}
# settings consulted only by options that are themselves refused when on, or at training time
_LORA_IGNORED = {"megatron_core", "qalora_group_size", "ensure_weight_tying", "eva_config",
                 "corda_config", "lora_ga_config"}
_IA3_HANDLED = {"target_modules", "exclude_modules", "feedforward_modules", "fan_in_fan_out",
                "init_ia3_weights"}
_PROMPT_COMMON = {"num_virtual_tokens", "token_dim", "num_transformer_submodules",
                  "num_attention_heads", "num_layers"}
_PROMPT_TUNING_HANDLED = _PROMPT_COMMON | {"prompt_tuning_init", "prompt_tuning_init_text",
                                           "tokenizer_name_or_path", "tokenizer_kwargs"}
_PREFIX_HANDLED = _PROMPT_COMMON | {"encoder_hidden_size", "prefix_projection", "init_weights"}
_PTUNING_HANDLED = _PROMPT_COMMON | {"encoder_reparameterization_type", "encoder_hidden_size",
                                     "encoder_num_layers", "encoder_dropout"}
# LoRA inits that leave the base weights alone (anything else rewrites them: PiSSA, OLoRA, ...)
_SAFE_LORA_INITS = (True, False, "gaussian", "eva", "orthogonal")
# LoRA inits whose base rewrite jpeft recomputes exactly from the original weights
# (jpeft.methods.lora_init); randomized ones ("pissa_niter_<k>") cannot be
_REWRITING_LORA_INITS = ("pissa", "olora")

_REASONS = {
    "lora_bias": "LoRA with a bias on lora_B is not implemented in jpeft",
    "layer_replication": "layer replication changes the model's depth",
    "megatron_config": "Megatron parallel layers are not jpeft Dense layers",
    "target_parameters": "LoRA on raw parameters (not modules) is not implemented in jpeft",
    "trainable_token_indices": "jpeft reads trainable tokens beside LoRA adapters only",
    "use_qalora": "QA-LoRA pools the input and is not implemented in jpeft",
    "loftq_config": "LoftQ rewrites (quantizes) the base weights",
    "alora_invocation_tokens": "activated LoRA (aLoRA) is not implemented in jpeft",
}


def _neutral(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (dict, list, tuple, str)) and not value)


def _refuse(field: str, value: Any, why: str | None = None) -> ValueError:
    why = why or _REASONS.get(field, "jpeft cannot represent it exactly")
    return ValueError(f"{ADAPTER_CONFIG}: {field}={value!r} is not supported ({why}); "
                      "jpeft refuses the adapter rather than load it approximately")


def _check_fields(cfg: Mapping[str, Any], handled: set[str], ignored: set[str] = frozenset()) -> None:
    """Refuse every field that is neither handled, ignorable, nor at a neutral value."""
    for field in sorted(cfg):
        if field in handled or field in ignored or field in _COMMON_IGNORED:
            continue
        if not _neutral(cfg[field]):
            raise _refuse(field, cfg[field])
