"""(IA)³: Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al., 2022,
arXiv:2205.05638), with Hugging Face PEFT's semantics (``peft/tuners/ia3/layer.py``).

A learned vector rescales the activations of each target ``Dense`` (kernel ``W (d_in, d_out)``,
bias ``b (d_out,)``):

* an ordinary target scales the layer's **output**:   ``y = (x W + b) ⊙ l``,   ``l (d_out,)``;
* a *feed-forward* target scales the layer's **input**: ``y = (x ⊙ l) W + b``,  ``l (d_in,)``.

Targets are the Dense modules whose path matches ``IA3Config.targets``; those that also match
``IA3Config.feedforward`` are feed-forward targets (the feed-forward pattern may not select a
module that ``targets`` does not). With the defaults on BERT, ``output/dense$`` matches both the
attention output projection (``d_in = d``) and the FFN output projection (``d_in = 4d``), exactly as
PEFT's ``output.dense`` does, so MiniLM (d = 384, 6 layers) gets ``6·(384+384+384+1536) = 16,128``
scalars (plus the 770 of the 2-class head: PEFT prints 16,898).

``l = 1`` at init, so a fresh delta is **exactly the identity**. Weight-space, so **mergeable**:

* ordinary target:     ``W' = W ⊙ l[None, :]``,  ``b' = b ⊙ l``;
* feed-forward target: ``W' = l[:, None] ⊙ W``,  ``b' = b``;

and :func:`unmerge` divides by ``l``. An entry of ``l`` that is exactly 0 has destroyed the
weights it scaled, so it cannot be unmerged: ``unmerge`` raises ``ValueError`` for concrete
(non-traced) deltas (PEFT instead adds 1e-8 and silently returns wrong weights); under ``jit`` the
check cannot run and such entries give ``inf``/``nan``.

Stacking: ``compose(lora(), ia3())`` on the same Dense computes ``ia3(lora(x))``, i.e. for an
ordinary target ``(x W + b + s·x A B) ⊙ l`` and for a feed-forward one
``(x⊙l) W + b + s·(x⊙l) A B``; merging applies LoRA first, then the (IA)³ scaling, which folds the
same function. The delta mirrors the parameter tree: ``{..., "key": {"ia3_l": l}}``. The vectors
are labelled ``"no_decay"`` (weight decay would pull them towards 0, not towards the identity 1).

Other layer kinds (:mod:`jpeft.core.layers`): ``l`` spans the layer's output axis group (an
ordinary target) or its input feature axes (a feed-forward target; a conv's input channels), and
layers stacked by ``nn.scan`` / ``nnx.scan`` get one vector per layer, ``(*stack, *group)``.

Example::

    method = jpeft.ia3(IA3Config())
    delta = method.init(jax.random.key(0), base, model.info())
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.core import layers as L
from jpeft.core.arrays import is_concrete
from jpeft.core import paths as P
from jpeft.core.paths import layer_index
from jpeft.core.registry import register
from jpeft.core.transform import ApplyContext, ModelInfo, Transform, resolve_info

LEAF = "ia3_l"


@dataclasses.dataclass(frozen=True)
class IA3Config:
    targets: str = dataclasses.field(
        default=r"(key|value|output/dense)$",
        metadata={"help": "regex searched in Dense module paths: the layers to rescale"},
    )
    feedforward: str = dataclasses.field(
        default=r"output/dense$",
        metadata={"help": "regex of the targets whose INPUT is scaled (PEFT's feedforward_modules); "
                          "must select only targets; '' for none"},
    )
    layers: tuple[int, ...] = dataclasses.field(
        default=(), metadata={"help": "only these layer indices (empty: all layers)"}
    )

    def __post_init__(self) -> None:
        for field in ("targets", "feedforward"):
            try:
                re.compile(getattr(self, field))
            except re.error as err:
                raise ValueError(f"ia3.{field} is not a valid regex: {getattr(self, field)!r} ({err})")
        if not self.targets:
            raise ValueError("ia3.targets must be a non-empty regex (it would select every Dense)")
        if any(i < 0 for i in self.layers) or len(set(self.layers)) != len(self.layers):
            raise ValueError(
                f"ia3.layers must be distinct non-negative layer indices, got {list(self.layers)}"
            )


def is_feedforward(config: IA3Config, path: str) -> bool:
    """Whether the target at module ``path`` scales its input (else its output)."""
    return bool(config.feedforward) and re.search(config.feedforward, path) is not None


def target_modules(config: IA3Config, base: P.Params,
                   layers: Mapping[str, L.LayerSpec] | None = None) -> dict[str, bool]:
    """``{module path: is_feedforward}`` of the layers this config rescales (``layers``: the
    model's description, for registered layer types).

    Raises when a pattern matches nothing, or when ``feedforward`` selects a non-target.
    """
    targets = L.select_layers(base, config.targets, layers or {}, "ia3.targets")
    if config.feedforward:
        ff = L.select_layers(base, config.feedforward, layers or {}, "ia3.feedforward")
        outside = [m for m in ff if m not in set(targets)]
        if outside:
            raise ValueError(
                f"ia3.feedforward {config.feedforward!r} must select a subset of the modules of "
                f"ia3.targets {config.targets!r}, but it also selects {outside[:10]}"
                f"{' ...' if len(outside) > 10 else ''}. Narrow ia3.feedforward, widen "
                "ia3.targets, or set ia3.feedforward='' for no feed-forward targets."
            )
    if config.layers:
        wanted = set(config.layers)
        kept = [m for m in targets if layer_index(m) in wanted]
        if not kept:
            raise P.no_match_error(f"ia3.layers={list(config.layers)}", config.targets, targets)
        targets = kept
    return {m: is_feedforward(config, m) for m in targets}


def _group(config: IA3Config, path: str) -> str:
    return "features" if is_feedforward(config, path) else "out"


def ia3(config: IA3Config = IA3Config(), *, name: str = "ia3") -> Transform:
    """(IA)³ as a :class:`~jpeft.core.transform.Transform` (see the module docstring)."""

    def init(rng: jax.Array, base: P.Params, info: ModelInfo | None = None) -> dict[str, Any]:
        layers = resolve_info(info).layers
        flat_base = P.flatten(base)
        flat: dict[str, jax.Array] = {}
        for path in target_modules(config, base, layers):
            stored = jnp.shape(flat_base[L.kernel_path(path, layers, flat_base)])
            spec = L.kernel_spec(path, stored, layers, "ia3.targets")
            shape = (*spec.stack, *spec.group_shape(_group(config, path)))
            flat[f"{path}/{LEAF}"] = jnp.ones(shape, jnp.float32)
        return P.unflatten(flat)

    def layer_hook(ctx: ApplyContext):
        def adapt(call, x, layer, leaves):
            scale = leaves[LEAF]
            if is_feedforward(config, layer.path):
                return call(L.scale_input(layer.spec, x, scale))
            return L.scale_output(layer.spec, call(x), scale)

        return adapt

    def _fold(params: P.Params, delta: Any, inverse: bool, info: ModelInfo | None) -> P.Params:
        flat = P.flatten(params)
        layers = resolve_info(info).layers
        for key, scale in P.flatten(delta).items():
            if not key.endswith(f"/{LEAF}"):
                continue
            path = key[: -len(LEAF) - 1]
            if inverse and is_concrete(scale) and not np.all(np.asarray(scale) != 0):
                raise ValueError(
                    f"ia3 unmerge: {path}/{LEAF} has entries exactly 0; the weights they scaled "
                    "were zeroed by merge and cannot be recovered. Keep the base weights instead."
                )
            key = L.kernel_path(path, layers, flat)
            kernel = flat[key]
            spec = L.kernel_spec(path, kernel.shape, layers, "ia3 merge")
            group = _group(config, path)
            factor = L.broadcast_group(spec, scale, group)
            flat[key] = (kernel / factor if inverse else kernel * factor).astype(kernel.dtype)
            bias_key = f"{path}/{spec.bias}"
            bias = flat.get(bias_key) if spec.bias else None
            if group == "out" and bias is not None:
                if jnp.shape(bias) != jnp.shape(scale):
                    raise ValueError(f"ia3 merge: the bias of '{path}' has shape {jnp.shape(bias)}, "
                                     f"not the output group's {jnp.shape(scale)}; it cannot be scaled")
                flat[bias_key] = (bias / scale if inverse else bias * scale).astype(bias.dtype)
        return P.unflatten(flat)

    return Transform(
        name=name,
        config=config,
        init=init,
        layer_hook=layer_hook,
        delta_layout=lambda path, leaf: ("stack", _group(config, path)),
        merge=lambda params, delta, info=None: _fold(params, delta, False, info),
        unmerge=lambda params, delta, info=None: _fold(params, delta, True, info),
        labels=lambda delta: jax.tree_util.tree_map(lambda _: "no_decay", delta),
    )


register("ia3", IA3Config, ia3)
