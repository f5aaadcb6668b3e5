"""Any Flax model, Linen or NNX, as a pure function of a frozen parameter tree.

A weight-space method (LoRA, (IA)³) declares a *layer hook*: for every adapted layer it gets
the layer's own call, the input, a :class:`Layer` (its path, :class:`~jpeft.core.layers.LayerSpec`
and its index in a stack) and its delta leaves for that layer, and returns the layer's output::

    hook(call, x, layer, leaves) -> y          # e.g. call(x) + s · B(A(x))

How the hooks reach the layers, without touching the model's code or mutating anything the
user holds:

* **Linen**: each adapted module's delta leaves are put into the parameter tree next to its
  kernel (under ``"jpeft"``), and one ``nn.intercept_methods`` interceptor wraps the
  ``__call__`` of ``nn.Dense`` / ``DenseGeneral`` / ``Einsum`` / ``Conv`` modules (and classes
  registered with :func:`jpeft.register_layer`) that hold
  some. Because the leaves live in the module's own parameters, ``nn.scan`` slices a stacked
  delta with its stacked kernel: layer ``i`` of the stack sees its own factors.
* **NNX**: the model is split once (``nnx.split``) into a graph definition, the ``Param`` state
  (the frozen base, given to the user as a plain nested dict) and the rest. Inside the traced
  call the module is rebuilt (``nnx.merge``), the delta leaves are attached to the adapted
  layers as ``Param`` variables (so ``nnx.scan`` slices them too), and the ``__call__`` of
  ``nnx.Linear`` / ``LinearGeneral`` / ``Einsum`` / ``Conv`` (and of the registered classes)
  runs the hooks of the layers that
  carry leaves. The rebuilt module is local to the call; the user's module is never changed.

Interception happens only while tracing, so a jitted step pays nothing for it.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jpeft.core import layers as L
from jpeft.core import paths as P
from jpeft import quant as Q

INJECTED = "jpeft"  # key of the delta leaves in a Linen module's params; NNX attribute prefix
LAYER_INDEX = "layer_index"

LayerHook = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class Layer:
    """What a layer hook sees of the layer it adapts.

    Attributes:
      path: the module path (``"encoder/layer_0/attention/self/query"``; inside ``nn.scan``
        the path of the stacked module).
      spec: the layer's :class:`~jpeft.core.layers.LayerSpec` (one layer: no stack axes).
      index: the layer's position in a stack (a traced scalar), ``None`` outside a stack.
      kernel / bias: the layer's own weights as it runs (one layer's slice inside a stack;
        ``bias`` is ``None`` without one), for hooks whose update depends on them (DoRA's
        column norm of ``W + s·AB``).
    """

    path: str
    spec: L.LayerSpec
    index: jax.Array | None = None
    kernel: jax.Array | None = None
    bias: jax.Array | None = None

    def key(self, ctx: Any, *names: str) -> jax.Array | None:
        """A PRNG key for this layer: ``ctx.key(*names, path)``, folded with the stack index."""
        key = ctx.key(*names, self.path)
        if key is not None and self.index is not None:
            key = jax.random.fold_in(key, self.index)
        return key


@dataclasses.dataclass(frozen=True)
class HookPart:
    """One transform's hook and its delta leaves grouped by module path."""

    name: str
    hook: LayerHook
    modules: Mapping[str, Mapping[str, jax.Array]]


def group_by_module(delta: Any) -> dict[str, dict[str, jax.Array]]:
    """``{"a/b/lora_A": x, "a/b/lora_B": y}`` (nested) -> ``{"a/b": {"lora_A": x, "lora_B": y}}``."""
    out: dict[str, dict[str, jax.Array]] = {}
    for key, leaf in P.flatten(delta).items():
        module, _, leaf_name = key.rpartition("/")
        out.setdefault(module, {})[leaf_name] = leaf
    return out


def _run_hooks(parts: Sequence[HookPart], leaves_of: Callable[[str], Mapping | None],
               call: Callable[[jax.Array], jax.Array], x: jax.Array, layer: Layer) -> jax.Array:
    """Chain the parts' hooks around ``call`` (a later part wraps an earlier one)."""
    for part in parts:
        leaves = leaves_of(part.name)
        if leaves:
            call = (lambda inner, hook, lv: lambda v: hook(inner, v, layer, lv))(call, part.hook, leaves)
    return call(x)


