"""Does a delta fit its transform on this base? The keys, shapes and dtypes ``transform.init``
would make, compared with a given delta (one built by hand, filtered, loaded from elsewhere).

``jpeft.apply`` runs a delta as it is: a delta missing some modules adapts the others only, one
of another rank fails inside the layer. :func:`check_delta` says, before that, what differs; the
adapter loaders and savers run the same comparison on every file.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jpeft.core import paths as P
from jpeft.core.transform import ModelInfo, Transform


def expected_deltas(transform: Transform, base: P.Params, info: ModelInfo | None = None
                    ) -> list[dict[str, Any]]:
    """The flat ``{path: ShapeDtypeStruct}`` of the delta ``transform`` makes on ``base``, as
    trained and as finalized (those that can be computed abstractly: ``jax.eval_shape``)."""
    out = []
    for make in (lambda key: transform.init(key, base, info),
                 lambda key: transform.finalize(transform.init(key, base, info))):
        try:
            shapes = P.flatten(jax.eval_shape(make, jax.random.key(0)))
        except Exception:  # noqa: BLE001 (a method whose init needs more than shapes: not checked)
            continue
        if shapes not in out:
            out.append(shapes)
    return out


def delta_problems(delta: Any, expected: list[dict[str, Any]]) -> list[str]:
    """What differs between ``delta`` and the closest of ``expected`` (empty: it fits)."""
    if not expected:
        return []
    flat = P.flatten(delta)
    best = min(expected, key=lambda e: len(set(e) ^ set(flat)))
    missing, unexpected = sorted(set(best) - set(flat)), sorted(set(flat) - set(best))
    problems = []
    if missing:
        problems.append(f"missing tensors {['delta/' + k for k in missing[:6]]}"
                        f"{f' and {len(missing) - 6} more' if len(missing) > 6 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors {['delta/' + k for k in unexpected[:6]]}"
                        f"{f' and {len(unexpected) - 6} more' if len(unexpected) > 6 else ''}")
    for key in sorted(set(best) & set(flat)):
        got, want = flat[key], best[key]
        if tuple(jnp.shape(got)) != tuple(want.shape) or jnp.result_type(got) != jnp.dtype(want.dtype):
            problems.append(f"delta/{key} is {tuple(jnp.shape(got))} {jnp.result_type(got).name}, the "
                            f"method expects {tuple(want.shape)} {jnp.dtype(want.dtype).name}")
            if len(problems) >= 4:
                break
    return problems


def check_delta(transform: Transform, base: P.Params, delta: Any, info: ModelInfo | None = None) -> None:
    """Raise ``ValueError`` naming every missing or unexpected tensor of ``delta`` and every one
    of another shape or dtype than ``transform.init(key, base, info)`` makes."""
    problems = delta_problems(delta, expected_deltas(transform, base, info))
    if problems:
        raise ValueError(f"the delta does not fit {transform.name} ({transform.config}) on this base: "
                         + "; ".join(problems) + ". Was it made with this config on this model? "
                         "Make deltas with transform.init(key, base, model.info())")
