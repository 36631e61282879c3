"""Device mesh, batch sharding and FSDP-style parameter sharding.

The mesh has two axes: `data` (pure data parallel) and `fsdp` (data parallel whose members also
split parameters and optimiser state).  The batch is split over both; a parameter is split over
`fsdp` along its largest axis divisible by the fsdp size when it is large enough, otherwise
replicated.  XLA's SPMD partitioner inserts the all-gathers / reduce-scatters.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
MIN_FSDP_SIZE = 2**14  # smaller leaves (norms, biases) stay replicated


def make_mesh(mesh_cfg, devices: list | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    fsdp = int(mesh_cfg.get("fsdp", 1))
    data = int(mesh_cfg.get("data", -1))
    if data == -1:
        if n % fsdp:
            raise ValueError(f"train.mesh.fsdp={fsdp} does not divide the {n} devices")
        data = n // fsdp
    if data * fsdp != n:
        raise ValueError(f"train.mesh data={data} x fsdp={fsdp} != {n} devices")
    return Mesh(np.asarray(devices).reshape(data, fsdp), BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_spec(shape: tuple[int, ...], fsdp: int, min_size: int = MIN_FSDP_SIZE) -> P:
    if fsdp <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    order = sorted(range(len(shape)), key=lambda i: -shape[i])
    for axis in order:
        if shape[axis] % fsdp == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return P(*spec)
    return P()


def tree_shardings(mesh: Mesh, tree: Any, min_size: int = MIN_FSDP_SIZE) -> Any:
    """NamedSharding for every leaf of `tree` (arrays or ShapeDtypeStructs); leaves with at
    least `min_size` elements are split over `fsdp` (`train.mesh.fsdp_min_size`)."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree_util.tree_map(
        lambda x: NamedSharding(mesh, param_spec(tuple(x.shape), fsdp, min_size)), tree
    )
