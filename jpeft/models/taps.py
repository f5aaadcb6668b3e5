"""Named taps: identity points in a model where activation-space methods attach.

A tap is a tiny Linen module whose ``__call__`` returns its inputs unchanged. Transforms intercept
it (``nn.intercept_methods``) by :attr:`Tap.kind` and :attr:`Tap.layer`, so a model never knows
which method is attached. Every model family exposes the same kinds:

=====================  ============================================  ==================================
kind                   arguments (and return value)                  used by
=====================  ============================================  ==================================
``embed.inputs``       ``embeds (B,T,D), mask (B,T), types (B,T)``   prompt tuning, P-tuning (prepend
                       token embeddings before position/type         tokens; T may grow)
                       embeddings are added
``embed.positions``    ``offset``, a Python int (0): the position    prefix tuning, P-tuning v2 with
                       of the first input token (after any tokens    ``peft_positions``: ``offset + P``
                       ``embed.inputs`` prepends); a KV cache's      (transformers numbers the tokens
                       continuation is not tapped                    after ``past_key_values``)
``attn.kv``            ``key (B,S,Hkv,Dh), value (B,S,Hkv,Dh),       prefix tuning, P-tuning v2 (S may
                       mask (B,S)``                                  grow)
``attn.out``           ``h (B,T,D)``: attention output projection,   Houlsby adapters
                       before the residual add and LayerNorm
``ffn.hidden``         ``h (B,T,I)``: FFN activation                 (IA)³
``ffn.out``            ``h (B,T,D)``: FFN output projection,         Houlsby / Pfeiffer adapters
                       before the residual add and LayerNorm
=====================  ============================================  ==================================

A model jpeft did not write gets the same attachment points with one call each: ``Tap(kind,
layer=i)(h)`` inside a Linen ``@nn.compact`` method, or an :class:`NnxTap` attribute of an NNX
module (``self.ffn_tap = NnxTap("ffn.out", layer=i)``, then ``h = self.ffn_tap(h)``).

Inside an ``nn.scan`` / ``nnx.scan`` body the layer number is a traced scalar (the scanned
``jnp.arange(num_layers)``, or a carried counter): ``Tap(kind, layer=i)(h)`` and
``NnxTap(kind, layer=i)(h)`` take it as it is. A method then picks its layer's parameters with
:func:`layer_entry`, which indexes them by the traced number, so layer ``i`` of the stack runs
with its own parameters, as a stacked kernel is sliced.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

EMBED_INPUTS = "embed.inputs"
EMBED_POSITIONS = "embed.positions"
ATTN_KV = "attn.kv"
ATTN_OUT = "attn.out"
FFN_HIDDEN = "ffn.hidden"
FFN_OUT = "ffn.out"
KINDS = (EMBED_INPUTS, EMBED_POSITIONS, ATTN_KV, ATTN_OUT, FFN_HIDDEN, FFN_OUT)


class Tap(nn.Module):
    """Identity; see the module docstring. ``layer`` is ``None`` outside the layer stack."""

    kind: str
    layer: int | jax.Array | None = None

    def __call__(self, *args: Any) -> Any:
        return args[0] if len(args) == 1 else args


class NnxTap(nnx.Module):
    """The NNX form of :class:`Tap`: identity, unless a method attached to its kind."""

    def __init__(self, kind: str, layer: int | None = None):
        if kind not in KINDS:
            raise ValueError(f"unknown tap kind {kind!r}; the kinds are {list(KINDS)}")
        self.kind = kind
        self.layer = layer

    def __call__(self, *args: Any) -> Any:
        call = lambda *a: a[0] if len(a) == 1 else a
        context = _NnxContext(self)
        for intercept in (_NNX_INTERCEPTORS[-1] if _NNX_INTERCEPTORS else ()):
            call = (lambda inner, fn: lambda *a, **k: fn(inner, a, k, context))(call, intercept)
        return call(*args)


class _NnxContext:
    """What a Linen interceptor reads of its context (``module``, ``method_name``)."""

    method_name = "__call__"

    def __init__(self, module: Any):
        self.module = module


_NNX_INTERCEPTORS: list[Sequence[Any]] = []  # the interceptors of the NNX calls being traced


def layer_entry(entries: Mapping[int, Any], layer: int | jax.Array) -> tuple[Any, Any]:
    """A method's parameters for the tap's ``layer``: ``(entry, present)``.

    ``entries`` maps layer numbers to pytrees (the layers the method adapts). For a Python int,
    ``(entries[layer], True)`` or ``(None, False)``. For a traced layer number (a tap inside a
    scan body), the entries are stacked and indexed by it: a layer without an entry gets an
    all-zero pytree and ``present`` is a traced ``False`` (the method then leaves that layer
    unchanged, e.g. a zero adapter is the identity).
    """
    if not isinstance(layer, jax.Array):
        entry = entries.get(int(layer))
        return entry, entry is not None
    if not entries:
        return None, False
    keys = sorted(entries)
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack([*xs, jnp.zeros_like(xs[0])]),
                                     *(entries[k] for k in keys))
    hits = jnp.asarray(keys) == layer
    row = jnp.where(hits.any(), jnp.argmax(hits), len(keys))
    return jax.tree_util.tree_map(lambda x: x[row], stacked), hits.any()


def is_tap(context: Any, kind: str) -> bool:
    """Whether an interceptor ``context`` is a call of a tap of this kind (Linen or NNX)."""
    module = context.module
    return (isinstance(module, (Tap, NnxTap)) and module.kind == kind
            and context.method_name == "__call__")


EXAMPLE = {
    EMBED_INPUTS: ("embeds, mask, types = jpeft.Tap('embed.inputs')(embeds, mask, types)  "
                   "# before position embeddings"),
    EMBED_POSITIONS: ("offset = jpeft.Tap('embed.positions')(0)  # positions = offset + 0, 1, ... "
                      "(a Python int)"),
    ATTN_KV: "k, v, mask = jpeft.Tap('attn.kv', layer=i)(k, v, mask)  # k, v: (B, S, H, Dh)",
    ATTN_OUT: "h = jpeft.Tap('attn.out', layer=i)(h)  # attention output, before the residual",
    FFN_HIDDEN: "h = jpeft.Tap('ffn.hidden', layer=i)(h)  # the FFN activation",
    FFN_OUT: "h = jpeft.Tap('ffn.out', layer=i)(h)  # FFN output, before the residual",
}


def require_taps(taps: Mapping[str, int] | None, method: str, kinds: Sequence[str]) -> None:
    """Raise, with the lines to add, when a described model (``taps`` known) lacks a kind."""
    if taps is None:
        return
    missing = [k for k in kinds if not taps.get(k)]
    if missing:
        lines = "\n".join(f"    {EXAMPLE[k]}" for k in missing)
        raise ValueError(
            f"{method} attaches to the tap(s) {missing}, which this model never calls. Add one "
            f"call per place (and per layer i) in the model's code, e.g. in a Linen "
            f"@nn.compact method:\n{lines}\n(NNX: create jpeft.NnxTap(kind, layer=i) in "
            "__init__ and call it at that place.) Then describe the model again with "
            "jpeft.from_linen / jpeft.from_nnx and example inputs.")
