"""BEiT's relative position bias from the Pallas kernel (kernels/position_bias_pallas.py) in the
Pallas interpreter, against the XLA path (`beit.relative_position_bias`, itself checked against
the table gather in tests/test_beit*.py) and `layers.pad_for_cudnn`'s padding: values bit for
bit (each entry is one table entry), the table's gradient through the padded bias, and the
padded bias taken as it is by `pad_for_cudnn`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sarformer_jax.kernels.position_bias_pallas import (_pow2_chunks, _row_plan, padded_tokens,
                                                         position_bias)
from sarformer_jax.models.beit import BEiTAttention, relative_position_bias
from sarformer_jax.models.layers import pad_for_cudnn


def _table(grid, n, seed=0):
    h, w = grid
    rows = (2 * h - 1) * (2 * w - 1) + 3
    return jnp.asarray(np.random.default_rng(seed).normal(size=(rows, n)), jnp.float32)


def _cudnn_padded(bias):
    """The XLA bias padded as `pad_for_cudnn` pads it (zeros row, -2**40 column when odd)."""
    t = bias.shape[-1]
    q = jnp.zeros((1, t, bias.shape[0], 8), bias.dtype)
    return pad_for_cudnn(q, q, q, bias[None])[3][0]


@pytest.mark.parametrize("grid,n", [((3, 4), 2), ((5, 5), 3), ((2, 7), 1), ((6, 3), 4)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_equals_xla_bias_and_cudnn_padding(grid, n, dtype):
    table = _table(grid, n)
    want = relative_position_bias(table, grid, dtype)
    t = 1 + grid[0] * grid[1]
    got = position_bias(table, grid, dtype, pad_even=False, interpret=True)
    assert got.dtype == jnp.dtype(dtype) and got.shape == (n, t, t)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    padded = position_bias(table, grid, dtype, pad_even=True, interpret=True)
    assert padded.shape == (n, padded_tokens(grid, True), padded_tokens(grid, True))
    assert padded.shape[-1] % 2 == 0
    np.testing.assert_array_equal(np.asarray(padded, np.float32),
                                  np.asarray(_cudnn_padded(want), np.float32))
    # the XLA path pads the same way
    np.testing.assert_array_equal(
        np.asarray(relative_position_bias(table, grid, dtype, pad_even=True), np.float32),
        np.asarray(padded, np.float32))


@pytest.mark.parametrize("grid", [(3, 4), (4, 4)])
def test_table_gradient_through_the_padded_kernel_bias(grid):
    """d table of sum(weights * bias): the kernel's bias (custom VJP, the padding ignored) against
    the XLA bias padded by `pad_for_cudnn` (autodiff through the padding)."""
    n = 3
    table = _table(grid, n, seed=1)
    t = padded_tokens(grid, True)
    weights = jnp.asarray(np.random.default_rng(2).normal(size=(n, t, t)), jnp.float32)

    def loss(tab, impl):
        if impl == "xla":
            bias = _cudnn_padded(relative_position_bias(tab, grid, jnp.float32))
        else:
            bias = relative_position_bias(tab, grid, jnp.float32, implementation=impl,
                                          pad_even=True)
        return jnp.sum(weights * jnp.where(bias < -1e30, 0.0, bias))

    want = jax.grad(loss)(table, "xla")
    got = jax.grad(loss)(table, "pallas_interpret")
    assert float(jnp.abs(want).max()) > 0
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_pad_for_cudnn_takes_a_padded_bias_as_it_is():
    grid, n = (3, 4), 2  # t = 13: padded to 14
    table = _table(grid, n)
    bias = relative_position_bias(table, grid, jnp.float32)
    padded = relative_position_bias(table, grid, jnp.float32, pad_even=True)
    q = jnp.ones((2, 13, n, 8), jnp.float32)
    a = pad_for_cudnn(q, q, q, bias[None])
    b = pad_for_cudnn(q, q, q, padded[None])
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert b[3].shape == (1, n, 14, 14)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="rows"):
        position_bias(jnp.zeros((10, 2)), (3, 4), jnp.float32, interpret=True)
    with pytest.raises(ValueError, match="not one of"):
        relative_position_bias(_table((3, 4), 2), (3, 4), implementation="triton")
    from flax import nnx

    with pytest.raises(ValueError, match="position_bias"):
        BEiTAttention(16, 2, (3, 4), position_bias="gather", rngs=nnx.Rngs(0))


def test_pow2_chunks_tile_exactly():
    for n in (1, 2, 13, 26, 1602, 4097):
        chunks = _pow2_chunks(n)
        assert sum(s for _, s in chunks) == n
        assert all(s & (s - 1) == 0 for _, s in chunks)
        assert [c for c, _ in chunks] == list(np.cumsum([0] + [s for _, s in chunks])[:-1])


@pytest.mark.parametrize("t_out,block_rows", [(1602, 8), (14, 8), (16, 8), (26, 4), (7, 1), (5, 16)])
def test_row_plan_tiles_the_rows_with_power_of_two_tiles(t_out, block_rows):
    """Triton needs power-of-two tiles: full blocks plus power-of-two tail chunks cover every
    row exactly once (SARFormer-B: 200 blocks of 8 and one chunk of 2)."""
    full, tail = _row_plan(t_out, block_rows)
    rows = [r for b in range(full) for r in range(b * block_rows, (b + 1) * block_rows)]
    rows += [r for r0, n in tail for r in range(r0, r0 + n)]
    assert rows == list(range(t_out))
    assert all(n & (n - 1) == 0 for _, n in tail)
    if t_out == 1602:
        assert (full, tail) == (200, [(1600, 2)])


@pytest.mark.parametrize("block_rows", [1, 2, 4, 16])
def test_other_block_rows_give_the_same_bias(block_rows):
    grid, n = (3, 5), 2  # 16 tokens padded to 16; 26 with (5, 5)
    for g in (grid, (5, 5)):
        table = _table(g, n)
        want = position_bias(table, g, jnp.float32, interpret=True)
        got = position_bias(table, g, jnp.float32, block_rows=block_rows, interpret=True)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_block_rows_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="block_rows must be a power of two, got 6"):
        position_bias(_table((3, 4), 2), (3, 4), jnp.float32, block_rows=6, interpret=True)


@pytest.mark.parametrize("grid,block_rows", [((40, 40), 8), ((5, 7), 16), ((3, 4), 4)])
def test_triton_lowering_on_the_cpu(grid, block_rows):
    """The kernel lowers to Triton for a CUDA target here, without a GPU (jax lowers for another
    platform): every tile a power of two, as the Triton lowering demands (a block of 6 rows, the
    first version's tile for 1602 rows, is refused there; the interpreter would not notice)."""
    rows = (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3
    sds = jax.ShapeDtypeStruct((rows, 12), jnp.float32)

    def fwd(t):
        return position_bias(t, grid, jnp.bfloat16, pad_even=True, block_rows=block_rows)

    text = jax.jit(fwd).trace(sds).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 1
