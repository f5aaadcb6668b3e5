"""Deterministic, length-bucketed batching of tokenised splits (GLUE, E2E, ...).

A split is any object with ``len()`` and ``lengths`` (``(N,)`` real tokens per example). An
epoch's plan (:func:`batch_plan`) is a list of ``(example indices, padded length)``, a function
of ``(seed, epoch)`` only, so a resumed run replays the same batches; :func:`padded_batches` cuts
the columns of the split to those rows and lengths.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np


class Split(Protocol):
    lengths: np.ndarray

    def __len__(self) -> int: ...


def default_buckets(max_length: int) -> tuple[int, ...]:
    """Powers of two from 16 below ``max_length``, then ``max_length`` (128 -> (16, 32, 64, 128))."""
    buckets: list[int] = []
    b = 16
    while b < max_length:
        buckets.append(b)
        b *= 2
    return (*buckets, int(max_length))


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= ``length`` (ValueError when it exceeds the largest bucket)."""
    for b in sorted(buckets):
        if b >= length:
            return int(b)
    raise ValueError(f"length {length} exceeds the largest bucket {max(buckets)}; the last bucket "
                     "must be >= max_length")


def num_batches(n: int, batch_size: int, drop_remainder: bool = False) -> int:
    """Batches in an epoch of ``n`` examples (without length grouping)."""
    return n // batch_size if drop_remainder else -(-n // batch_size)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The example order of one epoch: ``default_rng((seed, epoch)).permutation(n)`` or 0..n-1."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng((seed, epoch)).permutation(n)


def batch_plan(enc: Split, batch_size: int, *, buckets: Sequence[int], shuffle: bool,
               seed: int = 0, epoch: int = 0, drop_remainder: bool = False,
               group_by_length: bool = False) -> list[tuple[np.ndarray, int]]:
    """One epoch's batches as ``(example indices, padded length)``; a function of (seed, epoch).

    By default consecutive examples of :func:`epoch_order` form a batch, padded to the bucket of
    its longest example. With ``group_by_length`` the ordered examples are split by length bucket
    and batched within a bucket (at most one short batch per bucket, so the count can exceed
    :func:`num_batches`; use :func:`num_epoch_batches`), then the batch order is shuffled with
    ``default_rng((seed, epoch, 1))``: less padding.
    """
    order = epoch_order(len(enc), seed, epoch, shuffle)
    if group_by_length:
        target = np.array([bucket_length(int(l), buckets) for l in enc.lengths[order]], dtype=int)
        groups = [order[target == b] for b in sorted(set(target.tolist()))]
    else:
        groups = [order]
    plan: list[tuple[np.ndarray, int]] = []
    for group in groups:
        stop = len(group) - len(group) % batch_size if drop_remainder else len(group)
        for start in range(0, stop, batch_size):
            idx = group[start:start + batch_size]
            plan.append((idx, bucket_length(int(enc.lengths[idx].max()), buckets)))
    if shuffle and group_by_length:
        perm = np.random.default_rng((seed, epoch, 1)).permutation(len(plan))
        plan = [plan[i] for i in perm]
    return plan


def num_epoch_batches(enc: Split, batch_size: int, *, buckets: Sequence[int],
                      drop_remainder: bool = False, group_by_length: bool = False) -> int:
    """Batches per epoch of :func:`iterate_batches` with the same arguments (any seed/epoch)."""
    if not group_by_length:
        return num_batches(len(enc), batch_size, drop_remainder)
    return len(batch_plan(enc, batch_size, buckets=buckets, shuffle=False,
                          drop_remainder=drop_remainder, group_by_length=True))


def padded_batches(columns: Mapping[str, tuple[np.ndarray, Any]], plan: Sequence[tuple[np.ndarray, int]],
                   batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Batches of ``batch_size`` rows for each ``(indices, length)`` of ``plan``.

    ``columns`` maps a batch key to ``(array, fill)``: arrays of rank 2 ``(N, L)`` are cut or
    padded with ``fill`` to the planned length, rank-1 arrays ``(N,)`` are taken per row
    (``fill`` unused). A short batch is filled up to ``batch_size`` with copies of its first row;
    ``weights`` (float32, ``(batch_size,)``) is 1 for real rows and 0 for those copies.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for idx, length in plan:
        real = len(idx)
        rows = np.concatenate([idx, np.repeat(idx[:1], batch_size - real)]) if real < batch_size else idx
        batch: dict[str, np.ndarray] = {}
        for key, (array, fill) in columns.items():
            if array.ndim == 1:
                batch[key] = array[rows]
                continue
            out = array[rows, :length]
            if out.shape[1] < length:  # the split is narrower than the bucket
                out = np.pad(out, ((0, 0), (0, length - out.shape[1])), constant_values=fill)
            batch[key] = out
        weights = np.zeros(batch_size, np.float32)
        weights[:real] = 1.0
        batch["weights"] = weights
        yield batch
