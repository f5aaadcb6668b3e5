"""Device meshes and sharding rules for the train step (``jax.sharding``, nothing home-made).

The mesh has two axes: ``data`` (the batch is split along it) and ``fsdp`` (large weights are
split along it). The rule for a parameter leaf, in order:

1. the first ``(regex, spec)`` of ``rules`` whose regex matches the leaf's path gives its
   ``PartitionSpec`` (e.g. ``(r"word_embeddings", P("fsdp", None))``);
2. a leaf with fewer than ``min_shard_size`` elements is replicated (LoRA factors, biases,
   LayerNorm scales: splitting them saves nothing and costs collectives);
3. otherwise the leaf is split over ``fsdp`` along its largest dimension that ``fsdp`` divides
   (replicated when none does).

The frozen base, the trainable tree and the optimizer state all follow this rule (optimizer
moments have their parameter's shape, hence its sharding); the batch is split over ``data``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Rules = Sequence[tuple[str, P]]
DATA, FSDP = "data", "fsdp"


def make_mesh(spec: str | dict[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``(data, fsdp)`` mesh from ``"data=4,fsdp=2"`` (default: every device on ``data``).

    A size of ``-1`` takes the devices left over. The product must equal the device count.
    """
    devices = list(devices if devices is not None else jax.devices())
    sizes = {DATA: -1, FSDP: 1}
    if isinstance(spec, str) and spec.strip():
        for part in spec.split(","):
            name, _, value = part.partition("=")
            name = name.strip()
            if name not in sizes:
                raise ValueError(f"mesh axis {name!r} unknown; use data and fsdp (e.g. 'data=4,fsdp=2')")
            sizes[name] = int(value)
    elif isinstance(spec, dict):
        sizes.update(spec)
    known = int(np.prod([s for s in sizes.values() if s != -1]))
    for name, size in sizes.items():
        if size == -1:
            sizes[name] = len(devices) // max(known, 1)
    if sizes[DATA] * sizes[FSDP] != len(devices):
        raise ValueError(f"mesh {sizes} needs {sizes[DATA] * sizes[FSDP]} devices, "
                         f"{len(devices)} are available")
    grid = np.asarray(devices, dtype=object).reshape(sizes[DATA], sizes[FSDP])
    return Mesh(grid, (DATA, FSDP))


def leaf_spec(path: str, shape: tuple[int, ...], mesh: Mesh, rules: Rules = (),
              min_shard_size: int = 2**16) -> P:
    """The ``PartitionSpec`` of one parameter leaf (see the module docstring)."""
    for pattern, spec in rules:
        if re.search(pattern, path):
            return spec
    fsdp = mesh.shape[FSDP]
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_shard_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp == 0:
            return P(*[FSDP if d == dim else None for d in range(len(shape))])
    return P()


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules = (), min_shard_size: int = 2**16) -> Any:
    """A ``NamedSharding`` for every array leaf of ``tree`` (scalars and keys replicated)."""

    def one(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
        return NamedSharding(mesh, leaf_spec(name, shape, mesh, rules, min_shard_size))

    return jax.tree_util.tree_map_with_path(one, tree)


def delta_rules(transform: Any, delta: Any, base: Any, info: Any, mesh: Mesh, rules: Rules = (),
                min_shard_size: int = 2**16) -> list[tuple[str, P]]:
    """Rules that partition every delta leaf of a method with a ``delta_layout`` as its kernel
    is partitioned (by ``rules`` and the size rule): LoRA's ``A (*stack, *in, r)`` takes the
    kernel's input-axis partition, ``B (*stack, r, *out)`` its output-axis partition, (IA)³'s
    vectors the partition of their axis. Each rule matches the leaf's path in the trainable
    tree and in the optimizer state (``.../delta/<part>/<module>/<leaf>``)."""
    from jpeft.core import layers as L
    from jpeft.core import paths as PT
    from jpeft.core.model import group_by_module

    flat_base = PT.flatten(base)
    parts = transform.parts or (transform,)
    out: list[tuple[str, P]] = []
    for part in parts:
        if part.delta_layout is None:
            continue
        sub = delta[part.name] if transform.parts else delta
        prefix = f"{part.name}/" if transform.parts else ""
        for module, leaves in group_by_module(sub).items():
            kernel_path = L.kernel_path(module, info.layers, flat_base)
            kernel = flat_base[kernel_path]
            spec = L.kernel_spec(module, kernel.shape, info.layers, part.name)
            kernel_spec = leaf_spec(kernel_path, tuple(kernel.shape), mesh, rules, min_shard_size)
            for leaf in leaves:
                pspec = L.follow_kernel(spec, tuple(kernel_spec), part.delta_layout(module, leaf))
                out.append((f"(^|/)delta/{re.escape(prefix + module)}/{re.escape(leaf)}$", P(*pspec)))
    return out


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Split the leading (batch) axis over ``data``."""
    return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
