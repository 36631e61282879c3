"""The fused SAM upscaling kernel (kernels/sam_upscale.py) on the CPU, in the Pallas interpreter:
its erf against XLA's, its shape checks, and its masks against an independent numpy evaluation
of SAM's upscaling head (two stride-2 transposed convs written as explicit pixel loops, LayerNorm,
exact GELU from math.erf).  The decoder-level parity with segment-anything is in
test_sam_vs_segment_anything.py (upscale "pallas_interpret")."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import RTOL, rel_err
from sarformer_jax.kernels.sam_upscale import _erf, _gelu_poly, conv2_masks, default_block_l, hyper_blocks, upscale_masks


def test_erf_approximation_is_within_its_bound():
    x = np.linspace(-6, 6, 200001, dtype=np.float32)
    err = np.abs(np.asarray(_erf(jnp.asarray(x))) - np.asarray(jax.lax.erf(jnp.asarray(x))))
    assert err.max() <= 6e-7


def test_polynomial_gelu_is_within_its_bound():
    """The conv2 kernel's multiply-add-only GELU: |error| <= 1.6e-5 |x| / 2 (+ float32 rounding)
    against math.erf in float64, over the polynomial's range, its clamp and beyond."""
    x = np.linspace(-9, 9, 360001, dtype=np.float32)
    exact = np.array([0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x.astype(np.float64)])
    err = np.abs(np.asarray(_gelu_poly(jnp.asarray(x)), np.float64) - exact)
    assert np.all(err <= 0.8e-5 * np.abs(x) + 1e-6 * np.maximum(1.0, np.abs(exact)))
    assert err.max() > 1e-7  # not the exact function: the bound above is what it promises


def _numpy_head(x, w1, b1, g, be, w2, b2, hyper, eps):
    """x [b,h,w,c]; w1 [2,2,c,c1] with out[2i+p, 2j+q] = x[i,j] @ w1[p,q]; same for w2."""
    b, h, w, _ = x.shape
    gelu = np.vectorize(lambda v: 0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))))
    y = np.zeros((b, 2 * h, 2 * w, w1.shape[-1]))
    for p in range(2):
        for q in range(2):
            y[:, p::2, q::2] = x @ w1[p, q] + b1
    mu = y.mean(-1, keepdims=True)
    var = ((y - mu) ** 2).mean(-1, keepdims=True)
    y = gelu((y - mu) / np.sqrt(var + eps) * g + be)
    z = np.zeros((b, 4 * h, 4 * w, w2.shape[-1]))
    for p in range(2):
        for q in range(2):
            z[:, p::2, q::2] = y @ w2[p, q] + b2
    z = gelu(z)
    return np.einsum("bmc,bhwc->bmhw", hyper, z)


@pytest.mark.parametrize("h,w,masks,block_l,direct", [
    (4, 8, 3, None, None),  # block of 32 > row of 8: planes + transpose
    (8, 8, 1, 16, None),
    (4, 4, 4, 16, None),
    (3, 16, 3, 16, None),  # one block per row: stride-4 stores into the final masks
    (2, 32, 2, 16, True),  # two blocks per row
    (2, 32, 2, 16, False),
])
@pytest.mark.parametrize("products", ["rows", "tensor"])
def test_kernel_matches_a_numpy_evaluation(h, w, masks, block_l, direct, products):
    if products == "tensor" and direct is False:
        pytest.skip("the tensor form has no planes layout")
    rng = np.random.default_rng(h * w + masks)
    b, c, c1, c2 = 3, 32, 16, 16
    args = [rng.normal(size=s).astype(np.float32) for s in
            [(b, h, w, c), (2, 2, c, c1), (c1,), (c1,), (c1,), (2, 2, c1, c2), (c2,), (b, masks, c2)]]
    args[1] /= math.sqrt(c)
    args[5] /= math.sqrt(c1)
    args[3] = 1.0 + 0.1 * args[3]
    ref = _numpy_head(*[a.astype(np.float64) for a in args], eps=1e-6)
    out = upscale_masks(*map(jnp.asarray, args), eps=1e-6, block_l=block_l, interpret=True, direct=direct,
                        products=products)
    assert out.shape == (b, masks, 4 * h, 4 * w)
    assert rel_err(np.asarray(out), ref) <= RTOL["float32"]


