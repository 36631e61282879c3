"""Automatic mask generation (mirrors segment_anything/automatic_mask_generator.py).

`generate_masks` is the on-device, batched, jit-able generator SARFormer uses: images
[b, H, W, 3] uint8 -> up to K masks per image in fixed-size arrays, with everything (resize,
encoder, point-grid decoding in chunks, IoU / stability thresholds, boxes, greedy box NMS) inside
one jit.  `SamAutomaticMaskGenerator` keeps upstream's API and output records (crop layers,
small-region clean-up and RLE outputs run on the host around the same device core).

Legend: b batch, n candidates (points x 3 masks), k kept, p points, h w spatial.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sarformer_jax.sam import amg
from sarformer_jax.sharding import batch_partitioned, per_batch_shard
from sarformer_jax.sam.predictor import SamPredictor
from sarformer_jax.sam.sam import Sam
from sarformer_jax.sam.transforms import ResizeLongestSide, get_preprocess_shape, resize_uint8


@dataclasses.dataclass(frozen=True)
class AmgSettings:
    """Static settings of the device core (hashable: part of the jit cache key)."""

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    max_masks: int = 256
    crop_box: tuple[int, int, int, int] | None = None  # xyxy of the crop in the full image
    orig_size: tuple[int, int] | None = None  # (H, W) of the full image when cropping
    # explicit (x, y) points in [0, 1] of the crop, instead of the points_per_side grid
    point_grid: tuple[tuple[float, float], ...] | None = None
    # Upscale (and post-process) only the prompts with at least one mask over pred_iou_thresh:
    # the others' candidates fail the IoU threshold whatever their masks, so the kept masks,
    # scores, stability and boxes are upstream's either way.  Each chunk's passing prompts go
    # first (per image) and are upscaled in groups of `gcd(points_per_batch, skip_group)` while
    # any image has some left; skipped candidates keep zero logits, stability and boxes.
    skip_low_iou: bool = False
    skip_group: int = 16

    def points(self) -> np.ndarray:
        """[n, 2] (x, y) prompts, normalised to the (crop) image."""
        if self.point_grid is not None:
            return np.asarray(self.point_grid, np.float64).reshape(-1, 2)
        return amg.build_point_grid(self.points_per_side)


def _candidates(sam: Sam, images: jax.Array, points: np.ndarray, s: AmgSettings,
                emb: jax.Array | None = None) -> dict[str, jax.Array]:
    """Decodes every grid point of every image: per candidate (point-major, 3 masks per point)
    the low-res logits, predicted IoU, stability score, box and validity.  `images` may be a
    ShapeDtypeStruct-like placeholder when the embeddings `emb` are given."""
    b, h, w, _ = images.shape
    input_size = get_preprocess_shape(h, w, sam.img_size)
    if emb is None:
        with jax.named_scope("sam_encoder"):
            emb = sam.embed_image(resize_uint8(images, input_size))  # [b, 64, 64, c]
    n_pts = points.shape[0]
    ppb = s.points_per_batch
    n_chunks = -(-n_pts // ppb)
    padded = np.zeros((n_chunks * ppb, 2), np.float64)
    padded[:n_pts] = points
    coords = ResizeLongestSide(sam.img_size).apply_coords(padded * np.array([w, h]), (h, w))
    coords = jnp.asarray(coords.reshape(n_chunks, ppb, 1, 2), jnp.float32)
    x0, y0 = (s.crop_box or (0, 0, w, h))[:2]
    orig_h, orig_w = s.orig_size or (h, w)

    def chunk(c):  # c [ppb, 1, 2] -> per-image results for ppb points
        pts = jnp.broadcast_to(c[None], (b,) + c.shape).reshape(b * ppb, 1, 2)
        labels = jnp.ones((b * ppb, 1), jnp.int32)
        with jax.named_scope("sam_mask_decoder"):
            low, iou = sam.decode(emb, (pts, labels), multimask_output=True)  # ppb prompts per image
        with jax.named_scope("sam_postprocess"):
            stab, boxes = sam.mask_stats(low, input_size, (h, w), s.stability_score_offset)  # [b*ppb, 3]
        m = low.shape[1]
        return dict(low_res=low.reshape(b, ppb * m, *low.shape[2:]), iou=iou.reshape(b, ppb * m),
                    stability=stab.reshape(b, ppb * m), boxes=boxes.reshape(b, ppb * m, 4))

    def gated_chunk(args):  # `chunk`, upscaling only the prompts that can pass (skip_low_iou)
        c, ok = args  # ok [ppb]: the chunk's points that are not padding
        pts = jnp.broadcast_to(c[None], (b,) + c.shape).reshape(b * ppb, 1, 2)
        labels = jnp.ones((b * ppb, 1), jnp.int32)
        with jax.named_scope("sam_mask_decoder"):
            x, hyper, iou = sam.decode_tokens(emb, (pts, labels), multimask_output=True)
        m = iou.shape[-1]
        x = x.reshape(b, ppb, *x.shape[1:])
        hyper = hyper.reshape(b, ppb, *hyper.shape[1:])
        passing = jnp.any(iou.reshape(b, ppb, m) > s.pred_iou_thresh, axis=-1) & ok[None]
        order = jnp.argsort(~passing, axis=1, stable=True).astype(jnp.int32)  # passing first
        group = math.gcd(ppb, s.skip_group)
        n_groups = (jnp.max(jnp.sum(passing, axis=1)) + group - 1) // group
        # per image (vmapped: gathers and scatters with the image as a batching dimension, so a
        # batch-sharded step keeps each image's tokens on its device)
        take = jax.vmap(lambda a, i: a[i])
        put = jax.vmap(lambda a, i, v: a.at[i].set(v))

        def upscale(i):  # group i of every image's sorted prompts
            idx = jax.lax.dynamic_slice_in_dim(order, i * group, group, axis=1)  # [b, group]
            xs = take(x, idx).reshape(b * group, *x.shape[2:])
            hs = take(hyper, idx).reshape(b * group, *hyper.shape[2:])
            with jax.named_scope("sam_mask_decoder"):
                low = sam.mask_decoder.upscale_masks(xs, hs)
            with jax.named_scope("sam_postprocess"):
                stab, boxes = sam.mask_stats(low, input_size, (h, w), s.stability_score_offset)
            return idx, (low.reshape(b, group, *low.shape[1:]), stab.reshape(b, group, m),
                         boxes.reshape(b, group, m, 4))

        parts = jax.eval_shape(upscale, 0)[1]
        init = tuple(jnp.zeros((b, ppb) + p.shape[2:], p.dtype) for p in parts)

        def body(i, acc):
            idx, new = upscale(i)
            return tuple(put(a, idx, v) for a, v in zip(acc, new))

        low, stab, boxes = jax.lax.fori_loop(0, n_groups, body, init)
        return dict(low_res=low.reshape(b, ppb * m, *low.shape[3:]), iou=iou.reshape(b, ppb * m),
                    stability=stab.reshape(b, ppb * m), boxes=boxes.reshape(b, ppb * m, 4))

    if s.skip_low_iou and s.pred_iou_thresh > 0.0:
        oks = jnp.asarray((np.arange(n_chunks * ppb) < n_pts).reshape(n_chunks, ppb))
        out = jax.lax.map(gated_chunk, (coords, oks))
    else:
        out = jax.lax.map(chunk, coords)  # leaves [chunks, b, ppb*3, ...]
    out = jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1).reshape(b, -1, *x.shape[3:]), out)
    n = out["iou"].shape[1]
    m = n // (n_chunks * ppb)
    point_ok = np.repeat(np.arange(n_chunks * ppb) < n_pts, m)
    valid = jnp.broadcast_to(jnp.asarray(point_ok), (b, n))
    if s.pred_iou_thresh > 0.0:
        valid &= out["iou"] > s.pred_iou_thresh
    if s.stability_score_thresh > 0.0:
        valid &= out["stability"] >= s.stability_score_thresh
    out["boxes"] = out["boxes"] + jnp.asarray([x0, y0, x0, y0], jnp.int32)
    if s.crop_box is not None:
        valid &= ~amg.is_box_near_crop_edge(out["boxes"], s.crop_box, (0, 0, orig_w, orig_h))
    out["valid"] = valid
    pts_img = np.repeat(padded * np.array([w, h]) + np.array([x0, y0]), m, axis=0)
    out["points"] = jnp.broadcast_to(jnp.asarray(pts_img, jnp.float32), (b, n, 2))
    return out


@functools.lru_cache(maxsize=None)
def _nms_per_batch_shard(iou_threshold: float, max_keep: int):
    """`amg.box_nms` vmapped over images [b, n, ...], run on each device's batch shard: left to
    the partitioner, the vmapped `while_loop` would decide every iteration over the whole batch
    (an all-reduce of the loop predicate per iteration in a batch-sharded train step)."""
    nms = jax.vmap(lambda bx, sc, v: amg.box_nms(bx, sc, v, iou_threshold, max_keep))
    return batch_partitioned(nms, 2, "b n c, b n, b n -> b k, b", ("n", "c", "k"))


def _select(sam: Sam, cand: dict[str, jax.Array], s: AmgSettings, image_hw: tuple[int, int],
            max_keep: int) -> dict[str, jax.Array]:
    with jax.named_scope("sam_nms"):
        keep, n_keep = per_batch_shard(_nms_per_batch_shard(s.box_nms_thresh, max_keep), 2,
                                       cand["boxes"], cand["iou"], cand["valid"])
    valid = jnp.arange(max_keep)[None, :] < n_keep[:, None]
    take = lambda x: jnp.take_along_axis(x, keep.reshape(keep.shape + (1,) * (x.ndim - 2)), axis=1)
    return dict(keep=keep, valid=valid, scores=jnp.where(valid, take(cand["iou"]), 0.0),
                stability=jnp.where(valid, take(cand["stability"]), 0.0),
                boxes=jnp.where(valid[..., None], take(cand["boxes"]), 0).astype(jnp.float32),
                points=jnp.where(valid[..., None], take(cand["points"]), 0.0),
                low_res=take(cand["low_res"]))


def automatic_masks(sam: Sam, images, s: AmgSettings, emb: jax.Array | None = None) -> dict[str, jax.Array]:
    """The traced core of `generate_masks` (call it inside your own jit): `images` [b, H, W, 3]
    uint8 (or only its shape when the image embeddings `emb` [b, 64, 64, 256] are given)."""
    b, h, w, _ = images.shape
    input_size = get_preprocess_shape(h, w, sam.img_size)
    cand = _candidates(sam, images, s.points(), s, emb=emb)
    out = _select(sam, cand, s, (h, w), s.max_masks)
    low = out.pop("low_res")
    with jax.named_scope("sam_postprocess"):
        masks = sam.threshold_masks(low, input_size, (h, w))
    out["masks"] = masks & out["valid"][..., None, None]
    out.pop("keep")
    return out


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _generate(graphdef, state, images, boxes, s: AmgSettings, box_prompts: bool):
    sam: Sam = nnx.merge(graphdef, state)
    out = automatic_masks(sam, images, s)
    if box_prompts:
        input_size = get_preprocess_shape(images.shape[1], images.shape[2], sam.img_size)
        out.update(_decode_boxes(sam, images, boxes, input_size))
    return out


def _decode_boxes(sam: Sam, images, boxes, input_size, emb: jax.Array | None = None):
    """External xyxy box prompts [b, m, 4] (image pixels; NaN rows = absent) -> single masks.
    `emb`: precomputed image embeddings (then `images` only gives the shape)."""
    b, h, w, _ = images.shape
    m = boxes.shape[1]
    present = ~jnp.any(jnp.isnan(boxes), axis=-1)
    scale = jnp.asarray([input_size[1] / w, input_size[0] / h] * 2, jnp.float32)
    bx = jnp.where(present[..., None], boxes, 0.0) * scale
    if emb is None:
        emb = sam.embed_image(resize_uint8(images, input_size))
    low, iou = sam.decode(emb, boxes=bx.reshape(b * m, 4), multimask_output=False)  # m per image
    masks = sam.threshold_masks(low[:, 0], input_size, (h, w)).reshape(b, m, h, w)
    return dict(box_masks=masks & present[..., None, None], box_scores=jnp.where(present, iou.reshape(b, m), 0.0),
                box_valid=present)


def generate_masks(sam: Sam, images: jax.Array, *, params: nnx.State | None = None, points_per_side: int = 32,
                   points_per_batch: int = 64, pred_iou_thresh: float = 0.88, stability_score_thresh: float = 0.95,
                   stability_score_offset: float = 1.0, box_nms_thresh: float = 0.7, max_masks: int = 256,
                   boxes: jax.Array | None = None, skip_low_iou: bool = False) -> dict[str, jax.Array]:
    """SAM automatic masks for a batch of same-size images, on device, in one jit.

    Args:
      sam: the model (its state is used unless `params` is given).
      images: [b, H, W, 3] uint8 RGB.
      points_per_side ... box_nms_thresh: as `SamAutomaticMaskGenerator` (crop_n_layers = 0).
      max_masks: K, the fixed number of output slots; masks beyond K (lowest IoU) are dropped.
      boxes: optional external xyxy box prompts [b, m, 4] in image pixels, NaN rows absent
        (the original fed YOLO detections this way), decoded with a single mask each.
      skip_low_iou: upscale only the prompts with a mask over `pred_iou_thresh`
        (`AmgSettings.skip_low_iou`; the same masks).
    Returns:
      masks bool [b, K, H, W], valid bool [b, K], scores (predicted IoU) [b, K], stability [b, K],
      boxes xyxy float32 [b, K, 4] (inclusive pixel bounds, as upstream), points [b, K, 2];
      slots sorted by score, invalid ones zero.  With `boxes`: box_masks [b, m, H, W],
      box_scores [b, m], box_valid [b, m]."""
    graphdef, state = nnx.split(sam)
    if params is not None:
        state = params
    s = AmgSettings(points_per_side, points_per_batch, float(pred_iou_thresh), float(stability_score_thresh),
                    float(stability_score_offset), float(box_nms_thresh), int(max_masks),
                    skip_low_iou=bool(skip_low_iou))
    return _call_generate(graphdef, state, images, boxes, s)


def mask_generator(sam: Sam, **settings) -> Callable[..., dict[str, jax.Array]]:
    """`generate_masks` with the model split once: returns `f(images, boxes=None)` taking the
    other arguments from `settings` (the keyword arguments of `generate_masks`).  The model's
    state is captured now (make a new function after changing its weights); each call then
    skips `nnx.split`'s traversal of the model, which for vit_b costs ~10-25 ms of host time,
    as much as a few images' device time."""
    params = settings.pop("params", None)
    graphdef = nnx.graphdef(sam)
    state = sam.inference_state() if params is None else params
    unknown = set(settings) - {"points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh",
                               "stability_score_offset", "box_nms_thresh", "max_masks", "skip_low_iou"}
    if unknown:
        raise TypeError(f"mask_generator: unknown settings {sorted(unknown)}")
    cast = lambda k, v: type(getattr(AmgSettings, k))(v)  # float, int or bool as the field
    s = AmgSettings(**{k: cast(k, v) for k, v in settings.items()})
    return functools.partial(_call_generate, graphdef, state, s=s)


