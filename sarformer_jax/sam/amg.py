"""Pure helpers of the automatic mask generator (mirrors segment_anything/utils/amg.py), in two
flavours: jit-able JAX functions on fixed-size candidate arrays (stability score, mask -> box,
greedy box NMS with torchvision's ordering and IoU), and host-side numpy helpers (point grids,
crop boxes, RLE, small-region removal).

Legend: b batch, n candidates, k kept masks, h w spatial.
"""

from __future__ import annotations

import math
from itertools import product
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# ----------------------------------------------------------------------------------------------
# Device (JAX) helpers


def calculate_stability_score(logits: jax.Array, mask_threshold: float, threshold_offset: float) -> jax.Array:
    """IoU of the masks thresholded at `mask_threshold +- threshold_offset` (the high mask is a
    subset of the low one, so IoU = count(high) / count(low)); NaN for an empty low mask."""
    high = jnp.sum(logits > (mask_threshold + threshold_offset), axis=(-2, -1), dtype=jnp.int32)
    low = jnp.sum(logits > (mask_threshold - threshold_offset), axis=(-2, -1), dtype=jnp.int32)
    return high.astype(jnp.float32) / low.astype(jnp.float32)


def mask_bits(logits: jax.Array, mask_threshold: float, threshold_offset: float) -> jax.Array:
    """uint8 [..., h, w]: bit 0 = logits > threshold + offset, bit 1 = logits > threshold -
    offset, bit 2 = logits > threshold: everything the generator needs from the full-size
    logits (`stability_from_bits`, the box of bit 2) in a quarter of float32's bytes, so the
    upscaled logits are compared where they are computed and never stored."""
    bit = lambda cond, k: cond.astype(jnp.uint8) << k
    return (bit(logits > mask_threshold + threshold_offset, 0)
            | bit(logits > mask_threshold - threshold_offset, 1)
            | bit(logits > mask_threshold, 2))


def stability_from_bits(bits: jax.Array) -> jax.Array:
    """`calculate_stability_score` from `mask_bits`: count(bit 0) / count(bit 1)."""
    high = jnp.sum((bits & 1) != 0, axis=(-2, -1), dtype=jnp.int32)
    low = jnp.sum((bits & 2) != 0, axis=(-2, -1), dtype=jnp.int32)
    return high.astype(jnp.float32) / low.astype(jnp.float32)


def batched_mask_to_box(masks: jax.Array) -> jax.Array:
    """Inclusive xyxy pixel boxes [..., 4] (int32) of boolean masks [..., h, w]; [0, 0, 0, 0]
    for an empty mask."""
    return box_from_rows_cols(jnp.any(masks, axis=-1), jnp.any(masks, axis=-2))


def box_from_rows_cols(rows: jax.Array, cols: jax.Array) -> jax.Array:
    """`batched_mask_to_box` from which rows [..., h] and columns [..., w] hold a mask pixel."""
    h, w = rows.shape[-1], cols.shape[-1]
    ys, xs = jnp.arange(h, dtype=jnp.int32), jnp.arange(w, dtype=jnp.int32)
    top = jnp.min(jnp.where(rows, ys, h), axis=-1)
    bottom = jnp.max(jnp.where(rows, ys, 0), axis=-1)
    left = jnp.min(jnp.where(cols, xs, w), axis=-1)
    right = jnp.max(jnp.where(cols, xs, 0), axis=-1)
    box = jnp.stack([left, top, right, bottom], axis=-1)
    empty = ~jnp.any(rows, axis=-1)
    return jnp.where(empty[..., None], 0, box)


