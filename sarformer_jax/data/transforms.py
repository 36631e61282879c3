"""Training and evaluation transforms with the semantics of the pipeline that ran (ARCHITECTURE
§6.2, §1.1), as pure numpy / OpenCV functions of an explicit `np.random.Generator`.

A sample is a dict: `image` uint8 [H, W, 3] RGB, `label` uint8 [H, W] (255 = ignore, already
reduced), optionally `proposals` bool [N, H, W].  Geometric transforms move the label and the
proposals with nearest-neighbour sampling only, so neither is ever interpolated; proposals are
resampled with the same source-pixel index maps as OpenCV's INTER_NEAREST, but only inside the
crop window (resizing every mask of a full image would cost far more than the crop needs).
"""

from __future__ import annotations

import cv2
import numpy as np

IGNORE = 255


# ------------------------------------------------------------------ resize (keep ratio)
def rescale_size(hw: tuple[int, int], scale: tuple[int, int]) -> tuple[int, int]:
    """(H, W) after a keep-ratio rescale that fits `scale` = (long, short) edge limits: the factor
    is min(long_limit / long_edge, short_limit / short_edge), sizes rounded half up."""
    h, w = hw
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def sample_resize_scale(rng: np.random.Generator, scale: tuple[int, int],
                        ratio_range: tuple[float, float]) -> tuple[int, int]:
    """RandomResize: r ~ U(lo, hi), target (int(scale0 * r), int(scale1 * r))."""
    lo, hi = ratio_range
    r = rng.random() * (hi - lo) + lo
    return int(scale[0] * r), int(scale[1] * r)


def resize_image(image: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    if image.shape[:2] == tuple(size_hw):
        return image
    return cv2.resize(image, (size_hw[1], size_hw[0]), interpolation=cv2.INTER_LINEAR)


def resize_label(label: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    if label.shape[:2] == tuple(size_hw):
        return label
    return cv2.resize(label, (size_hw[1], size_hw[0]), interpolation=cv2.INTER_NEAREST)


def nearest_index(src: int, dst: int) -> np.ndarray:
    """Source index of each destination pixel under OpenCV's INTER_NEAREST:
    min(floor(x * (1 / (dst / src))), src - 1), computed in float64 as OpenCV does."""
    inv = 1.0 / (dst / src)
    return np.minimum(np.floor(np.arange(dst) * inv).astype(np.int64), src - 1)


# ------------------------------------------------------------------ crop, flip, pad
def crop_box(rng: np.random.Generator, hw: tuple[int, int], crop: tuple[int, int]):
    """Uniform crop offsets: (y1, y2, x1, x2); the crop is clipped to the image."""
    margin_h, margin_w = max(hw[0] - crop[0], 0), max(hw[1] - crop[1], 0)
    y1 = int(rng.integers(0, margin_h + 1))
    x1 = int(rng.integers(0, margin_w + 1))
    return y1, y1 + min(crop[0], hw[0]), x1, x1 + min(crop[1], hw[1])


def choose_crop(rng: np.random.Generator, label: np.ndarray, crop: tuple[int, int],
                cat_max_ratio: float, ignore_index: int = IGNORE):
    """RandomCrop's box: with cat_max_ratio < 1, a box is redrawn (up to 10 times) until the
    crop holds >= 2 non-ignored classes and the largest covers < cat_max_ratio of them; if no
    try succeeds, the last drawn box is used."""
    box = crop_box(rng, label.shape, crop)
    if cat_max_ratio < 1.0:
        for _ in range(10):
            y1, y2, x1, x2 = box
            values, counts = np.unique(label[y1:y2, x1:x2], return_counts=True)
            counts = counts[values != ignore_index]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            box = crop_box(rng, label.shape, crop)
    return box


def pad_to(array: np.ndarray, size_hw: tuple[int, int], value, axes=(0, 1)) -> np.ndarray:
    """Pads bottom / right of the two spatial `axes` up to `size_hw`."""
    pad = [(0, 0)] * array.ndim
    for ax, target in zip(axes, size_hw):
        if array.shape[ax] > target:
            raise ValueError(f"cannot pad size {array.shape[ax]} down to {target}")
        pad[ax] = (0, target - array.shape[ax])
    if all(p == (0, 0) for p in pad):
        return array
    return np.pad(array, pad, constant_values=value)


# ------------------------------------------------------------------ photometric
def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """x * alpha + beta in float32, clipped to [0, 255], truncated back to uint8."""
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(image: np.ndarray, rng: np.random.Generator, *,
                           brightness_delta: int = 32, contrast_range=(0.5, 1.5),
                           saturation_range=(0.5, 1.5), hue_delta: int = 18) -> np.ndarray:
    """PhotoMetricDistortion on a uint8 image (RGB here; brightness and contrast act per channel
    alike and HSV is taken with the matching channel order, so it equals the BGR original).

    Draw order: brightness flag [, beta]; contrast-mode coin; (contrast flag [, alpha]) if the
    coin says first; saturation flag [, alpha]; hue flag [, delta]; (contrast ...) if last.
    Each step happens with p 0.5 (a draw from {0, 1})."""
    img = image
    if rng.integers(2):
        img = _convert(img, beta=rng.uniform(-brightness_delta, brightness_delta))
    contrast_first = rng.integers(2) == 1

    def contrast(x):
        if rng.integers(2):
            return _convert(x, alpha=rng.uniform(*contrast_range))
        return x

    if contrast_first:
        img = contrast(img)
    if rng.integers(2):
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*saturation_range))
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if rng.integers(2):
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        shift = int(rng.integers(-hue_delta, hue_delta))
        hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + shift) % 180).astype(np.uint8)
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if not contrast_first:
        img = contrast(img)
    return img