def _mode_kwargs(fn: Callable[..., Any], train: bool, given: Mapping[str, Any]) -> dict[str, Any]:
    """``deterministic=not train`` (or ``train=train``) when ``fn`` takes it and it is not given."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    if "deterministic" in params and "deterministic" not in given:
        return {"deterministic": not train}
    if "train" in params and "train" not in given:
        return {"train": train}
    return {}


# ----------------------------------------------------------------------------------------------
# Linen

def _linen_layer_interceptor(parts: Sequence[HookPart], targets: set[str], seen: set[str]):
    def intercept(next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        path = "/".join(str(p) for p in context.module.path)
        if path not in targets:
            return next_fun(*args, **kwargs)
        module = context.module
        kernel = module.get_variable("params", L.kernel_attr(module))
        spec = L.spec_of(module, kernel.shape, path)  # raises for an unsupported layer type
        seen.add(path)
        injected = module.get_variable("params", INJECTED)
        index = injected.get(LAYER_INDEX)
        layer = Layer(path, spec, index if index is not None and index.ndim == 0 else None,
                      Q.dequantize_leaf(kernel), module.get_variable("params", spec.bias) if spec.bias else None)
        call = lambda x: next_fun(x, *args[1:], **kwargs)
        return _run_hooks(parts, injected.get, call, args[0], layer)

    return intercept


def _inject(params: P.Params, parts: Sequence[HookPart]) -> dict[str, Any]:
    """``params`` with every part's leaves under ``<module>/jpeft/<part>/`` (and the stack index)."""
    flat = dict(P.flatten(params))
    for part in parts:
        for module, leaves in part.modules.items():
            kernel = flat.get(L.kernel_path(module, {}, flat))
            if kernel is None:
                raise KeyError(f"{part.name}: the delta adapts '{module}', which has no kernel in "
                               "the parameters; was the delta made for another model?")
            for leaf_name, leaf in leaves.items():
                flat[f"{module}/{INJECTED}/{part.name}/{leaf_name}"] = leaf
            if kernel.ndim > 0:
                flat[f"{module}/{INJECTED}/{LAYER_INDEX}"] = jnp.arange(kernel.shape[0])
    return P.unflatten(flat)


def run_linen(module: nn.Module, params: P.Params, parts: Sequence[HookPart],
              interceptors: Sequence[Any], args: Sequence[Any], kwargs: Mapping[str, Any],
              ctx: Any, method: Any) -> Any:
    """``module.apply`` with the hooks and interceptors installed (see the module docstring)."""
    from jpeft.core.transform import intercepting

    targets = {m for part in parts for m in part.modules}
    seen: set[str] = set()
    # a quantized base's Dense layers dequantize their kernels innermost, under every hook
    interceptors = [*Q.interceptors_for(params), *interceptors]
    if parts:
        params = _inject(params, parts)
        interceptors = [*interceptors, _linen_layer_interceptor(parts, targets, seen)]
    fn = method if callable(method) else getattr(module, method or "__call__")
    kwargs = {**_mode_kwargs(fn, ctx.train, kwargs), **kwargs}
    rngs = {"dropout": ctx.key("dropout")} if (ctx.train and ctx.rng is not None) else None
    with intercepting(interceptors):
        out = module.apply({"params": params}, *args, rngs=rngs, method=method, **kwargs)
    missing = sorted(targets - seen)
    if missing and method is None:
        raise L.UnsupportedLayerError(
            f"the adapted layers {missing[:5]} were never called as one of the layer types jpeft "
            f"adapts ({L.SUPPORTED}); their kernels may be used directly by the model's code "
            "(e.g. self.param + jnp.dot). Narrow the method's targets to such layers, or register "
            "the layer class: jpeft.register_layer(cls, kind='dense' or 'einsum', kernel=...).")
    return out


@dataclasses.dataclass(frozen=True)
class LinenModel:
    """A user's Linen module with its :class:`~jpeft.core.transform.ModelInfo` (see
    :func:`from_linen`). ``jpeft.apply``, the ``Trainer`` and the checkpoint code take it where
    they take jpeft's own models."""

    module: nn.Module
    model_info: Any

    def info(self) -> Any:
        return self.model_info


