"""cuDNN fused attention on the GPU against the XLA attention (marker gpu), in bf16 with the
float32 XLA result on the same rounded inputs as the reference (rel err <= 1e-2):
BEiT's attention with its relative position bias (odd token count, values and gradients, the
bias table's included) and SAM's encoder attention with the relative positions as channels
(windowed and global blocks, vit_b and vit_h head dims).
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


def _randomize(module, seed):
    graphdef, state = nnx.split(module)
    leaves, tree = jax.tree_util.tree_flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [0.2 * jax.random.normal(k, x.shape, jnp.float32) for k, x in zip(keys, leaves)]
    return graphdef, jax.tree_util.tree_unflatten(tree, leaves)


@pytest.mark.parametrize("grid", [(40, 40), (7, 9)])
def test_beit_attention_cudnn_matches_xla(grid):
    from sarformer_jax.models.beit import BEiTAttention

    dim, heads = 768, 12
    outs, grads = {}, {}
    for impl, dtype in (("cudnn", jnp.bfloat16), ("xla", jnp.float32)):
        m = BEiTAttention(dim, heads, grid, implementation=impl, dtype=dtype, rngs=init_rngs(0))
        graphdef, state = _randomize(m, 1)
        t = 1 + grid[0] * grid[1]
        x = jax.random.normal(jax.random.key(2), (2, t, dim)).astype(jnp.bfloat16).astype(jnp.float32)
        ct = jax.random.normal(jax.random.key(3), (2, t, dim))

        def loss(st, x):
            return jnp.sum(nnx.merge(graphdef, st)(x, grid).astype(jnp.float32) * ct)

        f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        _, (gs, gx) = f(state, x)
        outs[impl] = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x, grid))(state, x)
        grads[impl] = (gs, gx)
    assert rel_err(outs["cudnn"], outs["xla"]) <= RTOL["bfloat16"]
    assert rel_err(grads["cudnn"][1], grads["xla"][1]) <= RTOL["bfloat16"]
    for a, b in zip(jax.tree_util.tree_leaves(grads["cudnn"][0]), jax.tree_util.tree_leaves(grads["xla"][0])):
        assert rel_err(a, b) <= RTOL["bfloat16"], a.shape


@pytest.mark.parametrize("hw,dim,heads", [((14, 14), 768, 12), ((64, 64), 768, 12), ((64, 64), 1280, 16)])
def test_sam_attention_cudnn_matches_xla(hw, dim, heads):
    from sarformer_jax.sam.image_encoder import Attention

    outs = {}
    for impl, dtype in (("cudnn", jnp.bfloat16), ("xla", jnp.float32)):
        m = Attention(dim, num_heads=heads, input_size=hw, implementation=impl, dtype=dtype,
                      rngs=init_rngs(0))
        graphdef, state = _randomize(m, 1)
        x = jax.random.normal(jax.random.key(2), (2, *hw, dim)).astype(jnp.bfloat16).astype(jnp.float32)
        out = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))(state, x)
        outs[impl] = np.asarray(out.astype(jnp.float32))
    assert np.isfinite(outs["cudnn"]).all()
    assert rel_err(outs["cudnn"], outs["xla"]) <= RTOL["bfloat16"]
