"""`sarformer amg`: SAM automatic masks for one image (colour overlay PNG, optional COCO RLE JSON)
or for a whole dataset split (proposal cache for SARFormer's `guidance.source="cached"`).

    sarformer amg photo.jpg --sam-checkpoint sam_vit_b.npz --out overlay.png --rle-json masks.json
    sarformer amg --dataset data/ade/ADEChallengeData2016 --split training --out cache/ \
        --sam-checkpoint sam_vit_b.npz

Cache format: one `CACHE_DIR/<split>/<stem>.npz` per image with `masks` = np.packbits of the
bool [N, H, W] masks along the last axis, `shape` = (N, H, W), `scores` float32 [N] (predicted
IoU, descending).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", nargs="?", help="input image (omit with --dataset)")
    parser.add_argument("--sam-checkpoint", required=True, help=".npz from `sarformer convert sam`")
    parser.add_argument("--out", required=True, help="overlay PNG (single image) or cache dir (--dataset)")
    parser.add_argument("--rle-json", default=None, help="also write the masks as COCO RLE JSON")
    parser.add_argument("--dataset", default=None, help="ADE20K-layout root: images/<split>/*.jpg")
    parser.add_argument("--split", default="training")
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--points-per-batch", type=int, default=64)
    parser.add_argument("--pred-iou-thresh", type=float, default=0.88)
    parser.add_argument("--stability-score-thresh", type=float, default=0.95)
    parser.add_argument("--box-nms-thresh", type=float, default=0.7)
    parser.add_argument("--max-masks", type=int, default=256, help="per image (dataset mode)")
    parser.add_argument("--skip-low-iou", action=argparse.BooleanOptionalAction, default=True,
                        help="upscale and post-process only the prompts with a mask over --pred-iou-thresh "
                             "(the others' masks fail that threshold anyway: the same masks; on by default, "
                             "32.4 -> 25.1 ms per 640² image on an H100 with random weights, SAM run 16)")
    parser.add_argument("--postprocess", default="auto", choices=["auto", "matmul", "taps", "pallas"],
                        help="how candidates' logits are resized and thresholded (Sam.postprocess_implementation; "
                             "auto: the Pallas kernel on a GPU, taps elsewhere)")


def _settings(args) -> dict:
    return dict(points_per_side=args.points_per_side, points_per_batch=args.points_per_batch,
                pred_iou_thresh=args.pred_iou_thresh, stability_score_thresh=args.stability_score_thresh,
                box_nms_thresh=args.box_nms_thresh, skip_low_iou=args.skip_low_iou)


def overlay(image: np.ndarray, masks: np.ndarray, alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """Paints masks [n, H, W] (largest first, so small ones stay visible) in random colours."""
    rng = np.random.default_rng(seed)
    out = image.astype(np.float32).copy()
    for i in np.argsort([-m.sum() for m in masks]):
        colour = rng.integers(0, 256, 3).astype(np.float32)
        out[masks[i]] = (1 - alpha) * out[masks[i]] + alpha * colour
    return out.round().clip(0, 255).astype(np.uint8)


def _read_image(path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def _single(args, sam) -> int:
    from PIL import Image

    from sarformer_jax.sam import amg
    from sarformer_jax.sam.automatic_mask_generator import SamAutomaticMaskGenerator

    image = _read_image(args.image)
    records = SamAutomaticMaskGenerator(sam, **_settings(args)).generate(image)
    masks = np.stack([r["segmentation"] for r in records]) if records else np.zeros((0,) + image.shape[:2], bool)
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(overlay(image, masks)).save(args.out)
    if args.rle_json:
        out = [dict({k: v for k, v in r.items() if k != "segmentation"}, segmentation=amg.mask_to_rle(r["segmentation"]))
               for r in records]
        pathlib.Path(args.rle_json).write_text(json.dumps(out))
    print(f"{args.image}: {len(records)} masks -> {args.out}" + (f", {args.rle_json}" if args.rle_json else ""))
    return 0


def _dataset(args, sam) -> int:
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    from sarformer_jax.sam.automatic_mask_generator import mask_generator

    root = pathlib.Path(args.dataset)
    images = sorted(p for p in (root / "images" / args.split).glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not images:
        print(f"sarformer amg: no images under {root / 'images' / args.split}", file=sys.stderr)
        return 2
    out_dir = pathlib.Path(args.out) / args.split
    out_dir.mkdir(parents=True, exist_ok=True)
    generate = mask_generator(sam, max_masks=args.max_masks, **_settings(args))  # the model split once
    todo = [p for p in images if not (out_dir / f"{p.stem}.npz").exists()]
    print(f"sarformer amg: {len(images)} images in {root / 'images' / args.split}, "
          f"{len(images) - len(todo)} already cached in {out_dir}", flush=True)
    def write(dst, res):
        n = int(np.asarray(res["valid"][0]).sum())
        masks = np.asarray(res["masks"][0, :n])
        tmp = dst.with_suffix(".tmp.npz")
        np.savez(tmp, masks=np.packbits(masks, axis=-1), shape=np.asarray(masks.shape, np.int64),
                 scores=np.asarray(res["scores"][0, :n], np.float32))
        tmp.replace(dst)

    pending = None  # the previous image's masks, still on the device
    try:
        for path in tqdm(todo, desc="sarformer amg", unit="img"):
            image = _read_image(path)
            res = generate(jnp.asarray(image)[None])
            if pending is not None:  # written once this image's masks are queued on the device
                write(*pending)
            pending = (out_dir / f"{path.stem}.npz", res)
    finally:  # also when a later image is unreadable: what was computed is cached
        if pending is not None:
            write(*pending)
    return 0


def run(args: argparse.Namespace) -> int:
    from sarformer_jax.sam import load_sam

    if (args.image is None) == (args.dataset is None):
        print("sarformer amg: give either IMAGE or --dataset ROOT", file=sys.stderr)
        return 2
    from sarformer_jax.convert.common import CheckpointError

    try:
        sam = load_sam(args.sam_checkpoint)
    except CheckpointError as e:
        print(f"sarformer amg: {e}", file=sys.stderr)
        return 1
    sam.postprocess_implementation = args.postprocess
    try:
        return _single(args, sam) if args.image else _dataset(args, sam)
    except ValueError as e:  # a bad input image: one line; the images cached before it stay
        print(f"sarformer amg: {e}", file=sys.stderr)
        return 2
