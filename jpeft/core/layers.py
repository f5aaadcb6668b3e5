"""Adaptable layers: what a weight-space method needs to know about a layer, for any Flax model.

jpeft adapts four kinds of layer, in Linen and in NNX alike:

==================  ====================================  =====================================
kind                Linen / NNX                           kernel axes (input group | output)
==================  ====================================  =====================================
``dense``           ``nn.Dense`` / ``nnx.Linear``         ``(d_in | d_out)``
``dense_general``   ``nn.DenseGeneral`` /                 ``(*in_features | *features)``
                    ``nnx.LinearGeneral``
``einsum``          ``nn.Einsum`` / ``nnx.Einsum``        labels shared with the input and absent
                                                          from the output ``|`` the rest
``conv``            ``nn.Conv`` / ``nnx.Conv``            ``(*kernel_size, c_in | c_out)``
==================  ====================================  =====================================

A kernel ``W`` is read as a matrix from its *input group* (the axes the layer contracts with its
input) to its *output group* (all other axes), so a low-rank update ``ΔW = A·B`` with
``A (*in, r)`` and ``B (r, *out)`` keeps the layer's own contraction: ``y + s·B(A(x))``, where
``A(x)`` is the layer's operation with ``A`` as kernel (for a conv: the same kernel size, strides,
padding and dilation; then ``B`` acts as a 1×1 conv, the form Hugging Face PEFT uses) and
``B(h)`` contracts ``r``. Layers stacked along leading axes (``nn.scan``, ``nnx.scan`` over
``nnx.vmap``-made layers) have a stored kernel of shape ``(*stack, *kernel)``; a method gives
each layer of the stack its own slice, ``A (*stack, *in, r)``.

:class:`LayerSpec` holds those facts. It comes from a module (:func:`spec_of`), from a
:class:`~jpeft.core.transform.ModelInfo` built by :func:`jpeft.from_linen` / :func:`jpeft.from_nnx`,
or, for a 2-D ``kernel`` leaf of a plain parameter tree, it is read off the tree (a ``Dense``).

Layer classes jpeft does not ship (a third-party ``Einsum`` holding a raw ``w``, a user's module
with its own call) are made adaptable by :func:`register_layer`, which names the attribute of
the kernel (and bias) and how the layer contracts. Every method finds a layer's kernel through
one lookup, :func:`kernel_name`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jpeft.models.common import linear

KINDS = ("dense", "dense_general", "einsum", "conv")
SUPPORTED = ("Linen: nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv; "
             "NNX: nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv")


class UnsupportedLayerError(TypeError):
    """A method's target is a layer type it cannot adapt."""


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One adaptable layer.

    Attributes:
      kind: one of :data:`KINDS`.
      kernel_shape: the shape of one layer's kernel (without stack axes).
      in_axes / out_axes: the kernel axes of the input and output groups (together: all axes).
      stack: the leading stack axes of the stored kernel (``nn.scan``: ``(num_layers,)``).
      axis: ``dense_general``: the input axes contracted (as the layer holds them).
      einsum: ``einsum``: the layer's equation ``"x,kernel->y"``.
      conv: ``conv``: ``(strides, padding, input_dilation, kernel_dilation)``.
      module: the class name of the layer (for messages).
      note: why a layer holding a kernel cannot be adapted (``kind == "unsupported"``).
      kernel / bias: the names of the layer's kernel and bias parameters (``bias``: ``None``
        when the layer has none).
    """

    kind: str
    kernel_shape: tuple[int, ...]
    in_axes: tuple[int, ...]
    out_axes: tuple[int, ...]
    stack: tuple[int, ...] = ()
    axis: tuple[int, ...] = ()
    einsum: str = ""
    conv: tuple[Any, ...] = ()
    module: str = ""
    note: str = ""
    kernel: str = "kernel"
    bias: str | None = "bias"

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.kernel_shape[i] for i in self.in_axes)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.kernel_shape[i] for i in self.out_axes)

    @property
    def fan_in(self) -> int:
        return math.prod(self.in_shape)

    @property
    def feature_axes(self) -> tuple[int, ...]:
        """The kernel axes of the input's features: the input group, less a conv's window."""
        return (len(self.kernel_shape) - 2,) if self.kind == "conv" else self.in_axes

    def group_shape(self, group: str) -> tuple[int, ...]:
        """The shape of a group: ``"in"``, ``"out"`` or ``"features"``."""
        return tuple(self.kernel_shape[i] for i in self._group_axes(group))

    def _group_axes(self, group: str) -> tuple[int, ...]:
        return {"in": self.in_axes, "out": self.out_axes, "features": self.feature_axes}[group]

    def with_stack(self, stored_shape: Sequence[int]) -> "LayerSpec":
        """This spec with ``stack`` read from the stored kernel's shape."""
        extra = len(stored_shape) - len(self.kernel_shape)
        if extra < 0 or tuple(stored_shape[extra:]) != self.kernel_shape:
            raise ValueError(f"{self.module}: stored kernel {tuple(stored_shape)} does not end with "
                             f"the layer's kernel shape {self.kernel_shape}")
        return dataclasses.replace(self, stack=tuple(stored_shape[:extra]))


