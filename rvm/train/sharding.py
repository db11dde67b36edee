"""Data parallelism with `jax.sharding`: one `("data",)` mesh over every device."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rvm.errors import ConfigError


def data_mesh(devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the `data` axis."""
    return NamedSharding(mesh, PartitionSpec("data"))


def check_divisible(batch_size: int, mesh: Mesh, field: str) -> None:
    n = mesh.devices.size
    if batch_size % n:
        raise ConfigError(f"{field}={batch_size} is not divisible by the {n} devices of the mesh")