def test_tensor_form_blocks_span_token_rows():
    """A block of 32 tokens over rows of 12 (blocks start mid-row): every pixel is still written
    where it belongs (the output is poisoned with NaN in the interpreter where nothing lands)."""
    rng = np.random.default_rng(5)
    b, h, w, c, c1, c2, masks = 2, 8, 12, 32, 16, 16, 3
    args = [rng.normal(size=s).astype(np.float32) for s in
            [(b, h, w, c), (2, 2, c, c1), (c1,), (c1,), (c1,), (2, 2, c1, c2), (c2,), (b, masks, c2)]]
    args[1] /= math.sqrt(c)
    args[5] /= math.sqrt(c1)
    ref = _numpy_head(*[a.astype(np.float64) for a in args], eps=1e-6)
    out = np.asarray(upscale_masks(*map(jnp.asarray, args), eps=1e-6, block_l=32, interpret=True, products="tensor"))
    assert np.isfinite(out).all() and rel_err(out, ref) <= RTOL["float32"]


def test_hyper_blocks_put_each_mask_on_its_sub_position_columns():
    hyper = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2) + 1  # [b=2, m=3, c2=2]
    hb = np.asarray(hyper_blocks(jnp.asarray(hyper)))
    assert hb.shape == (2, 8, 16)
    for bi in range(2):
        for s2 in range(4):
            for ch in range(2):
                for col in range(16):
                    k, t = divmod(col, 4)
                    want = hyper[bi, min(k, 2), ch] if t == s2 else 0.0
                    assert hb[bi, s2 * 2 + ch, col] == want


def test_kernel_rejects_bad_shapes():
    z = lambda *s: jnp.zeros(s, jnp.float32)
    with pytest.raises(ValueError, match=r"w1 \(2, 2, 8, 16\).*\[2,2,c,c1\]"):
        upscale_masks(z(1, 4, 4, 32), z(2, 2, 8, 16), z(16), z(16), z(16), z(2, 2, 16, 16), z(16), z(1, 3, 16),
                      interpret=True)
    with pytest.raises(ValueError, match="block_l=32 must divide the 16 image tokens"):
        upscale_masks(z(1, 4, 4, 32), z(2, 2, 32, 16), z(16), z(16), z(16), z(2, 2, 16, 16), z(16), z(1, 3, 16),
                      block_l=32, interpret=True)
    with pytest.raises(ValueError, match="direct=True needs block_l=16 to divide the row of 8 tokens"):
        upscale_masks(z(1, 4, 8, 32), z(2, 2, 32, 16), z(16), z(16), z(16), z(2, 2, 16, 16), z(16), z(1, 3, 16),
                      block_l=16, direct=True, interpret=True)
    with pytest.raises(ValueError, match="products must be 'rows' or 'tensor', got 'cols'"):
        upscale_masks(z(1, 4, 4, 32), z(2, 2, 32, 16), z(16), z(16), z(16), z(2, 2, 16, 16), z(16), z(1, 3, 16),
                      products="cols", interpret=True)
    with pytest.raises(ValueError, match="products='tensor' always writes the final masks"):
        upscale_masks(z(1, 4, 4, 32), z(2, 2, 32, 16), z(16), z(16), z(16), z(2, 2, 16, 16), z(16), z(1, 3, 16),
                      products="tensor", direct=False, interpret=True)
    with pytest.raises(ValueError, match="12 image tokens are not a multiple of 16"):
        default_block_l(12)


