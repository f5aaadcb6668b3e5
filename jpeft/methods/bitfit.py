"""BitFit: train only the bias terms (Ben Zaken, Ravfogel and Goldberg, 2022, arXiv:2106.10199).

Every bias vector ``b (d_out,)`` of the base model is adapted additively,

    b' = b + δ_b,       δ_b (d_out,) = 0 at init,

through :mod:`jpeft.methods.additive`: the delta mirrors the parameter tree restricted to the
``.../bias`` leaves, a fresh delta is **exactly the identity**, and the method **merges**
(``b + δ_b``) and unmerges exactly. Training ``δ_b`` is training ``b`` (same gradient); the
checkpoint holds only the biases' deltas.

Selection, following the paper ("all bias terms"): every ``bias`` leaf outside the task head —
query/key/value, attention output, intermediate, output, the LayerNorm biases (``β``, turned off
with ``include_layernorm=False``), the embeddings' LayerNorm **and the pooler** (a bias of the
base model like any other; BERT's pooler sits between the encoder and the classifier). The task
head is trained by the trainer, not by BitFit. ``pattern`` narrows the selection further (a
regex searched in the bias paths, e.g. ``"(query|intermediate)"`` for the paper's ablation that
trains only the query and intermediate-layer biases).

Count on BERT-style models with hidden ``d``, intermediate ``I``, ``L`` layers:
``L·(4d + I + d + 2d) + d (embeddings LayerNorm) + d (pooler; absent in RoBERTa)``, i.e.
``6·(4·384 + 1536 + 384 + 2·384) + 384 + 384 = 26,112`` on MiniLM (+770 for its 2-class head).
HF PEFT has no BitFit (its nearest is ``bias="all"`` on another method).

The deltas are labelled ``"no_decay"`` (biases are never decayed, as the Hugging Face Trainer
does). Stacking: see :mod:`jpeft.methods.additive` (put BitFit before ``ia3`` in a composition).

Example::

    method = bitfit(BitFitConfig(include_layernorm=False))
    delta = method.init(jax.random.key(0), base, model.info())
"""

from __future__ import annotations

import dataclasses
import re

from jpeft.core import paths as P
from jpeft.core.registry import register
from jpeft.core.transform import ModelInfo, Transform
from jpeft.methods.additive import additive, exclude_head

_LAYERNORM = re.compile(r"(?:layer_?norm|(?:^|/)ln(?:_\w+)?/)", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class BitFitConfig:
    include_layernorm: bool = dataclasses.field(
        default=True, metadata={"help": "also train the LayerNorm biases (beta), as the paper does"}
    )
    pattern: str = dataclasses.field(
        default="",
        metadata={"help": "regex searched in the bias paths to narrow the selection ('' = all biases)"},
    )

    def __post_init__(self) -> None:
        try:
            re.compile(self.pattern)
        except re.error as err:
            raise ValueError(f"bitfit.pattern is not a valid regex: {self.pattern!r} ({err})") from None


def is_layernorm(path: str) -> bool:
    """Whether a parameter path belongs to a LayerNorm (``LayerNorm``, ``layer_norm``, ``ln_f``)."""
    return _LAYERNORM.search(path) is not None


def bias_paths(config: BitFitConfig, base: P.Params, info: ModelInfo) -> list[str]:
    """The bias leaves BitFit trains (head excluded); raises when ``pattern`` matches none."""
    candidates = exclude_head((p for p in P.paths(base) if p.endswith("/bias")), info)
    if not config.include_layernorm:
        candidates = [p for p in candidates if not is_layernorm(p)]
    if not candidates:
        raise ValueError(
            f"bitfit: the {info.family} model has no bias outside the task head"
            + ("" if config.include_layernorm else " and the LayerNorms (include_layernorm=False)")
            + "; BitFit trains only biases, so it has nothing to train here: choose another method "
            "(e.g. lora, ia3, an adapter) for this model"
        )
    if not config.pattern:
        return candidates
    allowed = set(candidates)
    return P.select(base, config.pattern, leaf_filter=lambda p, _: p in allowed,
                    what="bitfit.pattern")


def bitfit(config: BitFitConfig = BitFitConfig(), *, name: str = "bitfit") -> Transform:
    """BitFit as a :class:`~jpeft.core.transform.Transform` (see the module docstring)."""
    return additive(name, config, lambda base, info: bias_paths(config, base, info),
                    label="no_decay")


register("bitfit", BitFitConfig, bitfit)
