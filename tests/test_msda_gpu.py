"""The compiled Pallas kernels on the GPU against the XLA reference in fp32 (marker gpu).

Random shapes (seeded), outputs poisoned with NaN before each run so an unwritten element fails.
Run on the device machine: `JAX_PLATFORMS=cuda python3 -m pytest -q -m gpu tests/test_msda_gpu.py`
(conftest sets the CPU platform otherwise; the whole file takes ~7 min on an H100).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import RTOL, rel_err
from sarformer_jax.kernels import BlockSizes, ms_deform_attn, ms_deform_attn_reference
from sarformer_jax.kernels.msda_pallas import msda_pallas_bwd, msda_pallas_fwd

pytestmark = pytest.mark.gpu


def _random_case(seed, d=None):
    rng = np.random.default_rng(seed)
    n_lvl = int(rng.integers(1, 5))
    shapes = tuple((int(rng.integers(1, 60)), int(rng.integers(1, 60))) for _ in range(n_lvl))
    b, q = int(rng.integers(1, 4)), int(rng.integers(1, 3000))
    n, p = int(rng.integers(1, 9)), int(rng.integers(1, 6))
    d = d or int(rng.choice([16, 32, 64, 128]))
    s = sum(h * w for h, w in shapes)
    value = rng.standard_normal((b, s, n, d)).astype(np.float32)
    loc = rng.uniform(-0.1, 1.1, (b, q, n, n_lvl, p, 2)).astype(np.float32)
    att = rng.uniform(0, 1, (b, q, n, n_lvl, p)).astype(np.float32)
    ct = rng.standard_normal((b, q, n * d)).astype(np.float32)
    return shapes, value, loc, att, ct


def _check(shapes, value, loc, att, ct, dtype, block_sizes=None):
    args = [jnp.asarray(x, dtype) for x in (value, loc, att)]
    ref_args = [a.astype(jnp.float32) for a in args]  # same rounded inputs, fp32 reference
    ref, vjp = jax.vjp(lambda v, lo, a: ms_deform_attn_reference(v, shapes, lo, a), *ref_args)
    ref_grads = vjp(jnp.asarray(ct))
    b, q, n = value.shape[0], loc.shape[1], loc.shape[2]
    d = value.shape[-1]
    out = msda_pallas_fwd(args[0], shapes, args[1], args[2], block_sizes=block_sizes, poison=True)
    assert out.dtype == dtype
    assert rel_err(out.reshape(b, q, n * d).astype(jnp.float32), ref) <= RTOL[jnp.dtype(dtype).name]
    g = jnp.asarray(ct, dtype).reshape(b, q, n, d)
    grads = msda_pallas_bwd(args[0], shapes, args[1], args[2], g, block_sizes=block_sizes,
                            poison=True)
    for name, got, want in zip(("value", "loc", "att"), grads, ref_grads):
        err = rel_err(got.astype(jnp.float32), want)
        assert err <= RTOL[jnp.dtype(dtype).name], (name, err)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("seed", range(6))
def test_random_shapes(seed, dtype):
    _check(*_random_case(seed), dtype)


@pytest.mark.parametrize("d", [16, 32, 64, 128])
def test_head_dims(d):
    _check(*_random_case(100 + d, d), jnp.float32)


@pytest.mark.parametrize("bs", [BlockSizes(16, 2), BlockSizes(128, 8, block_q_bwd=64)])
def test_block_override(bs):
    _check(*_random_case(7, 32), jnp.float32, bs)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("seed", [21, 22])
def test_skip_outside(seed, dtype):
    """The masked gathers and atomics of `BlockSizes.skip_outside` (the interpreter has no
    masked gather, so only here is that lowering checked)."""
    _check(*_random_case(seed), dtype, BlockSizes(64, 8, block_q_bwd=16, num_warps_bwd=4,
                                                  skip_outside=True))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("seed,value_grad,grads", [(23, "scatter", True), (24, "scatter", False),
                                                   (25, "pull", True)])
def test_tile_point_grads(seed, value_grad, grads, dtype):
    """`BlockSizes.tile_point_grads` (the default): the backward's location and weight gradients
    stored as one padded, masked tile a program (power-of-two columns, the padding and the
    queries past Lq masked off), poisoned before they are written, also in the pull path's
    points kernel; off, three stores a point."""
    shapes, value, loc, att, ct = _random_case(seed)
    bs = dataclasses.replace(BlockSizes.get_default(value.shape[-1], loc.shape[1]),
                             tile_point_grads=grads, value_grad=value_grad)
    _check(shapes, value, loc, att, ct, dtype, bs)


def test_public_op_grad_matches_reference():
    shapes, value, loc, att, ct = _random_case(11, 32)

    def loss(impl):
        return lambda v, lo, a: jnp.sum(ms_deform_attn(v, shapes, lo, a, implementation=impl) * ct)

    got = jax.jit(jax.value_and_grad(loss("pallas"), argnums=(0, 1, 2)))(value, loc, att)
    want = jax.value_and_grad(loss("xla"), argnums=(0, 1, 2))(value, loc, att)
    assert abs(float(got[0]) - float(want[0])) <= 1e-4 * abs(float(want[0])) + 1e-3
    for a, b in zip(got[1], want[1]):
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("seed,rows,chunks,entries", [(31, 32, 1, 0), (32, 16, 1, 0),
                                                      (33, 64, 1, 0), (34, 32, 4, 0),
                                                      (35, 32, 1, 2)])
def test_value_grad_pull(seed, rows, chunks, entries, dtype):
    """`BlockSizes.value_grad="pull"`: the sort, the points kernel and the pull kernel's masked
    gathers and dynamic-length loop compiled, the value gradient poisoned before it is written
    (in one chunk; with 4 chunks, or each level's own split, the partial sums' masked
    atomics)."""
    shapes, value, loc, att, ct = _random_case(seed)
    bs = BlockSizes.get_default(value.shape[-1], loc.shape[1])
    _check(shapes, value, loc, att, ct, dtype, dataclasses.replace(
        bs, value_grad="pull", block_rows_pull=rows, chunks_pull=chunks,
        pull_run_entries=entries))
