"""Loops whose trip count depends on the data run on each device's batch shard (8 fake CPU
devices): the Hungarian matcher of the loss and the NMS of SAM's automatic masks.  Left to the
partitioner, a vmapped `while_loop` over a sharded batch decides each iteration over the whole
batch -- one all-reduce of its predicate per iteration.  Results equal the unsharded ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hlo import collectives_in_loops
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from sarformer_jax.losses import _match_all
from sarformer_jax.sam import amg
from sarformer_jax.sam.automatic_mask_generator import _nms_per_batch_shard
from sarformer_jax.sharding import per_batch_shard


def _put(mesh, *xs, axis=0):
    spec = PartitionSpec(*([None] * axis + ["data"]))
    return [jax.device_put(x, NamedSharding(mesh, spec)) for x in xs]


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_matcher_solves_each_batch_shard_alone(axis_type):
    rng = np.random.default_rng(0)
    layers, b, q, k = 3, 8, 6, 4
    cost = jnp.asarray(rng.normal(size=(layers, b, q, k)), jnp.float32)
    present = jnp.asarray(rng.random((b, k)) < 0.7)
    want = jax.jit(_match_all)(cost, present)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    cost_s, = _put(mesh, cost, axis=1)
    present_s, = _put(mesh, present)
    f = jax.jit(_match_all)
    assert not collectives_in_loops(f.lower(cost_s, present_s).compile().as_text())
    got = f(cost_s, present_s)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    # a single image ([Q, K]) and the [B, Q, K] form take the same path
    np.testing.assert_array_equal(np.asarray(jax.jit(_match_all)(cost[0, 0], present[0])[0]),
                                  np.asarray(want[0][0, 0]))
    np.testing.assert_array_equal(np.asarray(f(*_put(mesh, cost[1]), present_s)[0]), np.asarray(want[0][1]))


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_nms_runs_on_each_batch_shard(axis_type):
    rng = np.random.default_rng(1)
    b, n, keep = 8, 40, 16
    xy = rng.integers(0, 60, (b, n, 2))
    wh = rng.integers(4, 30, (b, n, 2))
    boxes = jnp.asarray(np.concatenate([xy, xy + wh], -1), jnp.int32)
    scores = jnp.asarray(rng.random((b, n)), jnp.float32)
    valid = jnp.asarray(rng.random((b, n)) < 0.8)
    want = jax.vmap(lambda bx, sc, v: amg.box_nms(bx, sc, v, 0.5, keep))(boxes, scores, valid)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    args = _put(mesh, boxes, scores, valid)
    f = jax.jit(lambda *a: per_batch_shard(_nms_per_batch_shard(0.5, keep), 2, *a))
    assert not collectives_in_loops(f.lower(*args).compile().as_text())
    got = f(*args)
    assert got[0].sharding.spec[0] == "data"
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    assert 0 < int(want[1].min()) and int(want[1].max()) <= keep


def test_per_shard_functions_under_vmap():
    """vmap folds its axis into the batch (one solve for all), same results as nested vmaps."""
    rng = np.random.default_rng(2)
    v, b, q, k = 2, 3, 5, 4
    cost = jnp.asarray(rng.normal(size=(v, b, q, k)), jnp.float32)
    present = jnp.asarray(rng.random((v, b, k)) < 0.7)
    got = jax.jit(jax.vmap(_match_all))(cost, present)
    want = [jax.jit(_match_all)(cost[i], present[i]) for i in range(v)]
    for j in range(2):
        np.testing.assert_array_equal(np.asarray(got[j]), np.stack([np.asarray(w[j]) for w in want]))
    xy = rng.integers(0, 40, (v, b, 20, 2))
    boxes = jnp.asarray(np.concatenate([xy, xy + rng.integers(4, 20, (v, b, 20, 2))], -1), jnp.int32)
    scores = jnp.asarray(rng.random((v, b, 20)), jnp.float32)
    valid = jnp.ones((v, b, 20), bool)
    nms = _nms_per_batch_shard(0.5, 8)
    got = jax.jit(jax.vmap(lambda *a: per_batch_shard(nms, 2, *a)))(boxes, scores, valid)
    want = jax.vmap(jax.vmap(lambda bx, sc, va: amg.box_nms(bx, sc, va, 0.5, 8)))(boxes, scores, valid)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_host_device_without_a_cpu_backend(monkeypatch):
    """With JAX_PLATFORMS=cuda jax has no CPU backend; the trainer's host build must fall back
    to the default device instead of failing with "Unknown backend cpu" (as the GPU bench did)."""
    from sarformer_jax.sharding import host_device

    assert host_device().platform == "cpu"
    real = jax.devices

    def devices(backend=None):
        if backend == "cpu":
            raise RuntimeError("Unknown backend cpu. Available backends are ['cuda']")
        return real()

    monkeypatch.setattr(jax, "devices", devices)
    assert host_device() is real()[0]
