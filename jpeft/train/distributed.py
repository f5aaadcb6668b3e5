"""Multi-process (multi-host) training: ``jax.distributed`` set-up and per-process batch slices.

Every process runs the same program; :func:`initialize` connects them (``jax.distributed``),
after which ``jax.devices()`` lists the devices of all processes and a mesh
(:func:`jpeft.train.sharding.make_mesh`) spans them. Each process then feeds only its own rows
of every global batch (:func:`process_rows`); :meth:`jpeft.train.trainer.Trainer.shard_batch`
assembles the global array with ``jax.make_array_from_process_local_data``.

Settings, first found wins (per argument):

1. the arguments of :func:`initialize` (``experiments.glue``: ``--coordinator-address``,
   ``--num-processes``, ``--process-id``);
2. the environment variables ``JPEFT_COORDINATOR`` (``host:port`` of process 0),
   ``JPEFT_NUM_PROCESSES``, ``JPEFT_PROCESS_ID`` and ``JPEFT_LOCAL_DEVICE_IDS`` (``0,1,...``);
3. JAX's own: ``JAX_COORDINATOR_ADDRESS`` (with ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``
   read here, ``JAX_LOCAL_DEVICE_IDS`` by JAX) or a cluster JAX auto-detects (SLURM, Open MPI,
   TPU pods ...): set ``JPEFT_DISTRIBUTED=auto`` to call ``jax.distributed.initialize()`` with no
   arguments and let JAX detect it (SLURM / Open MPI jobs of several tasks are detected here too).

Nothing set, or one process: a no-op (single-process training, the default). On CPU the
cross-process collectives use gloo (``jax_cpu_collectives_implementation``; the default in
jax 0.10, set explicitly here so that an older default cannot silently fail).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax

_initialized_here = False


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def _auto_cluster() -> bool:
    """Whether the environment asks for JAX's cluster auto-detection."""
    if os.environ.get("JPEFT_DISTRIBUTED", "").lower() == "auto":
        return True
    for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        size = _env_int(name)
        if size is not None and size > 1:
            return True
    return False


def settings(coordinator_address: str | None = None, num_processes: int | None = None,
             process_id: int | None = None, local_device_ids: Sequence[int] | None = None
             ) -> dict[str, Any]:
    """The resolved ``jax.distributed.initialize`` arguments (see the module docstring)."""
    coordinator_address = (coordinator_address or os.environ.get("JPEFT_COORDINATOR")
                           or os.environ.get("JAX_COORDINATOR_ADDRESS") or None)
    if num_processes is None:
        num_processes = _env_int("JPEFT_NUM_PROCESSES")
    if num_processes is None:
        num_processes = _env_int("JAX_NUM_PROCESSES")
    if process_id is None:
        process_id = _env_int("JPEFT_PROCESS_ID")
    if process_id is None:
        process_id = _env_int("JAX_PROCESS_ID")
    if local_device_ids is None and os.environ.get("JPEFT_LOCAL_DEVICE_IDS"):
        local_device_ids = [int(x) for x in os.environ["JPEFT_LOCAL_DEVICE_IDS"].split(",")]
    return {"coordinator_address": coordinator_address, "num_processes": num_processes,
            "process_id": process_id,
            "local_device_ids": list(local_device_ids) if local_device_ids is not None else None}


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: Sequence[int] | None = None,
               *, timeout_s: int = 300) -> bool:
    """Connect this process to the others (``jax.distributed.initialize``).

    Must run before anything touches a device (``jax.devices()``, the first array). Returns
    ``True`` if the process joined a multi-process run, ``False`` for the single-process no-op
    (nothing configured, or ``num_processes == 1``). Calling it again is a no-op.
    """
    global _initialized_here
    if _initialized_here or jax.distributed.is_initialized():
        return True
    s = settings(coordinator_address, num_processes, process_id, local_device_ids)
    if s["num_processes"] == 1:
        return False
    explicit = any(v is not None for v in s.values())
    if not explicit and not _auto_cluster():
        return False
    if explicit and s["coordinator_address"] is not None and (
            s["num_processes"] is None or s["process_id"] is None) and not _auto_cluster():
        raise ValueError(
            "multi-process training needs the coordinator address, the number of processes and "
            f"this process's id; got {s} (set --num-processes/--process-id or "
            "JPEFT_NUM_PROCESSES/JPEFT_PROCESS_ID)")
    if s["process_id"] is not None and s["num_processes"] is not None and not (
            0 <= s["process_id"] < s["num_processes"]):
        raise ValueError(f"process id {s['process_id']} is outside [0, {s['num_processes']})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**({k: v for k, v in s.items() if v is not None} if explicit else {}),
                               initialization_timeout=timeout_s)
    _initialized_here = True
    return True


def shutdown() -> None:
    """Disconnect (``jax.distributed.shutdown``); a no-op when not initialised."""
    global _initialized_here
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()
    _initialized_here = False


def process_rows(batch: Mapping[str, Any], index: int | None = None, count: int | None = None
                 ) -> dict[str, Any]:
    """This process's rows ``[index·B/count, (index+1)·B/count)`` of every array of a global batch.

    ``index``/``count`` default to ``jax.process_index()`` / ``jax.process_count()``. With the
    mesh's devices in ``jax.devices()`` order (process 0's first, as :func:`make_mesh` builds
    it), these are exactly the rows the process's devices hold under the ``data`` split.
    """
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    if count == 1:
        return dict(batch)
    out: dict[str, Any] = {}
    for key, value in batch.items():
        rows = value.shape[0]
        if rows % count:
            raise ValueError(f"batch[{key!r}] has {rows} rows, not a multiple of the {count} processes")
        per = rows // count
        out[key] = value[index * per:(index + 1) * per]
    return out