def box_iou_matrix(boxes: jax.Array) -> jax.Array:
    """torchvision's pairwise IoU [n, n] of xyxy boxes [n, 4]: areas (x2-x1)(y2-y1), no +1;
    NaN where both boxes are empty, which no threshold test passes."""
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    lo = jnp.maximum(boxes[:, None, :2], boxes[None, :, :2])
    hi = jnp.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    wh = jnp.maximum(hi - lo, 0.0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (areas[:, None] + areas[None, :] - inter)


def box_nms(boxes: jax.Array, scores: jax.Array, valid: jax.Array, iou_threshold: float,
            max_keep: int) -> tuple[jax.Array, jax.Array]:
    """Greedy NMS over the valid entries of boxes [n, 4] / scores [n] (one image).

    The result is torchvision's `nms`: candidates visited by decreasing score (ties by index, a
    stable order), each kept unless an already kept box overlaps it with IoU > `iou_threshold`;
    the first `max_keep` kept are returned.  Computed without visiting candidates one by one:
    with the candidates in that order and S[i, j] = (j before i and IoU > threshold), the greedy
    result is the one solution of keep[i] = valid[i] and not any_j(S[i, j] and keep[j]) (keep[i]
    depends only on earlier entries).  Iterating that equation from keep = valid fixes at least
    one more leading entry per round, so it reaches the solution in at most n rounds; it stops
    when a round changes nothing, typically after a handful (the longest chain of boxes that
    suppress each other), each round one [n, n] reduction.  Returns (kept indices [max_keep]
    sorted by score, padded with 0; number kept)."""
    n = boxes.shape[0]
    boxes = boxes.astype(jnp.float32)
    order = jnp.argsort(jnp.where(valid, -scores, jnp.inf), stable=True)
    sorted_valid = valid[order]
    pos = jnp.arange(n)
    suppresses = (box_iou_matrix(boxes[order]) > iou_threshold) & (pos[None, :] < pos[:, None])

    def cond(state):
        keep, changed = state
        return changed

    def body(state):
        keep, _ = state
        new = sorted_valid & ~jnp.any(suppresses & keep[None, :], axis=1)
        return new, jnp.any(new != keep)

    keep, _ = jax.lax.while_loop(cond, body, (sorted_valid, jnp.bool_(True)))
    (first,) = jnp.nonzero(keep, size=max_keep, fill_value=0)
    n_keep = jnp.minimum(jnp.sum(keep, dtype=jnp.int32), max_keep)
    kept = jnp.where(jnp.arange(max_keep) < n_keep, order[first], 0)
    return kept.astype(jnp.int32), n_keep


def is_box_near_crop_edge(boxes: jax.Array, crop_box: tuple[int, int, int, int],
                          orig_box: tuple[int, int, int, int], atol: float = 20.0) -> jax.Array:
    """Boxes [..., 4] (already in the full-image frame) touching the crop edge (within `atol`)
    where that edge is not the image edge."""
    boxes = boxes.astype(jnp.float32)
    near_crop = jnp.abs(boxes - jnp.asarray(crop_box, jnp.float32)) <= atol
    near_image = jnp.abs(boxes - jnp.asarray(orig_box, jnp.float32)) <= atol
    return jnp.any(near_crop & ~near_image, axis=-1)


# ----------------------------------------------------------------------------------------------
# Host (numpy) helpers


def build_point_grid(n_per_side: int) -> np.ndarray:
    """[n^2, 2] (x, y) points at the centres of an n x n grid of [0, 1]^2, row-major in y."""
    side = (np.arange(n_per_side, dtype=np.float64) + 0.5) / n_per_side
    xs, ys = np.meshgrid(side, side)
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(n_per_side: int, n_layers: int, scale_per_layer: int) -> list[np.ndarray]:
    """One grid per crop layer, `n_per_side / scale_per_layer**i` points per side."""
    return [build_point_grid(int(n_per_side / (scale_per_layer**i))) for i in range(n_layers + 1)]


def generate_crop_boxes(im_size: tuple[int, int], n_layers: int,
                        overlap_ratio: float) -> tuple[list[list[int]], list[int]]:
    """xyxy crop boxes: the whole image, then (2^(i+1))^2 overlapping crops in layer i+1."""
    im_h, im_w = im_size
    short_side = min(im_h, im_w)
    boxes, layers = [[0, 0, im_w, im_h]], [0]
    for i_layer in range(n_layers):
        n = 2 ** (i_layer + 1)
        overlap = int(overlap_ratio * short_side * (2 / n))
        crop_w = int(math.ceil((overlap * (n - 1) + im_w) / n))
        crop_h = int(math.ceil((overlap * (n - 1) + im_h) / n))
        x0s = [int((crop_w - overlap) * i) for i in range(n)]
        y0s = [int((crop_h - overlap) * i) for i in range(n)]
        for x0, y0 in product(x0s, y0s):
            boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layers.append(i_layer + 1)
    return boxes, layers


def box_xyxy_to_xywh(box: np.ndarray) -> np.ndarray:
    box = np.array(box, copy=True)
    box[..., 2] = box[..., 2] - box[..., 0]
    box[..., 3] = box[..., 3] - box[..., 1]
    return box


def nms_numpy(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Host NMS with the same conventions as `box_nms` (all candidates, kept indices by score)."""
    boxes = np.asarray(boxes, np.float32)
    order = np.argsort(-np.asarray(scores), kind="stable")
    suppressed = np.zeros(len(boxes), bool)
    keep = []
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    for pos, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(i)
        rest = order[pos + 1:]
        iw = np.maximum(np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0]), 0)
        ih = np.maximum(np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1]), 0)
        inter = iw * ih
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = inter / (areas[i] + areas[rest] - inter)
        suppressed[rest[iou > iou_threshold]] = True
    return np.asarray(keep, np.int64)


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """Uncompressed COCO RLE of a bool [h, w] mask: run lengths in column-major order, starting
    with a (possibly empty) run of zeros."""
    h, w = mask.shape
    flat = np.asarray(mask, bool).T.reshape(-1)
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    edges = np.concatenate([[0], change, [h * w]])
    counts = np.diff(edges).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": [h, w], "counts": counts}


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    h, w = rle["size"]
    values = np.arange(len(rle["counts"])) % 2 == 1
    flat = np.repeat(values, rle["counts"])
    return flat.reshape(w, h).T


def area_from_rle(rle: dict[str, Any]) -> int:
    return int(sum(rle["counts"][1::2]))


def coco_encode_rle(uncompressed_rle: dict[str, Any]) -> dict[str, Any]:
    """Compressed COCO RLE (needs pycocotools, as upstream)."""
    from pycocotools import mask as mask_utils

    h, w = uncompressed_rle["size"]
    rle = mask_utils.frPyObjects(uncompressed_rle, h, w)
    rle["counts"] = rle["counts"].decode("utf-8")
    return rle


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> tuple[np.ndarray, bool]:
    """Fills holes (`mode="holes"`) or drops islands (`"islands"`) smaller than `area_thresh`
    (8-connectivity); returns the mask and whether it changed."""
    import cv2

    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    holes = mode == "holes"
    work = (holes ^ mask).astype(np.uint8)
    n_labels, regions, stats, _ = cv2.connectedComponentsWithStats(work, 8)
    sizes = stats[1:, -1]
    small = [i + 1 for i, s in enumerate(sizes) if s < area_thresh]
    if not small:
        return mask, False
    fill = [0] + small
    if not holes:
        fill = [i for i in range(n_labels) if i not in fill] or [int(np.argmax(sizes)) + 1]
    return np.isin(regions, fill), True
