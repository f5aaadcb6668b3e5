"""jpeft: functional parameter-efficient fine-tuning for JAX/Flax.

A PEFT method is a pure :class:`~jpeft.core.transform.Transform` over a frozen base parameter
tree; methods compose with :func:`compose` and run with :func:`apply`.
"""

from jpeft.core.check import check_delta
from jpeft.core.model import LinenModel, NnxModel, from_linen, from_nnx
from jpeft.core.layers import LayerSpec, register_layer
from jpeft.core.paths import count_params, partition, combine, select, select_modules
from jpeft.core.transform import (
    ApplyContext,
    ModelInfo,
    Transform,
    apply,
    compose,
    merge,
    unmerge,
)
from jpeft.methods import (
    REGISTRY,
    AdapterConfig,
    BitFitConfig,
    DiffPruningConfig,
    FreezeConfig,
    FullConfig,
    HraConfig,
    IA3Config,
    LNTuningConfig,
    LohaConfig,
    LokrConfig,
    LoraConfig,
    OftConfig,
    PrefixConfig,
    PromptConfig,
    PTuningConfig,
    PTuningV2Config,
    TrainableTokensConfig,
    VeraConfig,
    bitfit,
    build,
    diff_pruning,
    freeze,
    full,
    houlsby,
    hra,
    ia3,
    ln_tuning,
    loha,
    lokr,
    lora,
    oft,
    pfeiffer,
    prefix,
    prompt,
    ptuning,
    ptuning2,
    trainable_tokens,
    vera,
)
from jpeft.models import from_pretrained
from jpeft.models.bert import BertConfig, BertModel
from jpeft.models.taps import NnxTap, Tap
from jpeft.quant import QuantizedArray, QuantizedBaseError, dequantize_base, quantize_base

__version__ = "0.1.0"


def print_trainable_parameters(transform: Transform, base, delta) -> str:
    """Print (and return) trainable/all parameter counts, as HF PEFT's method of that name.

    Trainable = the delta plus the base leaves the method trains (the task head is counted by
    :class:`jpeft.train.trainer.Trainer`, which also trains it). All = the adapted model's
    parameters: the base's plus what the method adds (``Transform.new_params``: nothing for
    BitFit's or freezing's ``θ₀ + δ``), as ``Trainer.counts`` reports.
    """
    from jpeft.core import paths as P

    trained_base = transform.trainable_base(base)
    flat = P.flatten(base)
    trainable = count_params(delta) + sum(int(flat[p].size) for p in trained_base)
    total = count_params(base) + transform.new_params(delta)
    line = (f"trainable params: {trainable:,d} || all params: {total:,d} "
            f"|| trainable%: {100.0 * trainable / max(total, 1):.4f}")
    print(line)
    return line


__all__ = [
    "ApplyContext", "ModelInfo", "Transform", "apply", "compose", "merge", "unmerge", "build",
    "check_delta",
    "from_linen", "from_nnx", "LinenModel", "NnxModel", "Tap", "NnxTap", "register_layer",
    "LayerSpec",
    "REGISTRY", "count_params", "partition", "combine", "select", "select_modules",
    "full", "FullConfig", "lora", "LoraConfig", "houlsby", "pfeiffer", "AdapterConfig", "ia3",
    "IA3Config", "prefix", "PrefixConfig", "ptuning2", "PTuningV2Config", "prompt", "PromptConfig",
    "ptuning", "PTuningConfig", "bitfit", "BitFitConfig", "freeze", "FreezeConfig", "diff_pruning",
    "DiffPruningConfig", "trainable_tokens", "TrainableTokensConfig", "ln_tuning",
    "LNTuningConfig", "loha", "LohaConfig", "lokr", "LokrConfig", "vera", "VeraConfig",
    "oft", "OftConfig", "hra", "HraConfig", "BertConfig", "BertModel",
    "from_pretrained",
    "QuantizedArray", "QuantizedBaseError", "quantize_base", "dequantize_base",
    "print_trainable_parameters", "__version__",
]
