"""Device meshes for data parallelism: a 1-D ("data",) mesh and `NamedSharding`s (layer 1).

DESIGN.md principle 7: the batch is sharded over a 1-D mesh, the state replicated, and `jax.jit`
(with in/out shardings) does the rest; no `pmap`. The same code runs on one CPU device, several
fake CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N`` set before JAX starts), a
GPU or a TPU slice. All functions here are host-only.
"""

from __future__ import annotations

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
    "make_mesh",
    "n_devices",
    "replicate",
    "replicated",
    "shard_batch",
]


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis "data" over `devices` (default: all of `jax.devices()`)."""
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
      batch: pytree of arrays with a common leading batch dim B (numpy or jax).
      mesh: a mesh from `make_mesh`.
    Returns: the same tree of `jax.Array`s sharded with `data_sharding(mesh)`.
    Raises: ValueError when B is not divisible by the number of devices (message gives the fix).
    """
    check_batch(batch, mesh)
    return jax.device_put(batch, data_sharding(mesh))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every leaf of `tree` (params, train state) fully on every device of `mesh`."""
    return jax.device_put(tree, replicated(mesh))
