"""Semantic-segmentation metrics accumulated over a whole dataset (mmseg `IoUMetric` semantics).

For every batch, four per-class pixel areas are counted over the pixels whose label is not
`ignore_index`: intersection (pred == label == k), prediction (pred == k), label (label == k)
and union (prediction + label - intersection).  Only the dataset totals are divided, at the end:

  IoU[k] = I[k] / U[k]        Acc[k] = I[k] / L[k]        aAcc = sum(I) / sum(L)
  mIoU = nanmean(IoU)         mAcc = nanmean(Acc)

0 / 0 gives NaN, so a class absent from both prediction and ground truth has IoU NaN and a class
absent from the ground truth has Acc NaN; NaN classes are left out of the means.  As in mmseg,
only `ignore_index` pixels are masked: a label value outside [0, K) counts for no label area
(`torch.histc` drops it) while its pixel's prediction still counts; predictions outside [0, K)
count for no class.

The per-batch counting is one `bincount` per area: jit-friendly on the device for jax arrays
(only 4 x K integers come back to the host), plain numpy for numpy arrays.  Totals are int64.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

AREAS = ("intersect", "union", "pred", "label")


def _areas(xp, pred, label, num_classes: int, ignore_index: int):
    """[4, K] (intersect, union, pred, label) areas with array module `xp` (numpy or jnp)."""
    k = num_classes
    pred = pred.reshape(-1).astype(xp.int32)
    label = label.reshape(-1).astype(xp.int32)
    valid = label != ignore_index
    label_in = valid & (label >= 0) & (label < k)
    pred_in = valid & (pred >= 0) & (pred < k)
    # Out-of-range / ignored pixels go to an overflow bin k that is dropped afterwards.
    if xp is np:
        count = functools.partial(np.bincount, minlength=k + 1)
    else:
        count = functools.partial(jnp.bincount, length=k + 1)
    area_label = count(xp.where(label_in, label, k))[:k]
    area_pred = count(xp.where(pred_in, pred, k))[:k]
    area_inter = count(xp.where(label_in & (pred == label), label, k))[:k]
    area_union = area_pred + area_label - area_inter
    return xp.stack([area_inter, area_union, area_pred, area_label])


@functools.partial(jax.jit, static_argnames=("num_classes", "ignore_index"))
def intersect_and_union(pred: jax.Array, label: jax.Array, num_classes: int,
                        ignore_index: int = 255) -> jax.Array:
    """Per-class areas of one batch, on the device.

    Args:
      pred: [...] integer predicted class ids.
      label: [...] integer ground truth, same shape; `ignore_index` pixels are skipped.
    Returns:
      [4, K] int32: intersection, union, prediction and label areas (order of `AREAS`).
      int32 holds batches of up to 2**31 pixels.
    """
    return _areas(jnp, pred, label, num_classes, ignore_index)


def intersect_and_union_np(pred: np.ndarray, label: np.ndarray, num_classes: int,
                           ignore_index: int = 255) -> np.ndarray:
    """numpy twin of `intersect_and_union`, [4, K] int64."""
    return _areas(np, np.asarray(pred), np.asarray(label), num_classes, ignore_index)


class IoUAccumulator:
    """Streaming per-class IoU / accuracy over a dataset.

    >>> acc = IoUAccumulator(150)
    >>> for pred, label in batches: acc.update(pred, label)
    >>> results = acc.compute()  # {"IoU": [K], "Acc": [K], "mIoU", "mAcc", "aAcc", ...}
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if num_classes < 1:
            raise ValueError(f"IoUAccumulator: num_classes={num_classes} must be >= 1")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.reset()

    def reset(self) -> None:
        self.totals = np.zeros((4, self.num_classes), np.int64)
        self.num_images = 0

    def update(self, pred: Any, label: Any) -> None:
        """Adds one batch.  pred, label: [B, H, W] or [H, W] integer class ids of equal shape
        (numpy arrays are counted on the host, jax arrays on their device)."""
        if tuple(np.shape(pred)) != tuple(np.shape(label)):
            raise ValueError(f"IoUAccumulator.update: pred shape {np.shape(pred)} != label shape "
                             f"{np.shape(label)}")
        if isinstance(pred, jax.Array) or isinstance(label, jax.Array):
            areas = np.asarray(jax.device_get(intersect_and_union(
                jnp.asarray(pred), jnp.asarray(label), self.num_classes, self.ignore_index)))
        else:
            areas = intersect_and_union_np(pred, label, self.num_classes, self.ignore_index)
        self.totals += areas.astype(np.int64)
        self.num_images += 1 if np.ndim(label) <= 2 else int(np.shape(label)[0])

    def update_areas(self, areas: Any) -> None:
        """Adds precomputed [4, K] areas (e.g. from `intersect_and_union` inside a jitted step)."""
        areas = np.asarray(jax.device_get(areas))
        if areas.shape != (4, self.num_classes):
            raise ValueError(f"IoUAccumulator.update_areas: shape {areas.shape} != "
                             f"(4, {self.num_classes})")
        self.totals += areas.astype(np.int64)

    def compute(self) -> dict[str, Any]:
        """Fractions in [0, 1] (multiply by 100 for mmseg's printed numbers).

        Returns dict with "IoU", "Acc" ([K] float64, NaN where undefined), "mIoU", "mAcc",
        "aAcc" (floats) and the int64 totals "area_intersect", "area_union", "area_pred",
        "area_label" ([K])."""
        return compute_metrics(self.totals)