TapCall = tuple[str, Any, tuple[tuple[int, ...], ...]]  # (kind, layer, argument shapes)


def _tap_recorder(calls: list[TapCall]) -> Callable[..., Any]:
    from jpeft.models.taps import KINDS, is_tap

    def intercept(next_fun, a, kw, context):
        kind = next((k for k in KINDS if is_tap(context, k)), None)
        if kind is not None:
            calls.append((kind, context.module.layer, tuple(tuple(getattr(x, "shape", ())) for x in a)))
        return next_fun(*a, **kw)

    return intercept


def tap_facts(calls: Sequence[TapCall]) -> dict[str, Any]:
    """ModelInfo fields read off the taps a model called: ``taps`` (calls per kind),
    ``num_layers``, ``hidden_size`` and, from ``attn.kv``, ``num_kv_heads``/``head_dim``. A tap
    inside a scan body (a traced layer index) sets ``scanned``: the number of layers is then the
    stack's (:func:`_info`)."""
    facts: dict[str, Any] = {"taps": {}}
    for kind, layer, shapes in calls:
        facts["taps"][kind] = facts["taps"].get(kind, 0) + 1
        if isinstance(layer, jax.Array):
            facts["scanned"] = True
        elif layer is not None:
            facts["num_layers"] = max(facts.get("num_layers", 0), int(layer) + 1)
        if kind in ("attn.out", "ffn.out", "embed.inputs") and shapes:
            facts["hidden_size"] = shapes[0][-1]
        if kind == "attn.kv" and shapes and len(shapes[0]) == 4:
            facts["num_kv_heads"], facts["head_dim"] = shapes[0][2], shapes[0][3]
            facts.setdefault("num_heads", shapes[0][2])
        if kind == "ffn.hidden" and shapes:
            facts["intermediate_size"] = shapes[0][-1]
    return facts


def _info(family: str, layers: Mapping[str, L.LayerSpec], calls: Sequence[TapCall] | None,
          head_patterns: Sequence[str], given: Any) -> Any:
    """A ModelInfo: the fields ``given`` sets, then the ones read off the layers and taps."""
    from jpeft.core.transform import ModelInfo

    info = given if given is not None else ModelInfo(family=family)
    facts = tap_facts(calls) if calls is not None else {}
    if facts.pop("scanned", False) and "num_layers" not in facts:
        facts["num_layers"] = max((s.stack[0] for s in layers.values() if s.stack), default=0)
    fill = {k: v for k, v in facts.items() if k != "taps" and not getattr(info, k)}
    return dataclasses.replace(info, layers={**layers, **info.layers}, taps=facts.get("taps"),
                               head_patterns=tuple(head_patterns) or info.head_patterns, **fill)


def describe_linen(module: nn.Module, params: P.Params, *args: Any, _taps: list[TapCall] | None = None,
                   **kwargs: Any) -> dict[str, L.LayerSpec]:
    """``{module path: LayerSpec}`` of every module holding a ``kernel``, found by tracing the
    model once (shapes only) on example inputs (the tap calls go to ``_taps`` when given)."""
    flat = P.flatten(params)
    found: dict[str, L.LayerSpec] = {}

    def intercept(next_fun, a, kw, context):
        mod = context.module
        if context.method_name == "__call__" and mod.scope is not None:
            path = "/".join(str(p) for p in mod.path)
            name = L.kernel_attr(mod)
            stored = flat.get(f"{path}/{name}")
            kernel = mod.get_variable("params", name) if stored is not None else None
            if kernel is not None and path not in found:
                found[path] = _spec_or_unsupported(mod, kernel.shape, stored.shape, path)
            elif kernel is None and path not in found:
                own = {k[len(path) + 1:]: v for k, v in flat.items()
                       if k.startswith(f"{path}/") and "/" not in k[len(path) + 1:]} if path else {}
                custom = L.custom_kernel(mod, own)
                if custom is not None:
                    found[path] = L.unknown_layer_spec(mod, custom, own[custom].shape, path)
        return next_fun(*a, **kw)

    fn = getattr(module, "__call__")
    extra = _mode_kwargs(fn, False, kwargs)
    recorder = _tap_recorder(_taps if _taps is not None else [])
    with nn.intercept_methods(intercept), nn.intercept_methods(recorder):
        jax.eval_shape(lambda p: module.apply({"params": p}, *args, **extra, **kwargs), params)
    return found


