"""Device mesh, batch sharding and FSDP-style parameter sharding.

The mesh has two axes: `data` (pure data parallel) and `fsdp` (data parallel whose members also
split parameters and optimiser state).  The batch is split over both; a parameter is split over
`fsdp` along its largest axis divisible by the fsdp size when it is large enough, otherwise
replicated.  XLA's SPMD partitioner inserts the all-gathers / reduce-scatters.

`per_batch_shard` runs a function on each device's batch shard alone, for ops the partitioner
would otherwise make collective: Pallas kernels, and loops whose trip count is decided over the
whole batch (the Hungarian matcher: one all-reduce of the loop predicate per iteration).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
MIN_FSDP_SIZE = 2**14  # smaller leaves (norms, biases) stay replicated


def host_device():
    """The host's CPU device, where models are built op by op before they are placed on the
    mesh.  With `JAX_PLATFORMS=cuda` (or any list without `cpu`) jax has no CPU backend: the
    build then runs op by op on the first default device instead.  The parameters are drawn
    from the same threefry bits either way."""
    try:
        return jax.local_devices(backend="cpu")[0]  # this process's own (multi-host: not device 0)
    except RuntimeError:
        return jax.local_devices()[0]


def put_on_mesh(tree: Any, shardings: Any) -> Any:
    """`jax.device_put` of host-built values (every process built the same ones, from the same
    seed) onto `shardings` (a tree, or one sharding for every leaf).  With several processes a
    sharding spans devices this process cannot address, and device_put refuses host values
    (numpy arrays, scalars) there, so each process supplies the shards of its own devices from
    its copy."""
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def put(x, sharding):
        dtype = getattr(x, "dtype", None)
        if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            impl = jax.random.key_impl(x)
            return jax.random.wrap_key_data(put(jax.random.key_data(x), sharding), impl=impl)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(put, tree, shardings)


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


# ---- functions run per batch shard --------------------------------------------------------


def _batch_axes(arg_shapes) -> Any:
    """Mesh axes that shard the leading (batch) dimension of the first argument that has any."""
    for a in arg_shapes:
        sharding = getattr(a, "sharding", None)
        if isinstance(sharding, NamedSharding) and len(sharding.spec) and sharding.spec[0]:
            return sharding.spec[0]
    return None


def _vmap_into_batch(fn: Callable) -> Callable:
    """custom_vmap: a vmapped axis is folded into the leading batch axis (one call of `fn`)."""
    wrapped = jax.custom_batching.custom_vmap(fn)

    @wrapped.def_vmap
    def rule(axis_size, in_batched, *args):
        args = [x if bat else jnp.broadcast_to(x, (axis_size,) + x.shape)
                for x, bat in zip(args, in_batched)]
        out = wrapped(*[x.reshape((-1,) + x.shape[2:]) for x in args])
        out = jax.tree.map(lambda y: y.reshape((axis_size, -1) + y.shape[1:]), out)
        return out, jax.tree.map(lambda _: True, out)

    return wrapped


def batch_partitioned(fn: Callable, n_out: int, sharding_rule: str, other_factors: Sequence[str]) -> Callable:
    """`custom_partitioning` of `fn` (arrays with a leading batch axis in and out): under a
    sharded jit each device runs `fn` on its batch shard, every other axis replicated.
    `sharding_rule` names the axes einsum-style ("b q k, b k -> b q"); `other_factors` are its
    non-batch factors (kept replicated).  Under `vmap` the mapped axis joins the batch axis."""
    part = custom_partitioning(fn)

    def arg_shardings(mesh, arg_shapes):
        axes = _batch_axes(arg_shapes)
        return tuple(NamedSharding(mesh, P(axes)) for _ in arg_shapes), axes

    def infer(mesh, arg_shapes, result_shape):
        _, axes = arg_shardings(mesh, arg_shapes)
        out = tuple(NamedSharding(mesh, P(axes)) for _ in range(n_out))
        return out if n_out > 1 else out[0]

    def partition(mesh, arg_shapes, result_shape):
        arg, _ = arg_shardings(mesh, arg_shapes)
        return mesh, fn, infer(mesh, arg_shapes, result_shape), arg

    part.def_partition(partition=partition, infer_sharding_from_operands=infer,
                       propagate_user_sharding=None, sharding_rule=sharding_rule,
                       need_replication_factors=tuple(other_factors))
    return _vmap_into_batch(part)


def _explicit_batch_axes(*args):
    """Mesh and batch axes when the arguments carry explicit (typed) shardings, else None."""
    for x in args:
        sharding = getattr(jax.typeof(x), "sharding", None)
        mesh = getattr(sharding, "mesh", None)
        if mesh is None or mesh.empty:
            continue
        explicit = {n for n, t in zip(mesh.axis_names, mesh.axis_types)
                    if t == jax.sharding.AxisType.Explicit}
        if not explicit:
            continue
        spec = sharding.spec
        return mesh, (spec[0] if len(spec) else None)
    return None


def per_batch_shard(fn: Callable, n_out: int, *args):
    """`fn(*args)` on each device's batch shard.  With explicit (typed) shardings: `shard_map`
    over the batch axes (local shapes, no gather); otherwise `fn` is called as is, and should be
    a `batch_partitioned` function, which the partitioner splits the same way."""
    found = _explicit_batch_axes(*args)
    if found is None:
        return fn(*args)
    mesh, axes = found
    spec = P(axes)
    out_specs = spec if n_out == 1 else (spec,) * n_out
    # an argument replicated so far (e.g. broadcast to the batch) is split locally, no transfer
    args = [x if _leading_spec(x) == axes else jax.sharding.reshard(x, NamedSharding(mesh, spec)) for x in args]
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * len(args), out_specs=out_specs,
                         check_vma=False)(*args)


def _leading_spec(x):
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    return spec[0] if spec else None


def num_batch_shards(mesh: Mesh, axes) -> int:
    """How many pieces the mesh axes `axes` (a name or a tuple of names) split the batch into."""
    return int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)]))


def on_batch_shards(fn, batch_mesh, in_axes: Sequence[int], out_axis: int):
    """`fn` on each device's images: `shard_map` over the batch axes when `batch_mesh` = (mesh,
    axes) is given and the mesh divides the batch, else `fn` itself.  `in_axes` gives each
    argument's batch axis (a pytree argument: all its leaves), `out_axis` that of every output.

    Unlike `per_batch_shard` it is differentiable and needs no typed shardings: the caller
    names the mesh.  Used for the per-image mask losses, which need no other image: left to the
    partitioner, their `lax.cond` (`losses.mask_losses_over_slots`) was compiled on 2 GPUs with
    all-gathers of the whole batch's point logits inside both branches (docs/benchmarks.md,
    scaling run 11)."""
    if batch_mesh is None:
        return fn
    mesh, axes = batch_mesh
    shards = num_batch_shards(mesh, axes)
    if shards == 1:
        return fn

    def spec(axis):
        return P(*([None] * axis), axes)

    def wrapped(*args):
        for a, ax in zip(args, in_axes):
            for leaf in jax.tree_util.tree_leaves(a):
                if leaf.shape[ax] % shards:
                    return fn(*args)  # a batch the mesh does not divide: one program
        out = jax.shard_map(fn, mesh=mesh, in_specs=tuple(spec(ax) for ax in in_axes),
                            out_specs=spec(out_axis), check_vma=False)
        return out(*args)

    return wrapped
