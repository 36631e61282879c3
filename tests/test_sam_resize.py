"""SAM's on-device image resize (`sam.transforms.resize_uint8`) against PIL, which upstream's
`ResizeLongestSide.apply_image` calls, and its taps against the dense integer matrix they
replace."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from PIL import Image

from sarformer_jax.sam.transforms import (get_preprocess_shape, pil_resize_taps, pil_resize_weights,
                                          resize_uint8)


@pytest.mark.parametrize("hw, out", [
    ((640, 640), (1024, 1024)),  # the guidance's crops
    ((480, 640), (768, 1024)), ((683, 512), (1024, 767)),  # ADE20K-like, enlarged
    ((37, 50), (64, 86)),  # odd sizes
    ((2000, 1500), (1024, 768)), ((1500, 2048), (750, 1024)),  # shrunk: PIL's antialias taps
    ((1024, 1024), (1024, 1024)),  # nothing to do
])
def test_resize_uint8_is_pil_bilinear(hw, out):
    rng = np.random.default_rng(sum(hw))
    x = rng.integers(0, 256, hw + (3,), dtype=np.uint8)
    x[: hw[0] // 3] = 255  # saturated and flat regions too
    want = np.array(Image.fromarray(x).resize(out[::-1], Image.BILINEAR))
    got = np.asarray(jax.jit(lambda a: resize_uint8(a, out))(x))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("n_in, n_out", [(640, 1024), (77, 26), (3000, 1024), (5, 7), (1024, 1024),
                                         (1, 3), (3, 1)])
def test_taps_are_the_dense_weights(n_in, n_out):
    dense = pil_resize_weights(n_in, n_out)
    idx, w = pil_resize_taps(n_in, n_out)
    assert idx.min() >= 0 and idx.max() < n_in
    rebuilt = np.zeros_like(dense)
    np.add.at(rebuilt, (np.repeat(np.arange(n_out), idx.shape[1]), idx.ravel()), w.ravel())
    np.testing.assert_array_equal(rebuilt, dense)
    # the resize of a batch through the taps is the dense integer product, pixel for pixel
    rng = np.random.default_rng(n_in)
    x = rng.integers(0, 256, (2, n_in, 4, 3), dtype=np.uint8)
    acc = np.einsum("oi,bihc->bohc", dense.astype(np.int64), x.astype(np.int64))
    want = np.clip((acc + (1 << 21)) >> 22, 0, 255).astype(np.uint8)
    got = np.asarray(resize_uint8(x, (n_out, 4)))
    np.testing.assert_array_equal(got, want)


def test_longest_side_sizes():
    assert get_preprocess_shape(640, 480, 1024) == (1024, 768)
    assert get_preprocess_shape(683, 512, 1024) == (1024, 768)  # 767.6 rounded half up
