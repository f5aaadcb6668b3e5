"""LoRA: low-rank adaptation of linear layers (Hu et al., 2021, arXiv:2106.09685).

For a target ``Dense`` with kernel ``W (d_in, d_out)`` the adapted layer computes

    h = x W + b + s · (dropout(x) A) B,      A (d_in, r),  B (r, d_out),  s = α / r

(``s = α / √r`` with ``use_rslora``, Kalajdzievski 2023). LoRA+ (Hayou et al., 2024,
arXiv:2402.12354) trains ``B`` at ``lr_ratio`` times ``A``'s learning rate (the paper's default
16): the ``B`` leaves are the optimizer group ``"<name>_B"`` with that multiplier. ``B = 0`` at init, so a fresh delta
leaves the model unchanged. Training uses the factored form and never builds ``W + s·AB``;
:func:`merge` folds it into the kernel for zero-overhead inference and :func:`unmerge` takes it
back out. The delta mirrors the parameter tree: ``{..., "query": {"lora_A": A, "lora_B": B}}``.

Every layer kind of :mod:`jpeft.core.layers` is adapted the same way: ``A (*in, r)`` spans the
kernel's input axis group and ``B (r, *out)`` its output group, ``ΔW = A·B`` in the kernel's
layout, and the update is the layer's own operation with ``A`` as kernel followed by ``B``
(``DenseGeneral`` contracts the same input axes; ``Einsum`` keeps its equation; a ``Conv``'s
``A`` is a conv with the layer's window, strides and padding and ``B`` a 1×1 conv, as in HF
PEFT). Layers stacked by ``nn.scan`` / ``nnx.scan`` get factors ``(*stack, *in, r)``: one pair
per layer. ``layers=`` keeps the other layers of a stack at ``A = B = 0``, a fixed point of
training (both gradients are zero), so they stay unadapted.

``use_dora=True`` is DoRA (Liu et al., 2024, arXiv:2402.09353): a trained magnitude per output
column rescales the direction ``W + s·AB`` (the leaf ``lora_magnitude``, :mod:`jpeft.methods.dora`).

Example::

    method = jpeft.lora(LoraConfig(r=8, alpha=16, targets=r"(query|value)$"))
    delta = method.init(jax.random.key(0), base, model.info())
"""

from __future__ import annotations

import dataclasses
import math
import numbers
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
from jpeft.core import paths as P
from jpeft.core.capabilities import OptimizerGroups
from jpeft.core.dropout import dropout
from jpeft.core.model import group_by_module
from jpeft.core.paths import layer_index
from jpeft.core.registry import register
from jpeft.core.transform import ApplyContext, ModelInfo, Transform, resolve_info
from jpeft.methods import dora
from jpeft.quant import dequantize_leaf


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    r: int = dataclasses.field(default=8, metadata={"help": "rank of the update"})
    alpha: float = dataclasses.field(default=8.0, metadata={"help": "scaling numerator: s = alpha / r"})
    dropout: float = dataclasses.field(default=0.0, metadata={"help": "dropout on the LoRA input"})
    targets: str = dataclasses.field(
        default=r"(query|value)$",
        metadata={"help": "regex searched in Dense module paths (e.g. 'attention/self/(query|value)$')"},
    )
    layers: tuple[int, ...] = dataclasses.field(
        default=(), metadata={"help": "only these layer indices (empty: all layers)"}
    )
    use_rslora: bool = dataclasses.field(default=False, metadata={"help": "s = alpha / sqrt(r)"})
    init: str = dataclasses.field(
        default="kaiming", metadata={"help": "A init: 'kaiming' (HF PEFT default) or 'gaussian' (std 1/r)"}
    )
    rank_pattern: dict[str, int] = dataclasses.field(
        default_factory=dict, metadata={"help": "per-target rank: {regex: r}"}
    )
    alpha_pattern: dict[str, float] = dataclasses.field(
        default_factory=dict, metadata={"help": "per-target alpha: {regex: alpha}"}
    )
    bias: str = dataclasses.field(
        default="none", metadata={"help": "train biases too: 'none', 'all' or 'lora_only'"}
    )
    lr_ratio: float = dataclasses.field(
        default=1.0, metadata={"help": "LoRA+ (Hayou et al., 2024): B's learning rate is lr_ratio "
                                       "times A's (the paper's default: 16; 1: plain LoRA)"}
    )
    use_dora: bool = dataclasses.field(
        default=False, metadata={"help": "DoRA (Liu et al., 2024): a trained magnitude per output "
                                         "column times the direction W + s·AB (jpeft.methods.dora)"}
    )

    def __post_init__(self) -> None:
        check_rank_fields("lora", self)
        if self.init not in ("kaiming", "gaussian"):
            raise ValueError(f"lora.init must be 'kaiming' or 'gaussian', got {self.init!r}")
        check_bias("lora", self.bias)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not (isinstance(self.lr_ratio, (int, float)) and math.isfinite(self.lr_ratio)
                and self.lr_ratio > 0):
            raise ValueError(f"lora.lr_ratio must be a finite number > 0 (16 in the LoRA+ paper), "
                             f"got {self.lr_ratio!r}")