def compute_metrics(totals: np.ndarray) -> dict[str, Any]:
    """Metrics from [4, K] dataset totals (order of `AREAS`)."""
    inter, union, pred, label = np.asarray(totals, np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union.astype(np.float64)
        acc = inter / label.astype(np.float64)
        a_acc = float(inter.sum() / np.float64(label.sum()))
    return {
        "aAcc": a_acc,
        "mIoU": _nanmean(iou),
        "mAcc": _nanmean(acc),
        "IoU": iou,
        "Acc": acc,
        "area_intersect": inter,
        "area_union": union,
        "area_pred": pred,
        "area_label": label,
    }


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else math.nan


def _pct(x: float) -> str:
    return "nan" if math.isnan(x) else f"{100.0 * x:.2f}"


def format_table(results: dict[str, Any], class_names: Sequence[str]) -> str:
    """Markdown: the per-class IoU / Acc table (percent, 2 decimals, as mmseg prints), then the
    aAcc / mIoU / mAcc summary table."""
    iou, acc = results["IoU"], results["Acc"]
    if len(class_names) != len(iou):
        raise ValueError(f"format_table: {len(class_names)} class names for {len(iou)} classes")
    lines = ["| Class | IoU | Acc |", "|---|---:|---:|"]
    for name, i, a in zip(class_names, iou, acc):
        lines.append(f"| {name} | {_pct(float(i))} | {_pct(float(a))} |")
    lines += ["", "| aAcc | mIoU | mAcc |", "|---:|---:|---:|",
              f"| {_pct(results['aAcc'])} | {_pct(results['mIoU'])} | {_pct(results['mAcc'])} |"]
    return "\n".join(lines) + "\n"


def _finite_or_none(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def to_json(results: dict[str, Any], class_names: Sequence[str], **extra: Any) -> str:
    """JSON text: summary fractions, per-class {name: {IoU, Acc, area_*}} (NaN -> null), and
    any `extra` keys (checkpoint, config, ...)."""
    if len(class_names) != len(results["IoU"]):
        raise ValueError(f"to_json: {len(class_names)} class names for "
                         f"{len(results['IoU'])} classes")
    per_class = {}
    for k, name in enumerate(class_names):
        per_class[name] = {
            "IoU": _finite_or_none(float(results["IoU"][k])),
            "Acc": _finite_or_none(float(results["Acc"][k])),
            **{f"area_{a}": int(results[f"area_{a}"][k]) for a in AREAS},
        }
    doc = {
        "aAcc": _finite_or_none(results["aAcc"]),
        "mIoU": _finite_or_none(results["mIoU"]),
        "mAcc": _finite_or_none(results["mAcc"]),
        "per_class": per_class,
        **extra,
    }
    return json.dumps(doc, indent=2)