def _spec_or_unsupported(module: Any, kernel_shape: Sequence[int], stored_shape: Sequence[int],
                         path: str) -> L.LayerSpec:
    try:
        return L.spec_of(module, kernel_shape, path).with_stack(stored_shape)
    except L.UnsupportedLayerError as err:
        return L.unsupported_spec(module, kernel_shape, L.kernel_attr(module), str(err))


def from_linen(module: nn.Module, params: P.Params, *example_args: Any,
               head_patterns: Sequence[str] = (), info: Any = None, **example_kwargs: Any) -> LinenModel:
    """Describe a Linen model once so that every method can adapt it.

    Traces ``module.apply({"params": params}, *example_args, **example_kwargs)`` (shapes only,
    nothing is computed) and records the layers that hold a kernel (their kind, input and output
    axis groups, and stack axes under ``nn.scan``) and the taps the model calls
    (:mod:`jpeft.models.taps`: the sizes activation-space methods need are read off them).
    ``head_patterns`` are regexes of a task head's parameter paths, trained whole by the
    :class:`~jpeft.train.trainer.Trainer`; ``info`` sets fields explicitly (they win).

    Example::

        model = jpeft.from_linen(mlp, params, x)
        delta = jpeft.lora(jpeft.LoraConfig(targets="proj$")).init(key, params, model.info())
    """
    calls: list[TapCall] = []
    layers = describe_linen(module, params, *example_args, _taps=calls, **example_kwargs)
    return LinenModel(module, _info(type(module).__name__, layers, calls, head_patterns, info))


# ----------------------------------------------------------------------------------------------
# NNX

