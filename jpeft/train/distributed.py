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
import sys
import threading
import time
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
               *, timeout_s: int = 300, report: Any = None) -> bool:
    """Connect this process to the others (``jax.distributed.initialize``).

    Must run before anything touches a device (``jax.devices()``, the first array). Returns
    ``True`` if the process joined a multi-process run, ``False`` for the single-process no-op
    (nothing configured, or ``num_processes == 1``). Calling it again is a no-op.

    Says on stderr (``report``) whom it waits for; when the processes have not all joined within
    ``timeout_s`` seconds it raises :class:`TimeoutError` naming the coordinator and what to check.
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
    if explicit and (s["coordinator_address"] is None or s["num_processes"] is None
                     or s["process_id"] is None) and not _auto_cluster():
        raise ValueError(
            "multi-process training needs the coordinator address (host:port of process 0), the "
            "number of processes and this process's id; got "
            f"coordinator={s['coordinator_address']}, processes={s['num_processes']}, "
            f"id={s['process_id']} (set --coordinator-address/--num-processes/--process-id or "
            "JPEFT_COORDINATOR/JPEFT_NUM_PROCESSES/JPEFT_PROCESS_ID)")
    if timeout_s < 1:
        raise ValueError(f"timeout_s={timeout_s} is out of range: give an integer >= 1")
    if s["process_id"] is not None and s["num_processes"] is not None and not (
            0 <= s["process_id"] < s["num_processes"]):
        raise ValueError(f"process id {s['process_id']} is outside [0, {s['num_processes']})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    say = report or (lambda text: print(text, file=sys.stderr, flush=True))
    if explicit:
        role = ("the coordinator: waiting for the other "
                f"{s['num_processes'] - 1} process(es) to connect to {s['coordinator_address']}"
                if s["process_id"] == 0 else
                f"connecting to the coordinator (process 0) at {s['coordinator_address']}")
        say(f"process {s['process_id']} of {s['num_processes']}: {role} (up to {timeout_s} s)")
    else:
        say(f"joining the cluster's processes that JAX detects (up to {timeout_s} s)")
    failure = (f"multi-process start-up failed: not all {s['num_processes'] or 'detected'} processes "
               f"joined at coordinator {s['coordinator_address'] or '(auto-detected)'} within "
               f"{timeout_s} s. Start every process (ids 0 to N-1) with the same "
               "--coordinator-address and --num-processes, check that process 0's host and port are "
               "reachable from here, or raise the timeout (--coordinator-timeout).")
    # JAX aborts the whole process (a C++ check failure and a stack dump) when its deadline
    # passes: a watchdog says what went wrong and exits first.
    done = threading.Event()

    def watchdog() -> None:
        start = time.monotonic()
        while not done.wait(min(30.0, max(timeout_s - (time.monotonic() - start), 0.0))):
            waited = time.monotonic() - start
            if waited >= timeout_s:
                say(f"error: {failure}")
                os._exit(2)
            say(f"still waiting for the other processes ({waited:.0f} s of {timeout_s} s)")

    threading.Thread(target=watchdog, daemon=True, name="jpeft-distributed-watchdog").start()
    try:
        jax.distributed.initialize(**({k: v for k, v in s.items() if v is not None} if explicit else {}),
                                   initialization_timeout=timeout_s + 30)
    except Exception as err:  # JAX raises XlaRuntimeError (UNAVAILABLE ...) for some failures
        text = " ".join(str(err).split())[:300]
        raise TimeoutError(f"{failure} ({type(err).__name__}: {text})") from None
    finally:
        done.set()
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
