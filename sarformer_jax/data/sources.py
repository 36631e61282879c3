"""Random-access sources of (image, label[, proposals]) records, shared by every dataset.

A source is a picklable sequence (grain's RandomAccessDataSource protocol: `__len__`,
`__getitem__`) whose items are dicts
  image     uint8 [H, W, 3] RGB
  label     uint8 [H, W] in train ids (reduce_zero_label / id mapping already applied)
  name      str, the file (or TFDS record) it came from
  proposals bool [N, H, W] and proposal_scores float32 [N], when a proposal cache is attached.
Every problem with one record raises `DataError` whose message names the file.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from typing import Callable, Sequence

import cv2
import numpy as np

from sarformer_jax.data.proposals import load_proposals
from sarformer_jax.data.transforms import IGNORE, check_label, reduce_zero_label

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A bad record (corrupt file, size mismatch, bad label values, missing file)."""


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Encoded bytes -> uint8 RGB [H, W, 3] (OpenCV decoder, as mmcv's default backend).

    libjpeg only warns on a truncated JPEG and returns grey rows, so the end-of-image marker is
    checked explicitly."""
    if not data:
        raise DataError(f"empty image file: {name}")
    if data[:2] == b"\xff\xd8" and b"\xff\xd9" not in data[-64:]:
        raise DataError(f"truncated JPEG (no end-of-image marker): {name}")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise DataError(f"corrupt or unsupported image file: {name}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def decode_label(data: bytes, name: str) -> np.ndarray:
    if not data:
        raise DataError(f"empty label file: {name}")
    label = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if label is None:
        raise DataError(f"corrupt or unsupported label file: {name}")
    if label.ndim != 2 or label.dtype != np.uint8:
        raise DataError(f"label file must be a single-channel 8-bit PNG, got shape {label.shape} "
                        f"{label.dtype}: {name}")
    return label


def label_mapping(kind: str) -> Callable[[np.ndarray], np.ndarray]:
    """How stored label values become train ids: "reduce_zero_label" (ADE20K), "train_ids"
    (already train ids), "cityscapes_ids" (labelIds through the Cityscapes table)."""
    if kind == "reduce_zero_label":
        return reduce_zero_label
    if kind == "train_ids":
        return lambda x: x
    if kind == "cityscapes_ids":
        from sarformer_jax.data.cityscapes import label_ids_to_train_ids

        return label_ids_to_train_ids
    raise ValueError(f"unknown label mapping {kind!r}")


def finish_record(image: np.ndarray, label: np.ndarray, *, name: str, label_name: str,
                  label_kind: str, num_classes: int, proposals_path: str | None) -> dict:
    """Checks sizes and values, maps the label, attaches proposals."""
    if image.shape[:2] != label.shape[:2]:
        where = name if label_name == name else f"{name} / {label_name}"
        raise DataError(f"image {image.shape[:2]} and label {label.shape[:2]} sizes differ: "
                        f"{where}")
    label = label_mapping(label_kind)(label)
    try:
        check_label(label, num_classes, label_name, IGNORE)
    except ValueError as e:
        raise DataError(str(e)) from None
    record = {"image": image, "label": label, "name": name}
    if proposals_path is not None:
        try:
            masks, scores = load_proposals(proposals_path)
        except (OSError, ValueError) as e:
            raise DataError(str(e)) from None
        if masks.shape[1:] != label.shape:
            raise DataError(f"proposals {masks.shape[1:]} and image {label.shape} sizes differ: "
                            f"{proposals_path}")
        record["proposals"], record["proposal_scores"] = masks, scores
    return record


@dataclasses.dataclass
class PairedFileSource:
    """Image / label files on disk, paired by stem."""

    images: Sequence[str]
    labels: Sequence[str]
    stems: Sequence[str]
    label_kind: str
    num_classes: int
    proposals_dir: str | None = None  # <cache_dir>/<split>

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        image_path, label_path = self.images[index], self.labels[index]
        image = decode_image(_read_bytes(image_path), image_path)
        label = decode_label(_read_bytes(label_path), label_path)
        cache = None
        if self.proposals_dir is not None:
            cache = os.path.join(self.proposals_dir, self.stems[index] + ".npz")
        record = finish_record(image, label, name=image_path, label_name=label_path,
                               label_kind=self.label_kind, num_classes=self.num_classes,
                               proposals_path=cache)
        record["stem"] = self.stems[index]
        return record


def pair_files(images: dict[str, pathlib.Path], labels: dict[str, pathlib.Path], *,
               split_dir: str, on_error: str) -> list[str]:
    """Stems present on both sides.  A one-sided file is an error naming it, or (on_error="skip")
    is logged and counted.  An empty result is always an error naming `split_dir`."""
    lonely = sorted([str(p) for s, p in images.items() if s not in labels]
                    + [str(p) for s, p in labels.items() if s not in images])
    if lonely:
        msg = f"{len(lonely)} file(s) without a partner image/label, first: {lonely[0]}"
        if on_error != "skip":
            raise DataError(msg)
        log.warning("skipping %s", msg)
    stems = sorted(set(images) & set(labels))
    if not stems:
        raise DataError(f"empty split: no image/label pairs under {split_dir}")
    return stems
