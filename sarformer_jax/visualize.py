"""Label maps as pictures: dataset class names and palettes, colourised maps, overlays with a
legend of the classes present, and raw label PNGs.

Class names and colours are those mmseg publishes for ADE20K (150 classes, reduce_zero_label
ids) and Cityscapes (19 train ids).  mmseg spells ADE20K class 7 "bed " with a trailing space;
here it is "bed".
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug",
    "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning",
    "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole",
    "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van",
    "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light",
    "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower",
    "radiator", "glass", "clock", "flag",
)

ADE20K_PALETTE = np.array([
    [120, 120, 120], [180, 120, 120], [6, 230, 230], [80, 50, 50], [4, 200, 3],
    [120, 120, 80], [140, 140, 140], [204, 5, 255], [230, 230, 230], [4, 250, 7],
    [224, 5, 255], [235, 255, 7], [150, 5, 61], [120, 120, 70], [8, 255, 51],
    [255, 6, 82], [143, 255, 140], [204, 255, 4], [255, 51, 7], [204, 70, 3],
    [0, 102, 200], [61, 230, 250], [255, 6, 51], [11, 102, 255], [255, 7, 71],
    [255, 9, 224], [9, 7, 230], [220, 220, 220], [255, 9, 92], [112, 9, 255],
    [8, 255, 214], [7, 255, 224], [255, 184, 6], [10, 255, 71], [255, 41, 10],
    [7, 255, 255], [224, 255, 8], [102, 8, 255], [255, 61, 6], [255, 194, 7],
    [255, 122, 8], [0, 255, 20], [255, 8, 41], [255, 5, 153], [6, 51, 255],
    [235, 12, 255], [160, 150, 20], [0, 163, 255], [140, 140, 140], [250, 10, 15],
    [20, 255, 0], [31, 255, 0], [255, 31, 0], [255, 224, 0], [153, 255, 0],
    [0, 0, 255], [255, 71, 0], [0, 235, 255], [0, 173, 255], [31, 0, 255],
    [11, 200, 200], [255, 82, 0], [0, 255, 245], [0, 61, 255], [0, 255, 112],
    [0, 255, 133], [255, 0, 0], [255, 163, 0], [255, 102, 0], [194, 255, 0],
    [0, 143, 255], [51, 255, 0], [0, 82, 255], [0, 255, 41], [0, 255, 173],
    [10, 0, 255], [173, 255, 0], [0, 255, 153], [255, 92, 0], [255, 0, 255],
    [255, 0, 245], [255, 0, 102], [255, 173, 0], [255, 0, 20], [255, 184, 184],
    [0, 31, 255], [0, 255, 61], [0, 71, 255], [255, 0, 204], [0, 255, 194],
    [0, 255, 82], [0, 10, 255], [0, 112, 255], [51, 0, 255], [0, 194, 255],
    [0, 122, 255], [0, 255, 163], [255, 153, 0], [0, 255, 10], [255, 112, 0],
    [143, 255, 0], [82, 0, 255], [163, 255, 0], [255, 235, 0], [8, 184, 170],
    [133, 0, 255], [0, 255, 92], [184, 0, 255], [255, 0, 31], [0, 184, 255],
    [0, 214, 255], [255, 0, 112], [92, 255, 0], [0, 224, 255], [112, 224, 255],
    [70, 184, 160], [163, 0, 255], [153, 0, 255], [71, 255, 0], [255, 0, 163],
    [255, 204, 0], [255, 0, 143], [0, 255, 235], [133, 255, 0], [255, 0, 235],
    [245, 0, 255], [255, 0, 122], [255, 245, 0], [10, 190, 212], [214, 255, 0],
    [0, 204, 255], [20, 0, 255], [255, 255, 0], [0, 153, 255], [0, 41, 255],
    [0, 255, 204], [41, 0, 255], [41, 255, 0], [173, 0, 255], [0, 245, 255],
    [71, 0, 255], [122, 0, 255], [0, 255, 184], [0, 92, 255], [184, 255, 0],
    [0, 133, 255], [255, 214, 0], [25, 194, 194], [102, 255, 0], [92, 0, 255],
], np.uint8)

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)

CITYSCAPES_PALETTE = np.array([
    [128, 64, 128], [244, 35, 232], [70, 70, 70], [102, 102, 156], [190, 153, 153],
    [153, 153, 153], [250, 170, 30], [220, 220, 0], [107, 142, 35], [152, 251, 152],
    [70, 130, 180], [220, 20, 60], [255, 0, 0], [0, 0, 142], [0, 0, 70], [0, 60, 100],
    [0, 80, 100], [0, 0, 230], [119, 11, 32],
], np.uint8)

DATASETS = {
    "ade20k": (ADE20K_CLASSES, ADE20K_PALETTE),
    "cityscapes": (CITYSCAPES_CLASSES, CITYSCAPES_PALETTE),
}

IGNORE_COLOR = (0, 0, 0)  # colour of ignore / out-of-range ids in `colorize`


def dataset_meta(name: str) -> tuple[tuple[str, ...], np.ndarray]:
    """(class names, [K, 3] uint8 palette) of "ade20k" or "cityscapes"."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"dataset_meta: unknown dataset {name!r}; known: "
                         f"{sorted(DATASETS)}") from None


