"""`layers.column_sum` / `broadcast_param` and the Linear / LayerNorm built on them: the same
forward values as flax's layers, parameter gradients summed in float32 in two passes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sarformer_jax.models.layers import LayerNorm, Linear, broadcast_param, column_sum


@pytest.mark.parametrize("method", ["auto", "sum", "blocks", "dot"])
@pytest.mark.parametrize("n", [5, 1023, 1024, 1601, 3202, 8191, 8192, 16800])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_column_sum_against_numpy(n, dtype, method):
    x = jnp.asarray(np.random.default_rng(n).normal(size=(n, 24)) + 0.5, dtype)
    got = jax.jit(functools.partial(column_sum, method=method))(x)
    want = np.asarray(x.astype(jnp.float32), np.float64).sum(0)
    assert got.dtype == jnp.float32 and got.shape == (24,)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6 * np.abs(want).max())


def test_column_sum_runs_two_passes_behind_a_barrier():
    text = jax.jit(column_sum).lower(jnp.zeros((3202, 768), jnp.bfloat16)).as_text()
    assert text.count("stablehlo.reduce") >= 2
    assert "optimization_barrier" in text
    for n in (100, 16800):  # one pass: too few rows to gain, or XLA splits them itself
        text = jax.jit(column_sum).lower(jnp.zeros((n, 768), jnp.bfloat16)).as_text()
        assert "optimization_barrier" not in text


def _lowered(x, method=None):
    return jax.jit(functools.partial(column_sum, method=method)).lower(x).as_text()


def test_column_sum_dot_is_a_product_with_hidden_ones(monkeypatch):
    bf = jnp.zeros((3202, 768), jnp.bfloat16)
    text = _lowered(bf, "dot")
    assert "stablehlo.dot_general" in text and "optimization_barrier" in text
    assert "stablehlo.reduce" not in text
    # float32 would be rounded to TF32 by a GPU product: it keeps the two passes
    text = _lowered(jnp.zeros((3202, 768), jnp.float32), "dot")
    assert "dot_general" not in text and text.count("stablehlo.reduce") >= 2
    # the environment picks the method when the caller does not
    monkeypatch.setenv("SARFORMER_COLUMN_SUM", "dot")
    assert "stablehlo.dot_general" in _lowered(bf)
    monkeypatch.setenv("SARFORMER_COLUMN_SUM", "sum")
    text = _lowered(bf)
    assert text.count("stablehlo.reduce") == 1 and "optimization_barrier" not in text
    monkeypatch.setenv("SARFORMER_COLUMN_SUM", "rows")
    with pytest.raises(ValueError, match="'rows' is not one of"):
        _lowered(bf)


@pytest.mark.parametrize("p_shape", [(24,), (3, 4, 2)])
def test_broadcast_param_gradient_is_the_sum_of_the_cotangent(p_shape):
    rng = np.random.default_rng(0)
    p = jnp.asarray(rng.normal(size=p_shape), jnp.float32)
    shape = (2, 1601) + p_shape
    g = jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
    y, vjp = jax.vjp(lambda p: broadcast_param(p, shape, jnp.bfloat16), p)
    assert y.dtype == jnp.bfloat16 and y.shape == shape
    np.testing.assert_array_equal(y, jnp.broadcast_to(p.astype(jnp.bfloat16), shape))
    (dp,) = vjp(g)
    assert dp.dtype == jnp.float32 and dp.shape == p_shape
    want = np.asarray(g.astype(jnp.float32), np.float64).reshape(-1, *p_shape).sum(0)
    np.testing.assert_allclose(dp, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    with pytest.raises(ValueError, match=r"parameter \(24,\) does not end shape \(2, 5\)"):
        broadcast_param(jnp.zeros((24,)), (2, 5))


def _pair(kind, dtype, **kw):
    if kind == "linear":
        ours, theirs = Linear(32, 48, dtype=dtype, rngs=nnx.Rngs(0)), nnx.Linear(32, 48, dtype=dtype, rngs=nnx.Rngs(0))
    else:
        ours = LayerNorm(32, epsilon=1e-6, dtype=dtype, rngs=nnx.Rngs(0), **kw)
        theirs = nnx.LayerNorm(32, epsilon=1e-6, dtype=dtype, rngs=nnx.Rngs(0), **kw)
    rng = np.random.default_rng(1)
    for name in ("bias", "scale"):
        if getattr(theirs, name, None) is not None:
            value = jnp.asarray(rng.normal(size=getattr(theirs, name)[...].shape), jnp.float32)
            getattr(ours, name)[...] = value
            getattr(theirs, name)[...] = value
    return ours, theirs


@pytest.mark.parametrize("kind,kw", [("linear", {}), ("ln", {}), ("ln", {"use_fast_variance": False})])
@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_layers_match_flax(kind, kw, dtype):
    """Forward bit for bit; parameter gradients equal flax's in float32 (rel 1e-5), and in
    bf16 they stay within 1e-2 of the float32 gradients (flax's bf16 gradients are rounded to
    bf16 first, ours are float32 sums)."""
    ours, theirs = _pair(kind, dtype, **kw)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 1601, 32)) * 2 + 0.3, jnp.float32)
    x = x.astype(dtype or jnp.float32)
    np.testing.assert_array_equal(jax.jit(lambda x: ours(x))(x), jax.jit(lambda x: theirs(x))(x))

    def loss(m, x):
        return jnp.sum(jnp.sin(m(x).astype(jnp.float32)))

    g_ours = jax.tree.leaves(nnx.grad(loss)(ours, x))
    if dtype is None:
        for a, b in zip(g_ours, jax.tree.leaves(nnx.grad(loss)(theirs, x))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))
    else:
        ref, _ = _pair(kind, None, **kw)
        g_ref = jax.tree.leaves(nnx.grad(loss)(ref, x.astype(jnp.float32)))
        for a, b in zip(g_ours, g_ref):
            assert a.dtype == jnp.float32
            np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2 * float(jnp.abs(b).max()))


@pytest.mark.parametrize("groups,n", [(2, 3202), (8, 6408), (3, 3003), (4, 1024)])
def test_column_sum_in_groups_against_numpy(groups, n):
    x = jnp.asarray(np.random.default_rng(n).normal(size=(n, 24)) + 0.5, jnp.float32)
    got = jax.jit(functools.partial(column_sum, method="blocks", groups=groups))(x)
    want = np.asarray(x, np.float64).sum(0)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6 * np.abs(want).max())
    with pytest.raises(ValueError, match="do not split into 5 equal groups"):
        column_sum(x[:1601 * 2 + 1] if n > 3203 else x, method="blocks", groups=5)


def test_broadcast_param_gradient_stays_on_each_batch_shard():
    """8 fake devices, the cotangent batch-sharded: each device sums its own images' rows and
    the partial sums meet in an all-reduce.  Blocks across the images' boundary made the
    partitioner move rows between devices (collective-permute / all-gather) before."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    assert len(jax.devices()) == 8
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    shape = (8, 170, 24)  # 1360 rows: two passes, 37 blocks of 40 rows over the whole batch
    g = jax.device_put(jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.bfloat16),
                       NamedSharding(mesh, P("data")))
    p = jax.device_put(jnp.zeros((24,), jnp.float32), NamedSharding(mesh, P()))

    def grad(p, g):
        return jax.vjp(lambda p: broadcast_param(p, shape, jnp.bfloat16), p)[1](g)[0]

    fn = jax.jit(grad)
    text = fn.lower(p, g).compile().as_text()
    assert "all-reduce" in text
    for op in ("all-gather", "collective-permute", "all-to-all"):
        assert op not in text, op
    want = np.asarray(g.astype(jnp.float32), np.float64).reshape(-1, 24).sum(0)
    np.testing.assert_allclose(fn(p, g), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