@pytest.mark.parametrize("direct,products", [(True, "rows"), (False, "rows"), (None, "tensor")])
def test_kernel_lowers_to_triton_for_a_gpu(direct, products):
    """Lowering for CUDA on this CPU machine runs the Pallas Triton lowering of every primitive
    in the kernel (an unsupported one, e.g. lax.erf, raises here); the GPU run is the gpu test."""
    s = jax.ShapeDtypeStruct
    b, h, w, c, c1, c2, m = 2, 64, 64, 256, 64, 32, 3
    f32, dtype = jnp.float32, jnp.bfloat16
    args = [s((b, h, w, c), dtype), s((2, 2, c, c1), f32), s((c1,), f32), s((c1,), f32), s((c1,), f32),
            s((2, 2, c1, c2), f32), s((c2,), f32), s((b, m, c2), dtype)]
    lowered = jax.jit(lambda *a: upscale_masks(*a, direct=direct, products=products)).trace(*args).lower(
        lowering_platforms=("cuda",))
    assert "__gpu$xla.gpu.triton" in lowered.as_text()


def test_kernel_refuses_float32_outside_the_interpreter():
    z = lambda *s: jnp.zeros(s, jnp.float32)
    with pytest.raises(ValueError, match="float32 image tokens are not supported on the GPU"):
        upscale_masks(z(1, 4, 16, 32), z(2, 2, 32, 16), z(16), z(16), z(16), z(2, 2, 16, 16), z(16), z(1, 3, 16))


def _numpy_conv2(y, w2, b2, hyper):
    """y [b, n, c1] -> [b, n, 2, 2, m]: mask k of row r at sub-position (X, Y) of the second conv."""
    gelu = np.vectorize(lambda v: 0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))))
    z = gelu(np.einsum("bnc,pqco->bnpqo", y, w2) + b2)
    return np.einsum("bnpqo,bmo->bnpqm", z, hyper)


@pytest.mark.parametrize("n,masks,block_n,per_program", [(64, 3, None, 1), (48, 1, 16, 1), (32, 4, 32, 1),
                                                        (96, 5, 32, 1), (96, 3, 16, 3), (128, 2, 16, 4)])
def test_conv2_kernel_matches_a_numpy_evaluation(n, masks, block_n, per_program):
    """Against numpy; per_program > 1: each program loops over that many row blocks."""
    rng = np.random.default_rng(n + masks)
    b, c1, c2 = 2, 16, 16
    y = rng.normal(size=(b, n, c1)).astype(np.float32)
    w2 = (rng.normal(size=(2, 2, c1, c2)) / math.sqrt(c1)).astype(np.float32)
    b2 = rng.normal(size=(c2,)).astype(np.float32)
    hyper = rng.normal(size=(b, masks, c2)).astype(np.float32)
    ref = _numpy_conv2(*[a.astype(np.float64) for a in (y, w2, b2, hyper)])
    out = np.asarray(conv2_masks(*map(jnp.asarray, (y, w2, b2, hyper)), block_n=block_n,
                                 per_program=per_program, interpret=True))
    mp = max(4, 1 << (masks - 1).bit_length())
    assert out.shape == (b, n, 4 * mp)
    got = out.reshape(b, n, mp, 2, 2)  # column 4k + 2X + Y
    assert rel_err(got[:, :, :masks].transpose(0, 1, 3, 4, 2), ref) <= RTOL["float32"]
    # padding columns repeat the last mask
    np.testing.assert_array_equal(got[:, :, masks:], np.repeat(got[:, :, masks - 1:masks], mp - masks, axis=2))