def normalize(image: np.ndarray, mean, std) -> np.ndarray:
    """uint8 RGB -> float32 (x - mean) / std."""
    mean = np.asarray(mean, np.float32)
    inv_std = 1.0 / np.asarray(std, np.float32)
    return (image.astype(np.float32) - mean) * inv_std


def warp_boxes(boxes: np.ndarray, src_hw: tuple[int, int], new_hw: tuple[int, int],
               crop: tuple[int, int, int, int], flip: bool, max_boxes: int) -> np.ndarray:
    """Detector boxes (xyxy, continuous pixel coordinates of the source image) through
    RandomResize (scale by new/src per axis), RandomCrop (shift by the crop's corner, clip to it;
    boxes left with no area are dropped) and the horizontal flip (x -> crop width - x).
    Returns float32 [max_boxes, 4], NaN rows where there is no box."""
    out = np.full((max_boxes, 4), np.nan, np.float32)
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    if len(b):
        y1, y2, x1, x2 = crop
        sy, sx = new_hw[0] / src_hw[0], new_hw[1] / src_hw[1]
        b = b * np.array([sx, sy, sx, sy]) - np.array([x1, y1, x1, y1])
        b[:, 0::2] = np.clip(b[:, 0::2], 0, x2 - x1)
        b[:, 1::2] = np.clip(b[:, 1::2], 0, y2 - y1)
        if flip:
            b[:, [0, 2]] = (x2 - x1) - b[:, [2, 0]]
        b = b[(b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])][:max_boxes]
        out[: len(b)] = b
    return out


