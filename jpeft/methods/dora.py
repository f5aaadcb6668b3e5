"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024, arXiv:2402.09353).

DoRA is LoRA's ``use_dora`` option (:class:`~jpeft.methods.lora.LoraConfig`). It splits the
adapted kernel into a magnitude and a direction (the paper's Eq. 5):

    W' = m ⊙ (W + s·AB) / ‖W + s·AB‖_c

``‖·‖_c`` is the norm of each output column over the kernel's input axis group (a ``Conv``:
over its window and input channels, as Hugging Face PEFT); ``m`` has the shape of the output
group (``(*stack, *out)`` for layers stacked by ``nn.scan``), is trained, and starts at
``‖W + s·AB‖_c = ‖W‖_c`` (``B = 0``), so a fresh delta is the identity. The delta holds
``lora_A``, ``lora_B`` and ``lora_magnitude`` per adapted layer (PEFT's ``lora_magnitude_vector``).

Forward, as PEFT computes it (``peft/tuners/lora/dora.py``), with ``g = m / ‖W + s·AB‖_c``,
``b`` the layer's bias and ``call`` the layer's own operation:

    y = call(x) + (g − 1) ⊙ (call(x) − b) + g ⊙ s·B(A(x))        evaluation, or no dropout
    y = call(x) + (g − 1) ⊙ x̃W + g ⊙ s·B(A(x̃))                   training, x̃ = dropout(x)

The first is ``g ⊙ x(W + s·AB) + b``, the merged layer. With dropout (PEFT's path when
``lora_dropout`` is not the identity) the base output keeps the undropped input and only the
DoRA correction sees ``x̃``; ``x̃W`` is the layer's operation with its kernel and no bias (one
more matmul or conv of the layer's size, as in PEFT).

**Detached norm.** Section 4.3 of the paper treats ``‖W + s·AB‖_c`` as a constant during
back-propagation ("it won't receive any gradient"), which saves the memory of its backward
pass; PEFT detaches it, and so does jpeft (``stop_gradient`` on the norm, and on ``s·AB`` inside
it): ``m`` gets the gradient of ``g`` directly, ``A`` and ``B`` only through ``B(A(x))``.

**Merging** computes ``W'`` above; the bias is unchanged. **Unmerging** cannot be done from
``W'`` and the delta alone: every column of ``W'`` has norm ``|m|`` whatever the norm of the
column of ``W + s·AB`` was, so any positive rescaling of a column of ``W + s·AB`` merges to the
same ``W'``. PEFT caches the norms on the module at merge time. jpeft stays functional: take the
norms before merging with :func:`weight_norms` and invert with :func:`unmerge_with_norms`
(exact to float rounding); :func:`jpeft.unmerge` on a DoRA delta raises and says so. The base
parameters are never changed by :func:`jpeft.merge`, so keeping them is the other way back.

**Optimizer.** ``m`` is decayed like ``A`` and ``B``: PEFT's magnitude is a plain parameter,
and the Hugging Face Trainer decays every parameter but biases and LayerNorm weights. With
LoRA+ (``lr_ratio``) ``m`` learns at ``B``'s rate, as in PEFT's ``create_loraplus_optimizer``
(which puts 1-D parameters in ``B``'s group). Under a mesh ``m`` is partitioned like the
kernel's output axes.

Example::

    method = jpeft.lora(LoraConfig(r=8, alpha=16, use_dora=True))
    delta = method.init(jax.random.key(0), base, model.info())   # + lora_magnitude leaves
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jpeft.core import layers as L
from jpeft.core import paths as P
from jpeft.core.transform import ModelInfo, resolve_info

MAGNITUDE = "lora_magnitude"


def check_layer(spec: L.LayerSpec, path: str) -> None:
    """Refuse an einsum whose kernel has an output-group label absent from the output (its
    columns are summed over, so there is no per-output magnitude to scale)."""
    if spec.kind != "einsum":
        return
    _, k_spec, y_spec = L._einsum_parts(spec.einsum, spec.module, "")
    lost = [k_spec[i] for i in spec.out_axes if k_spec[i] not in y_spec]
    if lost:
        raise L.UnsupportedLayerError(
            f"lora.use_dora: the einsum '{spec.einsum}' at '{path}' sums its kernel's axes {lost} "
            "out of the output, so its columns have no magnitude to scale; use plain LoRA there")


def direction(spec: L.LayerSpec, kernel: jax.Array, a: jax.Array, b: jax.Array,
              scale: float) -> jax.Array:
    """``W + s·AB`` in float32, in the kernel's layout (``(*stack, *kernel)``)."""
    return kernel.astype(jnp.float32) + scale * L.low_rank_kernel(spec, a, b).astype(jnp.float32)


def column_norm(spec: L.LayerSpec, v: jax.Array) -> jax.Array:
    """``‖v‖_c``: the norm of ``v (*stack, *kernel)`` over the input axis group, ``(*stack, *out)``."""
    s = v.ndim - len(spec.kernel_shape)
    return jnp.sqrt(jnp.sum(jnp.square(v), axis=tuple(s + i for i in spec.in_axes)))


def magnitude_init(spec: L.LayerSpec, kernel: jax.Array, a: jax.Array, b: jax.Array,
                   scale: float) -> jax.Array:
    """``m₀ = ‖W + s·AB‖_c`` (``‖W‖_c`` with ``B = 0``), as PEFT's ``update_layer``."""
    return column_norm(spec, direction(spec, kernel, a, b, scale))


def _keep(mask: jax.Array | None, like: jax.Array) -> jax.Array | None:
    """A ``layers=`` stack mask ``(stack[0], 1, …)`` reshaped to broadcast against ``like``."""
    if mask is None:
        return None
    return jnp.reshape(mask, (mask.shape[0],) + (1,) * (like.ndim - 1)) > 0


def factor(spec: L.LayerSpec, kernel: jax.Array, a: jax.Array, b: jax.Array, m: jax.Array,
           scale: float, keep: jax.Array | None = None, detach: bool = True) -> jax.Array:
    """``g = m / ‖W + s·AB‖_c`` (float32, ``(*stack, *out)``), the norm detached (paper §4.3);
    ``1`` where ``keep`` is false (layers of a stack that ``layers=`` leaves unadapted)."""
    low_rank = L.low_rank_kernel(spec, a, b).astype(jnp.float32)
    if detach:
        low_rank = jax.lax.stop_gradient(low_rank)
    norm = column_norm(spec, kernel.astype(jnp.float32) + scale * low_rank)
    if detach:
        norm = jax.lax.stop_gradient(norm)
    g = m.astype(jnp.float32) / norm
    return g if keep is None else jnp.where(keep, g, 1.0)


def _bias_like(spec: L.LayerSpec, bias: jax.Array, y: jax.Array) -> jax.Array:
    """The layer's bias shaped to broadcast against its output ``y`` (as the layer adds it)."""
    if spec.kind != "einsum":
        return bias  # Dense, DenseGeneral, Conv: the output group is the output's trailing axes
    _, k_spec, y_spec = L._einsum_parts(spec.einsum, spec.module, "")
    if "..." in y_spec:
        y_spec = y_spec.replace("...", "." * (y.ndim - len(y_spec) + 3))
    return jnp.reshape(bias, [y.shape[i] if c in k_spec else 1 for i, c in enumerate(y_spec)])


def adapt(call: Callable[[jax.Array], jax.Array], x: jax.Array, layer: Any,
          leaves: Mapping[str, jax.Array], scale: float, dropped: jax.Array | None = None,
          keep: jax.Array | None = None) -> jax.Array:
    """DoRA's layer output (module docstring): ``dropped`` is ``dropout(x)`` in training with
    dropout, else ``None``; ``keep`` a traced bool (``layers=`` inside a stack) or ``None``."""
    spec = layer.spec
    if layer.kernel is None:
        raise ValueError(f"lora.use_dora: the layer at '{layer.path}' was called without its kernel")
    if MAGNITUDE not in leaves:
        raise KeyError(f"lora.use_dora: the delta has no '{MAGNITUDE}' for '{layer.path}'; it was "
                       "made without use_dora (init the delta with the DoRA config)")
    a, b = leaves["lora_A"], leaves["lora_B"]
    g = factor(spec, layer.kernel, a, b, leaves[MAGNITUDE], scale, keep)
    y = call(x)
    inner = x if dropped is None else dropped
    if dropped is None:  # x·W: the layer's output less its bias
        base = y if layer.bias is None else y - _bias_like(spec, layer.bias, y).astype(y.dtype)
    else:  # x̃·W: the layer's operation on the dropped input, with its kernel
        base = L.apply_kernel(spec, dropped, layer.kernel.astype(dropped.dtype))
    update = L.expand(spec, L.contract(spec, inner, a.astype(inner.dtype)), b.astype(inner.dtype))
    return (y + L.scale_output(spec, base, g - 1.0)
            + L.scale_output(spec, (scale * update).astype(y.dtype), g)).astype(y.dtype)


def merge_kernel(spec: L.LayerSpec, kernel: jax.Array, a: jax.Array, b: jax.Array, m: jax.Array,
                 scale: float, mask: jax.Array | None = None) -> jax.Array:
    """``W' = m ⊙ (W + s·AB) / ‖W + s·AB‖_c`` in the stored kernel's layout and dtype."""
    v = direction(spec, kernel, a, b, scale)
    g = m.astype(jnp.float32) / column_norm(spec, v)
    g = g if mask is None else jnp.where(_keep(mask, g), g, 1.0)
    return (L.broadcast_group(spec, g, "out") * v).astype(kernel.dtype)


def unmerge_kernel(spec: L.LayerSpec, merged: jax.Array, a: jax.Array, b: jax.Array,
                   m: jax.Array, norm: jax.Array, scale: float,
                   mask: jax.Array | None = None) -> jax.Array:
    """``W = W' ‖W + s·AB‖_c / m − s·AB``, given the norms ``norm`` at merge time."""
    g = m.astype(jnp.float32) / norm.astype(jnp.float32)
    g = g if mask is None else jnp.where(_keep(mask, g), g, 1.0)
    low_rank = L.low_rank_kernel(spec, a, b).astype(jnp.float32)
    return (merged.astype(jnp.float32) / L.broadcast_group(spec, g, "out")
            - scale * low_rank).astype(merged.dtype)


def unmerge_error() -> ValueError:
    return ValueError(
        "lora.use_dora: merged DoRA weights do not determine the base weights (each column of "
        "W + s·AB can be rescaled without changing the merged kernel), so jpeft.unmerge cannot "
        "invert the merge. Keep the base parameters (jpeft.merge does not change them), or take "
        "the column norms before merging and invert with them: "
        "norms = jpeft.methods.dora.weight_norms(config, base, delta, info); "
        "base = jpeft.methods.dora.unmerge_with_norms(config, merged, delta, norms, info)")


def _layers(config: Any, delta: Any, flat: Mapping[str, jax.Array], info: ModelInfo | None):
    """``(kernel path, spec, leaves, scale, mask)`` of every adapted layer of a DoRA delta."""
    from jpeft.core.model import group_by_module
    from jpeft.methods.lora import _stack_mask, rank_and_scale

    if not getattr(config, "use_dora", False):
        raise ValueError("jpeft.methods.dora: the config is not a LoraConfig with use_dora=True")
    layers = resolve_info(info).layers
    for path, leaves in group_by_module(delta).items():
        key = L.kernel_path(path, layers, flat)
        spec = L.kernel_spec(path, jnp.shape(flat[key]), layers, "lora.use_dora")
        yield key, spec, leaves, rank_and_scale(config, path)[1], _stack_mask(config, spec)


def weight_norms(config: Any, base: P.Params, delta: Any,
                 info: ModelInfo | None = None) -> dict[str, jax.Array]:
    """``{module path: ‖W + s·AB‖_c (*stack, *out)}``: what :func:`unmerge_with_norms` needs;
    take it from the base before merging (``config``: the ``LoraConfig`` with ``use_dora``)."""
    flat = P.flatten(base)
    return {key.rpartition("/")[0]: column_norm(spec, direction(spec, flat[key], leaves["lora_A"],
                                                                leaves["lora_B"], scale))
            for key, spec, leaves, scale, _ in _layers(config, delta, flat, info)}


def unmerge_with_norms(config: Any, params: P.Params, delta: Any, norms: Mapping[str, jax.Array],
                       info: ModelInfo | None = None) -> P.Params:
    """The inverse of ``jpeft.merge`` for a DoRA delta, given :func:`weight_norms` of the base."""
    flat = dict(P.flatten(params))
    for key, spec, leaves, scale, mask in _layers(config, delta, flat, info):
        path = key.rpartition("/")[0]
        if path not in norms:
            raise KeyError(f"unmerge_with_norms: no norm for '{path}'; pass weight_norms(config, "
                           "base, delta, info) of the same delta")
        flat[key] = unmerge_kernel(spec, flat[key], leaves["lora_A"], leaves["lora_B"],
                                   leaves[MAGNITUDE], norms[path], scale, mask)
    return P.unflatten(flat)
