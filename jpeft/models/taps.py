"""Named taps: identity points in a model where activation-space methods attach.

A tap is a tiny Linen module whose ``__call__`` returns its inputs unchanged. Transforms intercept
it (``nn.intercept_methods``) by :attr:`Tap.kind` and :attr:`Tap.layer`, so a model never knows
which method is attached. Every model family exposes the same kinds:

=================  ===========================================  ==================================
kind               arguments (and return value)                 used by
=================  ===========================================  ==================================
``embed.inputs``   ``embeds (B,T,D), mask (B,T), types (B,T)``  prompt tuning, P-tuning (prepend
                   token embeddings before position/type         tokens; T may grow)
                   embeddings are added
``attn.kv``        ``key (B,S,Hkv,Dh), value (B,S,Hkv,Dh),     prefix tuning, P-tuning v2 (S may
                   mask (B,S)``                                  grow)
``attn.out``       ``h (B,T,D)``: attention output projection,  Houlsby adapters
                   before the residual add and LayerNorm
``ffn.hidden``     ``h (B,T,I)``: FFN activation                (IA)³
``ffn.out``        ``h (B,T,D)``: FFN output projection,        Houlsby / Pfeiffer adapters
                   before the residual add and LayerNorm
=================  ===========================================  ==================================
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

EMBED_INPUTS = "embed.inputs"
ATTN_KV = "attn.kv"
ATTN_OUT = "attn.out"
FFN_HIDDEN = "ffn.hidden"
FFN_OUT = "ffn.out"
KINDS = (EMBED_INPUTS, ATTN_KV, ATTN_OUT, FFN_HIDDEN, FFN_OUT)


class Tap(nn.Module):
    """Identity; see the module docstring. ``layer`` is ``None`` outside the layer stack."""

    kind: str
    layer: int | None = None

    def __call__(self, *args: Any) -> Any:
        return args[0] if len(args) == 1 else args


def is_tap(context: Any, kind: str) -> bool:
    """Whether an interceptor ``context`` is a call of a tap of this kind."""
    module = context.module
    return isinstance(module, Tap) and module.kind == kind and context.method_name == "__call__"
