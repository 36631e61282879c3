"""The relative position bias kernel compiled on the GPU (marker gpu): SARFormer-B's bias (40 x 40
grid, 12 heads, bf16, padded to 1602) equals the XLA path's padded bias bit for bit, and a BEiT
attention layer with `position_bias="pallas"` gives the "xla" layer's outputs and gradients
(cuDNN attention, bf16).
Run on the device: `JAX_PLATFORMS=cuda python3 -m pytest -q -m gpu tests/test_position_bias_gpu.py`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sarformer_jax.kernels.position_bias_pallas import position_bias
from sarformer_jax.models.beit import BEiTAttention, relative_position_bias

pytestmark = pytest.mark.gpu


def test_sarformer_b_bias_equals_xla():
    grid, n = (40, 40), 12
    rows = (2 * 40 - 1) ** 2 + 3
    table = jnp.asarray(np.random.default_rng(0).normal(size=(rows, n)), jnp.float32)
    got = jax.jit(lambda t: position_bias(t, grid, jnp.bfloat16, pad_even=True))(table)
    want = jax.jit(lambda t: relative_position_bias(t, grid, jnp.bfloat16, pad_even=True))(table)
    assert got.shape == want.shape == (n, 1602, 1602)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_attention_layer_with_kernel_bias_equals_xla_bias():
    grid, dim, heads = (20, 20), 96, 3
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 401, dim)), jnp.bfloat16)
    outs = []
    for impl in ("xla", "pallas"):
        layer = BEiTAttention(dim, heads, grid, implementation="cudnn", position_bias=impl,
                              dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
        table = layer.relative_position_bias_table
        table[...] = jnp.asarray(np.random.default_rng(2).normal(size=table[...].shape),
                                 jnp.float32)
        graphdef, state = nnx.split(layer)

        def loss(state, x):
            y = nnx.merge(graphdef, state)(x, grid)
            return jnp.sum(y.astype(jnp.float32) ** 2), y

        (_, y), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(state, x)
        outs.append((y, g))
    (y0, g0), (y1, g1) = outs
    np.testing.assert_array_equal(np.asarray(y1, np.float32), np.asarray(y0, np.float32))
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(b, a, rtol=1e-2, atol=1e-2 * np.abs(a).max())