# ------------------------------------------------------------------ the pipelines
def train_transform(sample: dict, rng: np.random.Generator, *, crop_size, scale, ratio_range,
                    cat_max_ratio: float, flip_prob: float, photometric: bool, mean, std,
                    ignore_index: int = IGNORE, max_boxes: int = 0,
                    normalize_image: bool = True, label_dtype=np.int32) -> dict:
    """RandomResize -> RandomCrop -> RandomFlip -> PhotoMetricDistortion -> normalise -> pad.

    Returns image float32 [h, w, 3], label [h, w] (`label_dtype`, ignore_index in the padding)
    and, when present, proposals uint8 [N, h, w] (h, w = crop_size); the proposals undergo
    exactly the label's geometry; detector `boxes` [m, 4] become float32 [max_boxes, 4]
    (`warp_boxes`).  With `normalize_image=False` the image stays uint8 (padded with 0) and
    `image_hw` int32 [2] holds its size before padding: the training loader ships that (a
    quarter of the bytes) and the step normalises on the device (`pipeline.device_inputs`),
    which gives exactly this function's float32 image."""
    image, label = sample["image"], sample["label"]
    label_hw = label.shape
    crop_size = tuple(crop_size)
    target = sample_resize_scale(rng, tuple(scale), tuple(ratio_range))
    new_hw = rescale_size(label.shape, target)
    image = resize_image(image, new_hw)
    label = resize_label(label, new_hw)
    y1, y2, x1, x2 = choose_crop(rng, label, crop_size, cat_max_ratio, ignore_index)
    image, label = image[y1:y2, x1:x2], label[y1:y2, x1:x2]
    flip = rng.random() < flip_prob
    if flip:
        image, label = image[:, ::-1], label[:, ::-1]
    out = {}
    if "proposals" in sample:
        masks = sample["proposals"]
        ys = nearest_index(masks.shape[1], new_hw[0])[y1:y2]
        xs = nearest_index(masks.shape[2], new_hw[1])[x1:x2]
        if flip:
            xs = xs[::-1]
        warped = masks[:, ys[:, None], xs[None, :]]
        out["proposals"] = pad_to(warped.astype(np.uint8), crop_size, 0, axes=(1, 2))
    if "boxes" in sample:
        out["boxes"] = warp_boxes(sample["boxes"], label_hw, new_hw, (y1, y2, x1, x2), flip,
                                  max_boxes)
    if photometric:
        image = photometric_distortion(np.ascontiguousarray(image), rng)
    if normalize_image:
        out["image"] = pad_to(normalize(image, mean, std), crop_size, 0.0)
    else:
        out["image"] = pad_to(np.ascontiguousarray(image), crop_size, 0)
        out["image_hw"] = np.asarray(image.shape[:2], np.int32)
    out["label"] = pad_to(label.astype(label_dtype), crop_size, ignore_index)
    return out


def select_proposals(masks: np.ndarray, num_queries: int, rng: np.random.Generator):
    """Drops empty masks; more than Q left -> a random subset of Q (kept in cache order);
    pads with zero masks to Q.  Returns (uint8 [Q, h, w], number of real masks)."""
    keep = np.flatnonzero(masks.reshape(len(masks), -1).any(-1))
    if len(keep) > num_queries:
        keep = np.sort(rng.choice(keep, num_queries, replace=False))
    out = np.zeros((num_queries,) + masks.shape[1:], np.uint8)
    out[: len(keep)] = masks[keep]
    return out, len(keep)


def eval_resize_shape(hw: tuple[int, int], scale) -> tuple[int, int]:
    return rescale_size(hw, tuple(scale))


def eval_transform(image: np.ndarray, *, scale, mean, std) -> np.ndarray:
    """Test-time Resize(scale, keep_ratio) with bilinear interpolation, then normalise."""
    return normalize(resize_image(image, eval_resize_shape(image.shape[:2], scale)), mean, std)


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """0 -> 255, k -> k - 1 (uint8 arithmetic as the original: 0 - 1 wraps to 255, 255 -> 254
    then back to 255)."""
    out = label.astype(np.int32) - 1
    out[label == 0] = IGNORE
    out[label == IGNORE] = IGNORE
    return out.astype(np.uint8)


def check_label(label: np.ndarray, num_classes: int, name: str,
                ignore_index: int = IGNORE) -> None:
    """Raises if a label map holds values outside [0, K) ∪ {ignore}."""
    values = np.unique(label)
    bad = values[(values >= num_classes) & (values != ignore_index)]
    if len(bad):
        raise ValueError(f"{name}: label values {bad[:8].tolist()} outside [0, {num_classes}) "
                         f"and != {ignore_index}")

