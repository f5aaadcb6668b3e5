"""Bottleneck adapters: Houlsby et al. (2019, arXiv:1902.00751) and Pfeiffer et al. (2021,
arXiv:2005.00247).

An adapter is a small residual bottleneck MLP inserted into the activations of a frozen layer:

    h' = h + f(h W_down + b_down) W_up + b_up,
    W_down (d, m),  b_down (m,),  W_up (m, d),  b_up (d,),  f ∈ {relu, gelu, tanh, swish}

with ``d`` the hidden size and ``m`` the bottleneck size (``AdapterConfig.size``): ``2·m·d + d + m``
parameters per adapter. ``h`` is a sub-layer's output after its output projection (and dropout),
*before* the residual add and LayerNorm: the model taps ``attn.out`` and ``ffn.out`` of
:mod:`jpeft.models.taps`.

* :func:`houlsby`: two adapters per layer, at ``attn.out`` and at ``ffn.out`` (Houlsby et al.,
  Fig. 2). The paper also trains the LayerNorm parameters; set ``train_layer_norm=True`` for that
  (off by default, so counts compare with the adapter-only formula).
* :func:`pfeiffer`: one adapter per layer, at ``ffn.out`` only (Pfeiffer et al.'s configuration
  found best in AdapterFusion). This is the placement of that configuration; the
  ``adapter-transformers`` library's extra residual/LayerNorm re-ordering details are not modelled.

Init: ``W_down ~ normal(init_scale)`` (Houlsby et al. use a near-zero Gaussian, std 1e-2), ``W_up``
and both biases zero, so a fresh delta is **exactly the identity**. Adapters act on activations:
they are **not mergeable** (``merge is None``).

Delta layout, keyed by layer and tap::

    {"layer_3": {"attn_out": {"down": {"kernel": (d, m), "bias": (m,)},
                              "up":   {"kernel": (m, d), "bias": (d,)}},
                 "ffn_out":  {...}}, ...}

Biases are labelled ``"no_decay"`` (as the Hugging Face Trainer treats biases), kernels
``"default"``. When two adapter transforms sit on the same tap (``compose(houlsby(), pfeiffer())``)
they run in sequence: the later one adapts the earlier one's output.

Example::

    method = jpeft.houlsby(AdapterConfig(size=64, activation="swish"))
    delta = method.init(jax.random.key(0), base, model.info())
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import chex
import jax
import jax.numpy as jnp

from jpeft.core import paths as P
from jpeft.core.registry import register
from jpeft.core.transform import ApplyContext, ModelInfo, Transform, resolve_info
from jpeft.core.paths import layer_index
from jpeft.models.common import linear
from jpeft.models.taps import ATTN_OUT, FFN_OUT, is_tap, layer_entry, require_taps

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "tanh": jnp.tanh,
    "swish": jax.nn.silu,
}
PLACEMENTS = (ATTN_OUT, FFN_OUT)
HOULSBY_PLACEMENT = (ATTN_OUT, FFN_OUT)
PFEIFFER_PLACEMENT = (FFN_OUT,)


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    size: int = dataclasses.field(default=64, metadata={"help": "bottleneck size m"})
    activation: str = dataclasses.field(
        default="relu", metadata={"help": "bottleneck non-linearity: relu, gelu, tanh or swish"}
    )
    init_scale: float = dataclasses.field(
        default=1e-2, metadata={"help": "std of the normal init of the down projection (up is zero)"}
    )
    layers: tuple[int, ...] = dataclasses.field(
        default=(), metadata={"help": "only these layer indices (empty: all layers)"}
    )
    placement: tuple[str, ...] = dataclasses.field(
        default=(),
        metadata={"help": "taps that get an adapter (attn.out, ffn.out); empty: the factory's "
                          "placement (houlsby: both, pfeiffer: ffn.out)"},
    )
    train_layer_norm: bool = dataclasses.field(
        default=False, metadata={"help": "also train the LayerNorms of adapted layers (Houlsby et al. do)"}
    )

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"adapter.size must be an integer >= 1, got {self.size!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"adapter.activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}"
            )
        if not self.init_scale > 0.0:
            raise ValueError(f"adapter.init_scale must be > 0, got {self.init_scale}")
        P.check_layer_indices("adapter", self.layers)
        bad = [p for p in self.placement if p not in PLACEMENTS]
        if bad or len(set(self.placement)) != len(self.placement):
            raise ValueError(
                f"adapter.placement must be distinct tap kinds among {list(PLACEMENTS)}, "
                f"got {list(self.placement)}"
            )


def tap_key(kind: str) -> str:
    """Delta key of a tap kind: ``"attn.out"`` -> ``"attn_out"``."""
    return kind.replace(".", "_")


def adapter_forward(h: jax.Array, params: dict[str, Any], activation: str) -> jax.Array:
    """``h + f(h W_down + b_down) W_up + b_up`` for ``h (..., d)``."""
    down, up = params["down"], params["up"]
    d, m = h.shape[-1], (jnp.shape(down["kernel"]) or (-1,))[-1]
    got = {f"{a}/{b}": jnp.shape(params[a][b]) for a in ("down", "up") for b in ("kernel", "bias")}
    want = {"down/kernel": (d, m), "down/bias": (m,), "up/kernel": (m, d), "up/bias": (d,)}
    if got != want:
        raise ValueError(f"adapter: the delta's bottleneck shapes {got} do not fit the model's hidden size {d}: "
                         f"expected {want} (size m = down/kernel's last axis). Was the delta made for "
                         "another model? Init it with this transform on this model's parameters")
    dtype = h.dtype
    z = linear(h, down["kernel"].astype(dtype)) + down["bias"].astype(dtype)
    z = ACTIVATIONS[activation](z)
    return h + (linear(z, up["kernel"].astype(dtype)) + up["bias"].astype(dtype))


def _layers(config: AdapterConfig, info: ModelInfo) -> list[int]:
    if not config.layers:
        return list(range(info.num_layers))
    bad = [i for i in config.layers if i >= info.num_layers]
    if bad:
        raise ValueError(
            f"adapter.layers={list(config.layers)}: the model has layers 0..{info.num_layers - 1}, "
            f"no layer {bad}"
        )
    return sorted(config.layers)


def adapters(config: AdapterConfig, *, placement: tuple[str, ...], name: str) -> Transform:
    """Bottleneck adapters at the given taps (``config.placement`` overrides when non-empty)."""
    if not config.placement:
        config = dataclasses.replace(config, placement=tuple(placement))
    kinds = tuple(config.placement)

    def init(rng: jax.Array, base: P.Params, info: ModelInfo | None = None) -> dict[str, Any]:
        info = resolve_info(info)
        require_taps(info.taps, name, kinds)
        info.require(name, "hidden_size", "num_layers")
        d, m = info.hidden_size, config.size
        layers = _layers(config, info)
        keys = jax.random.split(rng, len(layers) * len(kinds)).reshape(len(layers), len(kinds))
        delta: dict[str, Any] = {}
        for i, layer_keys in zip(layers, keys):
            delta[f"layer_{i}"] = {
                tap_key(kind): {
                    "down": {"kernel": config.init_scale * jax.random.normal(k, (d, m), jnp.float32),
                             "bias": jnp.zeros((m,), jnp.float32)},
                    "up": {"kernel": jnp.zeros((m, d), jnp.float32),
                           "bias": jnp.zeros((d,), jnp.float32)},
                }
                for kind, k in zip(kinds, layer_keys)
            }
        return delta

    def interceptors(delta: Any, ctx: ApplyContext) -> list[Any]:
        keys = {tap_key(k) for k in kinds}
        bad = [k for k, v in delta.items() if not re.fullmatch(r"layer_\d+", str(k))
               or not isinstance(v, Mapping) or not set(v) <= keys]
        if bad:
            raise KeyError(f"{name}: the delta has entries {sorted(map(str, bad))[:5]}; an adapter delta is "
                           f"{{'layer_<i>': {{{' or '.join(sorted(keys))}: {{'down', 'up'}}}}}}. Was it made by "
                           "another method (or with another placement)? Apply a delta with the transform "
                           "that made it")

        def intercept(next_fun, args, kwargs, context):
            kind = next((k for k in kinds if is_tap(context, k)), None)
            if kind is None or context.module.layer is None:
                return next_fun(*args, **kwargs)
            # a traced layer number (a tap in a scan body) indexes the stacked layers' adapters
            entries = {int(k[len("layer_"):]): v[tap_key(kind)] for k, v in delta.items()
                       if tap_key(kind) in v}
            entry, _ = layer_entry(entries, context.module.layer)
            if entry is None:
                return next_fun(*args, **kwargs)
            h = next_fun(*args, **kwargs)
            chex.assert_rank(h, 3)
            return adapter_forward(h, entry, config.activation)

        return [intercept]

    def trainable_base(base: P.Params) -> list[str]:
        if not config.train_layer_norm:
            return []
        norm = re.compile(r"(LayerNorm|layer_norm|norm)[^/]*/(scale|bias)$")
        wanted = set(config.layers)
        found = [p for p in P.paths(base)
                 if norm.search(p) and layer_index(p) is not None
                 and (not wanted or layer_index(p) in wanted)]
        if not found:
            raise P.no_match_error(f"{name}.train_layer_norm", norm.pattern, P.paths(base))
        return found

    def labels(delta: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "no_decay" if getattr(path[-1], "key", None) == "bias" else "default",
            delta,
        )

    return Transform(
        name=name,
        config=config,
        init=init,
        interceptors=interceptors,
        trainable_base=trainable_base,
        labels=labels,
    )


def houlsby(config: AdapterConfig = AdapterConfig(), *, name: str = "houlsby") -> Transform:
    """Houlsby adapters: after the attention and the FFN output projections of every layer."""
    return adapters(config, placement=HOULSBY_PLACEMENT, name=name)


def pfeiffer(config: AdapterConfig = AdapterConfig(), *, name: str = "pfeiffer") -> Transform:
    """Pfeiffer adapters: after the FFN output projection of every layer only."""
    return adapters(config, placement=PFEIFFER_PLACEMENT, name=name)


register("houlsby", AdapterConfig, houlsby)
register("pfeiffer", AdapterConfig, pfeiffer)