def colorize(label: np.ndarray, palette: np.ndarray = ADE20K_PALETTE) -> np.ndarray:
    """[H, W] class ids -> [H, W, 3] uint8 colours; ids outside the palette are `IGNORE_COLOR`."""
    label = np.asarray(label).astype(np.int64)
    palette = np.asarray(palette, np.uint8)
    table = np.concatenate([palette, np.array([IGNORE_COLOR], np.uint8)])
    k = len(palette)
    return table[np.where((label >= 0) & (label < k), label, k)]


def legend_entries(label: np.ndarray, class_names: Sequence[str]) -> list[tuple[int, str, int]]:
    """(class id, name, pixel count) of every class present in `label`, largest first (ties by
    id); ids outside [0, len(class_names)) (e.g. 255) are not classes."""
    label = np.asarray(label).astype(np.int64).ravel()
    k = len(class_names)
    counts = np.bincount(label[(label >= 0) & (label < k)], minlength=k)
    present = [c for c in range(k) if counts[c] > 0]
    present.sort(key=lambda c: (-counts[c], c))
    return [(c, class_names[c], int(counts[c])) for c in present]


def overlay(image: np.ndarray | Image.Image, label: np.ndarray,
            palette: np.ndarray = ADE20K_PALETTE, alpha: float = 0.5,
            class_names: Sequence[str] | None = None, legend: bool = True) -> Image.Image:
    """The image with the label colours blended over it, and a legend strip on the right.

    Args:
      image: [H, W, 3] uint8 RGB (array or PIL image).
      label: [H, W] class ids; ignore / out-of-range pixels keep the image colour.
      palette: [K, 3] uint8.  alpha: weight of the label colour.
      class_names: K names; the legend needs them (without them no legend is drawn).
      legend: draw the strip listing the classes present (swatch + name, largest first).
    Returns:
      RGB PIL image, [H, W + legend width] (the legend grows downwards for very short images).
    """
    img = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    label = np.asarray(label)
    if img.ndim != 3 or img.shape[2] != 3 or img.shape[:2] != label.shape:
        raise ValueError(f"overlay: image {img.shape} must be [H, W, 3] matching label "
                         f"{label.shape}")
    palette = np.asarray(palette, np.uint8)
    valid = ((label >= 0) & (label < len(palette)))[..., None]
    blend = (1.0 - alpha) * img.astype(np.float32) + alpha * colorize(label, palette)
    out = np.where(valid, np.clip(np.rint(blend), 0, 255), img).astype(np.uint8)
    picture = Image.fromarray(out)
    if not legend or class_names is None:
        return picture
    if len(class_names) != len(palette):
        raise ValueError(f"overlay: {len(class_names)} class names for {len(palette)} colours")
    return _with_legend(picture, legend_entries(label, class_names), palette)


_ROW = 18  # legend row height in pixels
_SWATCH = 14


def _with_legend(picture: Image.Image, entries, palette) -> Image.Image:
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(picture)
    text_w = max([int(probe.textlength(name, font=font)) for _, name, _ in entries] + [40])
    col_w = _SWATCH + 12 + text_w + 8
    w, h = picture.size
    rows = max(1, (h - 8) // _ROW)
    cols = max(1, -(-len(entries) // rows))
    height = max(h, 8 + _ROW * min(rows, max(len(entries), 1)))
    canvas = Image.new("RGB", (w + cols * col_w, height), (255, 255, 255))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.fontmode = "1"  # no anti-aliasing: the strip holds only white, black and swatch colours
    for i, (c, name, _) in enumerate(entries):
        x = w + 6 + (i // rows) * col_w
        y = 4 + (i % rows) * _ROW
        draw.rectangle([x, y, x + _SWATCH - 1, y + _SWATCH - 1], fill=tuple(int(v) for v in
                                                                            palette[c]))
        draw.text((x + _SWATCH + 6, y), name, fill=(0, 0, 0), font=font)
    return canvas


def save_label_png(label: np.ndarray, path: str | os.PathLike,
                   palette: np.ndarray | None = None) -> None:
    """Writes class ids as an 8-bit PNG holding the raw ids (255 stays 255).  With a palette the
    PNG is paletted ("P"): the pixel values are still the raw ids, viewers show the colours."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"save_label_png: label {label.shape} must be [H, W] ({path})")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError(f"save_label_png: ids {label.min()}..{label.max()} do not fit 8 bits "
                         f"({path})")
    ids = np.ascontiguousarray(label.astype(np.uint8))
    if palette is None:
        img = Image.frombytes("L", (ids.shape[1], ids.shape[0]), ids.tobytes())
    else:
        img = Image.frombytes("P", (ids.shape[1], ids.shape[0]), ids.tobytes())
        img.putpalette(_png_palette(palette))
    img.save(path)


def _png_palette(palette: np.ndarray) -> list[int]:
    table = np.zeros((256, 3), np.uint8)
    table[: len(palette)] = palette
    return table.ravel().tolist()