def dense_spec(kernel_shape: Sequence[int], module: str = "Dense") -> LayerSpec:
    """A ``Dense`` layer's spec: ``kernel (d_in, d_out)``."""
    return LayerSpec("dense", tuple(kernel_shape), (0,), (1,), module=module)


# ----------------------------------------------------------------------------------------------
# Reading a module (Linen or NNX) into a spec.

def _tuple(x: Any) -> tuple[Any, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


@dataclasses.dataclass(frozen=True)
class LayerType:
    """How jpeft reads a layer class (see :func:`register_layer`).

    Attributes:
      kind: ``"dense"`` (kernel ``(d_in, d_out)``), ``"einsum"``, or, for the classes Flax ships,
        ``"dense_general"`` / ``"conv"``.
      kernel / bias: the names of the kernel and bias parameters (``bias``: ``None`` for none).
      equation: ``einsum``: the attribute holding the equation ``"x,kernel->y"``.
      spec: ``(module, kernel_shape) -> LayerSpec``, for a layer the fields above do not describe.
    """

    kind: str
    kernel: str = "kernel"
    bias: str | None = "bias"
    equation: str = ""
    spec: Callable[[Any, tuple[int, ...]], LayerSpec] | None = None


_REGISTERED: dict[type, LayerType] = {}


def register_layer(cls: type, kind: str = "dense", *, kernel: str = "kernel", bias: str | None = None,
                   equation: str = "",
                   spec: Callable[[Any, tuple[int, ...]], LayerSpec] | None = None) -> type:
    """Make a Linen or NNX layer class adaptable by every weight-space method.

    ``kind="dense"``: the layer computes ``x @ W (+ b)`` with its parameter ``kernel`` of shape
    ``(d_in, d_out)``; ``kind="einsum"``: it computes ``jnp.einsum(eq, x, W)`` with ``eq`` the
    string held by its attribute ``equation``. ``bias`` names its bias parameter, if any (for
    (IA)³'s merge). Any other contraction: ``spec=lambda module, kernel_shape: LayerSpec(...)``.
    The layer's own ``__call__`` keeps running; jpeft adds the update around it. Returns
    ``cls``. Example (Google tunix's ``Einsum``, a raw ``w`` fed to ``jnp.einsum``)::

        jpeft.register_layer(tunix_llama.Einsum, kind="einsum", kernel="w", equation="einsum_str")
    """
    if not isinstance(cls, type):
        raise TypeError(f"register_layer: pass the layer class, got {type(cls).__name__}")
    if spec is None and kind not in ("dense", "einsum"):
        raise ValueError(f"register_layer: kind must be 'dense' or 'einsum' (got {kind!r}); describe "
                         "any other layer with spec=lambda module, kernel_shape: LayerSpec(...)")
    if spec is None and kind == "einsum" and not equation:
        raise ValueError("register_layer: kind='einsum' needs equation=<the attribute holding the "
                         "einsum string>, e.g. equation='einsum_str'")
    _REGISTERED[cls] = LayerType(kind, kernel, bias, equation, spec)
    return cls


def registered_classes() -> tuple[type, ...]:
    """The classes registered with :func:`register_layer`."""
    return tuple(_REGISTERED)


def _builtin_type(module: Any) -> LayerType | None:
    import flax.linen as nn
    from flax import nnx

    if isinstance(module, (nn.Dense, nnx.Linear)):
        return LayerType("dense")
    if isinstance(module, (nn.DenseGeneral, nnx.LinearGeneral)):
        return LayerType("dense_general")
    if isinstance(module, (nn.Einsum, nnx.Einsum)):
        return LayerType("einsum", equation="einsum_str")
    if isinstance(module, (nn.Conv, nnx.Conv)):
        return LayerType("conv")
    return None


def layer_type(module: Any) -> LayerType | None:
    """The :class:`LayerType` of a module: registered (its class or a base class), else one of
    Flax's layers, else ``None``."""
    for cls in type(module).__mro__:
        if cls in _REGISTERED:
            return _REGISTERED[cls]
    return _builtin_type(module)


def _module_kind(module: Any) -> str | None:
    found = layer_type(module)
    return found.kind if found is not None else None


def is_adaptable(module: Any) -> bool:
    return _module_kind(module) is not None


def kernel_attr(module: Any) -> str:
    """The name of a module's kernel parameter: its registered one, else ``"kernel"``."""
    kind = layer_type(module)
    return kind.kernel if kind is not None else "kernel"


def kernel_rank(module: Any) -> int | None:
    """The rank of one layer's kernel of a registered ``dense``/``einsum`` layer (``None``:
    unknown, the stored kernel is taken as one layer's)."""
    found = layer_type(module)
    if found is None or found.spec is not None:
        return None
    if found.kind == "dense":
        return 2
    if found.kind == "einsum":
        eq = str(getattr(module, found.equation, "")).replace(" ", "")
        return len(eq.split("->")[0].split(",")[-1]) if "->" in eq and "," in eq else None
    return None


def registration_hint(module: Any, kernel: str) -> str:
    """The one-line :func:`register_layer` call for an unknown layer class (kind guessed from
    an attribute holding an einsum string)."""
    cls = type(module)
    attrs = (vars(module) if not dataclasses.is_dataclass(module)
             else {f.name: getattr(module, f.name, None) for f in dataclasses.fields(module)})
    eq = next((k for k, v in attrs.items()
               if isinstance(v, str) and re.fullmatch(r"[\w.]+,[\w.]+->[\w.]+", v.replace(" ", ""))), None)
    kind = f'kind="einsum", kernel="{kernel}", equation="{eq}"' if eq else f'kind="dense", kernel="{kernel}"'
    return f"jpeft.register_layer({cls.__module__}.{cls.__qualname__}, {kind})"


def spec_of(module: Any, kernel_shape: Sequence[int], path: str = "") -> LayerSpec:
    """The spec of a Linen or NNX layer whose (one layer's) kernel has ``kernel_shape``.

    Raises :class:`UnsupportedLayerError` naming the layer type, or a layer option (a conv with
    feature groups, ``DenseGeneral`` batch dims) that has no low-rank form here.
    """
    name = type(module).__name__
    where = f" at '{path}'" if path else ""
    found = layer_type(module)
    shape = tuple(int(d) for d in kernel_shape)
    if found is None:
        raise UnsupportedLayerError(
            f"the layer{where} is a {name}, which jpeft's weight-space methods cannot adapt "
            f"(supported: {SUPPORTED}, and classes registered with jpeft.register_layer, e.g. "
            f"{registration_hint(module, 'kernel')}); narrow the method's targets pattern to "
            "exclude it")
    names = dict(module=name, kernel=found.kernel, bias=found.bias)
    if found.spec is not None:
        spec = found.spec(module, shape)
        if not isinstance(spec, LayerSpec) or spec.kind not in KINDS:
            raise TypeError(f"register_layer: the spec of {name} must return a LayerSpec of a kind "
                            f"in {KINDS}, got {spec!r}")
        return dataclasses.replace(spec, **names)
    return dataclasses.replace(_builtin_spec(module, found, shape, name, where), **names)


def _builtin_spec(module: Any, found: LayerType, shape: tuple[int, ...], name: str,
                  where: str) -> LayerSpec:
    kind = found.kind
    if kind == "dense":
        return dense_spec(shape, name)
    if kind == "dense_general":
        batch = getattr(module, "batch_dims", None) or getattr(module, "batch_axis", None)
        if batch:
            raise UnsupportedLayerError(f"{name}{where} has batch dims {batch}; jpeft adapts "
                                        "DenseGeneral/LinearGeneral without batch dims only")
        axis = _tuple(module.axis)
        n = len(axis)
        return LayerSpec(kind, shape, tuple(range(n)), tuple(range(n, len(shape))), axis=axis,
                         module=name)
    if kind == "einsum":
        eq = str(getattr(module, found.equation)).replace(" ", "")
        x_spec, k_spec, y_spec = _einsum_parts(eq, name, where)
        if len(k_spec) != len(shape):
            raise UnsupportedLayerError(f"{name}{where}: the kernel of '{eq}' has {len(k_spec)} axes, "
                                        f"the parameter {shape}")
        in_axes = tuple(i for i, c in enumerate(k_spec) if c in x_spec and c not in y_spec)
        out_axes = tuple(i for i in range(len(k_spec)) if i not in in_axes)
        if not in_axes:
            raise UnsupportedLayerError(f"{name}{where}: '{eq}' contracts no kernel axis with the "
                                        "input, so it has no input group to adapt")
        return LayerSpec(kind, shape, in_axes, out_axes, einsum=eq, module=name)
    # conv
    if int(getattr(module, "feature_group_count", 1)) != 1:
        raise UnsupportedLayerError(f"{name}{where} has feature_group_count="
                                    f"{module.feature_group_count}; jpeft adapts ungrouped convs only")
    padding = module.padding
    if isinstance(padding, str) and padding.upper() not in ("SAME", "VALID"):
        raise UnsupportedLayerError(f"{name}{where} uses padding={padding!r}; jpeft's conv adapters "
                                    "support 'SAME', 'VALID' and explicit padding")
    n = len(shape) - 2
    conv = (_tuple(module.strides or 1), padding, _tuple(module.input_dilation or 1),
            _tuple(module.kernel_dilation or 1))
    return LayerSpec(kind, shape, tuple(range(n + 1)), (n + 1,), conv=conv, module=name)


def _einsum_parts(eq: str, name: str, where: str) -> tuple[str, str, str]:
    if "->" not in eq or eq.count(",") != 1:
        raise UnsupportedLayerError(f"{name}{where}: einsum '{eq}' must have the form 'x,kernel->y'")
    lhs, y_spec = eq.split("->")
    x_spec, k_spec = lhs.split(",")
    if "." in k_spec:
        raise UnsupportedLayerError(f"{name}{where}: an ellipsis in the kernel of '{eq}'")
    return x_spec, k_spec, y_spec


@dataclasses.dataclass(frozen=True)
class _EinsumLabels:
    x: str      # the input's labels
    y: str      # the output's labels
    group: str  # the kernel's input group
    rest: str   # the kernel's output group
    r: str      # a free label for the rank
    mid: str    # the input's labels outside the group, then r: A(x)'s labels


def _labels(spec: LayerSpec) -> _EinsumLabels:
    x_spec, k_spec, y_spec = _einsum_parts(spec.einsum, spec.module, "")
    r = next(c for c in string.ascii_letters if c not in spec.einsum)
    group = "".join(k_spec[i] for i in spec.in_axes)
    rest = "".join(k_spec[i] for i in spec.out_axes)
    mid = "".join(c for c in x_spec if c not in group) + r
    return _EinsumLabels(x_spec, y_spec, group, rest, r, mid)


# ----------------------------------------------------------------------------------------------
# The layer's operation with a factor as kernel (LoRA's A(x), B(h)) and per-axis scaling ((IA)³).

def _axes(axis: tuple[int, ...], ndim: int) -> tuple[int, ...]:
    return tuple(a % ndim for a in axis)


def contract(spec: LayerSpec, x: jax.Array, a: jax.Array) -> jax.Array:
    """The layer's input contraction with ``a (*in, r)`` as kernel: ``(…, r)`` (einsum: the
    input's labels outside the input group, then ``r``)."""
    if spec.kind == "dense":
        return linear(x, a)
    if spec.kind == "dense_general":
        axes = _axes(spec.axis, x.ndim)
        return lax.dot_general(x, a, ((axes, tuple(range(len(axes)))), ((), ())))
    if spec.kind == "einsum":
        e = _labels(spec)
        return jnp.einsum(f"{e.x},{e.group}{e.r}->{e.mid}", x, a)
    strides, padding, input_dilation, kernel_dilation = spec.conv
    n = len(spec.kernel_shape) - 2
    batch_shape = x.shape[: x.ndim - n - 1]
    flat = x.reshape((-1, *x.shape[x.ndim - n - 1:]))
    if not isinstance(padding, str):
        padding = _canonical_padding(padding, n)
    lhs = "N" + "HWDXYZ"[:n] + "C"
    dims = lax.conv_dimension_numbers(flat.shape, a.shape, (lhs, "HWDXYZ"[:n] + "IO", lhs))
    out = lax.conv_general_dilated(
        flat, a, window_strides=_pad_tuple(strides, n), padding=padding,
        lhs_dilation=_pad_tuple(input_dilation, n), rhs_dilation=_pad_tuple(kernel_dilation, n),
        dimension_numbers=dims)
    return out.reshape((*batch_shape, *out.shape[1:]))


def _pad_tuple(values: tuple[int, ...], n: int) -> tuple[int, ...]:
    return tuple(values) * n if len(values) == 1 else tuple(values)


def _canonical_padding(padding: Any, n: int) -> list[tuple[int, int]]:
    if isinstance(padding, int):
        return [(padding, padding)] * n
    pads = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
    return pads * n if len(pads) == 1 else pads


def expand(spec: LayerSpec, h: jax.Array, b: jax.Array) -> jax.Array:
    """``h (…, r)`` times ``b (r, *out)``, shaped as the layer's output."""
    if spec.kind == "einsum":
        e = _labels(spec)
        return jnp.einsum(f"{e.mid},{e.r}{e.rest}->{e.y}", h, b)
    if b.ndim == 2:
        return linear(h, b)
    out = linear(h, b.reshape(b.shape[0], -1))
    return out.reshape((*h.shape[:-1], *b.shape[1:]))


def scale_output(spec: LayerSpec, y: jax.Array, scale: jax.Array) -> jax.Array:
    """``y`` times ``scale`` (shaped as the output group) along the output group's axes."""
    scale = scale.astype(y.dtype)
    if spec.kind == "einsum":
        e = _labels(spec)
        return jnp.einsum(f"{e.y},{e.rest}->{e.y}", y, scale)
    return y * scale


def scale_input(spec: LayerSpec, x: jax.Array, scale: jax.Array) -> jax.Array:
    """``x`` times ``scale`` (shaped as the ``features`` group) along the input's feature axes."""
    scale = scale.astype(x.dtype)
    if spec.kind == "einsum":
        e = _labels(spec)
        return jnp.einsum(f"{e.x},{e.group}->{e.x}", x, scale)
    if spec.kind == "dense_general":
        axes = _axes(spec.axis, x.ndim)
        order = np.argsort(axes)
        shape = [1] * x.ndim
        for a in axes:
            shape[a] = x.shape[a]
        return x * jnp.transpose(scale, order).reshape(shape)
    return x * scale  # dense, conv: the features are the input's last axis


# ----------------------------------------------------------------------------------------------
# Weight-space forms (merge / unmerge).

def low_rank_kernel(spec: LayerSpec, a: jax.Array, b: jax.Array) -> jax.Array:
    """``ΔW`` in the stored kernel's layout from ``a (*stack, *in, r)`` and ``b (*stack, r, *out)``."""
    s = len(spec.stack)
    if s == 0 and a.ndim == 2 and b.ndim == 2 and spec.in_axes == (0,):
        return a @ b
    r = a.shape[-1]
    return matrix_kernel(spec, as_matrix(spec, a, "in", r) @ as_matrix(spec, b, "out", r))


def as_matrix(spec: LayerSpec, factor: jax.Array, group: str, r: int) -> jax.Array:
    """A factor ``(*stack, *in, r)`` (``group="in"``) or ``(*stack, r, *out)`` (``"out"``) as a
    matrix ``(*stack, fan_in, r)`` / ``(*stack, r, fan_out)``."""
    if group == "in":
        return factor.reshape((*spec.stack, spec.fan_in, r))
    return factor.reshape((*spec.stack, r, math.prod(spec.out_shape)))


def matrix_kernel(spec: LayerSpec, matrix: jax.Array) -> jax.Array:
    """A ``(*stack, fan_in, fan_out)`` matrix (input group flattened in its order, then output
    group) as a kernel in the stored layout ``(*stack, *kernel_shape)``."""
    grouped = matrix.reshape((*spec.stack, *spec.in_shape, *spec.out_shape))
    return jnp.transpose(grouped, _to_kernel_order(spec))


def kernel_matrix(spec: LayerSpec, kernel: jax.Array) -> jax.Array:
    """A stored kernel ``(*stack, *kernel_shape)`` as a ``(*stack, fan_in, fan_out)`` matrix (the
    inverse of :func:`matrix_kernel`)."""
    s = len(spec.stack)
    grouped = jnp.transpose(kernel, (*range(s), *(s + a for a in (*spec.in_axes, *spec.out_axes))))
    return grouped.reshape((*spec.stack, spec.fan_in, math.prod(spec.out_shape)))


def apply_kernel(spec: LayerSpec, x: jax.Array, w: jax.Array) -> jax.Array:
    """The layer's operation, without its bias, with ``w`` (one layer's kernel shape) as kernel."""
    return jnp.einsum(spec.einsum, x, w) if spec.kind == "einsum" else contract(spec, x, w)


def _to_kernel_order(spec: LayerSpec) -> tuple[int, ...]:
    s = len(spec.stack)
    grouped = [*spec.in_axes, *spec.out_axes]  # kernel axis held at each grouped position
    inverse = [grouped.index(k) for k in range(len(spec.kernel_shape))]
    return (*range(s), *(s + i for i in inverse))


def broadcast_group(spec: LayerSpec, vector: jax.Array, group: str) -> jax.Array:
    """A ``(*stack, *group)`` array reshaped to broadcast against the stored kernel (``group``:
    ``"in"``, ``"out"`` or ``"features"``)."""
    axes = spec._group_axes(group)
    s = len(spec.stack)
    order = np.argsort(axes)  # the group's axes in kernel order
    moved = jnp.transpose(vector, (*range(s), *(s + int(i) for i in order)))
    shape = [1] * len(spec.kernel_shape)
    for a in axes:
        shape[a] = spec.kernel_shape[a]
    return moved.reshape((*spec.stack, *shape))


# ----------------------------------------------------------------------------------------------
# Sharding: a delta leaf follows the axes of its kernel.

GROUPS = ("stack", "in", "out", "features", "rank", "replicated")


def follow_kernel(spec: LayerSpec, kernel_pspec: Sequence[Any], layout: Sequence[str]) -> tuple[Any, ...]:
    """The partition of a delta leaf whose axes are ``layout`` (groups of :data:`GROUPS`, e.g.
    LoRA's ``A``: ``("stack", "in", "rank")``), given the stored kernel's partition
    ``kernel_pspec`` (one entry per stored axis; ``None`` = replicated). ``rank`` and
    ``replicated`` axes are replicated."""
    s = len(spec.stack)
    entries = list(kernel_pspec) + [None] * (s + len(spec.kernel_shape) - len(kernel_pspec))
    out: list[Any] = []
    for group in layout:
        if group == "stack":
            out.extend(entries[:s])
        elif group in ("rank", "replicated"):  # an axis of the factor's own (rank, Kronecker factor)
            out.append(None)
        else:
            out.extend(entries[s + a] for a in spec._group_axes(group))
    return tuple(out)


# ----------------------------------------------------------------------------------------------
# Specs for the targets of a method.

def kernel_spec(path: str, stored_shape: Sequence[int], layers: Mapping[str, LayerSpec],
                what: str) -> LayerSpec:
    """The spec of the layer at module ``path``: from ``layers`` (a model's description) when
    it has it, else read off a 2-D kernel. A kernel of another rank with no description is an
    error that says how to describe the model."""
    if path in layers:
        spec = layers[path]
        if not spec.stack and len(stored_shape) > len(spec.kernel_shape):
            spec = spec.with_stack(stored_shape)
        if spec.kind not in KINDS:
            raise UnsupportedLayerError(
                f"{what}: " + (spec.note or f"the layer at '{path}' is a {spec.module}, which "
                f"jpeft's weight-space methods cannot adapt (supported: {SUPPORTED})")
                + "; narrow the targets to exclude it")
        return spec
    if len(stored_shape) == 2:
        return dense_spec(stored_shape)
    raise ValueError(
        f"{what}: the layer at '{path}' has a {len(stored_shape)}-D kernel {tuple(stored_shape)}, "
        "whose input axes cannot be read from the parameter tree (a DenseGeneral, Einsum or Conv, "
        "or layers stacked by nn.scan). Describe the model once and pass its info: "
        "`info = jpeft.from_linen(model, params, *example_inputs).info()` (Linen) or "
        "`model, params = jpeft.from_nnx(module)` then `model.info()` (NNX).")


def unsupported_spec(module: Any, kernel_shape: Sequence[int], kernel: str = "kernel",
                     note: str = "") -> LayerSpec:
    """A placeholder spec for a module that holds a kernel but is not adaptable (named in errors)."""
    return LayerSpec("unsupported", tuple(kernel_shape), (), (), module=type(module).__name__,
                     note=note, kernel=kernel)


def custom_kernel(module: Any, params: Mapping[str, Any]) -> str | None:
    """The name of the first parameter of at least 2 axes of a module of a class neither Flax
    nor jpeft ships and nobody registered (``params``: its own parameters by name), else ``None``:
    such a module is recorded as an unsupported layer whose error shows the registration."""
    if layer_type(module) is not None or type(module).__module__.split(".")[0] in ("flax", "jpeft"):
        return None
    return next((k for k, v in params.items() if len(getattr(v, "shape", ())) >= 2), None)


def unknown_layer_spec(module: Any, kernel: str, stored_shape: Sequence[int], path: str) -> LayerSpec:
    """The unsupported spec of a module :func:`custom_kernel` found, with the call to register it."""
    note = (f"the layer at '{path}' is a {type(module).__name__}, a class jpeft does not know; "
            f"tell jpeft which parameter is its kernel and how it contracts, once, before "
            f"describing the model: {registration_hint(module, kernel)}")
    return unsupported_spec(module, stored_shape, kernel, note)


def kernel_name(path: str, layers: Mapping[str, LayerSpec], flat: Mapping[str, Any] | None = None) -> str:
    """The name of the kernel parameter of the layer at module ``path``: from the model's
    description ``layers``, else (with the flat parameter tree ``flat``) the first of
    ``kernel`` and the registered kernel names the module holds, else ``"kernel"``."""
    if path in layers:
        return layers[path].kernel
    if flat is not None:
        for name in ("kernel", *dict.fromkeys(t.kernel for t in _REGISTERED.values())):
            if f"{path}/{name}" in flat:
                return name
    return "kernel"


def select_layers(base: Mapping[str, Any], pattern: Any, layers: Mapping[str, LayerSpec],
                  what: str) -> list[str]:
    """Module paths matching ``pattern`` among the modules holding a ``kernel`` leaf and the
    layers of the model's description (registered ones hold their kernel under its own name).
    Raises :class:`~jpeft.core.paths.NoMatchError` listing the candidates."""
    from jpeft.core import paths as P

    modules: dict[str, None] = {}
    for leaf in P.flatten(base):
        module, _, name = leaf.rpartition("/")
        if name == "kernel" or (module in layers and layers[module].kernel == name):
            modules[module] = None
    regex = P._compile(pattern)
    hits = [m for m in modules if regex.search(m)]
    if not hits:
        raise P.no_match_error(what, pattern, modules)
    return hits


def kernel_path(path: str, layers: Mapping[str, LayerSpec], flat: Mapping[str, Any] | None = None) -> str:
    """``"<path>/<kernel name>"``: the parameter path of the kernel of the layer at ``path``
    (:func:`kernel_name`)."""
    return f"{path}/{kernel_name(path, layers, flat)}"


def stacked_leaves(base: Mapping[str, Any], layers: Mapping[str, LayerSpec]) -> dict[str, int]:
    """``{leaf path: number of layers}`` of the leaves that ``nn.scan`` / ``nnx.scan`` stacks.

    A stack's root is the highest module above a stacked layer of ``layers`` (a model's
    description) all of whose leaves have the stack's size as their leading axis (Linen:
    the scanned module, ``layers``; NNX: the ``nnx.vmap``-made module); every leaf under it
    (kernels, biases, norm scales) holds one slice per layer.
    """
    from jpeft.core import paths as P

    flat = P.flatten(base)
    out: dict[str, int] = {}
    for path, spec in layers.items():
        if not spec.stack:
            continue
        n, parts, root = spec.stack[0], path.split("/"), None
        for depth in range(len(parts), 0, -1):
            prefix = "/".join(parts[:depth]) + "/"
            under = [v for k, v in flat.items() if k.startswith(prefix)]
            if not under or any(len(jnp.shape(v)) == 0 or jnp.shape(v)[0] != n for v in under):
                break
            root = prefix
        if root is not None:
            out.update({k: n for k in flat if k.startswith(root)})
    return out