@pytest.mark.parametrize("dtype,gelu", [(jnp.float32, "erf"), (jnp.bfloat16, "poly"), (jnp.bfloat16, "erf")])
def test_conv2_kernel_with_the_first_convs_bias_norm_and_gelu(dtype, gelu):
    """first=(b1, scale, offset): the input is the first conv's product; the kernel adds b1 and
    applies the channel LayerNorm and GELU before the second conv (numpy evaluation)."""
    rng = np.random.default_rng(12)
    b, n, c1, c2, masks, eps = 2, 64, 16, 16, 3, 1e-6
    y = (rng.normal(size=(b, n, c1)) * 3 + 1).astype(np.float32)
    b1, g, be = (rng.normal(size=(c1,)).astype(np.float32), (1 + 0.2 * rng.normal(size=(c1,))).astype(np.float32),
                 (0.3 * rng.normal(size=(c1,))).astype(np.float32))
    w2 = (rng.normal(size=(2, 2, c1, c2)) / math.sqrt(c1)).astype(np.float32)
    b2 = rng.normal(size=(c2,)).astype(np.float32)
    hyper = rng.normal(size=(b, masks, c2)).astype(np.float32)
    ya, ha = jnp.asarray(y, dtype), jnp.asarray(hyper, dtype)
    v = np.asarray(ya.astype(jnp.float32), np.float64) + b1
    mu = v.mean(-1, keepdims=True)
    var = ((v - mu) ** 2).mean(-1, keepdims=True)
    gelu_np = np.vectorize(lambda t: 0.5 * t * (1.0 + math.erf(t / math.sqrt(2.0))))
    act = gelu_np((v - mu) / np.sqrt(var + eps) * g + be)
    ref = _numpy_conv2(act, w2.astype(np.float64), b2.astype(np.float64),
                       np.asarray(ha.astype(jnp.float32), np.float64))
    out = conv2_masks(ya, jnp.asarray(w2), jnp.asarray(b2), ha, first=tuple(map(jnp.asarray, (b1, g, be))), eps=eps,
                      gelu=gelu, interpret=True)
    got = np.asarray(out, np.float64).reshape(b, n, 4, 2, 2)[:, :, :masks].transpose(0, 1, 3, 4, 2)
    assert rel_err(got, ref) <= RTOL[jnp.dtype(dtype).name]
    # without `first` the same input gives other masks: the prologue is really applied
    plain = np.asarray(conv2_masks(ya, jnp.asarray(w2), jnp.asarray(b2), ha, gelu=gelu, interpret=True), np.float64)
    assert rel_err(plain.reshape(got.shape[:2] + (4, 2, 2))[:, :, :masks].transpose(0, 1, 3, 4, 2), ref) > 0.05


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_conv2_kernel_polynomial_gelu_in_half_precision(dtype):
    """gelu='poly' against numpy's exact GELU (half-precision tolerance) and against the kernel's
    erf form on the same half-precision inputs."""
    rng = np.random.default_rng(11)
    b, n, c1, c2, masks = 2, 64, 16, 16, 3
    y = rng.normal(size=(b, n, c1)).astype(np.float32)
    w2 = (rng.normal(size=(2, 2, c1, c2)) / math.sqrt(c1)).astype(np.float32)
    b2 = rng.normal(size=(c2,)).astype(np.float32)
    hyper = rng.normal(size=(b, masks, c2)).astype(np.float32)
    args = [jnp.asarray(y, dtype), jnp.asarray(w2), jnp.asarray(b2), jnp.asarray(hyper, dtype)]
    ref = _numpy_conv2(*[np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in args])
    poly = np.asarray(conv2_masks(*args, gelu="poly", interpret=True), np.float64).reshape(b, n, 4, 2, 2)
    erf = np.asarray(conv2_masks(*args, gelu="erf", interpret=True), np.float64).reshape(b, n, 4, 2, 2)
    assert rel_err(poly[:, :, :masks].transpose(0, 1, 3, 4, 2), ref) <= RTOL["bfloat16"]
    assert rel_err(poly, erf) <= 2e-3  # the two GELUs differ far below a half-precision step


