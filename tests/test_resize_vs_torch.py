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
