"""Resizing images and prompts to the encoder frame (mirrors segment_anything/utils/transforms.py).

Upstream resizes uint8 images with PIL's bilinear filter (antialiased when shrinking, 8-bit fixed
point, one pass per axis with rounding to uint8 in between).  `pil_resize_weights` rebuilds PIL's
integer filter taps so the same resize runs on device (`resize_uint8`) bit for bit, with the
passes in the order the installed Pillow runs them (`pil_vertical_first`).

Legend: b batch, h w spatial, c channels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_PRECISION_BITS = 32 - 8 - 2  # PIL's fixed-point precision for 8-bit images


def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> tuple[int, int]:
    """(h, w) after scaling the longest side to `long_side_length`, rounded half up."""
    scale = long_side_length * 1.0 / max(oldh, oldw)
    return int(oldh * scale + 0.5), int(oldw * scale + 0.5)


@functools.lru_cache(maxsize=64)
def pil_resize_weights(in_size: int, out_size: int) -> np.ndarray:
    """Dense [out, in] int32 matrix of PIL's fixed-point bilinear taps along one axis."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    m = np.zeros((out_size, in_size), np.int64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        x = np.arange(xmin, xmax)
        w = np.maximum(1.0 - np.abs((x - center + 0.5) * (1.0 / filterscale)), 0.0)  # as PIL: * ss
        total = w.sum()
        if total != 0.0:
            w = w / total
        m[xx, xmin:xmax] = np.where(w < 0, (-0.5 + w * (1 << _PRECISION_BITS)).astype(np.int64),
                                    (0.5 + w * (1 << _PRECISION_BITS)).astype(np.int64))
    return m.astype(np.int32)


@functools.lru_cache(maxsize=64)
def pil_resize_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """`pil_resize_weights` as taps: (index [out, k] int32, weight [out, k] int32), each output's
    nonzero weights (a contiguous run of inputs), padded with weight 0 to the longest run k."""
    m = pil_resize_weights(in_size, out_size)
    nz = m != 0
    first = np.where(nz.any(1), nz.argmax(1), 0)
    last = np.where(nz.any(1), in_size - 1 - nz[:, ::-1].argmax(1), 0)
    k = int(max(1, (last - first + 1).max()))
    idx = np.minimum(first[:, None] + np.arange(k)[None, :], in_size - 1)
    w = np.take_along_axis(m, idx, axis=1)
    w = np.where(first[:, None] + np.arange(k)[None, :] <= last[:, None], w, 0)
    return idx.astype(np.int32), w.astype(np.int32)


def _pil_pass(x: jax.Array, in_size: int, out_size: int, axis: int) -> jax.Array:
    """One axis of PIL's resize: each output sums its few integer taps (int32, exact as the
    dense integer product it replaces, which a GPU runs without tensor cores: ~1.3 ms per
    640² -> 1024² image on an H200)."""
    idx, w = pil_resize_taps(in_size, out_size)
    xs = jnp.moveaxis(x.astype(jnp.int32), axis, 0)  # [in, ...]
    tail = (1,) * (xs.ndim - 1)
    acc = sum(jnp.take(xs, jnp.asarray(idx[:, j]), axis=0) * jnp.asarray(w[:, j]).reshape((-1,) + tail)
              for j in range(idx.shape[1]))
    acc = (acc + (1 << (_PRECISION_BITS - 1))) >> _PRECISION_BITS
    return jnp.moveaxis(jnp.clip(acc, 0, 255).astype(jnp.uint8), 0, axis)


@functools.lru_cache(maxsize=1)
def _pillow_major() -> int:
    try:
        import PIL
    except ImportError:  # no Pillow to agree with: follow the current one
        return 13
    return int(str(PIL.__version__).split(".")[0])


def pil_vertical_first(in_hw: tuple[int, int], out_hw: tuple[int, int],
                       pillow_major: int | None = None) -> bool:
    """Whether Pillow resizes (h, w) -> (h', w') with its vertical pass first.

    Pillow up to 12 always runs the horizontal pass first.  Pillow 13 (python-pillow/Pillow#9549)
    runs the vertical one first when the height shrinks by more than twice as many pixels as the
    width does (h' < h and h - h' > 2 (w - w')): tall images brought to SAM's 1024 side, for
    example.  The uint8 rounding between the passes makes the order visible (±1 levels).  The
    rule was read off Pillow 13.0's output (tests/test_sam_resize.py checks it on random sizes
    against the installed Pillow).  `pillow_major` None: the installed Pillow's version."""
    major = _pillow_major() if pillow_major is None else pillow_major
    (in_h, in_w), (out_h, out_w) = in_hw, out_hw
    return major >= 13 and out_h < in_h and in_h - out_h > 2 * (in_w - out_w)


def resize_uint8(x: jax.Array, size: tuple[int, int], axes: tuple[int, int] = (-3, -2),
                 pillow_major: int | None = None) -> jax.Array:
    """PIL-exact bilinear resize of uint8 images [..., h, w, c] to `size` (h, w) (jit-able), the
    passes in the order of Pillow version `pillow_major` (None: the installed one)."""
    ah, aw = (a % x.ndim for a in axes)
    in_h, in_w = x.shape[ah], x.shape[aw]
    out_h, out_w = size
    passes = [(in_w, out_w, aw), (in_h, out_h, ah)]
    if pil_vertical_first((in_h, in_w), (out_h, out_w), pillow_major):
        passes.reverse()
    for n_in, n_out, axis in passes:
        if n_in != n_out:
            x = _pil_pass(x, n_in, n_out, axis)
    return x


class ResizeLongestSide:
    """Scales images, points and boxes so the longest image side is `target_length`."""

    def __init__(self, target_length: int) -> None:
        self.target_length = target_length

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """uint8 HWC -> uint8 HWC with the longest side `target_length` (PIL bilinear, on host)."""
        from PIL import Image

        h, w = get_preprocess_shape(image.shape[0], image.shape[1], self.target_length)
        if (h, w) == image.shape[:2]:
            return np.array(image)
        return np.array(Image.fromarray(np.ascontiguousarray(image)).resize((w, h), Image.BILINEAR))

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """(x, y) pixel coordinates [..., 2] of the original image -> resized frame (float64)."""
        old_h, old_w = original_size
        new_h, new_w = get_preprocess_shape(old_h, old_w, self.target_length)
        coords = np.array(coords, dtype=float)
        coords[..., 0] = coords[..., 0] * (new_w / old_w)
        coords[..., 1] = coords[..., 1] * (new_h / old_h)
        return coords

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """xyxy boxes [..., 4] -> resized frame."""
        return self.apply_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def apply_image_jax(self, images: jax.Array) -> jax.Array:
        """Device version of `apply_image` for uint8 [b, h, w, c] (same bytes as PIL)."""
        h, w = get_preprocess_shape(images.shape[1], images.shape[2], self.target_length)
        return resize_uint8(images, (h, w))


