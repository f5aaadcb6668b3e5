"""Layer freezing: fine-tune only the top ``k`` layers (the FT-Top2 baseline of Li and Liang, 2021,
arXiv:2101.00190, "Prefix-Tuning"; also Lee et al., 2019, arXiv:1911.03090).

Every leaf ``W`` of the ``k`` highest encoder layers (indices ``L-k .. L-1``, read from the path by
:func:`jpeft.methods.lora.layer_index`), optionally of the pooler and of the embeddings, is
adapted additively through :mod:`jpeft.methods.additive`:

    W' = W + δ_W,       δ_W shaped like W, 0 at init.

A fresh delta is **exactly the identity**; the method **merges** (``W + δ_W``) and unmerges
exactly. ``∂L/∂δ_W = ∂L/∂W``, so this is fine-tuning those layers, with one difference in the
optimizer: AdamW's decoupled weight decay acts on ``δ`` and pulls the weights towards their
pretrained values rather than towards 0 (labels follow the trainer's rule: ``"no_decay"`` for
biases and LayerNorm parameters, ``"default"`` otherwise). The delta (= checkpoint) holds only the
trained layers.

Options:

* ``top`` (default 2: ``--freeze.top=2`` is FT-Top2). ``0`` trains no layer (linear probing:
  only the head, plus the pooler when ``pooler``); ``top = L`` trains every layer.
* ``pooler`` (default **True**): the pooler (``tanh(dense(h[:, 0]))``) sits *above* the top layer,
  between it and the classifier, so "the top k layers" naturally include it; it only exists in
  BERT-style models (RoBERTa's equivalent dense lives in the task head, trained anyway).
* ``embeddings`` (default False): also train the embedding tables and their LayerNorm.
* ``layers`` (default none): train exactly these layer indices instead of the top ``k``
  (e.g. ``layers=(2, 3, 4)``; with ``pooler=False`` this is full fine-tuning of those layers).

Layers stacked in one leaf by ``nn.scan`` / ``nnx.scan`` (a leading layer axis, no layer number in
the path) are trained slice by slice without unstacking the base: the delta of such a leaf holds
only the trained layers' rows, ``θ[rows] = θ₀[rows] + δ`` (:mod:`jpeft.methods.additive`), so the
other layers stay bit-identical.

Count: the parameters of the top ``k`` layers (+ pooler, + embeddings). One BERT layer with hidden
``d`` and intermediate ``I`` has ``4(d² + d) + (dI + I) + (Id + d) + 4d``; on MiniLM (d=384,
I=1536) that is 1,774,464, so ``top=2`` with the pooler (147,840) trains 3,696,768 (+770 head).

Memory: the delta duplicates the trained weights (base + δ, plus Adam's two moments for δ).
"""

from __future__ import annotations

import dataclasses

from jpeft.core import layers as L
from jpeft.core import paths as P
from jpeft.core.registry import register
from jpeft.core.transform import ModelInfo, Transform
from jpeft.methods import additive as A
from jpeft.methods.additive import additive
from jpeft.core.paths import layer_index
from jpeft.train.optim import base_labels


@dataclasses.dataclass(frozen=True)
class FreezeConfig:
    top: int = dataclasses.field(
        default=2, metadata={"help": "number of top encoder layers trained (0: none; 2: FT-Top2)"}
    )
    pooler: bool = dataclasses.field(
        default=True, metadata={"help": "also train the pooler (above the top layer; BERT only)"}
    )
    embeddings: bool = dataclasses.field(
        default=False, metadata={"help": "also train the embedding tables and their LayerNorm"}
    )
    layers: tuple[int, ...] = dataclasses.field(
        default=(), metadata={"help": "train exactly these layer indices (empty: the top `top`)"}
    )

    def __post_init__(self) -> None:
        P.check_layer_indices("freeze", self.layers)
        if isinstance(self.top, bool) or not isinstance(self.top, int) or self.top < 0:
            raise ValueError(
                f"freeze.top must be an integer between 0 and the number of layers, got {self.top!r}"
            )

    def trained_layers(self, num_layers: int) -> tuple[int, ...]:
        """The layer indices trained in a model of ``num_layers`` layers (sorted)."""
        if self.layers:
            bad = [i for i in self.layers if i >= num_layers]
            if bad:
                raise ValueError(f"freeze.layers={list(self.layers)} but the model has "
                                 f"{num_layers} layers; choose indices below {num_layers}")
            return tuple(sorted(self.layers))
        if not 0 <= self.top <= num_layers:
            raise ValueError(
                f"freeze.top={self.top} but the model has {num_layers} layers; "
                f"choose 0 <= freeze.top <= {num_layers}"
            )
        return tuple(range(num_layers - self.top, num_layers))

    def stack_rows(self, num_layers: int) -> tuple[int, ...]:
        """The rows of a leaf stacking ``num_layers`` layers that are trained (see
        :mod:`jpeft.methods.additive`)."""
        return self.trained_layers(num_layers)


def _module_prefix(path: str) -> str:
    return path.split("/", 1)[0]


def trained_paths(config: FreezeConfig, base: P.Params, info: ModelInfo) -> list[str]:
    """The base leaves this config trains (top layers, pooler, embeddings; never the head)."""
    indices = [i for i in map(layer_index, P.paths(base)) if i is not None]
    stacked = L.stacked_leaves(base, info.layers)
    if not indices and not stacked:
        raise ValueError(
            "freeze: no parameter path carries a layer index (layer_<i>, layers_<i>, h_<i>, or an "
            "NNX list entry layers/<i>) and no leaf is stacked by nn.scan / nnx.scan in the model's "
            "description (for a scanned model pass info=jpeft.from_linen(...).info() or the model "
            f"of jpeft.from_nnx). The paths are {P.paths(base)[:20]}"
        )
    num_layers = info.num_layers or (max(indices) + 1 if indices else max(stacked.values()))
    trained = set(config.trained_layers(num_layers))
    embeddings = A.embedding_module(info, P.paths(base))
    chosen: list[str] = []
    for path in P.paths(base):
        index = layer_index(path)
        if index is not None:
            if index >= num_layers:
                raise ValueError(
                    f"freeze: {path!r} has layer index {index} but the model reports "
                    f"{num_layers} layers"
                )
            if index in trained:
                chosen.append(path)
        elif path in stacked:
            if trained:
                chosen.append(path)
        elif config.pooler and _module_prefix(path) == "pooler":
            chosen.append(path)
        elif config.embeddings and (path == embeddings or path.startswith(embeddings + "/")):
            chosen.append(path)
    return chosen


def _label(path: str) -> str:
    return base_labels({path: None})[path]


def freeze(config: FreezeConfig = FreezeConfig(), *, name: str = "freeze") -> Transform:
    """Layer freezing as a :class:`~jpeft.core.transform.Transform` (see the module docstring)."""
    return additive(name, config, lambda base, info: trained_paths(config, base, info),
                    label=_label)


register("freeze", FreezeConfig, freeze)
