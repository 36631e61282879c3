"""The fused image-token update of SAM's two-way transformer compiled for the GPU (marker gpu) at
the generator's size (64 prompts of 64 x 64 x 256 image tokens, 7 tokens, 8 heads of 16) against
the same update in XLA in float32 (`Attention.image_to_tokens` + residual + LayerNorm, full
precision): bfloat16 rel err <= 1e-2, with the image tokens shared by the prompts of 2 images
(the first block) and one map per prompt (the second).  Run on the device:
`JAX_PLATFORMS=cuda python3 -m pytest -q -m gpu tests/test_sam_image_to_tokens_gpu.py`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import RTOL, rel_err
from sarformer_jax.sam.common import layer_norm
from sarformer_jax.sam.transformer import Attention

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("layout,settings", [("loop", {}), ("merged", {}),
                                             ("merged", {"token_pad": 16})])
@pytest.mark.parametrize("shared", [True, False])
def test_kernel_on_gpu_matches_xla(shared, layout, settings):
    g, p, l, c, t = 2, 32, 4096, 256, 7
    attn = Attention(c, 8, 2, rngs=nnx.Rngs(0))
    norm = layer_norm(c, 1e-5, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)
    keys = jnp.asarray(rng.normal(size=(g, 1 if shared else p, l, c)), jnp.float32)
    pe = jnp.asarray(rng.normal(size=(1, 1, l, c)), jnp.float32)
    tk, tv = (jnp.asarray(rng.normal(size=(g, p, t, c)), jnp.float32) for _ in range(2))

    @jax.jit
    def ref(keys, pe, tk, tv):
        with jax.default_matmul_precision("highest"):
            return norm(keys + attn.image_to_tokens(keys + pe, tk, tv))

    want = np.asarray(ref(keys, pe, tk, tv))
    bf = lambda a: a.astype(jnp.bfloat16)
    attn_bf = nnx.clone(attn)
    attn_bf.q_proj.dtype = attn_bf.k_proj.dtype = attn_bf.v_proj.dtype = attn_bf.out_proj.dtype = jnp.bfloat16
    out = jax.jit(lambda *a: attn_bf.image_to_tokens_norm(*a, norm, heads=layout, **settings))(bf(keys), bf(pe), bf(tk), bf(tv))
    out = np.asarray(out.astype(jnp.float32))
    assert out.shape == (g, p, l, c) and np.isfinite(out).all()
    assert rel_err(out, want) <= RTOL["bfloat16"]