def _str_keys(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {str(k): _str_keys(v) for k, v in tree.items()}
    return tree


def _like_keys(template: Any, tree: Mapping[str, Any], where: str = "") -> Any:
    """``tree`` (string keys) re-keyed like ``template`` (NNX uses ints for list entries)."""
    if not isinstance(template, Mapping):
        return tree
    if not isinstance(tree, Mapping):
        raise ValueError(f"parameters: expected a dict at '{where}', got {type(tree).__name__}")
    missing = [str(k) for k in template if str(k) not in tree]
    if missing:
        raise KeyError(f"parameters: '{where}' lacks {missing[:5]}; were they made for another model?")
    return {k: _like_keys(v, tree[str(k)], f"{where}/{k}".lstrip("/")) for k, v in template.items()}


_DELTA_CLS: list[type] = []


def _delta_cls() -> type:
    if not _DELTA_CLS:
        from flax import nnx

        # a Param, so that a user's nnx.scan / StateAxes that stacks Params stacks it too
        _DELTA_CLS.append(type("DeltaParam", (nnx.Param,), {"__doc__": "A jpeft delta leaf."}))
    return _DELTA_CLS[0]


def _nnx_layer_classes() -> tuple[type, ...]:
    from flax import nnx

    registered = tuple(c for c in L.registered_classes() if issubclass(c, nnx.Module))
    return (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv, *registered)


_ACTIVE_PARTS: list[Sequence[HookPart]] = []  # the hook parts of the calls being traced


def _nnx_call(original: Callable[..., Any]) -> Callable[..., Any]:
    def __call__(self, x, *args, **kwargs):
        path = self.__dict__.get("_jpeft_path")
        if path is None or not _ACTIVE_PARTS:
            return original(self, x, *args, **kwargs)
        attrs = self.__dict__
        kernel = getattr(self, L.kernel_attr(self)).get_value()
        spec = L.spec_of(self, kernel.shape, path)
        index = attrs.get(f"{INJECTED}__{LAYER_INDEX}")
        index = index.get_value() if index is not None else None
        bias = getattr(self, spec.bias, None) if spec.bias else None
        layer = Layer(path, spec, index if index is not None and index.ndim == 0 else None,
                      kernel, bias.get_value() if bias is not None else None)

        def leaves_of(part: str) -> dict[str, jax.Array]:
            prefix = f"{INJECTED}__{part}__"
            return {k[len(prefix):]: v.get_value() for k, v in attrs.items() if k.startswith(prefix)}

        call = lambda v: original(self, v, *args, **kwargs)
        return _run_hooks(_ACTIVE_PARTS[-1], leaves_of, call, x, layer)

    __call__.__wrapped__ = original  # type: ignore[attr-defined]
    return __call__


@contextmanager
def _nnx_hooks(parts: Sequence[HookPart]) -> Iterator[None]:
    """Route the NNX layer classes' ``__call__`` through the hooks while tracing."""
    patched = []
    if not _ACTIVE_PARTS:
        # the classes that define the layers' __call__ (a registered subclass may inherit it)
        owners = dict.fromkeys(next((c for c in cls.__mro__ if "__call__" in c.__dict__), None)
                               for cls in _nnx_layer_classes())
        for cls in owners:
            if cls is None or cls is object:
                continue
            original = cls.__dict__["__call__"]
            cls.__call__ = _nnx_call(original)
            patched.append((cls, original))
    _ACTIVE_PARTS.append(parts)
    try:
        yield
    finally:
        _ACTIVE_PARTS.pop()
        for cls, original in patched:
            cls.__call__ = original


@dataclasses.dataclass(frozen=True)
class NnxModel:
    """An NNX module split into its graph definition, its ``Param`` state (handed to the user
    as the frozen base, a plain nested dict) and the rest of its state. See :func:`from_nnx`."""

    graphdef: Any
    params_template: Any
    rest: Any
    model_info: Any

    def info(self) -> Any:
        return self.model_info

    def module(self, params: P.Params) -> Any:
        """A fresh NNX module with these parameters (e.g. merged weights)."""
        from flax import nnx

        state = jax.tree_util.tree_map(lambda x: x, self.params_template)
        nnx.replace_by_pure_dict(state, _like_keys(nnx.to_pure_dict(self.params_template), params))
        return nnx.merge(self.graphdef, state, self.rest)

    def run(self, params: P.Params, parts: Sequence[HookPart], interceptors: Sequence[Any],
            args: Sequence[Any], kwargs: Mapping[str, Any], ctx: Any, method: Any) -> Any:
        from flax import nnx

        from jpeft.models import taps as T

        module = self.module(Q.dequantize_base(params))  # NNX: a quantized base runs dequantized
        module.set_attributes(deterministic=not ctx.train, use_running_average=not ctx.train,
                              raise_if_not_found=False)
        if ctx.train and ctx.rng is not None:
            streams = {n.key.tag for _, n in nnx.iter_graph(module) if isinstance(n, nnx.RngStream)}
            if streams:
                nnx.reseed(module, policy="match_shape",
                           **{s: ctx.key("rngs", s) for s in sorted(streams)})
        self._attach(module, parts)
        if method is None:
            fn = module
        elif isinstance(method, str):
            fn = getattr(module, method)
        else:
            fn = lambda *a, **kw: method(module, *a, **kw)
        T._NNX_INTERCEPTORS.append(tuple(interceptors))
        try:
            with _nnx_hooks(parts):
                return fn(*args, **kwargs)
        finally:
            T._NNX_INTERCEPTORS.pop()

    def _attach(self, module: Any, parts: Sequence[HookPart]) -> None:
        from flax import nnx

        if not parts:
            return
        nodes = {"/".join(str(k) for k in path): node for path, node in nnx.iter_graph(module)
                 if isinstance(node, nnx.Module)}
        delta_cls = _delta_cls()
        for part in parts:
            for path, leaves in part.modules.items():
                node = nodes.get(path)
                if node is None:
                    raise KeyError(f"{part.name}: the delta adapts '{path}', which is not a module "
                                   "of this model; was the delta made for another model?")
                if not isinstance(node, _nnx_layer_classes()):
                    raise L.UnsupportedLayerError(
                        f"{part.name}: the layer at '{path}' is a {type(node).__name__}, which "
                        f"jpeft's weight-space methods cannot adapt (supported: {L.SUPPORTED}); "
                        f"register it: {L.registration_hint(node, 'kernel')}")
                object.__setattr__(node, "_jpeft_path", path)
                for leaf_name, leaf in leaves.items():
                    setattr(node, f"{INJECTED}__{part.name}__{leaf_name}", delta_cls(leaf))
                spec = self.model_info.layers.get(path)
                if spec is not None and spec.stack:
                    setattr(node, f"{INJECTED}__{LAYER_INDEX}",
                            nnx.Variable(jnp.arange(spec.stack[0])))


def _nnx_kernel_shape(node: Any, stored: tuple[int, ...]) -> tuple[int, ...]:
    """One layer's kernel shape (``stored`` is the kernel as held, with any stack axes)."""
    from flax import nnx

    if not isinstance(node, (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv)):  # registered
        rank = L.kernel_rank(node)
        return tuple(stored[len(stored) - rank:]) if rank and rank <= len(stored) else tuple(stored)
    if isinstance(node, nnx.Linear):
        return (int(node.in_features), int(node.out_features))
    if isinstance(node, nnx.LinearGeneral):
        return (*L._tuple(node.in_features), *L._tuple(node.out_features))
    return tuple(int(d) for d in node.kernel_shape)


def describe_nnx(module: Any) -> dict[str, L.LayerSpec]:
    """``{module path: LayerSpec}`` of every NNX module holding a kernel variable (``kernel``,
    or the name :func:`jpeft.register_layer` gave), and of every unregistered custom module
    holding a parameter of at least 2 axes (unsupported, its error shows the registration)."""
    from flax import nnx

    found: dict[str, L.LayerSpec] = {}
    for path, node in nnx.iter_graph(module):
        if not isinstance(node, nnx.Module):
            continue
        key = "/".join(str(k) for k in path)
        kernel = getattr(node, L.kernel_attr(node), None)
        if isinstance(kernel, nnx.Variable):
            stored = tuple(kernel.get_value().shape)
            if isinstance(node, _nnx_layer_classes()):
                found[key] = _spec_or_unsupported(node, _nnx_kernel_shape(node, stored), stored, key)
            else:
                found[key] = L.unsupported_spec(node, stored)
            continue
        own = {k: v.get_value() for k, v in vars(node).items() if isinstance(v, nnx.Param)}
        custom = L.custom_kernel(node, own)
        if custom is not None:
            found[key] = L.unknown_layer_spec(node, custom, own[custom].shape, key)
    return found


def from_nnx(module: Any, *example_args: Any, head_patterns: Sequence[str] = (), info: Any = None,
             **example_kwargs: Any) -> tuple[NnxModel, dict[str, Any]]:
    """Split an NNX module into a model jpeft runs and its frozen base parameters.

    Returns ``(model, params)``: ``params`` is the module's ``nnx.Param`` state as a nested dict
    of arrays (list entries keyed ``"0"``, ``"1"``, …), the tree every method, ``jpeft.apply``,
    ``merge``, the ``Trainer`` and the checkpoints take; ``model.module(params)`` rebuilds an
    NNX module (for example from merged weights). The module passed in is not changed. The
    layers are read off the module's graph; with example inputs the model is also traced once
    (shapes only) to record its taps (:class:`jpeft.models.taps.NnxTap`), as :func:`from_linen`
    does. ``info`` sets :class:`~jpeft.core.transform.ModelInfo` fields explicitly.

    Example::

        model, params = jpeft.from_nnx(nnx_mlp)
        delta = jpeft.lora(jpeft.LoraConfig(targets="fc1$")).init(key, params, model.info())
    """
    from flax import nnx

    from jpeft.core.transform import ApplyContext

    graphdef, params_state, rest = nnx.split(module, nnx.Param, ...)
    params = _str_keys(nnx.to_pure_dict(params_state))
    layers = describe_nnx(module)
    template = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params_state)
    model = NnxModel(graphdef, template, rest, _info(type(module).__name__, layers, None,
                                                    head_patterns, info))
    if example_args or example_kwargs:
        calls: list[TapCall] = []
        jax.eval_shape(lambda p: model.run(p, [], [_tap_recorder(calls)], example_args,
                                           example_kwargs, ApplyContext(), None), params)
        model = dataclasses.replace(model, model_info=_info(type(module).__name__, layers, calls,
                                                            head_patterns, info))
    return model, params
