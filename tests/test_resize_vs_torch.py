"""`resize_bilinear` vs PyTorch `F.interpolate(bilinear, align_corners=False)` for every resize
pair the head uses (ARCHITECTURE.md §9), square 640 crops and the 512x1024 Cityscapes crop."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import RTOL, rel_err
from sarformer_jax.models.layers import resize_bilinear

PAIRS = [
    ((640, 640), (20, 20)),  # proposals -> layer-0 attention mask (1/32)
    ((640, 640), (160, 160)),  # proposals -> pooling grid (1/4)
    ((40, 40), (160, 160)),
    ((40, 40), (80, 80)),
    ((40, 40), (20, 20)),  # prediction masks -> next layer's attention mask
    ((20, 20), (40, 40)),
    ((80, 80), (160, 160)),  # FPN step of the pixel decoder
    ((160, 160), (640, 640)),  # final upsample at inference
    ((160, 160), (20, 20)),
    ((160, 160), (40, 40)),
    ((160, 160), (80, 80)),
    ((512, 1024), (16, 32)),
    ((512, 1024), (128, 256)),
    ((64, 128), (128, 256)),
    ((128, 256), (512, 1024)),
    ((128, 256), (32, 64)),
]


@pytest.mark.parametrize("src,dst", PAIRS)
def test_resize_matches_torch(src, dst, rng):
    x = rng.normal(size=(1, 3) + src).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.as_tensor(x), size=dst, mode="bilinear", align_corners=False)
    ours = resize_bilinear(jnp.asarray(x), dst, axes=(2, 3))  # NCHW, as the head resizes [B, Q, H, W]
    assert ours.shape == ref.shape
    assert rel_err(ours, ref.numpy()) <= RTOL["float32"]
    ours_nhwc = resize_bilinear(jnp.asarray(x.transpose(0, 2, 3, 1)), dst)
    assert rel_err(ours_nhwc, ref.numpy().transpose(0, 2, 3, 1)) <= RTOL["float32"]


def test_binary_mask_downsample_samples_pixel_pairs():
    """640 -> 20 samples pixels (32i+15, 32i+16) only (§4.4): a mask lit elsewhere vanishes."""
    m = np.zeros((1, 1, 640, 640), np.float32)
    m[..., 0:15, :] = 1.0
    m[..., 17:32, :] = 1.0
    out = np.asarray(resize_bilinear(jnp.asarray(m), (20, 20), axes=(2, 3)))
    assert np.all(out[..., 0, :] == 0)


@pytest.mark.parametrize("src,dst", [((640, 640), (160, 160)), ((96, 90), (32, 18)), ((45, 28), (9, 7)),
                                     ((12, 10), (12, 5))])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_whole_factor_downscale_is_the_matrix_product_bit_for_bit(src, dst, dtype, rng):
    """The whole-factor path (even factors average two pixels, odd ones pick one; one axis may
    keep its size) gives exactly the two matrix products' results, values and gradients, and
    torch's to float32 rounding."""
    import jax

    from sarformer_jax.models.layers import resize_axis_by_matrix

    def by_matrices(x):
        for ax, n_out in ((2, dst[0]), (3, dst[1])):
            if x.shape[ax] != n_out:
                x = resize_axis_by_matrix(x, ax, n_out)
        return x

    x = jnp.asarray(rng.normal(size=(2, 3) + src), dtype)
    ours = jax.jit(lambda v: resize_bilinear(v, dst, axes=(2, 3)))(x)
    want = jax.jit(by_matrices)(x)
    assert ours.dtype == want.dtype and ours.shape == want.shape
    np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(want, np.float32))
    ct = jnp.asarray(rng.normal(size=want.shape), dtype)
    g = jax.grad(lambda v: jnp.sum((resize_bilinear(v, dst, axes=(2, 3)) * ct).astype(jnp.float32)))(x)
    g_want = jax.grad(lambda v: jnp.sum((by_matrices(v) * ct).astype(jnp.float32)))(x)
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(g_want, np.float32))
    if dtype == "float32":
        ref = torch.nn.functional.interpolate(torch.as_tensor(np.array(x)), size=dst, mode="bilinear",
                                              align_corners=False)
        assert rel_err(ours, ref.numpy()) <= RTOL["float32"]