def check_rank_fields(method: str, config: Any) -> None:
    """Validate the fields a low-rank method's config shares with LoRA's: ``r``, ``alpha``,
    ``targets``, ``rank_pattern``, ``alpha_pattern`` and ``layers`` (``method``: the config's
    prefix in messages)."""
    if not _is_rank(config.r):
        raise ValueError(f"{method}.r must be an integer >= 1, got {config.r!r}")
    if not _is_scale(config.alpha):
        raise ValueError(f"{method}.alpha must be a finite number > 0 (the update is scaled by "
                         f"alpha / r), got {config.alpha!r}")
    for field in ("targets", "rank_pattern", "alpha_pattern"):
        patterns = getattr(config, field)
        for pattern in ([patterns] if isinstance(patterns, str) else patterns):
            try:
                re.compile(pattern)
            except (re.error, TypeError) as err:
                raise ValueError(f"{method}.{field}: {pattern!r} is not a valid regex ({err})") from None
    bad = {k: v for k, v in config.rank_pattern.items() if not _is_rank(v)}
    if bad:
        raise ValueError(f"{method}.rank_pattern ranks must be integers >= 1, got {bad}")
    bad = {k: v for k, v in config.alpha_pattern.items() if not _is_scale(v)}
    if bad:
        raise ValueError(f"{method}.alpha_pattern alphas must be finite numbers > 0, got {bad}")
    P.check_layer_indices(method, config.layers)


