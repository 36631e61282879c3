"""SAM's on-device image resize (`sam.transforms.resize_uint8`) against PIL, which upstream's
`ResizeLongestSide.apply_image` calls, and its taps against the dense integer matrix they
replace."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from PIL import Image

from sarformer_jax.sam.transforms import (get_preprocess_shape, pil_resize_taps, pil_resize_weights,
                                          pil_vertical_first, resize_uint8)


@pytest.mark.parametrize("hw, out", [
    ((640, 640), (1024, 1024)),  # the guidance's crops
    ((480, 640), (768, 1024)), ((683, 512), (1024, 767)),  # ADE20K-like, enlarged
    ((37, 50), (64, 86)),  # odd sizes
    ((2000, 1500), (1024, 768)), ((1500, 2048), (750, 1024)),  # shrunk: PIL's antialias taps
    ((1024, 1024), (1024, 1024)),  # nothing to do
    # tall images: Pillow 13 shrinks the height first (pil_vertical_first)
    ((1100, 300), (1024, 279)), ((3000, 1000), (1024, 341)), ((600, 400), (300, 500)),
    ((300, 1100), (279, 1024)),  # its wide twin: width first
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


def _dense_pass(x: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """One PIL pass through the dense integer weights (checked against the taps above)."""
    m = pil_resize_weights(x.shape[axis], n_out).astype(np.int64)
    acc = np.moveaxis(np.tensordot(m, np.moveaxis(x.astype(np.int64), axis, 0), axes=(1, 0)), 0, axis)
    return np.clip((acc + (1 << 21)) >> 22, 0, 255).astype(np.uint8)


def test_pass_order_is_the_installed_pillows():
    """On random sizes (up- and down-scaling, either axis) PIL's pixels are those of the order
    `pil_vertical_first` picks, and not those of the other order wherever the two differ."""
    rng = np.random.default_rng(0)
    decided = 0
    for _ in range(400):
        in_h, in_w, out_h, out_w = (int(v) for v in rng.integers(2, 90, 4))
        if in_h == out_h or in_w == out_w:
            continue
        x = rng.integers(0, 256, (in_h, in_w), dtype=np.uint8)
        want = np.array(Image.fromarray(x).resize((out_w, out_h), Image.BILINEAR))
        w_first = _dense_pass(_dense_pass(x, out_w, 1), out_h, 0)
        h_first = _dense_pass(_dense_pass(x, out_h, 0), out_w, 1)
        if np.array_equal(w_first, h_first):
            continue
        vfirst = pil_vertical_first((in_h, in_w), (out_h, out_w))
        np.testing.assert_array_equal(h_first if vfirst else w_first, want,
                                      err_msg=f"{(in_h, in_w)} -> {(out_h, out_w)}, vertical first {vfirst}")
        decided += 1
    assert decided > 200


def test_longest_side_sizes():
    assert get_preprocess_shape(640, 480, 1024) == (1024, 768)
    assert get_preprocess_shape(683, 512, 1024) == (1024, 768)  # 767.6 rounded half up