def test_resize_bench_smoke(capsys):
    import argparse

    from sarformer_jax.benchmarks import resize

    parser = argparse.ArgumentParser()
    resize.add_arguments(parser)
    assert resize.run(parser.parse_args(["--shape", "1,2,24,24", "--sizes", "8,6", "--reps", "1"])) == 0
    out = capsys.readouterr().out
    assert out.count("same values: True") == 2


@pytest.mark.parametrize("src,dst", [((40, 40), (640, 640)), ((5, 7), (80, 21)), ((3, 4), (3, 12)),
                                     ((1, 2), (16, 4)), ((40, 20), (640, 60))])
def test_whole_factor_upscale_taps(src, dst, rng):
    """`upscale="taps"` (each output from its two neighbours with the interpolation matrix's
    own weights; the auxiliary CE's 1/16 -> 1 upscale with `model.loss.aux_resize=taps`)
    against torch (values, gradients in float64) and the matrix products (values to float32
    rounding of two-term sums, gradients); a non-whole factor falls back to the products; bad
    methods are refused."""
    import jax

    from sarformer_jax.models.layers import upscale_taps

    x = rng.normal(size=(2, 3) + src).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.as_tensor(x), size=dst, mode="bilinear",
                                          align_corners=False).numpy()
    taps = jax.jit(lambda v: resize_bilinear(v, dst, axes=(2, 3), upscale="taps"))
    ours = taps(jnp.asarray(x))
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) <= RTOL["float32"]  # (torch rounds its 1/3 scale: ~1e-6 apart)
    by_matrix = resize_bilinear(jnp.asarray(x), dst, axes=(2, 3))
    np.testing.assert_allclose(np.asarray(ours), np.asarray(by_matrix), rtol=0, atol=5e-7)
    ct = jnp.asarray(rng.normal(size=ref.shape), jnp.float32)
    g = jax.grad(lambda v: jnp.sum(taps(v) * ct))(jnp.asarray(x))
    g_want = jax.grad(lambda v: jnp.sum(resize_bilinear(v, dst, axes=(2, 3)) * ct))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_want), rtol=1e-5, atol=1e-5)
    xt = torch.as_tensor(x, dtype=torch.float64).requires_grad_()
    torch.nn.functional.interpolate(xt, size=dst, mode="bilinear", align_corners=False).backward(
        torch.as_tensor(np.asarray(ct), dtype=torch.float64))
    np.testing.assert_allclose(np.asarray(g), xt.grad.numpy(), rtol=1e-5, atol=1e-5)
    assert np.allclose(upscale_taps(src[0], dst[0] // src[0]).sum(0), 1.0)
    odd = resize_bilinear(jnp.asarray(x), (src[0] * 3 + 1, src[1]), axes=(2, 3), upscale="taps")
    want = torch.nn.functional.interpolate(torch.as_tensor(x), size=(src[0] * 3 + 1, src[1]),
                                           mode="bilinear", align_corners=False).numpy()
    assert rel_err(odd, want) <= RTOL["float32"]
    with pytest.raises(ValueError, match="upscale must be one of"):
        resize_bilinear(jnp.asarray(x), dst, axes=(2, 3), upscale="nearest")


def test_aux_ce_loss_taps_equals_matrix(rng):
    """The auxiliary CE with the taps upscale equals the matrix one (loss and logits gradient)."""
    import jax

    from sarformer_jax.losses import aux_ce_loss

    logits = jnp.asarray(rng.normal(size=(2, 5, 6, 7)), jnp.float32)
    gt = rng.integers(0, 7, size=(2, 80, 96)).astype(np.int32)
    gt[:, :10] = 255
    gt = jnp.asarray(gt)
    vals = [jax.value_and_grad(lambda v, m=m: aux_ce_loss(v, gt, m))(logits)
            for m in ("matrix", "taps")]
    assert abs(float(vals[0][0]) - float(vals[1][0])) <= 1e-6 * abs(float(vals[0][0]))
    with pytest.raises(ValueError, match="model.loss.aux_resize"):
        aux_ce_loss(logits, gt, "bicubic")
    np.testing.assert_allclose(np.asarray(vals[1][1]), np.asarray(vals[0][1]), rtol=1e-5,
                               atol=1e-9)
