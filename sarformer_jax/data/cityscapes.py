"""Cityscapes in its native layout, and the labelIds -> labelTrainIds converter.

  <root>/leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
  <root>/gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png
19 evaluated classes (train ids 0..18), everything else 255; no reduce_zero_label.
`convert_label_ids` writes the *_labelTrainIds.png files from *_labelIds.png when a download only
has the latter (cityscapesscripts' `createTrainIdLabelImgs` needs the polygon json files instead).
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

from sarformer_jax.data.sources import DataError, PairedFileSource, pair_files

# (label id, name, train id) of the official table (cityscapesscripts.helpers.labels);
# test_data_sources checks it against the package.  License plate (id -1) never occurs in a
# labelIds PNG and is left out.
LABELS: tuple[tuple[int, str, int], ...] = (
    (0, "unlabeled", 255), (1, "ego vehicle", 255), (2, "rectification border", 255),
    (3, "out of roi", 255), (4, "static", 255), (5, "dynamic", 255), (6, "ground", 255),
    (7, "road", 0), (8, "sidewalk", 1), (9, "parking", 255), (10, "rail track", 255),
    (11, "building", 2), (12, "wall", 3), (13, "fence", 4), (14, "guard rail", 255),
    (15, "bridge", 255), (16, "tunnel", 255), (17, "pole", 5), (18, "polegroup", 255),
    (19, "traffic light", 6), (20, "traffic sign", 7), (21, "vegetation", 8), (22, "terrain", 9),
    (23, "sky", 10), (24, "person", 11), (25, "rider", 12), (26, "car", 13), (27, "truck", 14),
    (28, "bus", 15), (29, "caravan", 255), (30, "trailer", 255), (31, "train", 16),
    (32, "motorcycle", 17), (33, "bicycle", 18),
)
CLASSES = tuple(name for _, name, t in sorted(LABELS, key=lambda r: r[2]) if t != 255)
SPLITS = {"training": "train", "train": "train", "validation": "val", "val": "val",
          "test": "test"}

# label id (0..255) -> train id; ids outside the table map to 255.
ID_TO_TRAIN_ID = np.full(256, 255, np.uint8)
for _id, _, _train in LABELS:
    ID_TO_TRAIN_ID[_id] = _train
# train id -> its label id (used by the synthetic Cityscapes-layout writer).
TRAIN_ID_TO_ID = np.array([next(i for i, _, t in LABELS if t == k) for k in range(19)], np.uint8)


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """uint8 labelIds map -> uint8 labelTrainIds map (255 = ignore)."""
    return ID_TO_TRAIN_ID[np.asarray(label_ids, np.uint8)]


def convert_label_ids(root: str | os.PathLike, *, overwrite: bool = False,
                      progress: bool = False) -> int:
    """Writes `*_gtFine_labelTrainIds.png` next to every `*_gtFine_labelIds.png` under
    `root/gtFine`; returns how many files were written."""
    import cv2

    gt = pathlib.Path(root) / "gtFine"
    sources = sorted(gt.glob("*/*/*_gtFine_labelIds.png"))
    if not sources:
        raise FileNotFoundError(f"no *_gtFine_labelIds.png under {gt}")
    if progress:
        from tqdm import tqdm

        sources = tqdm(sources, desc="labelTrainIds", unit="img")
    written = 0
    for src in sources:
        dst = src.with_name(src.name.replace("_labelIds.png", "_labelTrainIds.png"))
        if dst.exists() and not overwrite:
            continue
        ids = cv2.imread(str(src), cv2.IMREAD_UNCHANGED)
        if ids is None or ids.ndim != 2:
            raise ValueError(f"unreadable or not single-channel label file: {src}")
        if not cv2.imwrite(str(dst), label_ids_to_train_ids(ids)):
            raise OSError(f"could not write {dst}")
        written += 1
    return written


def cityscapes_source(root: str, split: str, *, num_classes: int = 19,
                      proposals_dir: str | None = None, on_error: str = "raise",
                      label_suffix: str = "_gtFine_labelTrainIds.png") -> PairedFileSource:
    """Lists `split` ("train" / "val", or "training" / "validation") of a Cityscapes root.

    Proposals are read from `<proposals_dir>/<split>/<city>_<seq>_<frame>_leftImg8bit.npz`.
    With `label_suffix="_gtFine_labelIds.png"` the label ids are mapped on the fly."""
    if split not in SPLITS:
        raise ValueError(f"Cityscapes split must be one of {sorted(SPLITS)}, got {split!r}")
    split = SPLITS[split]
    root_path = pathlib.Path(root)
    image_dir, label_dir = root_path / "leftImg8bit" / split, root_path / "gtFine" / split
    for d in (image_dir, label_dir):
        if not d.is_dir():
            raise DataError(f"missing directory {d} (expected the Cityscapes layout)")
    suffix = "_leftImg8bit.png"
    images = {p.name[: -len(suffix)]: p for p in image_dir.glob(f"*/*{suffix}")}
    labels = {p.name[: -len(label_suffix)]: p for p in label_dir.glob(f"*/*{label_suffix}")}
    if not labels and any(label_dir.glob("*/*_gtFine_labelIds.png")) \
            and label_suffix.endswith("labelTrainIds.png"):
        raise DataError(f"{label_dir} has *_gtFine_labelIds.png but no *_labelTrainIds.png: run "
                        f"`sarformer data cityscapes-train-ids --root {root}`")
    bases = pair_files(images, labels, split_dir=str(image_dir), on_error=on_error)
    return PairedFileSource(
        images=[str(images[b]) for b in bases], labels=[str(labels[b]) for b in bases],
        stems=[b + "_leftImg8bit" for b in bases],
        label_kind="cityscapes_ids" if label_suffix.endswith("labelIds.png") else "train_ids",
        num_classes=num_classes,
        proposals_dir=str(pathlib.Path(proposals_dir) / split) if proposals_dir else None,
    )
