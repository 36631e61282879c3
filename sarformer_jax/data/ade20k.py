"""ADE20K in the ADEChallengeData2016 layout (also the layout of the synthetic set).

  <root>/images/{training,validation}/<stem>.jpg
  <root>/annotations/{training,validation}/<stem>.png     0 = other, 1..150
150 classes with reduce_zero_label (ARCHITECTURE §6.2): 0 -> 255 (ignored), k -> k - 1.
"""

from __future__ import annotations

import pathlib

from sarformer_jax.data.sources import DataError, PairedFileSource, pair_files

SPLITS = {"training": "training", "train": "training", "validation": "validation",
          "val": "validation"}


def ade20k_source(root: str, split: str, *, num_classes: int = 150,
                  reduce_zero_label: bool = True, proposals_dir: str | None = None,
                  on_error: str = "raise") -> PairedFileSource:
    """Lists `split` ("training" / "validation") under `root` and pairs images with labels.

    `proposals_dir` is the cache root (`guidance.cache_dir`); files are read from
    `<proposals_dir>/<split>/<stem>.npz`."""
    if split not in SPLITS:
        raise ValueError(f"ADE20K split must be one of {sorted(SPLITS)}, got {split!r}")
    split = SPLITS[split]
    root_path = pathlib.Path(root)
    image_dir, label_dir = root_path / "images" / split, root_path / "annotations" / split
    for d in (image_dir, label_dir):
        if not d.is_dir():
            raise DataError(f"missing directory {d} (expected the ADEChallengeData2016 layout)")
    images = {p.stem: p for p in image_dir.glob("*.jpg")}
    labels = {p.stem: p for p in label_dir.glob("*.png")}
    stems = pair_files(images, labels, split_dir=str(image_dir), on_error=on_error)
    return PairedFileSource(
        images=[str(images[s]) for s in stems], labels=[str(labels[s]) for s in stems],
        stems=stems, label_kind="reduce_zero_label" if reduce_zero_label else "train_ids",
        num_classes=num_classes,
        proposals_dir=str(pathlib.Path(proposals_dir) / split) if proposals_dir else None,
    )
