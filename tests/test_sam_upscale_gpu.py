"""The fused SAM upscaling kernel compiled for the GPU (marker gpu) at the generator's size (64
prompts of 64 x 64 x 256 image tokens, 3 masks) against an XLA evaluation of the same head
(explicit depth-to-space, exact GELU): bfloat16 rel err <= 1e-2 against the float32 reference,
with the masks written directly and as planes by the "rows" form, and by the "tensor" form.  (The kernel refuses float32 on the GPU: with
full-precision Triton products one call did not finish within 100 s.)  Run on the device:
`JAX_PLATFORMS=cuda python3 -m pytest -q -m gpu tests/test_sam_upscale_gpu.py`."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import RTOL, rel_err
from sarformer_jax.kernels.sam_upscale import upscale_masks

pytestmark = pytest.mark.gpu


def _xla_head(x, w1, b1, g, be, w2, b2, hyper, eps=1e-6):
    hp = jax.lax.Precision.HIGHEST

    def up(v, k, bias):
        b, h, w, _ = v.shape
        y = jnp.einsum("bhwc,pqco->bhpwqo", v, k, precision=hp).reshape(b, 2 * h, 2 * w, -1)
        return y + bias

    y = up(x, w1, b1)
    mu = y.mean(-1, keepdims=True)
    var = ((y - mu) ** 2).mean(-1, keepdims=True)
    y = jax.nn.gelu((y - mu) / jnp.sqrt(var + eps) * g + be, approximate=False)
    z = jax.nn.gelu(up(y, w2, b2), approximate=False)
    return jnp.einsum("bmc,bhwc->bmhw", hyper, z, precision=hp)


@pytest.mark.parametrize("dtype,direct,products", [("bfloat16", True, "rows"), ("bfloat16", False, "rows"),
                                                    ("bfloat16", None, "tensor")])
def test_kernel_on_gpu_matches_xla(dtype, direct, products):
    rng = np.random.default_rng(0)
    b, h, w, c, c1, c2, m = 64, 64, 64, 256, 64, 32, 3
    args = [rng.normal(size=s).astype(np.float32) for s in
            [(b, h, w, c), (2, 2, c, c1), (c1,), (c1,), (c1,), (2, 2, c1, c2), (c2,), (b, m, c2)]]
    args[1] /= math.sqrt(c)
    args[5] /= math.sqrt(c1)
    ref = np.asarray(jax.jit(_xla_head)(*map(jnp.asarray, args)))
    x = jnp.asarray(args[0], dtype)
    out = upscale_masks(x, *map(jnp.asarray, args[1:]), direct=direct, products=products)
    out = np.asarray(out.astype(jnp.float32))
    assert out.shape == (b, m, 4 * h, 4 * w) and np.isfinite(out).all()
    assert rel_err(out, ref) <= RTOL[dtype]


def test_blocks_pallas_decoder_on_gpu_matches_blocks():
    """The decoder's 'blocks_pallas' upscaling (XLA first conv, the conv2 kernel) against its
    'blocks' XLA path in bfloat16, and both against float32 upstream."""
    from flax import nnx

    from sarformer_jax.models.layers import init_rngs
    from sarformer_jax.sam.mask_decoder import MaskDecoder

    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 64, 64, 256)).astype(np.float32)
    hyper = rng.normal(size=(64, 3, 32)).astype(np.float32)
    outs = {}
    for impl, dt in [("upstream", jnp.float32), ("blocks", jnp.bfloat16), ("blocks_pallas", jnp.bfloat16),
                     ("blocks_pallas+norm", jnp.bfloat16)]:
        dec = MaskDecoder(rngs=init_rngs(0), dtype=None if dt == jnp.float32 else dt)
        dec.upscale_implementation = impl.removesuffix("+norm")
        dec.upscale_fuse_norm = impl.endswith("+norm")  # the first conv's LayerNorm and GELU in the kernel
        graphdef, state = nnx.split(dec)
        f = jax.jit(lambda st, a, h: nnx.merge(graphdef, st).upscale_masks(a, h))
        with jax.default_matmul_precision("highest" if dt == jnp.float32 else "default"):
            outs[impl] = np.asarray(f(state, jnp.asarray(x, dt), jnp.asarray(hyper, dt)).astype(jnp.float32))
    assert outs["blocks_pallas"].shape == (64, 3, 256, 256) and np.isfinite(outs["blocks_pallas"]).all()
    assert rel_err(outs["blocks_pallas"], outs["upstream"]) <= RTOL["bfloat16"]
    assert rel_err(outs["blocks_pallas+norm"], outs["upstream"]) <= RTOL["bfloat16"]
    assert rel_err(outs["blocks"], outs["upstream"]) <= RTOL["bfloat16"]
