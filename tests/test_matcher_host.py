"""`loss.matcher = "host"`: scipy through a callback gives the device solver's assignments, in
the loss, under jit and vmap, and inside a batch-sharded jit over 8 (CPU) devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sarformer_jax.config import load_config
from sarformer_jax.losses import loss_fn
from sarformer_jax.matcher import host_hungarian_assign, hungarian_assign


def _device(cost, present):
    fn = lambda c, p: hungarian_assign(c, None, p)  # noqa: E731
    for _ in range(cost.ndim - 2):
        fn = jax.vmap(fn)
    return fn(cost, present)


@pytest.mark.parametrize("shape", [(3, 4, 20, 30), (6, 12, 5)])
def test_host_equals_device_solver(shape, rng):
    cost = rng.normal(size=shape).astype(np.float32)
    present = rng.random(shape[:-2] + shape[-1:]) < 0.4
    present.reshape(-1, shape[-1])[0] = False  # an image with nothing present
    cost.reshape(-1, *shape[-2:])[1, 0, 0] = np.nan  # NaN entries are never preferred
    want = jax.jit(_device)(jnp.asarray(cost), jnp.asarray(present))
    got = jax.jit(host_hungarian_assign)(jnp.asarray(cost), jnp.asarray(present))
    for g, w in zip(got, want):
        assert g.dtype == jnp.int32 and g.shape == w.shape
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    assert (np.asarray(got[0]).reshape(-1, shape[-2])[0] == -1).all()


def test_host_solver_under_vmap_broadcasts_present(rng):
    cost = jnp.asarray(rng.normal(size=(3, 2, 9, 6)), jnp.float32)
    present = jnp.asarray(rng.random((2, 6)) < 0.6)
    got = jax.vmap(host_hungarian_assign, in_axes=(0, None))(cost, present)
    want = _device(cost, jnp.broadcast_to(present, (3, 2, 6)))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def _loss(matcher, sharded):
    cfg = load_config("tiny", ["model.loss.num_points=64", f"model.loss.matcher={matcher}"]).model.loss
    k, q, b, n = 5, 7, 8, 3
    rng = np.random.default_rng(1)
    preds = [{"cls": jnp.asarray(rng.normal(size=(b, q, k + 1)), jnp.float32),
              "mask": jnp.asarray(rng.normal(size=(b, q, 12, 10)), jnp.float32)} for _ in range(n)]
    gt = jnp.asarray(rng.integers(0, k, (b, 24, 20)).astype(np.int32))
    if sharded:
        mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
        put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))  # noqa: E731
        preds, gt = jax.tree_util.tree_map(put, preds), put(gt)

    def f(p, g):
        return loss_fn(p, g, None, key=jax.random.key(3), cfg_loss=cfg, num_classes=k)

    return jax.jit(jax.value_and_grad(lambda p, g: f(p, g)[0]))(preds, gt)


def test_loss_and_gradient_equal_with_either_matcher():
    (l_dev, g_dev), (l_host, g_host) = _loss("device", False), _loss("host", False)
    assert float(l_dev) == float(l_host)
    for a, b in zip(jax.tree_util.tree_leaves(g_dev), jax.tree_util.tree_leaves(g_host)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_host_matcher_in_a_batch_sharded_jit():
    l_dev, _ = _loss("device", True)
    l_host, g_host = _loss("host", True)
    np.testing.assert_allclose(float(l_host), float(l_dev), rtol=1e-6)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(g_host))


def test_unknown_matcher_is_refused():
    with pytest.raises(ValueError, match="loss.matcher must be 'device' or 'host'"):
        _loss("gpu", False)
