"""Slide / whole / multi-scale + flip inference (ARCHITECTURE.md §1.3, mmseg semantics)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

from sarformer_jax.inference import (
    TTA_RATIOS,
    aug_inference,
    eval_key,
    predict_labels,
    rescale_size,
    slide_counts,
    slide_inference,
    slide_windows,
    whole_inference,
)

K = 5


def _pixelwise(x):
    """A per-pixel (translation-equivariant, local) nonlinear map [N, h, w, 3] -> [N, h, w, K]."""
    w = jnp.asarray(np.linspace(-1, 1, 3 * K).reshape(3, K), jnp.float32)
    return jax.nn.softmax(jnp.tanh(x @ w) * 3.0 + jnp.sin(x[..., :1]), axis=-1)


def _positional(key=0):
    """Not translation-equivariant: a 3x3 conv plus a bias ramp along x and y."""
    kernel = jax.random.normal(jax.random.key(key), (3, 3, 3, K))

    def fn(x):
        y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         precision=jax.lax.Precision.HIGHEST)
        h, w = x.shape[1:3]
        ramp = (jnp.linspace(0.0, 2.0, w)[None, None, :, None]
                + jnp.linspace(0.0, 1.0, h)[None, :, None, None] * jnp.arange(K))
        return y + ramp

    return fn


def _image(rng, b, h, w):
    return jnp.asarray(rng.normal(size=(b, h, w, 3)), jnp.float32)


def test_slide_windows_follow_the_spec():
    # §1.3 numbers: 640 x 2560 image, crop 640, stride 426 -> one row of 6 windows
    boxes = slide_windows(640, 2560, 640, 426)
    np.testing.assert_array_equal(boxes[:, 2], [0, 426, 852, 1278, 1704, 1920])
    assert (boxes[:, :2] == [0, 640]).all() and (boxes[:, 3] - boxes[:, 2] == 640).all()
    np.testing.assert_array_equal(slide_windows(640, 1000, 640, 426),
                                  [[0, 640, 0, 640], [0, 640, 360, 1000]])
    np.testing.assert_array_equal(slide_windows(300, 500, 640, 426), [[0, 300, 0, 500]])
    # h_grids = max(H - 640 + 425, 0) // 426 + 1
    for h in (1, 639, 640, 641, 1066, 1067, 1500):
        boxes = slide_windows(h, 700, 640, 426)
        rows = sorted({(a, b) for a, b, _, _ in boxes})
        assert len(rows) == max(h - 640 + 425, 0) // 426 + 1
        assert all(b - a == min(640, h) for a, b in rows) and rows[-1][1] == h
    count = slide_counts(1500, 700, 640, 426)
    assert count.min() >= 1 and count.max() == 6


def test_slide_equals_whole_when_one_window_covers(rng):
    fn = _positional()
    image = _image(rng, 2, 48, 40)
    whole = whole_inference(fn, image)
    slide = slide_inference(fn, image, (48, 40), (32, 32), K)
    assert rel_err(slide, whole) < 1e-6


def test_small_image_is_padded_to_the_crop(rng):
    fn = _positional()
    image = _image(rng, 1, 20, 30)
    slide = slide_inference(fn, image, 32, 21, K)
    padded = jnp.pad(image, ((0, 0), (0, 12), (0, 2), (0, 0)))
    assert rel_err(slide, fn(padded)[:, :20, :30]) < 1e-6
    # a per-pixel function does not see the padding: slide == whole
    assert rel_err(slide_inference(_pixelwise, image, 32, 21, K), _pixelwise(image)) < 1e-6


def test_slide_of_pixelwise_equals_whole(rng):
    image = _image(rng, 2, 70, 95)  # 3 x 4 overlapping windows
    assert len(slide_windows(70, 95, 32, 21)) == 12
    slide = slide_inference(_pixelwise, image, 32, 21, K)
    assert rel_err(slide, _pixelwise(image)) < 1e-6


def test_slide_matches_numpy_loop(rng):
    """Overlap averaging against a loop over window positions written from §1.3 directly."""
    fn = _positional(1)
    image = _image(rng, 2, 50, 61)
    crop, stride = (24, 32), (16, 13)
    got = np.asarray(slide_inference(fn, image, crop, stride, K))
    img = np.asarray(image)
    acc = np.zeros(img.shape[:3] + (K,))
    cnt = np.zeros(img.shape[:3] + (1,))
    y = 0
    while True:
        y2 = min(y + crop[0], 50)
        x = 0
        while True:
            x2 = min(x + crop[1], 61)
            ys, xs = slice(y2 - crop[0], y2), slice(x2 - crop[1], x2)
            acc[:, ys, xs] += np.asarray(fn(jnp.asarray(img[:, ys, xs])))
            cnt[:, ys, xs] += 1
            if x2 == 61:
                break
            x += stride[1]
        if y2 == 50:
            break
        y += stride[0]
    assert rel_err(got, acc / cnt) < 1e-6
    assert rel_err(got, whole_inference(fn, image)) > 1e-3  # windows matter for this fn


def test_jit_one_call_and_chunks(rng):
    calls = []

    def fn(x):
        calls.append(x.shape)
        return _positional(2)(x)

    image = _image(rng, 2, 40, 70)
    eager = slide_inference(fn, image, 32, 20, K)
    jitted = jax.jit(lambda im: slide_inference(fn, im, 32, 20, K))(image)
    assert calls == [(2 * 6, 32, 32, 3)] * 2  # B * windows in one call, eager and traced
    assert rel_err(jitted, eager) < 1e-6
    calls.clear()
    chunked = slide_inference(fn, image, 32, 20, K, window_batch=4)
    assert calls == [(4, 32, 32, 3)] * 3
    assert rel_err(chunked, eager) < 1e-6


def test_rescale_size():
    assert rescale_size(512, 683, (2560, 640)) == (640, 854)  # ADE20K val image
    assert rescale_size(1024, 2048, (1024, 512)) == (512, 1024)
    assert rescale_size(640, 4000, (2560, 640)) == (410, 2560)  # long side binds
    assert rescale_size(333, 500, 0.75) == (250, 375)


def test_single_view_is_plain_inference(rng):
    fn = _positional()
    image = _image(rng, 1, 40, 52)
    got = aug_inference(fn, image, K, scale=None, scales=(1.0,), crop=32, stride=20)
    assert rel_err(got, slide_inference(fn, image, 32, 20, K)) < 1e-6
    # the eval scale resizes, the output comes back at the original (or the given) size
    got = aug_inference(fn, image, K, scale=(64, 48), crop=32, stride=20)
    assert got.shape == (1, 40, 52, K)
    got = aug_inference(fn, image, K, scale=None, out_size=(30, 31), mode="whole")
    assert got.shape == (1, 30, 31, K)


def test_flip_tta_is_symmetric_on_a_symmetric_image(rng):
    fn = _positional(3)
    half = rng.normal(size=(1, 36, 25, 3))
    image = jnp.asarray(np.concatenate([half, half[:, :, ::-1]], axis=2), jnp.float32)
    got = aug_inference(fn, image, K, scale=(60, 36), scales=(0.75, 1.0, 1.25), flip=True,
                        crop=24, stride=16)
    assert got.shape == (1, 36, 50, K)
    assert rel_err(got[:, :, ::-1], got) < 1e-6
    no_flip = aug_inference(fn, image, K, scale=(60, 36), scales=(0.75, 1.0, 1.25),
                            crop=24, stride=16)
    assert rel_err(no_flip[:, :, ::-1], no_flip) > 1e-3


def test_views_are_softmaxed_then_averaged(rng):
    image = _image(rng, 1, 30, 44)
    # a per-pixel function commutes with flipping: both views equal, the mean is their softmax
    got = aug_inference(_pixelwise, image, K, scale=None, flip=True, mode="whole")
    assert rel_err(got, jax.nn.softmax(_pixelwise(image), axis=-1)) < 1e-6
    # a constant image gives the same output at every scale; jitted, with windows padded at
    # the small scales (regression: this graph once aborted XLA's CPU simplifier)
    const = jnp.ones((1, 30, 44, 3)) * 0.3
    tta = jax.jit(lambda im: aug_inference(_pixelwise, im, K, scale=(88, 60), scales=TTA_RATIOS,
                                           flip=True, crop=64, stride=48))
    got = tta(const)
    assert rel_err(got, jax.nn.softmax(_pixelwise(const), axis=-1)) < 1e-6
    assert predict_labels(got).shape == (1, 30, 44)


def test_eval_key_is_fixed_per_image():
    a, b = eval_key(0, 7), eval_key(0, 7)
    assert (jax.random.key_data(a) == jax.random.key_data(b)).all()
    assert not (jax.random.key_data(a) == jax.random.key_data(eval_key(0, 8))).all()


def test_errors(rng):
    with pytest.raises(ValueError, match="mode"):
        aug_inference(_pixelwise, _image(rng, 1, 8, 8), K, mode="tile")
    with pytest.raises(ValueError, match="K=7"):
        slide_inference(_pixelwise, _image(rng, 1, 8, 8), 4, 4, 7)
    with pytest.raises(ValueError, match="positive"):
        slide_windows(8, 8, 0, 4)
