"""Synthetic segmentation data in the exact ADE20K (or Cityscapes) directory layout.

Each image shows a muted, low-frequency background (label 0, "other") and a few textured
objects.  An object's class decides its shape, its texture and its hue, so a small model can learn
the task from crops; sizes, aspect ratios, rotations, positions, colour jitter and occlusion
order vary per instance.  Every drawn instance also becomes a proposal mask (plus a few SAM-like
part and background masks), written in the proposal-cache format of `proposals.py`, so the tiny
config can train with `guidance.source="cached"` and no SAM weights.

Layouts written under `out`:
  ade20k      images/{training,validation}/ADE_{train,val}_%08d.jpg
              annotations/{training,validation}/ADE_{train,val}_%08d.png   (0 other, 1..K)
              proposals/{training,validation}/<stem>.npz
  cityscapes  leftImg8bit/{train,val}/<city>/<city>_%06d_000019_leftImg8bit.png
              gtFine/{train,val}/<city>/<stem>_gtFine_{labelIds,labelTrainIds}.png
              proposals/{train,val}/<city>_%06d_000019_leftImg8bit.npz   (stem of the image)
plus `synthetic.json` describing what was written.  Output depends only on the arguments: each
sample draws from its own generator seeded by (seed, split, index).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib

import cv2
import numpy as np

from sarformer_jax.data import cityscapes as cs
from sarformer_jax.data.proposals import proposal_path, save_proposals

SHAPES = ("ellipse", "rectangle", "triangle", "diamond", "star", "hexagon", "cross", "ring")
TEXTURES = ("solid", "hstripes", "vstripes", "dstripes", "checker", "dots", "rings", "grid")
CS_TRAIN_CITIES = ("alpha", "bravo")
CS_VAL_CITIES = ("charlie",)
_SPLIT_CODE = {"training": 0, "validation": 1}


@dataclasses.dataclass(frozen=True)
class ClassStyle:
    shape: str
    texture: str
    hue: float  # OpenCV hue units, [0, 180)


def class_style(k: int, num_classes: int) -> ClassStyle:
    """Appearance of class k in 1..K: shape and texture cycle through 8 each (offset for K > 8),
    hues are spread evenly over the colour circle."""
    i = k - 1
    return ClassStyle(SHAPES[i % 8], TEXTURES[(i + 3 * (i // 8)) % 8], 180.0 * i / num_classes)


@dataclasses.dataclass
class SyntheticSample:
    image: np.ndarray  # uint8 [H, W, 3] RGB
    label: np.ndarray  # uint8 [H, W], 0 = other, 1..K
    proposals: np.ndarray  # bool [N, H, W]: instances, then parts, then background
    scores: np.ndarray  # float32 [N]
    num_instances: int


def _unit_polygon(shape: str) -> np.ndarray:
    """Outline in [-1, 1]^2 (x, y); the ring is handled separately."""
    if shape in ("ellipse", "ring"):
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], -1)
    if shape == "rectangle":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float)
    if shape == "triangle":
        return np.array([[0, -1], [1, 1], [-1, 1]], float)
    if shape == "diamond":
        return np.array([[0, -1], [1, 0], [0, 1], [-1, 0]], float)
    if shape == "star":
        t = np.arange(10) * np.pi / 5 - np.pi / 2
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([r * np.cos(t), r * np.sin(t)], -1)
    if shape == "hexagon":
        t = np.arange(6) * np.pi / 3
        return np.stack([np.cos(t), np.sin(t)], -1)
    if shape == "cross":
        a = 0.36
        return np.array([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1],
                         [-a, a], [-1, a], [-1, -a], [-a, -a]], float)
    raise ValueError(f"unknown shape {shape!r}")


def _shape_mask(shape: str, size: tuple[int, int], center, radii, angle: float) -> np.ndarray:
    h, w = size
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    mask = np.zeros((h, w), np.uint8)

    def fill(poly, value):
        pts = (poly * np.asarray(radii)) @ rot.T + np.asarray(center)
        cv2.fillPoly(mask, [np.round(pts * 16).astype(np.int32)], value, cv2.LINE_8, shift=4)

    fill(_unit_polygon(shape), 1)
    if shape == "ring":
        fill(_unit_polygon("ellipse") * 0.5, 0)
    return mask.astype(bool)


def _texture(texture: str, yy: np.ndarray, xx: np.ndarray, period: float) -> np.ndarray:
    """Pattern in [0, 1] over object-centred coordinates (pixels)."""
    p = period
    if texture == "solid":
        return np.ones_like(yy)
    if texture == "hstripes":
        return (np.floor(yy / (p / 2)) % 2).astype(np.float32)
    if texture == "vstripes":
        return (np.floor(xx / (p / 2)) % 2).astype(np.float32)
    if texture == "dstripes":
        return (np.floor((xx + yy) / (p / 1.4)) % 2).astype(np.float32)
    if texture == "checker":
        return ((np.floor(xx / (p / 2)) + np.floor(yy / (p / 2))) % 2).astype(np.float32)
    if texture == "dots":
        dy = (yy % p) - p / 2
        dx = (xx % p) - p / 2
        return (dx * dx + dy * dy > (0.3 * p) ** 2).astype(np.float32)
    if texture == "rings":
        return (0.5 + 0.5 * np.cos(np.hypot(xx, yy) * (2 * np.pi / p))).astype(np.float32)
    if texture == "grid":
        return ((np.abs(yy % p) > 2) & (np.abs(xx % p) > 2)).astype(np.float32)
    raise ValueError(f"unknown texture {texture!r}")


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    px = np.array([[[np.clip(h, 0, 179), np.clip(s, 0, 255), np.clip(v, 0, 255)]]], np.uint8)
    return cv2.cvtColor(px, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def render_sample(rng: np.random.Generator, image_size: tuple[int, int] = (160, 192),
                  num_classes: int = 8) -> SyntheticSample:
    """One image, its label map and its proposal masks, drawn from `rng`."""
    h, w = image_size
    # Background: smooth, low-saturation colour field plus mild noise.
    field = rng.uniform(50, 200, (4, 5, 3)).astype(np.float32)
    field = cv2.resize(field, (w, h), interpolation=cv2.INTER_CUBIC)
    grey = field.mean(-1, keepdims=True)
    image = 0.75 * grey + 0.25 * field + rng.normal(0, 5, (h, w, 1)).astype(np.float32)
    label = np.zeros((h, w), np.uint8)
    instance = np.zeros((h, w), np.int32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)

    n = int(rng.integers(2, 7))
    side = min(h, w)
    classes = []
    for i in range(n):
        k = int(rng.integers(1, num_classes + 1))
        style = class_style(k, num_classes)
        r = side * rng.uniform(0.08, 0.28)
        aspect = math.exp(rng.uniform(-0.6, 0.6))
        radii = (r * math.sqrt(aspect), r / math.sqrt(aspect))
        center = (rng.uniform(0.05, 0.95) * w, rng.uniform(0.05, 0.95) * h)
        angle = rng.uniform(-0.25, 0.25)
        mask = _shape_mask(style.shape, (h, w), center, radii, angle)
        if not mask.any():
            continue
        period = rng.uniform(7.0, 11.0)
        pattern = _texture(style.texture, yy - center[1], xx - center[0], period)
        hue = style.hue + rng.uniform(-3, 3)
        bright = _hsv_to_rgb(hue, rng.uniform(190, 250), rng.uniform(190, 250))
        dark = _hsv_to_rgb(hue, rng.uniform(120, 170), rng.uniform(70, 110))
        colour = dark + (bright - dark) * pattern[..., None]
        image[mask] = colour[mask]
        label[mask] = k
        instance[mask] = i + 1
        classes.append(i + 1)

    image = np.clip(image + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)

    masks, scores = [], []
    for i in classes:
        m = instance == i
        if m.sum() >= 20:
            masks.append(m)
            scores.append(rng.uniform(0.92, 1.0))
    num_instances = len(masks)
    # SAM-like part masks: an instance cut by a line through its centroid.
    for j in rng.permutation(num_instances)[:2]:
        m = masks[j]
        if m.sum() < 200:
            continue
        cy, cx = np.argwhere(m).mean(0)
        t = rng.uniform(0, np.pi)
        part = m & ((xx - cx) * math.cos(t) + (yy - cy) * math.sin(t) > 0)
        if part.sum() >= 10:
            masks.append(part)
            scores.append(rng.uniform(0.88, 0.95))
    background = label == 0
    if background.sum() >= 50:
        masks.append(background)
        scores.append(rng.uniform(0.88, 0.97))
    proposals = np.stack(masks) if masks else np.zeros((0, h, w), bool)
    return SyntheticSample(image, label, proposals, np.asarray(scores, np.float32), num_instances)


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLIT_CODE[split], index])


def _write_png(path: pathlib.Path, array: np.ndarray) -> None:
    if not cv2.imwrite(str(path), array):
        raise OSError(f"could not write {path}")


def _ade_paths(out: pathlib.Path, split: str, index: int):
    stem = f"ADE_{'train' if split == 'training' else 'val'}_{index + 1:08d}"
    return (stem, out / "images" / split / f"{stem}.jpg",
            [(out / "annotations" / split / f"{stem}.png", None)], split)


def _cityscapes_paths(out: pathlib.Path, split: str, index: int):
    cities = CS_TRAIN_CITIES if split == "training" else CS_VAL_CITIES
    city = cities[index % len(cities)]
    cs_split = cs.SPLITS[split]
    stem = f"{city}_{index // len(cities):06d}_000019_leftImg8bit"
    base = stem[: -len("_leftImg8bit")]
    gt = out / "gtFine" / cs_split / city
    return (stem, out / "leftImg8bit" / cs_split / city / f"{stem}.png",
            [(gt / f"{base}_gtFine_labelIds.png", "ids"),
             (gt / f"{base}_gtFine_labelTrainIds.png", "train_ids")], cs_split)


def write_sample(out: pathlib.Path, layout: str, split: str, index: int,
                 sample: SyntheticSample) -> None:
    paths = _ade_paths if layout == "ade20k" else _cityscapes_paths
    stem, image_path, label_paths, cache_split = paths(out, split, index)
    image_path.parent.mkdir(parents=True, exist_ok=True)
    bgr = np.ascontiguousarray(sample.image[..., ::-1])
    if layout == "ade20k":
        ok = cv2.imwrite(str(image_path), bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
        if not ok:
            raise OSError(f"could not write {image_path}")
    else:
        _write_png(image_path, bgr)
    for path, kind in label_paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind is None:  # ADE20K: 0 other, 1..K
            _write_png(path, sample.label)
        else:  # Cityscapes: class k -> train id k-1, other -> unlabeled (id 0, train id 255)
            train_ids = np.where(sample.label == 0, 255, sample.label.astype(np.int32) - 1)
            if kind == "ids":
                ids = np.where(train_ids == 255, 0, cs.TRAIN_ID_TO_ID[np.minimum(train_ids, 18)])
                _write_png(path, ids.astype(np.uint8))
            else:
                _write_png(path, train_ids.astype(np.uint8))
    save_proposals(proposal_path(out / "proposals", cache_split, stem), sample.proposals,
                   sample.scores)


def generate(out: str | os.PathLike, *, num_train: int = 400, num_val: int = 50,
             image_size: tuple[int, int] = (160, 192), num_classes: int = 8, seed: int = 0,
             layout: str = "ade20k", progress: bool = False) -> dict:
    """Writes the synthetic dataset under `out` and returns the summary saved in
    `out/synthetic.json`.  `image_size` is (H, W)."""
    if layout not in ("ade20k", "cityscapes"):
        raise ValueError(f"layout must be 'ade20k' or 'cityscapes', got {layout!r}")
    if layout == "cityscapes" and num_classes > 19:
        raise ValueError(f"the Cityscapes layout has 19 train ids, got num_classes={num_classes}")
    if num_classes < 1 or num_train < 0 or num_val < 0 or min(image_size) < 16:
        raise ValueError(f"bad synthetic sizes: classes={num_classes}, train={num_train}, "
                         f"val={num_val}, image_size={image_size}")
    out = pathlib.Path(out)
    jobs = [("training", i) for i in range(num_train)] + [("validation", i) for i in range(num_val)]
    iterator = jobs
    if progress:
        from tqdm import tqdm

        iterator = tqdm(jobs, desc=f"synthetic {layout}", unit="img")
    for split, index in iterator:
        sample = render_sample(sample_rng(seed, split, index), tuple(image_size), num_classes)
        write_sample(out, layout, split, index, sample)
    summary = dict(
        layout=layout, num_train=num_train, num_val=num_val, image_size=list(image_size),
        num_classes=num_classes, seed=seed,
        classes=[dataclasses.asdict(class_style(k, num_classes)) | {"label": k}
                 for k in range(1, num_classes + 1)],
        proposals="proposals/<split>/<stem>.npz: masks=packbits(bool[N,H,W], -1), shape, scores",
    )
    (out / "synthetic.json").write_text(json.dumps(summary, indent=1))
    return summary