def _call_generate(graphdef, state, images, boxes=None, s: AmgSettings = None):
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"generate_masks expects images [b, H, W, 3], got {images.shape}")
    if boxes is not None:
        boxes = jnp.asarray(boxes, jnp.float32)
        if boxes.ndim != 3 or boxes.shape[0] != images.shape[0] or boxes.shape[-1] != 4:
            raise ValueError(f"boxes must be [b, m, 4] with b={images.shape[0]}, got {boxes.shape}")
    return _generate(graphdef, state, jnp.asarray(images), boxes, s, boxes is not None)


@functools.partial(jax.jit, static_argnums=(0, 2, 4))
def _crop_keep(graphdef, state, crop_hw: tuple[int, int], emb, s: AmgSettings):
    """Host-path device core: kept candidates of one embedded crop (up to every candidate)."""
    sam: Sam = nnx.merge(graphdef, state)
    shape = jax.ShapeDtypeStruct((1,) + tuple(crop_hw) + (3,), jnp.uint8)
    cand = _candidates(sam, shape, s.points(), s, emb=emb)
    n = cand["iou"].shape[1]
    out = _select(sam, cand, s, crop_hw, n)
    return jax.tree.map(lambda x: x[0], out)


class SamAutomaticMaskGenerator:
    """Generates masks for a whole image from a grid of point prompts (upstream's API).

    Arguments as upstream `SamAutomaticMaskGenerator` (`point_grids` explicit grids per crop
    layer instead of `points_per_side`); `generate(image)` returns upstream's list of records.
    The per-crop work (encoder, decoding, thresholds, NMS) runs in one jit on the device."""

    def __init__(self, model: Sam, points_per_side: int | None = 32, points_per_batch: int = 64,
                 pred_iou_thresh: float = 0.88, stability_score_thresh: float = 0.95,
                 stability_score_offset: float = 1.0, box_nms_thresh: float = 0.7, crop_n_layers: int = 0,
                 crop_nms_thresh: float = 0.7, crop_overlap_ratio: float = 512 / 1500,
                 crop_n_points_downscale_factor: int = 1, point_grids: list[np.ndarray] | None = None,
                 min_mask_region_area: int = 0, output_mode: str = "binary_mask",
                 skip_low_iou: bool = False) -> None:
        """`skip_low_iou` (ours, not upstream's): upscale only the prompts with a mask over
        `pred_iou_thresh` (`AmgSettings.skip_low_iou`; the same records)."""
        if (points_per_side is None) == (point_grids is None):
            raise ValueError("Exactly one of points_per_side or point_grids must be provided.")
        if point_grids is not None:
            point_grids = [np.asarray(g, np.float64) for g in point_grids]
            bad = [f"{i}: {g.shape}" for i, g in enumerate(point_grids)
                   if g.ndim != 2 or g.shape[0] == 0 or g.shape[1] != 2]
            if bad:
                raise ValueError(f"point_grids must be [n, 2] arrays of (x, y) in [0, 1], got "
                                 f"shapes {', '.join(bad)}")
            if len(point_grids) < crop_n_layers + 1:
                raise ValueError(f"point_grids has {len(point_grids)} grids; crop_n_layers="
                                 f"{crop_n_layers} needs one per layer, {crop_n_layers + 1}")
        self.point_grids = point_grids
        if output_mode not in ("binary_mask", "uncompressed_rle", "coco_rle"):
            raise ValueError(f"Unknown output_mode {output_mode}.")
        if output_mode == "coco_rle":
            import pycocotools  # noqa: F401  (required, as upstream)
        self.model = model
        self.points_per_side = points_per_side
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.crop_n_points_downscale_factor = crop_n_points_downscale_factor
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode
        self.skip_low_iou = bool(skip_low_iou)
        self._predictor = SamPredictor(model)
        # one held copy of the weights (`Sam.inference_state()`), shared with the predictor
        self._graphdef, self._state = self._predictor._graphdef, self._predictor._state

    def _settings(self, layer: int, crop_box, orig_size) -> AmgSettings:
        if self.point_grids is None:
            pps = int(self.points_per_side / (self.crop_n_points_downscale_factor**layer))
            grid = None
        else:  # the layer's own grid, as upstream (points_per_side is then unused)
            pps, grid = 0, tuple(map(tuple, self.point_grids[layer].tolist()))
        full = list(crop_box) == [0, 0, orig_size[1], orig_size[0]]
        return AmgSettings(pps, self.points_per_batch, float(self.pred_iou_thresh),
                           float(self.stability_score_thresh), float(self.stability_score_offset),
                           float(self.box_nms_thresh), 0, None if full else tuple(crop_box),
                           None if full else tuple(orig_size), grid, skip_low_iou=self.skip_low_iou)

    def _process_crop(self, image: np.ndarray, crop_box: list[int], layer: int,
                      orig_size: tuple[int, int]) -> dict[str, np.ndarray]:
        x0, y0, x1, y1 = crop_box
        crop = np.ascontiguousarray(image[y0:y1, x0:x1])
        self._predictor.set_image(crop)  # the encoder, jitted once for every crop size and setting
        out = _crop_keep(self._graphdef, self._state, crop.shape[:2], self._predictor.features,
                         self._settings(layer, crop_box, orig_size))
        self._predictor.reset_image()
        n = int(np.asarray(out["valid"]).sum())
        keep = {k: np.asarray(v)[:n] for k, v in out.items() if k != "low_res"}
        h, w = crop.shape[:2]
        input_size = get_preprocess_shape(h, w, self.model.img_size)
        masks = np.zeros((n, orig_size[0], orig_size[1]), bool)
        for i in range(0, n, 64):  # upscale the kept masks in chunks
            low = out["low_res"][i:min(i + 64, n)]
            masks[i:i + len(low), y0:y1, x0:x1] = np.asarray(_postprocess(self._graphdef, self._state, low,
                                                                          input_size, (h, w)))
        keep["masks"] = masks
        keep["crop_boxes"] = np.tile(np.asarray(crop_box, np.int64), (n, 1))
        return keep

    def _generate_masks(self, image: np.ndarray) -> dict[str, np.ndarray]:
        orig_size = image.shape[:2]
        crop_boxes, layer_idxs = amg.generate_crop_boxes(orig_size, self.crop_n_layers, self.crop_overlap_ratio)
        parts = [self._process_crop(image, cb, li, orig_size) for cb, li in zip(crop_boxes, layer_idxs)]
        data = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        if len(crop_boxes) > 1:
            cb = data["crop_boxes"].astype(np.float32)
            scores = 1.0 / ((cb[:, 2] - cb[:, 0]) * (cb[:, 3] - cb[:, 1]))
            keep = amg.nms_numpy(data["boxes"], scores, self.crop_nms_thresh)
            data = {k: v[keep] for k, v in data.items()}
        return data

    def _postprocess_small_regions(self, data: dict[str, np.ndarray], min_area: int, nms_thresh: float):
        if len(data["masks"]) == 0:
            return data
        masks, scores = [], []
        for mask in data["masks"]:
            mask, changed_h = amg.remove_small_regions(mask, min_area, "holes")
            mask, changed_i = amg.remove_small_regions(mask, min_area, "islands")
            masks.append(mask)
            scores.append(float(not (changed_h or changed_i)))
        masks = np.stack(masks)
        boxes = np.asarray(amg.batched_mask_to_box(jnp.asarray(masks)))
        keep = amg.nms_numpy(boxes, np.asarray(scores), nms_thresh)
        for i in keep:
            if scores[i] == 0.0:
                data["masks"][i] = masks[i]
                data["boxes"][i] = boxes[i]
        return {k: v[keep] for k, v in data.items()}

    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        """Masks for an HWC uint8 image, as upstream's records: segmentation, area, bbox (xywh),
        predicted_iou, point_coords, stability_score, crop_box (xywh)."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(f"generate expects an HxWx3 uint8 image, got {image.dtype} {image.shape}")
        data = self._generate_masks(image)
        if self.min_mask_region_area > 0:
            data = self._postprocess_small_regions(data, self.min_mask_region_area,
                                                   max(self.box_nms_thresh, self.crop_nms_thresh))
        records = []
        for i in range(len(data["masks"])):
            mask = data["masks"][i]
            if self.output_mode == "binary_mask":
                seg = mask
            else:
                seg = amg.mask_to_rle(mask)
                if self.output_mode == "coco_rle":
                    seg = amg.coco_encode_rle(seg)
            records.append({
                "segmentation": seg,
                "area": int(mask.sum()),
                "bbox": amg.box_xyxy_to_xywh(data["boxes"][i].astype(np.int64)).tolist(),
                "predicted_iou": float(data["scores"][i]),
                "point_coords": [data["points"][i].astype(np.float64).tolist()],
                "stability_score": float(data["stability"][i]),
                "crop_box": amg.box_xyxy_to_xywh(data["crop_boxes"][i]).tolist(),
            })
        return records


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _postprocess(graphdef, state, low, input_size, size):
    sam: Sam = nnx.merge(graphdef, state)
    return sam.threshold_masks(low, input_size, size)