def test_conv2_kernel_rejects_bad_input():
    z = lambda *s: jnp.zeros(s, jnp.float32)
    with pytest.raises(ValueError, match=r"w2 \(2, 2, 8, 16\).*\[2,2,c1,c2\]"):
        conv2_masks(z(1, 32, 16), z(2, 2, 8, 16), z(16), z(1, 3, 16), interpret=True)
    with pytest.raises(ValueError, match="40 rows are not a multiple of 16"):
        conv2_masks(z(1, 40, 16), z(2, 2, 16, 16), z(16), z(1, 3, 16), interpret=True)
    with pytest.raises(ValueError, match="block_n=64 must divide the 32 rows"):
        conv2_masks(z(1, 32, 16), z(2, 2, 16, 16), z(16), z(1, 3, 16), block_n=64, interpret=True)
    with pytest.raises(ValueError, match="per_program=3 must divide the 2 blocks of 16 rows"):
        conv2_masks(z(1, 32, 16), z(2, 2, 16, 16), z(16), z(1, 3, 16), block_n=16, per_program=3, interpret=True)
    with pytest.raises(ValueError, match="float32 inputs are not supported on the GPU"):
        conv2_masks(z(1, 32, 16), z(2, 2, 16, 16), z(16), z(1, 3, 16))
    with pytest.raises(ValueError, match="gelu='poly'.*bfloat16 / float16 inputs, got float32"):
        conv2_masks(z(1, 32, 16), z(2, 2, 16, 16), z(16), z(1, 3, 16), gelu="poly", interpret=True)
    with pytest.raises(ValueError, match=r"first must be \(bias, scale, offset\) of shape \(16,\) each, "
                                         r"got \[\(16,\), \(8,\), \(16,\)\]"):
        conv2_masks(z(1, 32, 16), z(2, 2, 16, 16), z(16), z(1, 3, 16), first=(z(16), z(8), z(16)), interpret=True)
    with pytest.raises(ValueError, match="gelu must be 'erf' or 'poly', got 'tanh'"):
        conv2_masks(z(1, 32, 16), z(2, 2, 16, 16), z(16), z(1, 3, 16), gelu="tanh", interpret=True)


@pytest.mark.parametrize("per_program,num_stages,gelu,first", [(1, 1, "erf", False), (4, 3, "erf", False),
                                                                (1, 1, "poly", False), (1, 1, "poly", True)])
def test_conv2_kernel_lowers_to_triton_for_a_gpu(per_program, num_stages, gelu, first):
    s = jax.ShapeDtypeStruct
    args = [s((2, 16384, 64), jnp.bfloat16), s((2, 2, 64, 32), jnp.float32), s((32,), jnp.float32),
            s((2, 3, 32), jnp.bfloat16)]
    f = functools.partial(conv2_masks, per_program=per_program, num_stages=num_stages, gelu=gelu)
    if first:
        f = lambda y, w2, b2, hy, f=f: f(y, w2, b2, hy, first=(jnp.zeros(64), jnp.ones(64), jnp.zeros(64)))
    lowered = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))
    assert "__gpu$xla.gpu.triton" in lowered.as_text()


def test_auto_upscaling_picks_the_conv2_kernel_on_a_gpu_in_half_precision_only(monkeypatch):
    from flax import nnx

    from sarformer_jax.sam.mask_decoder import MaskDecoder

    dec = MaskDecoder(transformer_dim=32, transformer_depth=1, transformer_heads=2, transformer_mlp_dim=16,
                      iou_head_hidden_dim=16, rngs=nnx.Rngs(0))
    assert dec.upscale_implementation == "auto"
    assert dec.resolved_upscale(jnp.bfloat16, 4096) == "blocks"  # the CPU here
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert dec.resolved_upscale(jnp.bfloat16, 4096) == "blocks_pallas"
    assert dec.resolved_upscale(jnp.float16, 4096) == "blocks_pallas"
    assert dec.resolved_upscale(jnp.float32, 4096) == "blocks"
    assert dec.resolved_upscale(jnp.bfloat16, 6) == "blocks"  # 24 rows: not a multiple of 16
    dec.upscale_implementation = "upstream"
    assert dec.resolved_upscale(jnp.bfloat16, 4096) == "upstream"
