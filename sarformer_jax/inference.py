"""Test-time inference around a per-window probability function: whole image, sliding window
(ARCHITECTURE.md §1.3), multi-scale + horizontal-flip TTA, resize back to the original size.

Legend: b batch, n windows, h w spatial, k classes.

`prob_fn` maps a batch of normalised RGB windows [N, h, w, 3] to class scores [N, h, w, K]
(SARFormer: the §4.7 mask-classification "probabilities").  Every function here is jit-friendly:
shapes and window positions are static (numpy), all windows of a batch go to `prob_fn` in one
call (or in equal-size chunks), and the per-pixel window count is a numpy constant.

Conventions follow mmseg's EncoderDecoder / TTA:
  * slide: window rows `y1 = i * stride`, `y2 = min(y1 + crop, H)`, `y1 = max(y2 - crop, 0)`
    (likewise x); window outputs are summed into place and divided by the per-pixel count.
    A window smaller than the crop (image smaller than the crop) is padded at the bottom / right
    with `pad_value` (0 = the mean colour in normalised space, as the training pipeline pads) so
    that the model always sees crop-size inputs (§8 #17: a documented deviation; the original
    would crash), and the padded part of the output is dropped.
  * each scale: the image is resized keeping its aspect ratio to fit (long, short) =
    (ratio * scale) as mmcv's `rescale_size` (0.x `MultiScaleFlipAug(img_scale, img_ratios)`;
    `scale=None` gives 1.x `Resize(scale_factor=ratio)`: relative to the input size).
  * each view's output is resized bilinearly (align_corners=False) to the original size and
    flipped back; with several views each is softmaxed over K and the views are averaged (mmseg
    `aug_test` / `SegTTAModel`), a single view is returned as is.  `predict_labels` = argmax.
Images are resized here in float (normalised values: bilinear resize commutes with the per-channel
affine normalisation), where the original resized uint8 with OpenCV; the difference is cv2's
fixed-point rounding.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sarformer_jax.models.layers import resize_bilinear

ProbFn = Callable[[jax.Array], jax.Array]

# Multi-scale ratios of the original test config (and mmseg's ADE20K `tta_pipeline`).
TTA_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def _pair(x: int | Sequence[int]) -> tuple[int, int]:
    return (int(x), int(x)) if np.ndim(x) == 0 else (int(x[0]), int(x[1]))


def slide_windows(h: int, w: int, crop: int | Sequence[int],
                  stride: int | Sequence[int]) -> np.ndarray:
    """Window boxes of mmseg's slide inference, row-major.

    Args:
      h, w: image size.  crop, stride: (h, w) pairs or ints.
    Returns:
      [n, 4] int64 (y1, y2, x1, x2): `y2 - y1 = min(crop_h, h)`, likewise for x.
    """
    (ch, cw), (sh, sw) = _pair(crop), _pair(stride)
    if min(ch, cw, sh, sw) < 1 or h < 1 or w < 1:
        raise ValueError(f"slide_windows: need positive sizes, got image {(h, w)}, crop "
                         f"{(ch, cw)}, stride {(sh, sw)}")
    h_grids = max(h - ch + sh - 1, 0) // sh + 1
    w_grids = max(w - cw + sw - 1, 0) // sw + 1
    boxes = []
    for i in range(h_grids):
        for j in range(w_grids):
            y2 = min(i * sh + ch, h)
            x2 = min(j * sw + cw, w)
            boxes.append((max(y2 - ch, 0), y2, max(x2 - cw, 0), x2))
    return np.asarray(boxes, np.int64)


def slide_counts(h: int, w: int, crop: int | Sequence[int],
                 stride: int | Sequence[int]) -> np.ndarray:
    """[h, w] float32 number of windows covering each pixel (a static constant)."""
    count = np.zeros((h, w), np.float32)
    for y1, y2, x1, x2 in slide_windows(h, w, crop, stride):
        count[y1:y2, x1:x2] += 1.0
    return count


def _run_windows(prob_fn: ProbFn, windows: jax.Array, window_batch: int | None) -> jax.Array:
    """prob_fn over [N, h, w, 3] in one call, or in chunks of `window_batch` (the last chunk is
    zero-padded so every call has the same shape and compiles once)."""
    n = windows.shape[0]
    if window_batch is None or window_batch >= n:
        return prob_fn(windows)
    chunks = -(-n // window_batch)
    pad = chunks * window_batch - n
    padded = jnp.concatenate([windows, jnp.zeros((pad,) + windows.shape[1:], windows.dtype)])
    outs = [prob_fn(padded[c * window_batch:(c + 1) * window_batch]) for c in range(chunks)]
    return jnp.concatenate(outs)[:n]


def whole_inference(prob_fn: ProbFn, image: jax.Array) -> jax.Array:
    """The model on the whole image.  image: [B, H, W, 3] normalised -> [B, H, W, K]."""
    out = prob_fn(image)
    if out.shape[:3] != image.shape[:3]:
        raise ValueError(f"whole_inference: prob_fn returned {out.shape} for input {image.shape}")
    return out


def slide_inference(prob_fn: ProbFn, image: jax.Array, crop: int | Sequence[int],
                    stride: int | Sequence[int], num_classes: int, *,
                    window_batch: int | None = None, pad_value: float = 0.0,
                    pad_to_crop: bool = True) -> jax.Array:
    """Sliding-window inference (§1.3).

    Args:
      prob_fn: [N, ch, cw, 3] -> [N, ch, cw, K].
      image: [B, H, W, 3] normalised.
      crop, stride: window size and step, (h, w) or int.
      num_classes: K.
      window_batch: windows per `prob_fn` call (None: all B * n windows in one call).
      pad_value, pad_to_crop: windows smaller than the crop are padded to it (see module doc).
    Returns:
      [B, H, W, K] float32: window outputs averaged by the per-pixel window count.
    """
    crops, layout = slide_split(image, crop, stride, pad_value=pad_value, pad_to_crop=pad_to_crop)
    out = _run_windows(prob_fn, crops, window_batch)
    if out.shape[-1] != num_classes or out.shape[1:3] != crops.shape[1:3]:
        raise ValueError(f"slide_inference: prob_fn returned {out.shape} for windows "
                         f"{crops.shape[1:]}, expected K={num_classes} channels")
    return slide_join(out, layout)


def slide_split(image: jax.Array, crop: int | Sequence[int], stride: int | Sequence[int], *,
                pad_value: float = 0.0, pad_to_crop: bool = True) -> tuple[jax.Array, tuple]:
    """The windows of `slide_inference`: image [B, H, W, C] -> (crops [B * n, ch, cw, C], layout),
    image-major.  `slide_join(outputs of the crops, layout)` is `slide_inference`'s result, so
    a caller may run the crops of several images in one batch (`evaluate`'s parallel path)."""
    _, h, w, _ = image.shape
    ch, cw = _pair(crop)
    boxes = tuple(map(tuple, slide_windows(h, w, (ch, cw), stride).tolist()))
    wh, ww = min(ch, h), min(cw, w)  # every window has this size
    pad = (ch - wh, cw - ww) if pad_to_crop else (0, 0)
    return _gather_windows(image, boxes, pad, pad_value), (boxes, (h, w))


def slide_join(out: jax.Array, layout: tuple) -> jax.Array:
    """Window outputs [B * n, ch, cw, K] of `slide_split`'s crops -> [B, H, W, K] float32,
    averaged by the per-pixel window count."""
    boxes, size = layout
    return _merge_windows(out, boxes, size)


# The gather and merge are jitted on their own (boxes static) so that eager callers run two
# compiled programs instead of one small op per window.
@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _gather_windows(image, boxes, pad, pad_value):
    crops = jnp.stack([image[:, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes], axis=1)
    if pad != (0, 0):
        crops = jnp.pad(crops, ((0, 0), (0, 0), (0, pad[0]), (0, pad[1]), (0, 0)),
                        constant_values=pad_value)
    return crops.reshape((-1,) + crops.shape[2:])


@functools.partial(jax.jit, static_argnums=(1, 2))
def _merge_windows(out, boxes, size):
    h, w = size
    n = len(boxes)
    wh, ww = boxes[0][1] - boxes[0][0], boxes[0][3] - boxes[0][2]
    out = out.reshape((-1, n) + out.shape[1:])[:, :, :wh, :ww].astype(jnp.float32)
    # Each window is zero-padded into place and the results summed (one fused loop).  A
    # `.at[].add` scatter would do the same, but XLA's CPU simplifier (jax 0.10.2) aborts on a
    # scatter followed by the flip back of flip TTA ("Invalid binary instruction opcode map").
    total = None
    count = np.zeros((h, w), np.float32)
    for i, (y1, y2, x1, x2) in enumerate(boxes):
        placed = jax.lax.pad(out[:, i], jnp.float32(0),
                             ((0, 0, 0), (y1, h - y2, 0), (x1, w - x2, 0), (0, 0, 0)))
        total = placed if total is None else total + placed
        count[y1:y2, x1:x2] += 1.0
    return total / jnp.asarray(count)[None, :, :, None]


def rescale_size(h: int, w: int, scale: Sequence[int] | float) -> tuple[int, int]:
    """mmcv keep-ratio rescale: `scale` = (long, short) edge limits (either order) or a float
    factor; returns (new_h, new_w) = round-half-up of (h, w) * factor."""
    if np.ndim(scale) == 0:
        factor = float(scale)
    else:
        long_edge, short_edge = max(scale), min(scale)
        factor = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def aug_inference(prob_fn: ProbFn, image: jax.Array, num_classes: int, *,
                  scale: Sequence[int] | None = (2560, 640),
                  scales: Sequence[float] = (1.0,), flip: bool = False, mode: str = "slide",
                  crop: int | Sequence[int] = (640, 640),
                  stride: int | Sequence[int] = (426, 426),
                  out_size: Sequence[int] | None = None, window_batch: int | None = None,
                  pad_value: float = 0.0) -> jax.Array:
    """Single- or multi-scale (+ flip) inference, resized to the original size.

    Args:
      prob_fn: see module doc.
      image: [B, H, W, 3] normalised image at its original size (or already resized by the data
        pipeline: then pass `scale=None, scales=(1.0,)` and the original size as `out_size`).
      num_classes: K.
      scale: eval scale (long, short), e.g. (2560, 640) for ADE20K, (2048, 1024) Cityscapes;
        each view is resized to fit `ratio * scale`.  None: ratios scale the input size.
      scales: the ratios; `TTA_RATIOS` for the original multi-scale test.
      flip: add a horizontally flipped view per scale.
      mode: "slide" or "whole".
      crop, stride, window_batch, pad_value: slide settings.
      out_size: (H0, W0) of the result; default the input size.
    Returns:
      [B, H0, W0, K] float32 (softmax-averaged when there are several views).
    """
    if mode not in ("slide", "whole"):
        raise ValueError(f"aug_inference: mode={mode!r} must be 'slide' or 'whole'")
    _, h, w, _ = image.shape
    out_h, out_w = (h, w) if out_size is None else (int(out_size[0]), int(out_size[1]))
    views = [(r, f) for r in scales for f in ((False, True) if flip else (False,))]
    total = None
    for ratio, flipped in views:
        if scale is None:
            size = rescale_size(h, w, ratio)
        else:
            size = rescale_size(h, w, (int(scale[0] * ratio), int(scale[1] * ratio)))
        x = resize_bilinear(image.astype(jnp.float32), size)
        if flipped:
            x = x[:, :, ::-1]
        if mode == "slide":
            p = slide_inference(prob_fn, x, crop, stride, num_classes,
                                window_batch=window_batch, pad_value=pad_value)
        else:
            p = whole_inference(prob_fn, x).astype(jnp.float32)
        if flipped:
            p = p[:, :, ::-1]
        p = resize_bilinear(p, (out_h, out_w))
        if len(views) > 1:
            p = jax.nn.softmax(p, axis=-1)
        total = p if total is None else total + p
    return total / len(views)


def predict_labels(probs: jax.Array) -> jax.Array:
    """[..., K] scores -> [...] int32 class ids (argmax; ties take the lowest id, as torch)."""
    return jnp.argmax(probs, axis=-1).astype(jnp.int32)


def eval_key(seed: int, image_index: int) -> jax.Array:
    """The fixed PRNG key of one evaluation image (deterministic evaluation, §8 #6): the same
    image gets the same key whatever the batch composition or the number of devices."""
    return jax.random.fold_in(jax.random.key(seed), image_index)
