"""TFDS-prepared datasets (`data.dataset = "tfds:scene_parse150"` or `"tfds:cityscapes"`) read
through `tfds.data_source` (ArrayRecord random access, no TensorFlow needed to read).

The user prepares the data once with TFDS (`tfds build scene_parse150`, which needs TensorFlow
and, for Cityscapes, the manual download); `data.root` is then the TFDS data_dir ("" = default).
tensorflow_datasets is imported only when such a source is built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import pathlib
from typing import Any

import numpy as np

from sarformer_jax.data.sources import DataError, finish_record

# name -> (image key, label key, label mapping, {our split: TFDS split}).
# scene_parse150 has no validation split: its "test" split is ADE20K's 2000 validation images.
# cityscapes/semantic_segmentation stores gtFine labelIds, mapped through the official table.
KNOWN = {
    "scene_parse150": ("image", "annotation", "reduce_zero_label",
                       {"training": "train", "validation": "test"}),
    "cityscapes": ("image_left", "segmentation_label", "cityscapes_ids",
                   {"training": "train", "validation": "validation", "test": "test"}),
}


@dataclasses.dataclass
class TfdsSource:
    """Adapter from a TFDS data source to the record format of `sources.py`."""

    data_source: Any
    dataset: str
    split: str
    image_key: str
    label_key: str
    label_kind: str
    num_classes: int
    proposals_dir: str | None = None

    def __len__(self) -> int:
        return len(self.data_source)

    def stem(self, index: int) -> str:
        return f"{self.split}_{index:08d}"

    def __getitem__(self, index: int) -> dict:
        name = f"tfds:{self.dataset}/{self.split}[{index}]"
        try:
            example = self.data_source[index]
        except Exception as e:  # a corrupt record surfaces as a decoding error of any type
            raise DataError(f"cannot decode {name}: {type(e).__name__}: {e}") from None
        image = np.asarray(example[self.image_key])
        label = np.asarray(example[self.label_key])
        if label.ndim == 3:  # grey PNGs decoded with 1 or 3 identical channels
            label = label[..., 0]
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise DataError(f"{name}: image must be uint8 [H, W, 3], got {image.shape} "
                            f"{image.dtype}")
        if label.dtype != np.uint8:
            if label.size and (label.min() < 0 or label.max() > 255):
                raise DataError(f"{name}: label values outside 0..255")
            label = label.astype(np.uint8)
        cache = None
        if self.proposals_dir is not None:
            cache = str(pathlib.Path(self.proposals_dir) / f"{self.stem(index)}.npz")
        return finish_record(image, label, name=name, label_name=name,
                             label_kind=self.label_kind, num_classes=self.num_classes,
                             proposals_path=cache)


@contextlib.contextmanager
def _collector_paused():
    """tensorflow_datasets imports much of itself through etils' lazy-import context, which
    turns every `import` run meanwhile into a lazy module, also imports run by finalisers of
    unrelated objects the garbage collector happens to free then (grain's iterators, pytest's
    unraisable-exception hook): they then fail with "'LazyModule' object is not callable".
    Collect first, then keep the collector off while tfds imports and opens its source."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def tfds_source(dataset: str, split: str, *, data_dir: str | None = None,
                num_classes: int, proposals_dir: str | None = None) -> TfdsSource:
    """`dataset` is a TFDS name (with optional config, e.g. "cityscapes/semantic_segmentation");
    `split` is "training" / "validation" (mapped to the TFDS split names) or a TFDS split."""
    with _collector_paused():
        import tensorflow_datasets as tfds

    base = dataset.split("/")[0].split(":")[0]
    if base not in KNOWN:
        raise ValueError(f"unsupported TFDS dataset {dataset!r}; known: {sorted(KNOWN)}")
    image_key, label_key, label_kind, splits = KNOWN[base]
    tfds_split = splits.get(split, split)
    if base == "cityscapes" and "/" not in dataset:
        dataset = "cityscapes/semantic_segmentation"
    try:
        with _collector_paused():
            source = tfds.data_source(dataset, split=tfds_split, data_dir=data_dir or None)
    except Exception as e:
        raise DataError(f"cannot open TFDS {dataset} split {tfds_split!r} in "
                        f"{data_dir or 'the default data_dir'}: {type(e).__name__}: {e}") from None
    if len(source) == 0:
        raise DataError(f"empty split: TFDS {dataset} split {tfds_split!r}")
    return TfdsSource(source, dataset, tfds_split, image_key, label_key, label_kind, num_classes,
                      str(pathlib.Path(proposals_dir) / tfds_split) if proposals_dir else None)
