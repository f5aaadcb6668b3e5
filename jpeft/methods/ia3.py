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

from jpeft.checkpoint import peft_convert as PC
from jpeft.checkpoint import peft_fields as F
from jpeft.checkpoint import peft_targets as T
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
        P.check_layer_indices("ia3", self.layers)


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


def _vector(name: str, config: IA3Config, path: str, spec: L.LayerSpec, leaves: Mapping[str, Any]) -> jax.Array:
    """A layer's (IA)³ vector, refused (at trace time) unless it has the shape of the group it
    scales (``spec``, with its stack axes) and a floating-point dtype."""
    if LEAF not in leaves:
        raise KeyError(f"{name}: the delta holds {sorted(leaves)} for '{path}', not (IA)³'s {LEAF}; was it "
                       "made by another method? Apply a delta with the transform that made it")
    scale, group = leaves[LEAF], _group(config, path)
    want = (*spec.stack, *spec.group_shape(group))
    if jnp.shape(scale) != want:
        raise ValueError(
            f"{name}: the delta's {LEAF} for '{path}' has shape {jnp.shape(scale)}, but it scales the "
            f"{'input features' if group == 'features' else 'outputs'} of the kernel "
            f"{(*spec.stack, *spec.kernel_shape)}: expected {want}. Was the delta made for another "
            "model or another (IA)³ config (feedforward)? Init it with this transform on this "
            "model's parameters")
    if not jnp.issubdtype(jnp.result_type(scale), jnp.floating):
        raise TypeError(f"{name}: the delta's {LEAF} for '{path}' is {jnp.result_type(scale)}; (IA)³ "
                        "vectors must be floating-point arrays")
    return scale


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
            scale = _vector(name, config, layer.path, layer.spec, leaves)
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
            _vector(name, config, path, spec, {LEAF: scale})
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


# -- Hugging Face PEFT format ------------------------------------------------------------------
# PEFT key per target: ``<module>.ia3_l``, ``(d_out, 1)`` or ``(1, d_in)`` for a feed-forward one.

def _from_peft(cfg: dict[str, Any], tensors: dict[str, np.ndarray], ctx: PC.PeftContext) -> tuple[Transform, Any]:
    """A PEFT ``IA3`` adapter as ``(ia3(config), delta)`` with exactly PEFT's (feed-forward) targets."""
    F._check_fields(cfg, F._IA3_HANDLED)
    label, mods = ctx.label, ctx.mods
    assert mods is not None
    modules = T._resolve_targets(cfg, mods, "(IA)³")
    ff_cfg = cfg.get("feedforward_modules")
    ff_list = T._as_list(ff_cfg) or []

    def is_ff(name: str) -> bool:
        if isinstance(ff_cfg, str):
            return re.fullmatch(ff_cfg, name) is not None
        return any(name.endswith(t) for t in ff_list)

    flat_base = P.flatten(ctx.params)
    flags: dict[str, bool] = {}
    flat: dict[str, Any] = {}
    for path in modules:
        name = mods.name(path)
        ff = is_ff(name)
        value = PC.take(tensors, f"{PC.MODULE_KEY}{name}.{LEAF}", label, "(IA)³ vector")
        d_in, d_out = np.shape(flat_base[f"{path}/kernel"])
        want = (1, d_in) if ff else (d_out, 1)
        if value.shape != want:
            raise ValueError(f"{label}: {name}.ia3_l has shape {value.shape}, expected {want} "
                             f"({'feed-forward: input' if ff else 'output'} scaling of a "
                             f"({d_in}, {d_out}) kernel); is the base the right architecture?")
        flat[f"{path}/{LEAF}"] = jnp.asarray(value.reshape(-1))
        flags[path] = ff
    PC.refuse_leftover(tensors, (f".{LEAF}",), label)
    ff_paths = [p for p, f in flags.items() if f]
    candidates = []  # PEFT's own list of suffixes first (readable), else every module by name
    targets = cfg.get("target_modules")
    if isinstance(targets, (list, tuple)) and not cfg.get("exclude_modules") and not isinstance(ff_cfg, str):
        ff_regex = ("(?:" + "|".join(T._name_to_path_regex(t) for t in sorted(ff_list)) + ")$") if ff_list else ""
        candidates.append(IA3Config(targets=PC.list_targets_regex(targets), feedforward=ff_regex))
    candidates.append(IA3Config(targets=T._exact_regex(modules),
                                feedforward=T._exact_regex(ff_paths) if ff_paths else ""))
    for config in candidates:
        try:
            chosen = target_modules(config, ctx.params)
        except (ValueError, P.NoMatchError):
            continue
        if chosen == flags:
            return ia3(config), P.unflatten(flat)
    raise AssertionError("unreachable: the explicit (IA)³ config reproduces the PEFT targets")


def _to_peft(transform: Transform, delta: Any, ctx: PC.PeftContext) -> tuple[dict[str, Any], dict[str, np.ndarray], P.Params]:
    """An (IA)³ delta (without its head part) as PEFT's config fields and tensors; PEFT's
    ``feedforward_modules`` must be entries of ``target_modules``, so both are suffix lists."""
    mods, body = ctx.mods, P.flatten(delta)
    assert mods is not None
    modules = sorted(k[: -len(f"/{LEAF}")] for k in body if k.endswith(f"/{LEAF}"))
    if not modules:
        raise ValueError("save_peft_adapter: the (IA)³ delta scales no module of the model")
    names = {m: mods.name(m) for m in modules}
    ff = {names[m] for m in modules if is_feedforward(transform.config, m)}
    universe = list(mods.by_name)
    want = set(names.values())
    chosen = None
    for suffixes in T._suffix_candidates(list(want)):
        selection = {"target_modules": suffixes, "modules_to_save": list(mods.head)}
        if {n for n in universe if T.peft_target_matches(selection, n)} != want:
            continue
        ff_entries = sorted({s for s in suffixes if any(n.endswith(s) for n in ff)})
        if {n for n in want if any(n.endswith(s) for s in ff_entries)} == ff:
            chosen = (suffixes, ff_entries)
            break
    if chosen is None:
        raise ValueError("save_peft_adapter: PEFT's target rules cannot select exactly these (IA)³ "
                         "targets and feed-forward targets")
    tensors = {}
    for m in modules:
        v = PC.to_numpy(body[f"{m}/{LEAF}"])
        tensors[f"{PC.MODULE_KEY}{names[m]}.{LEAF}"] = v.reshape((1, -1) if names[m] in ff else (-1, 1))
    fields = {"peft_type": "IA3", "target_modules": chosen[0], "feedforward_modules": chosen[1],
              "fan_in_fan_out": any(mods.is_conv1d(m) for m in modules), "init_ia3_weights": True}
    return fields, tensors, ctx.params


register("ia3", IA3Config, ia3,
         peft=PC.PeftConverter(peft_type="IA3", layout="modules", load=_from_peft, save=_to_peft))
