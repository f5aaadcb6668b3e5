"""P-tuning v2: deep prompt tuning (Liu et al., 2022, arXiv:2110.07602).

Trainable key/value prefixes at every layer, trained directly (no reparameterisation MLP):
exactly prefix tuning (:mod:`jpeft.methods.prefix`) with ``projection=False``. For layer ``l``

    K' = [P_k[l]; K],   V' = [P_v[l]; V],   m' = [1 … 1; m],   P_k[l], P_v[l] (P, H, Dh)

from one table ``T (P, L·2·H·Dh)`` in Hugging Face PEFT's layout (``layers × (key, value) × heads
× head_dim``; PEFT's ``PrefixTuningConfig(prefix_projection=False)``): ``P·L·2·H·Dh`` parameters.
The delta is ``{"prefix": T}`` (labelled ``"prefix"`` for the optimizer).

Like every prefix, **a fresh delta is not the identity** (the added keys take part in every
softmax; ``adds_tokens=True``), and it acts on activations: **not mergeable**. This module only
maps its config onto :class:`~jpeft.methods.prefix.PrefixConfig`; all the machinery is prefix's.

Example::

    method = jpeft.ptuning2(PTuningV2Config(num_virtual_tokens=20))
"""

from __future__ import annotations

import dataclasses

from jpeft.checkpoint.peft_convert import PeftConverter
from jpeft.core.registry import register
from jpeft.core.transform import Transform
from jpeft.methods.prefix import PrefixConfig, prefix, validate_prompt_fields
from jpeft.methods.prefix import to_peft as prefix_to_peft


@dataclasses.dataclass(frozen=True)
class PTuningV2Config:
    num_virtual_tokens: int = dataclasses.field(
        default=20, metadata={"help": "prefix length P (virtual key/value positions per layer)"}
    )
    init: str = dataclasses.field(
        default="normal",
        metadata={"help": "'normal' (table ~ normal(init_scale), as PEFT) or 'zero' (PEFT's init_weights='zero')"},
    )
    init_scale: float = dataclasses.field(
        default=1.0, metadata={"help": "std of the normal init of the table (1: torch's Embedding)"}
    )
    layers: tuple[int, ...] = dataclasses.field(
        default=(), metadata={"help": "only these layer indices get a prefix (empty: all layers)"}
    )

    peft_positions: bool = dataclasses.field(
        default=False,
        metadata={"help": "number the input tokens' positions from P as PEFT/transformers do "
                          "(see prefix.peft_positions); needed to export to PEFT"},
    )

    def __post_init__(self) -> None:
        validate_prompt_fields("ptuning2", self.num_virtual_tokens, self.init, self.init_scale,
                               tuple(self.layers))

    def to_prefix(self) -> PrefixConfig:
        """The equivalent prefix-tuning config (``projection=False``)."""
        return PrefixConfig(num_virtual_tokens=self.num_virtual_tokens, projection=False,
                            init=self.init, init_scale=self.init_scale, layers=tuple(self.layers),
                            peft_positions=self.peft_positions)


def ptuning2(config: PTuningV2Config = PTuningV2Config(), *, name: str = "ptuning2") -> Transform:
    """P-tuning v2 = ``prefix(PrefixConfig(projection=False, ...))``, keeping this config."""
    return dataclasses.replace(prefix(config.to_prefix(), name=name), config=config)


# PEFT has no P-tuning v2 type: it is written as PREFIX_TUNING (and reads back as a prefix).
register("ptuning2", PTuningV2Config, ptuning2,
         peft=PeftConverter(peft_type=None, layout="prompt", load=None, save=prefix_to_peft))