def _is_rank(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def _is_scale(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) \
        and value > 0


def _pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
    for pattern, value in patterns.items():
        if re.search(pattern, path):
            return value
    return default


def check_bias(method: str, bias: str) -> None:
    """PEFT's ``bias`` choices: ``'none'``, ``'all'`` (every bias outside the head) or
    ``'<method>_only'`` (the adapted layers' biases)."""
    if bias not in ("none", "all", f"{method}_only"):
        raise ValueError(f"{method}.bias must be 'none', 'all' or '{method}_only', got {bias!r}")


def trained_biases(method: str, config: Any, base: P.Params) -> list[str]:
    """The base bias paths a config with PEFT's ``bias`` field (and ``targets``/``layers``) trains."""
    if config.bias == "none":
        return []
    biases = [p for p in P.paths(base) if p.endswith("/bias") and not p.startswith("head/")]
    if config.bias == f"{method}_only":
        modules = set(target_modules(config, base))
        biases = [p for p in biases if p[: -len("/bias")] in modules]
    return biases


def target_modules(config: LoraConfig, base: P.Params,
                   layers: Mapping[str, L.LayerSpec] | None = None) -> list[str]:
    """Module paths of the layers this config adapts, with ``layers=`` applied to the layer
    number in each path (layers stacked in one kernel are selected in :func:`target_specs`);
    ``layers``: the model's description (registered layer types hold kernels of other names)."""
    modules = L.select_layers(base, config.targets, layers or {}, "lora.targets")
    if config.layers:
        modules = [m for m in modules if layer_index(m) in set(config.layers)]
        if not modules:
            raise P.no_match_error(
                f"lora.layers={list(config.layers)}", config.targets,
                L.select_layers(base, config.targets, layers or {}, "lora.targets"),
            )
    return modules


def rank_and_scale(config: Any, path: str) -> tuple[int, float]:
    """``(r, s)`` of the layer at ``path``: ``rank_pattern``/``alpha_pattern`` applied, ``s =
    α / r`` (``α / √r`` with a config's ``use_rslora``); for LoRA and the methods sharing its
    rank fields."""
    r = int(_pattern_value(config.rank_pattern, path, config.r))
    alpha = float(_pattern_value(config.alpha_pattern, path, config.alpha))
    return r, alpha / (math.sqrt(r) if getattr(config, "use_rslora", False) else r)


def target_specs(config: Any, base: P.Params, info: ModelInfo, method: str = "lora"
                 ) -> dict[str, L.LayerSpec]:
    """``{module path: LayerSpec}`` of the layers a config's ``targets`` and ``layers`` select
    (LoRA's, or another method's with these fields, named ``method`` in errors). With
    ``layers=``, a layer numbered in its path is kept when its number is listed; a stacked
    kernel is kept whole (its unlisted layers get zero factors, :func:`_stack_mask`)."""
    flat = P.flatten(base)
    specs = {}
    where = f"{method}.targets"
    for path in L.select_layers(base, config.targets, info.layers, where):
        stored = jnp.shape(flat[L.kernel_path(path, info.layers, flat)])
        spec = L.kernel_spec(path, stored, info.layers, where)
        index = layer_index(path)
        if not config.layers or index in set(config.layers) or (index is None and spec.stack):
            specs[path] = spec
    if not specs:
        raise P.no_match_error(f"{method}.layers={list(config.layers)}", config.targets,
                               L.select_layers(base, config.targets, info.layers, where))
    return specs


def config_for_peft_targets(cfg: Mapping[str, Any], modules: list[str], make: Any, params: P.Params,
                            method: str, accept: Any = lambda config: True) -> Any:
    """The first config ``make(targets=..., layers=...)`` (PEFT's own target list, else every
    module by path: :func:`~jpeft.checkpoint.peft_convert.target_candidates`) that selects exactly
    ``modules`` of ``params`` and that ``accept`` takes (a loaded PEFT adapter's config)."""
    for cand in PC.target_candidates(cfg, modules):
        try:
            config = make(**cand)
            chosen = sorted(target_specs(config, params, ModelInfo(), method))
        except (ValueError, P.NoMatchError):
            continue
        if chosen == modules and accept(config):
            return config
    raise AssertionError(f"unreachable: the explicit {method} config reproduces the PEFT targets")


def peft_rank_patterns(config: Any, modules: list[str], names: list[str]) -> dict[str, Any]:
    """PEFT's ``rank_pattern`` and ``alpha_pattern`` fields (torch names) for a config with LoRA's
    rank fields adapting ``modules`` (torch ``names``)."""
    ranks = {n: rank_and_scale(config, p)[0] for p, n in zip(modules, names)}
    alphas = {n: float(_pattern_value(config.alpha_pattern, p, config.alpha)) for p, n in zip(modules, names)}
    return {"rank_pattern": PC.pattern_groups(ranks, config.r, PC.torch_names_regex),
            "alpha_pattern": PC.pattern_groups(alphas, config.alpha, PC.torch_names_regex)}


def _stack_mask(config: Any, spec: L.LayerSpec) -> jax.Array | None:
    """``(stack[0], 1, ..., 1)``: 1 for the stacked layers ``layers=`` selects (``None``: all)."""
    if not spec.stack or not config.layers:
        return None
    wanted = jnp.isin(jnp.arange(spec.stack[0]), jnp.asarray(config.layers)).astype(jnp.float32)
    return wanted.reshape((spec.stack[0],) + (1,) * (len(spec.stack) + len(spec.in_shape)))


def _factors(name: str, path: str, spec: L.LayerSpec, leaves: Mapping[str, Any], r: int
             ) -> tuple[jax.Array, jax.Array]:
    """A layer's ``(lora_A, lora_B)``, refused (at trace time) unless they fit its kernel
    (``spec``, with its stack axes) and the config's rank ``r``."""
    if "lora_A" not in leaves or "lora_B" not in leaves:
        raise KeyError(f"{name}: the delta holds {sorted(leaves)} for '{path}', not LoRA's lora_A and "
                       "lora_B; was it made by another method? Apply a delta with the transform that "
                       "made it")
    a, b = leaves["lora_A"], leaves["lora_B"]
    want = ((*spec.stack, *spec.in_shape, r), (*spec.stack, r, *spec.out_shape))
    if (jnp.shape(a), jnp.shape(b)) != want:
        raise ValueError(
            f"{name}: the delta's lora_A {jnp.shape(a)} / lora_B {jnp.shape(b)} for '{path}' do not fit "
            f"its kernel {(*spec.stack, *spec.kernel_shape)} and r={r}; expected {want[0]} / {want[1]}. "
            "Was the delta made for another model or another LoRA config? Init it with this "
            "transform on this model's parameters")
    for leaf, value in (("lora_A", a), ("lora_B", b)):
        if not jnp.issubdtype(jnp.result_type(value), jnp.floating):
            raise TypeError(f"{name}: the delta's {leaf} for '{path}' is {jnp.result_type(value)}; "
                            "LoRA factors must be floating-point arrays")
    return a, b


# LoRA+ trains B, and DoRA's magnitude (a 1-D parameter, as PEFT's create_loraplus_optimizer
# groups it), at lr_ratio times A's learning rate.
_GROUP_B = ("lora_B", dora.MAGNITUDE)


def _layout(path: str, leaf: str) -> tuple[str, ...]:
    """A delta leaf's axes as groups of its kernel (for sharding)."""
    return {"lora_A": ("stack", "in", "rank"), dora.MAGNITUDE: ("stack", "out")}.get(
        leaf, ("stack", "rank", "out"))


def lora(config: LoraConfig = LoraConfig(), *, name: str = "lora") -> Transform:
    """LoRA as a :class:`~jpeft.core.transform.Transform` (see the module docstring)."""

    def init(rng: jax.Array, base: P.Params, info: ModelInfo | None = None) -> dict[str, Any]:
        specs = target_specs(config, base, resolve_info(info))
        flat: dict[str, jax.Array] = {}
        for key, (path, spec) in zip(jax.random.split(rng, len(specs)), specs.items()):
            r, _ = rank_and_scale(config, path)
            shape = (*spec.stack, *spec.in_shape, r)
            if config.init == "kaiming":
                # kaiming_uniform(a=sqrt(5)) on torch's (r, d_in) weight: bound = 1 / sqrt(d_in)
                bound = 1.0 / math.sqrt(spec.fan_in)
                a = jax.random.uniform(key, shape, jnp.float32, -bound, bound)
            else:
                a = jax.random.normal(key, shape, jnp.float32) / r
            mask = _stack_mask(config, spec)
            if mask is not None:
                a = a * mask
            flat[f"{path}/lora_A"] = a
            flat[f"{path}/lora_B"] = jnp.zeros((*spec.stack, r, *spec.out_shape), jnp.float32)
            if config.use_dora:
                dora.check_layer(spec, path)
                kernel = dequantize_leaf(P.flatten(base)[f"{path}/{spec.kernel}"])
                flat[f"{path}/{dora.MAGNITUDE}"] = dora.magnitude_init(
                    spec, kernel, a, flat[f"{path}/lora_B"], rank_and_scale(config, path)[1])
        return P.unflatten(flat)

    def layer_hook(ctx: ApplyContext):
        def adapt(call, x, layer, leaves):
            r, scale = rank_and_scale(config, layer.path)
            a, b = _factors(name, layer.path, layer.spec, leaves, r)
            if config.use_dora:
                return _dora_adapt(call, x, layer, leaves, scale)
            y = call(x)
            if ctx.train and config.dropout > 0.0 and ctx.rng is not None:
                x = dropout(layer.key(ctx, name), x, config.dropout)
            update = L.expand(layer.spec, L.contract(layer.spec, x, a.astype(x.dtype)), b.astype(x.dtype))
            return y + (scale * update).astype(y.dtype)

        def _dora_adapt(call, x, layer, leaves, scale):
            dropped = (dropout(layer.key(ctx, name), x, config.dropout)
                       if ctx.train and config.dropout > 0.0 and ctx.rng is not None else None)
            keep = (jnp.isin(layer.index, jnp.asarray(config.layers))
                    if config.layers and layer.index is not None else None)
            return dora.adapt(call, x, layer, leaves, scale, dropped, keep)

        return adapt

    def trainable_base(base: P.Params) -> list[str]:
        return trained_biases("lora", config, base)

    def _fold(params: P.Params, delta: Any, sign: float, info: ModelInfo | None) -> P.Params:
        flat = P.flatten(params)
        layers = resolve_info(info).layers
        for path, leaves in group_by_module(delta).items():
            r, scale = rank_and_scale(config, path)
            key = L.kernel_path(path, layers, flat)
            kernel = flat[key]
            spec = L.kernel_spec(path, kernel.shape, layers, "lora merge")
            _factors(name, path, spec, leaves, r)
            if config.use_dora:
                if sign < 0:
                    raise dora.unmerge_error()
                flat[key] = dora.merge_kernel(
                    spec, kernel, leaves["lora_A"], leaves["lora_B"], leaves[dora.MAGNITUDE], scale,
                    _stack_mask(config, spec))
                continue
            update = L.low_rank_kernel(spec, leaves["lora_A"], leaves["lora_B"])
            flat[key] = (kernel + sign * scale * update).astype(kernel.dtype)
        return P.unflatten(flat)

    plus = config.lr_ratio != 1.0
    group_b = f"{name}_B"

    def labels(delta: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda path, _: group_b if plus and getattr(path[-1], "key", None) in _GROUP_B else "default",
            delta)

    return Transform(
        name=name,
        config=config,
        init=init,
        labels=labels,
        capabilities=(OptimizerGroups({group_b: float(config.lr_ratio)}),) if plus else (),
        layer_hook=layer_hook,
        delta_layout=_layout,
        trainable_base=trainable_base,
        merge=lambda params, delta, info=None: _fold(params, delta, 1.0, info),
        unmerge=lambda params, delta, info=None: _fold(params, delta, -1.0, info),
    )


# -- Hugging Face PEFT format ------------------------------------------------------------------
# PEFT keys per target: ``<module>.lora_A.weight (r, d_in)``, ``.lora_B.weight (d_out, r)`` and,
# with DoRA, ``.lora_magnitude_vector (d_out,)``; trained biases as ``<module>[.base_layer].bias``.

def _from_peft(cfg: dict[str, Any], tensors: dict[str, np.ndarray], ctx: PC.PeftContext
               ) -> tuple[Transform, Any] | tuple[Transform, Any, P.Params]:
    """A PEFT ``LORA`` adapter as ``(lora(config), delta)``; the config selects exactly PEFT's
    targets with PEFT's per-module rank and alpha. A PiSSA or OLoRA adapter saved without
    conversion also returns the residual base that PEFT makes when it loads one
    (:mod:`jpeft.methods.lora_init`)."""
    if cfg.get("lora_bias"):  # (fan_in_fan_out only says how PEFT merges into Conv1D weights)
        raise F._refuse("lora_bias", cfg["lora_bias"])
    init = cfg.get("init_lora_weights", True)
    rewrites = isinstance(init, str) and init in F._REWRITING_LORA_INITS
    if not rewrites and not any(init is ok or (isinstance(init, str) and init == ok)
                                for ok in F._SAFE_LORA_INITS):
        raise F._refuse("init_lora_weights", init,
                        "this init rewrites the base weights in a way jpeft does not recompute exactly "
                        "(it recomputes 'pissa' and 'olora'); re-save it with save_pretrained(..., "
                        "path_initial_model_for_weight_conversion=...) to get a plain LoRA adapter")
    F._check_fields(cfg, F._LORA_HANDLED, F._LORA_IGNORED)
    bias = cfg.get("bias", "none")
    if bias not in ("none", "all", "lora_only"):
        raise F._refuse("bias", bias)
    r0, alpha0 = int(cfg["r"]), float(cfg.get("lora_alpha", 8))
    use_rslora, use_dora = bool(cfg.get("use_rslora", False)), bool(cfg.get("use_dora", False))
    label, mods = ctx.label, ctx.mods
    assert mods is not None
    modules = T._resolve_targets(cfg, mods, "LoRA")
    flat_base = P.flatten(ctx.params)
    flat: dict[str, Any] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for path in modules:
        name = mods.name(path)
        key = PC.MODULE_KEY + name
        r = int(T._peft_pattern_value(cfg.get("rank_pattern") or {}, name, r0))
        alphas[path] = float(T._peft_pattern_value(cfg.get("alpha_pattern") or {}, name, alpha0))
        a = PC.take(tensors, f"{key}.lora_A.weight", label, "LoRA A")
        b = PC.take(tensors, f"{key}.lora_B.weight", label, "LoRA B")
        d_in, d_out = np.shape(flat_base[f"{path}/kernel"])
        if a.shape != (r, d_in) or b.shape != (d_out, r):
            raise ValueError(
                f"{label}: {name}: lora_A {a.shape} / lora_B {b.shape} do not fit r={r} and the base "
                f"kernel (d_in={d_in}, d_out={d_out}); expected ({r}, {d_in}) / ({d_out}, {r}). Is the "
                "base the architecture the adapter was trained on?")
        flat[f"{path}/lora_A"], flat[f"{path}/lora_B"] = jnp.asarray(a.T), jnp.asarray(b.T)
        if use_dora:
            m = PC.take(tensors, f"{key}.lora_magnitude_vector", label, "DoRA magnitude")
            if m.shape != (d_out,):
                raise ValueError(f"{label}: {name}.lora_magnitude_vector has shape {m.shape}, expected "
                                 f"({d_out},) (one magnitude per output column); is the base the right "
                                 "architecture?")
            flat[f"{path}/{dora.MAGNITUDE}"] = jnp.asarray(m)
        ranks[path] = r
    PC.refuse_leftover(tensors, (".lora_A.", ".lora_B.", ".lora_embedding_", ".lora_magnitude_vector"), label)
    common = {"r": r0, "alpha": alpha0, "dropout": float(cfg.get("lora_dropout") or 0.0),
              "use_rslora": use_rslora, "bias": bias, "use_dora": use_dora,
              "init": "gaussian" if init == "gaussian" else "kaiming",
              "rank_pattern": PC.pattern_groups(ranks, r0, T._exact_regex),
              "alpha_pattern": PC.pattern_groups(alphas, alpha0, T._exact_regex)}
    config = config_for_peft_targets(
        cfg, modules, lambda **cand: LoraConfig(**common, **cand), ctx.params, "lora",
        lambda c: all(rank_and_scale(c, p) == (r, alphas[p] / (math.sqrt(r) if use_rslora else r))
                      for p, r in ranks.items()))
    if rewrites:  # as PEFT loads it: the init reruns on the original base, then the factors
        from jpeft.methods import lora_init
        residual, _ = getattr(lora_init, init)(config, ctx.params, ctx.model.info() if ctx.model else None)
        return lora(config), P.unflatten(flat), residual
    return lora(config), P.unflatten(flat)


def _to_peft(transform: Transform, delta: Any, ctx: PC.PeftContext) -> tuple[dict[str, Any], dict[str, np.ndarray], P.Params]:
    """A LoRA delta (without its head part) as PEFT's config fields and tensors."""
    config, mods, body = transform.config, ctx.mods, P.flatten(delta)
    assert mods is not None
    modules = sorted(k[: -len("/lora_A")] for k in body if k.endswith("/lora_A"))
    if not modules:
        raise ValueError("save_peft_adapter: the LoRA delta adapts no module of the model")
    names = [mods.name(m) for m in modules]
    selection = T._peft_targets_for(names, list(mods.by_name), list(mods.head))
    tensors: dict[str, np.ndarray] = {}
    for path, name in zip(modules, names):
        a, b = PC.to_numpy(body[f"{path}/lora_A"]), PC.to_numpy(body[f"{path}/lora_B"])
        r, _ = rank_and_scale(config, path)
        if a.shape[1] != r or b.shape[0] != r:
            raise ValueError(f"save_peft_adapter: {path} has rank {a.shape[1]} but the config gives r={r}")
        tensors[f"{PC.MODULE_KEY}{name}.lora_A.weight"] = a.T
        tensors[f"{PC.MODULE_KEY}{name}.lora_B.weight"] = b.T
        if config.use_dora:
            tensors[f"{PC.MODULE_KEY}{name}.lora_magnitude_vector"] = PC.to_numpy(body[f"{path}/{dora.MAGNITUDE}"])
    tensors.update(PC.bias_tensors(ctx, modules))  # trained biases (bias="all" / "lora_only")
    fields = {
        "peft_type": "LORA", "r": int(config.r), "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "use_rslora": bool(config.use_rslora), "bias": config.bias,
        "fan_in_fan_out": any(mods.is_conv1d(m) for m in modules),
        "init_lora_weights": "gaussian" if config.init == "gaussian" else True,
        "use_dora": bool(config.use_dora),
        **peft_rank_patterns(config, modules, names), "layers_pattern": None, **selection,
    }
    return fields, tensors, ctx.params


register("lora", LoraConfig, lora,
         peft=PC.PeftConverter(peft_type="LORA", layout="modules", load=_from_peft, save=_to_peft,
                               token_companion=True))
