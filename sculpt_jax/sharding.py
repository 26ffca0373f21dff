"""Device meshes for data parallelism: a 1-D ("data",) mesh and `NamedSharding`s (layer 1).

DESIGN.md principle 7: the batch is sharded over a 1-D mesh, the state replicated, and `jax.jit`
(with in/out shardings) does the rest; no `pmap`. The same code runs on one CPU device, several
fake CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N`` set before JAX starts), a
GPU or a TPU slice. All functions here are host-only.

Many hosts (JAX's multi-controller runtime): every process runs this same program;
`initialize_distributed` (called by the CLI before any backend use) joins them, after which
`jax.devices()` is global and the mesh spans every host. Each process places only ITS rows of a
global batch (`shard_batch`, via `jax.make_array_from_process_local_data`), reads results that
are replicated (or gathered with `to_host`), and only process 0 writes files (`is_primary`).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"

__all__ = [
    "DATA_AXIS",
    "check_batch",
    "data_sharding",
    "distributed_env",
    "initialize_distributed",
    "is_primary",
    "make_mesh",
    "n_devices",
    "process_count",
    "replicate",
    "replicated",
    "shard_batch",
    "shard_local_batch",
    "sync",
    "to_host",
]

# Our explicit multi-process environment (JAX itself reads only JAX_COORDINATOR_ADDRESS and
# JAX_LOCAL_DEVICE_IDS; the cluster auto-detection covers TPU pods, SLURM, Open MPI, k8s).
ENV_COORDINATOR = "SCULPT_COORDINATOR"  # host:port of process 0 (or JAX_COORDINATOR_ADDRESS)
ENV_NUM_PROCESSES = "SCULPT_NUM_PROCESSES"
ENV_PROCESS_ID = "SCULPT_PROCESS_ID"


def distributed_env(environ=None) -> dict | None:
    """The explicit multi-process setting of the environment, checked; None when it sets none.

    Reads ``SCULPT_NUM_PROCESSES``, ``SCULPT_PROCESS_ID`` and ``SCULPT_COORDINATOR`` (falling back
    to ``JAX_COORDINATOR_ADDRESS``). ``SCULPT_NUM_PROCESSES=1`` (or unset) means one process.
    Returns ``{"coordinator_address", "num_processes", "process_id"}`` for several processes.
    Raises: ValueError naming the variable for an inconsistent setting (a count without a
      coordinator or an id, an id out of range, a non-integer).
    """
    env = os.environ if environ is None else environ
    raw_n, raw_id = env.get(ENV_NUM_PROCESSES, ""), env.get(ENV_PROCESS_ID, "")
    coord = env.get(ENV_COORDINATOR) or env.get("JAX_COORDINATOR_ADDRESS") or ""
    if not raw_n:
        if raw_id or env.get(ENV_COORDINATOR):
            raise ValueError(
                f"{ENV_PROCESS_ID}/{ENV_COORDINATOR} are set but {ENV_NUM_PROCESSES} is not; set "
                f"{ENV_NUM_PROCESSES} to the number of processes (the same on every host)"
            )
        return None
    try:
        n = int(raw_n)
        pid = int(raw_id) if raw_id else None
    except ValueError:
        raise ValueError(
            f"{ENV_NUM_PROCESSES}={raw_n!r} and {ENV_PROCESS_ID}={raw_id!r} must be integers"
        ) from None
    if n < 1:
        raise ValueError(f"{ENV_NUM_PROCESSES}={n}: the number of processes must be >= 1")
    if n == 1:
        if pid not in (None, 0):
            raise ValueError(f"{ENV_PROCESS_ID}={pid} is out of range for {ENV_NUM_PROCESSES}=1")
        return None
    if pid is None:
        raise ValueError(
            f"{ENV_NUM_PROCESSES}={n} but {ENV_PROCESS_ID} is not set; give every process its "
            f"id, 0..{n - 1} (0 runs the coordinator)"
        )
    if not 0 <= pid < n:
        raise ValueError(
            f"{ENV_PROCESS_ID}={pid} is out of range for {ENV_NUM_PROCESSES}={n}; ids are 0..{n - 1}"
        )
    if not coord or ":" not in coord:
        raise ValueError(
            f"{ENV_NUM_PROCESSES}={n} but {ENV_COORDINATOR} (host:port of process 0) is "
            f"{'not set' if not coord else repr(coord) + ', which has no port'}; set it to the "
            "same address on every process, e.g. SCULPT_COORDINATOR=10.0.0.1:12345"
        )
    return {"coordinator_address": coord, "num_processes": n, "process_id": pid}


def initialize_distributed(distributed: bool = False, environ=None) -> bool:
    """Joins the processes of a multi-host job (`jax.distributed.initialize`); host-only.

    Must run before anything touches a JAX backend. Called with the explicit environment
    (`distributed_env`) when it names several processes; with ``distributed=True`` and no explicit
    environment, JAX's own cluster detection (Cloud TPU pod slices, SLURM, Open MPI, k8s; it also
    reads JAX_COORDINATOR_ADDRESS) supplies the settings. On CPU the cross-process collectives are
    gloo's. A second call in the same process is a no-op. Returns True when this process is part
    of a multi-process job.
    Raises: ValueError for an inconsistent environment, or when JAX cannot form the job.
    """
    spec = distributed_env(environ)
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    if spec is None and not distributed:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**(spec or {}))
    except (ValueError, RuntimeError, TypeError) as e:
        where = (f"{spec['num_processes']} processes, coordinator {spec['coordinator_address']}"
                 if spec else "JAX's cluster auto-detection")  # fmt: skip
        raise ValueError(
            f"could not start the multi-process job ({where}): {str(e).strip()[:400]}; check "
            f"{ENV_COORDINATOR}/{ENV_NUM_PROCESSES}/{ENV_PROCESS_ID} (README: Devices)"
        ) from e
    return jax.process_count() > 1


def process_count() -> int:
    """Processes of the job (1 unless `initialize_distributed` joined several)."""
    return jax.process_count()


def is_primary() -> bool:
    """True on process 0, the one process that writes reports, JSON, metrics and logs."""
    return jax.process_index() == 0


_BARRIERS = itertools.count()  # every process passes its barriers in the same order


def sync(name: str, timeout_s: int = 3600) -> None:
    """A barrier across the processes of a multi-process job (no-op in one process).

    The coordination service's barrier (orbax's `get_barrier_sync_fn`), not a device collective:
    a process may wait minutes for another's one-sided work (process 0 timing a latency table,
    writing reports) where a first collective would fail on the CPU collectives' 30 s connect
    timeout. Names get a running count, since a barrier key may be used once."""
    if jax.process_count() > 1:
        from orbax.checkpoint import multihost

        multihost.get_barrier_sync_fn()(key=f"sculpt_jax:{next(_BARRIERS)}:{name}",
                                        timeout_ms=timeout_s * 1000)  # fmt: skip


def to_host(tree: Any) -> Any:
    """Numpy copies of a pytree's arrays on every process: replicated or process-local arrays are
    read directly, a global array split across processes is gathered (`process_allgather`)."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x) if isinstance(x, jax.Array) else x

    return jax.tree.map(one, tree)


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis "data" over `devices` (default: all of `jax.devices()`, global in a
    multi-process job: process by process, so each process's devices hold contiguous rows)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh: no devices given; pass None to use jax.devices().")
    return Mesh(np.asarray(devices, dtype=object).reshape(-1), (DATA_AXIS,))


def n_devices(mesh: Mesh) -> int:
    """Number of devices along the mesh's "data" axis."""
    return int(mesh.shape[DATA_AXIS])


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over "data", other axes whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of the mesh."""
    return NamedSharding(mesh, P())


def check_batch(batch: Any, mesh: Mesh) -> None:
    """Raises ValueError unless every leaf's leading dim is divisible by the mesh's device count."""
    n = n_devices(mesh)
    for kp, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:
        shape = np.shape(leaf)
        name = jax.tree_util.keystr(kp) or "batch"
        if not shape:
            raise ValueError(
                f"batch leaf {name} is a scalar; every batch leaf needs a leading batch axis to be "
                f"sharded over {n} devices."
            )
        if shape[0] % n:
            raise ValueError(
                f"batch size {shape[0]} (leaf {name}) is not divisible by the {n} devices of the "
                f"mesh; use a batch size that is a multiple of {n} (e.g. "
                f"{max(n, shape[0] // n * n)}) or pad the batch with a 'mask' entry."
            )


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Places a batch pytree on the mesh, leading axis split over "data" (host-only).

    Args:
      batch: pytree of arrays with a common leading batch dim B (numpy or jax), the GLOBAL batch
        (the same on every process of a multi-process job: each places only its own rows).
      mesh: a mesh from `make_mesh`.
    Returns: the same tree of `jax.Array`s sharded with `data_sharding(mesh)`.
    Raises: ValueError when B is not divisible by the number of devices (message gives the fix).
    """
    check_batch(batch, mesh)
    sharding = data_sharding(mesh)
    if sharding.is_fully_addressable:
        return jax.device_put(batch, sharding)

    def local(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x  # already global
        x = np.asarray(x)
        rows = sorted({idx[0].indices(x.shape[0])[:2]
                       for idx in sharding.addressable_devices_indices_map(x.shape).values()})
        lo, hi = rows[0][0], rows[-1][1]
        if sum(b - a for a, b in rows) != hi - lo:
            raise ValueError("shard_batch: this process's devices are not contiguous in the mesh; "
                             "build it with make_mesh (process by process)")
        return jax.make_array_from_process_local_data(sharding, x[lo:hi], x.shape)

    return jax.tree.map(local, batch)


def shard_local_batch(local_batch: Any, mesh: Mesh, global_size: int | None = None) -> Any:
    """Makes a global batch from each process's OWN rows (a per-host input pipeline; host-only).

    Args:
      local_batch: pytree; leading dim B / process_count on each process (its rows, in mesh order).
      mesh: a mesh from `make_mesh`.
      global_size: the global B (default: local B x process count).
    Returns: the global tree sharded with `data_sharding(mesh)`.
    """
    sharding = data_sharding(mesh)
    n_proc = len({d.process_index for d in mesh.devices.flat})

    def one(x):
        x = np.asarray(x)
        b = global_size or x.shape[0] * n_proc
        return jax.make_array_from_process_local_data(sharding, x, (b, *x.shape[1:]))

    out = jax.tree.map(one, local_batch)
    check_batch(out, mesh)
    return out


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every leaf of `tree` (params, train state) fully on every device of `mesh`.

    In a multi-process job each leaf must hold the same value on every process (it does: every
    process runs the same deterministic program); host values are copied to the local devices."""
    sharding = replicated(mesh)
    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)

    def one(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(one(jax.random.key_data(x)),
                                            impl=jax.random.key_impl(x))  # fmt: skip
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x if x.sharding.is_equivalent_to(sharding, x.ndim) else jax.jit(
                lambda a: a, out_shardings=sharding)(x)  # fmt: skip
        if not isinstance(x, (jax.Array, np.ndarray, np.generic, int, float, bool, complex)):
            return x
        arr = np.asarray(x)
        return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])

    return jax.tree.map(one, tree)
