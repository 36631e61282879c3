"""Training / eval transforms against independent re-derivations of the mmcv / mmseg semantics
(ARCHITECTURE §6.2), written out here in numpy and OpenCV (BGR, as the original ran them)."""

import cv2
import numpy as np
import pytest

from sarformer_jax.data import transforms as T

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


# ------------------------------------------------------------------ oracles (mmcv semantics)
def oracle_keep_ratio_size(h, w, scale):
    """mmcv.imrescale: factor = min(long_limit / long_edge, short_limit / short_edge);
    new size = int(edge * factor + 0.5)."""
    long_limit, short_limit = max(scale), min(scale)
    factor = min(long_limit / max(h, w), short_limit / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def oracle_bilinear(img, out_h, out_w):
    """Half-pixel bilinear without antialiasing, edges clamped (cv2 INTER_LINEAR in float)."""
    h, w = img.shape[:2]
    ys = np.clip((np.arange(out_h) + 0.5) * h / out_h - 0.5, 0, h - 1)
    xs = np.clip((np.arange(out_w) + 0.5) * w / out_w - 0.5, 0, w - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    wy, wx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    f = img.astype(np.float64)
    top = f[y0][:, x0] * (1 - wx) + f[y0][:, x1] * wx
    bot = f[y1][:, x0] * (1 - wx) + f[y1][:, x1] * wx
    return top * (1 - wy) + bot * wy


def oracle_nearest(lab, out_h, out_w):
    """cv2 INTER_NEAREST (resizeNN): no half-pixel offset, the source index is
    floor(x * ifx) with ifx = 1 / fx and fx = dst / src in double precision.  (The exact integer
    floor(x * src / dst) differs from OpenCV at some sizes, e.g. 13 of 9216 pixels in a crop.)"""
    h, w = lab.shape[:2]

    def index(src, dst):
        ifx = 1.0 / (dst / src)
        return np.array([min(int(np.floor(x * ifx)), src - 1) for x in range(dst)])

    return lab[index(h, out_h)][:, index(w, out_w)]


def oracle_crop(rng, seg, crop, cat_max_ratio, ignore=255):
    def draw():
        mh, mw = max(seg.shape[0] - crop[0], 0), max(seg.shape[1] - crop[1], 0)
        oy = rng.integers(0, mh + 1)
        ox = rng.integers(0, mw + 1)
        return oy, oy + crop[0], ox, ox + crop[1]

    box = draw()
    for _ in range(10):
        part = seg[box[0]:box[1], box[2]:box[3]]
        vals, cnt = np.unique(part, return_counts=True)
        cnt = cnt[vals != ignore]
        if len(cnt) > 1 and np.max(cnt) / np.sum(cnt) < cat_max_ratio:
            break
        box = draw()
    return box


def oracle_photometric(bgr, rng):
    """mmseg PhotoMetricDistortion on a BGR uint8 image, draw order as the original."""
    def conv(img, alpha=1.0, beta=0.0):
        img = img.astype(np.float32) * alpha + beta
        return np.clip(img, 0, 255).astype(np.uint8)

    img = bgr
    if rng.integers(2):
        img = conv(img, beta=rng.uniform(-32, 32))
    mode = rng.integers(2)

    def contrast(img):
        if rng.integers(2):
            img = conv(img, alpha=rng.uniform(0.5, 1.5))
        return img

    if mode == 1:
        img = contrast(img)
    if rng.integers(2):
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        hsv[:, :, 1] = conv(hsv[:, :, 1], alpha=rng.uniform(0.5, 1.5))
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if rng.integers(2):
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + rng.integers(-18, 18)) % 180
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if mode == 0:
        img = contrast(img)
    return img


def _scene(rng, h=90, w=120, k=6):
    """An RGB image and a blocky label with a few classes and some 255."""
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    small = rng.integers(0, k, (h // 10 + 1, w // 10 + 1)).astype(np.uint8)
    label = np.kron(small, np.ones((10, 10), np.uint8))[:h, :w]
    label[rng.random((h, w)) < 0.05] = 255
    return image, label


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("hw,scale", [((512, 683), (2560, 640)), ((683, 512), (2560, 640)),
                                      ((1024, 2048), (2048, 1024)), ((160, 192), (512, 128)),
                                      ((100, 1000), (2560, 640)), ((333, 517), (1441, 360))])
def test_rescale_size(hw, scale):
    assert T.rescale_size(hw, scale) == oracle_keep_ratio_size(*hw, scale)


def test_random_resize_scale_draw():
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    for _ in range(20):
        r = rng_b.random() * 1.5 + 0.5
        assert T.sample_resize_scale(rng_a, (2560, 640), (0.5, 2.0)) == (int(2560 * r),
                                                                        int(640 * r))


@pytest.mark.parametrize("out_hw", [(45, 61), (180, 250), (91, 120), (300, 97)])
def test_resize_image_and_label(rng, out_hw):
    image, label = _scene(rng)
    got = T.resize_image(image, out_hw)
    assert got.shape == out_hw + (3,) and got.dtype == np.uint8
    # cv2 uses 11-bit fixed-point weights for uint8: within one grey level of exact bilinear.
    assert np.abs(got.astype(float) - oracle_bilinear(image, *out_hw)).max() <= 1.0
    lab = T.resize_label(label, out_hw)
    np.testing.assert_array_equal(lab, oracle_nearest(label, *out_hw))
    assert set(np.unique(lab)) <= set(np.unique(label))  # never interpolated
    ys, xs = T.nearest_index(label.shape[0], out_hw[0]), T.nearest_index(label.shape[1], out_hw[1])
    np.testing.assert_array_equal(label[ys][:, xs], lab)


def test_crop_matches_oracle_and_constraint(rng):
    _, label = _scene(rng, 200, 260)
    for seed in range(30):
        box = T.choose_crop(np.random.default_rng(seed), label, (64, 64), 0.75)
        assert box == tuple(int(v) for v in oracle_crop(np.random.default_rng(seed), label,
                                                          (64, 64), 0.75))
    # A one-class map never satisfies the constraint: 1 + 10 draws, the last box is used.
    flat = np.zeros((50, 70), np.uint8)
    r = np.random.default_rng(1)
    draws = [(int(r.integers(0, 51 - 20)), int(r.integers(0, 71 - 30))) for _ in range(11)]
    y1, _, x1, _ = T.choose_crop(np.random.default_rng(1), flat, (20, 30), 0.75)
    assert (y1, x1) == draws[-1]
    # cat_max_ratio = 1 disables the check: a single draw.
    assert T.choose_crop(np.random.default_rng(1), flat, (20, 30), 1.0)[::2] == draws[0]
    # Crop larger than the image: clipped to the image.
    assert T.crop_box(np.random.default_rng(0), (30, 40), (64, 64)) == (0, 30, 0, 40)


def test_photometric_matches_bgr_oracle(rng):
    image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    changed = 0
    for seed in range(48):
        ours = T.photometric_distortion(image, np.random.default_rng(seed))
        bgr = oracle_photometric(image[..., ::-1].copy(), np.random.default_rng(seed))
        np.testing.assert_array_equal(ours, bgr[..., ::-1])
        changed += not np.array_equal(ours, image)
    assert changed > 40


def test_normalize_and_pad():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    out = T.normalize(img, MEAN, STD)
    np.testing.assert_allclose(out, (img - np.array(MEAN)) / np.array(STD), rtol=1e-6)
    padded = T.pad_to(out, (4, 5), 0.0)
    assert padded.shape == (4, 5, 3) and np.all(padded[2:] == 0) and np.all(padded[:, 3:] == 0)
    lab = T.pad_to(np.zeros((2, 3), np.int32), (4, 5), 255)
    assert np.all(lab[2:] == 255) and np.all(lab[:2, :3] == 0)
    with pytest.raises(ValueError):
        T.pad_to(lab, (3, 3), 255)


def oracle_train(image, label, masks, rng, crop, scale, ratio, cat, flip_p):
    lo, hi = ratio
    r = rng.random() * (hi - lo) + lo
    target = (int(scale[0] * r), int(scale[1] * r))
    nh, nw = oracle_keep_ratio_size(*label.shape, target)
    img = cv2.resize(image[..., ::-1], (nw, nh), interpolation=cv2.INTER_LINEAR)  # BGR
    lab = oracle_nearest(label, nh, nw)
    m = np.stack([oracle_nearest(x, nh, nw) for x in masks])
    y1, y2, x1, x2 = oracle_crop(rng, lab, crop, cat)
    img, lab, m = img[y1:y2, x1:x2], lab[y1:y2, x1:x2], m[:, y1:y2, x1:x2]
    if rng.random() < flip_p:
        img, lab, m = img[:, ::-1], lab[:, ::-1], m[:, :, ::-1]
    img = oracle_photometric(np.ascontiguousarray(img), rng)[..., ::-1]  # back to RGB
    img = (img.astype(np.float32) - np.float32(MEAN)) / np.float32(STD)
    ph, pw = crop[0] - img.shape[0], crop[1] - img.shape[1]
    img = np.pad(img, ((0, ph), (0, pw), (0, 0)))
    lab = np.pad(lab.astype(np.int32), ((0, ph), (0, pw)), constant_values=255)
    m = np.pad(m.astype(np.uint8), ((0, 0), (0, ph), (0, pw)))
    return img, lab, m


@pytest.mark.parametrize("seed", range(6))
def test_train_transform_matches_composed_oracle(rng, seed):
    image, label = _scene(rng, 90, 130)
    classes = [c for c in np.unique(label) if c != 255]
    masks = np.stack([label == c for c in classes] + [rng.random(label.shape) < 0.5])
    kw = dict(crop_size=(96, 96), scale=(256, 96), ratio_range=(0.5, 2.0), cat_max_ratio=0.75,
              flip_prob=0.5)
    out = T.train_transform({"image": image, "label": label, "proposals": masks},
                            np.random.default_rng(seed), photometric=True, mean=MEAN, std=STD,
                            **kw)
    img, lab, m = oracle_train(image, label, masks, np.random.default_rng(seed), (96, 96),
                               (256, 96), (0.5, 2.0), 0.75, 0.5)
    np.testing.assert_allclose(out["image"], img, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(out["label"], lab)
    np.testing.assert_array_equal(out["proposals"], m)
    assert out["image"].dtype == np.float32 and out["label"].dtype == np.int32
    assert set(np.unique(out["label"])) <= set(np.unique(label)) | {255}
    # Proposals move exactly like the label: the one-hot planes are the warped label.
    valid = out["label"] != 255
    for i, c in enumerate(classes):
        np.testing.assert_array_equal(out["proposals"][i].astype(bool) & valid,
                                      out["label"] == c)


def test_select_proposals():
    r = np.random.default_rng(0)
    masks = r.random((12, 8, 8)) < 0.3
    masks[3] = False  # emptied by the crop: dropped
    out, n = T.select_proposals(masks, 20, r)
    assert n == 11 and out.shape == (20, 8, 8) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:11], np.delete(masks, 3, 0))
    assert not out[11:].any()
    sub, n = T.select_proposals(masks, 5, np.random.default_rng(1))
    assert n == 5
    picked = [i for i in range(12) if any(np.array_equal(masks[i], s) for s in sub)]
    assert len(picked) == 5 and 3 not in picked
    sub2, _ = T.select_proposals(masks, 5, np.random.default_rng(1))
    np.testing.assert_array_equal(sub, sub2)


def test_reduce_zero_label_and_check():
    lab = np.array([[0, 1, 150], [255, 2, 0]], np.uint8)
    np.testing.assert_array_equal(T.reduce_zero_label(lab), [[255, 0, 149], [255, 1, 255]])
    T.check_label(T.reduce_zero_label(lab), 150, "x.png")
    with pytest.raises(ValueError, match="bad.png.*150"):
        T.check_label(np.array([[150, 3]], np.uint8), 150, "bad.png")


def test_eval_transform():
    img = np.random.default_rng(0).integers(0, 256, (512, 683, 3), dtype=np.uint8)
    out = T.eval_transform(img, scale=(2560, 640), mean=MEAN, std=STD)
    assert out.shape == (640, 854, 3) and out.dtype == np.float32
    ref = (cv2.resize(img, (854, 640), interpolation=cv2.INTER_LINEAR).astype(np.float32)
           - np.float32(MEAN)) / np.float32(STD)
    np.testing.assert_allclose(out, ref, atol=1e-5)
