"""Full fine-tuning: every base parameter is trainable. The baseline every table compares with.

It has no delta; it cannot be composed with another method (there is nothing left to adapt).
"""

from __future__ import annotations

import dataclasses

from jpeft.core import paths as P
from jpeft.core.capabilities import Exclusive
from jpeft.core.registry import register
from jpeft.core.transform import Transform


@dataclasses.dataclass(frozen=True)
class FullConfig:
    embeddings: bool = dataclasses.field(
        default=True, metadata={"help": "train the embedding tables too"}
    )


def full(config: FullConfig = FullConfig(), *, name: str = "full") -> Transform:
    """Full fine-tuning as a transform whose delta is empty."""

    def trainable_base(base: P.Params) -> list[str]:
        return [p for p in P.paths(base) if config.embeddings or not p.startswith("embeddings/")]

    return Transform(
        name=name,
        config=config,
        init=lambda rng, base, info=None: {},
        trainable_base=trainable_base,
        merge=lambda params, delta, info=None: params,
        unmerge=lambda params, delta, info=None: params,
        capabilities=(Exclusive(),),
    )


register("full", FullConfig, full)
