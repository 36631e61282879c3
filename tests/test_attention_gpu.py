"""cuDNN fused attention on the GPU against the XLA attention (marker gpu): BEiT's attention
with its relative position bias (odd token count, values and gradients, the bias table's
included) and SAM's encoder attention with the relative positions as channels (windowed and
global blocks, vit_b and vit_h head dims), also with v at its own head dim (`cudnn_narrow_v`).

Reference: the float32 XLA attention on the same inputs (parameters and inputs rounded to bf16,
weights at the models' init scale 0.02).  The cuDNN result in bf16 must be within 1e-2 of it, or
within twice the XLA attention's own bf16 error where that is larger (a bias gradient summed over
all tokens in bf16 is at ~1e-2 by itself); a wrong attention is off by O(1).
Run on the device machine: `JAX_PLATFORMS=cuda python3 -m pytest -q -m gpu tests/test_attention_gpu.py`
(tests/conftest.py defaults JAX_PLATFORMS to cpu)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import RTOL, rel_err
from sarformer_jax.models.layers import init_rngs

pytestmark = pytest.mark.gpu

RUNS = (("cudnn", jnp.bfloat16), ("xla", jnp.bfloat16), ("xla", jnp.float32))


def _randomize(module, seed):
    graphdef, state = nnx.split(module)
    leaves, tree = jax.tree_util.tree_flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [(0.02 * jax.random.normal(k, x.shape, jnp.float32)).astype(jnp.bfloat16)
              .astype(jnp.float32) for k, x in zip(keys, leaves)]
    return graphdef, jax.tree_util.tree_unflatten(tree, leaves)


def _input(shape):
    return jax.random.normal(jax.random.key(2), shape).astype(jnp.bfloat16).astype(jnp.float32)


def _check(results, what):
    got, low, ref = (np.asarray(jnp.asarray(r, jnp.float32)) for r in results)
    assert np.isfinite(got).all(), what
    tol = max(RTOL["bfloat16"], 2 * rel_err(low, ref))
    assert rel_err(got, ref) <= tol, (what, rel_err(got, ref), rel_err(low, ref))


@pytest.mark.parametrize("grid", [(40, 40), (7, 9)])
def test_beit_attention_cudnn_matches_xla(grid):
    from sarformer_jax.models.beit import BEiTAttention

    dim, heads = 768, 12
    t = 1 + grid[0] * grid[1]
    x = _input((2, t, dim))
    ct = jax.random.normal(jax.random.key(3), (2, t, dim))
    outs, grads = [], []
    for impl, dtype in RUNS:
        m = BEiTAttention(dim, heads, grid, implementation=impl, dtype=dtype, rngs=init_rngs(0))
        graphdef, state = _randomize(m, 1)

        def loss(st, x):
            return jnp.sum(nnx.merge(graphdef, st)(x, grid).astype(jnp.float32) * ct)

        _, g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(state, x)
        outs.append(jax.jit(lambda st, x: nnx.merge(graphdef, st)(x, grid))(state, x))
        grads.append(jax.tree_util.tree_leaves(g))
    _check(outs, "output")
    for i, leaf in enumerate(grads[0]):
        _check([g[i] for g in grads], f"gradient {i} {leaf.shape}")


@pytest.mark.parametrize("fused", ["cudnn", "cudnn_narrow_v"])
@pytest.mark.parametrize("hw,dim,heads", [((14, 14), 768, 12), ((64, 64), 768, 12), ((64, 64), 1280, 16)])
def test_sam_attention_cudnn_matches_xla(hw, dim, heads, fused):
    from sarformer_jax.sam.image_encoder import Attention

    x = _input((1, *hw, dim))
    outs = []
    for impl, dtype in ((fused, jnp.bfloat16),) + RUNS[1:]:
        m = Attention(dim, num_heads=heads, input_size=hw, implementation=impl, dtype=dtype,
                      rngs=init_rngs(0))
        graphdef, state = _randomize(m, 1)
        outs.append(jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))(state, x))
    _check(outs, "output")
