"""IoUAccumulator against an independent numpy derivation (confusion matrix via np.add.at)."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sarformer_jax.metrics import (
    IoUAccumulator,
    compute_metrics,
    format_table,
    intersect_and_union,
    to_json,
)


def _reference(batches, k, ignore=255):
    """Dataset confusion matrix by scatter-add (row / column k = label / prediction outside
    [0, k)), then mmseg's formulas written out class by class."""
    conf = np.zeros((k + 1, k + 1), np.int64)
    for pred, label in batches:
        pred, label = pred.astype(np.int64).ravel(), label.astype(np.int64).ravel()
        keep = label != ignore
        rows = np.where((label >= 0) & (label < k), label, k)
        cols = np.where((pred >= 0) & (pred < k), pred, k)
        np.add.at(conf, (rows[keep], cols[keep]), 1)
    label_area = conf[:k].sum(1)
    pred_area = conf[:, :k].sum(0)
    iou, acc = [], []
    for c in range(k):
        tp = conf[c, c]
        u = label_area[c] + pred_area[c] - tp
        iou.append(tp / u if u else math.nan)
        acc.append(tp / label_area[c] if label_area[c] else math.nan)
    iou, acc = np.array(iou), np.array(acc)
    return {"IoU": iou, "Acc": acc, "mIoU": np.nanmean(iou), "mAcc": np.nanmean(acc),
            "aAcc": np.trace(conf[:k, :k]) / label_area.sum()}


def _random_batches(rng, k, n=4, shape=(3, 17, 23)):
    batches = []
    for _ in range(n):
        label = rng.integers(0, k, shape)
        label[rng.random(shape) < 0.2] = 255  # ignored pixels
        label[label == 3] = 5  # class 3 never in ground truth (predicted only)
        label[label == 7] = 8  # class 7 in neither
        pred = rng.integers(0, k, shape)
        pred[pred == 7] = 0
        pred[pred == 9] = 1  # class 9 never predicted (ground truth only)
        batches.append((pred.astype(np.int32), label.astype(np.uint8)))
    return batches


@pytest.mark.parametrize("device", [False, True])
def test_matches_numpy_confusion_matrix(rng, device):
    k = 11
    batches = _random_batches(rng, k)
    ref = _reference(batches, k)
    acc = IoUAccumulator(k, ignore_index=255)
    for pred, label in batches:
        if device:
            acc.update(jnp.asarray(pred), jnp.asarray(label))
        else:
            acc.update(pred, label)
    res = acc.compute()
    np.testing.assert_allclose(res["IoU"], ref["IoU"], rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(res["Acc"], ref["Acc"], rtol=1e-12, equal_nan=True)
    for key in ("mIoU", "mAcc", "aAcc"):
        assert res[key] == pytest.approx(ref[key], rel=1e-12)
    assert np.isnan(res["IoU"][7]) and np.isnan(res["Acc"][7])  # absent everywhere
    assert res["IoU"][3] == 0.0 and np.isnan(res["Acc"][3])  # predicted, never in GT
    assert res["IoU"][9] == 0.0 and res["Acc"][9] == 0.0  # in GT, never predicted
    assert acc.num_images == 12


def test_out_of_range_values_count_for_no_class():
    # label 4 >= K counts for no label area (its prediction 2 still counts, as mmseg masks only
    # ignore_index); predictions -1 / 6 count for no prediction area; label 255 is ignored.
    pred = np.array([[0, 1, 6, -1, 2, 1]])
    label = np.array([[0, 1, 1, 2, 4, 255]])
    ref = _reference([(pred, label)], 3)
    acc = IoUAccumulator(3)
    acc.update(pred, label)
    res = acc.compute()
    np.testing.assert_array_equal(res["area_label"], [1, 2, 1])
    np.testing.assert_array_equal(res["area_pred"], [1, 1, 1])
    np.testing.assert_allclose(res["IoU"], ref["IoU"], rtol=1e-12)
    assert res["aAcc"] == pytest.approx(2 / 4)


def test_jit_areas_and_update_areas(rng):
    k = 5
    pred = rng.integers(0, k, (2, 9, 9))
    label = rng.integers(0, k + 1, (2, 9, 9))
    label[label == k] = 255
    a = IoUAccumulator(k)
    a.update(pred, label)
    b = IoUAccumulator(k)
    step = jax.jit(lambda p, l: intersect_and_union(p, l, k))
    b.update_areas(step(jnp.asarray(pred), jnp.asarray(label)))
    np.testing.assert_array_equal(a.totals, b.totals)


def test_errors():
    acc = IoUAccumulator(3)
    with pytest.raises(ValueError, match="pred shape"):
        acc.update(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="update_areas"):
        acc.update_areas(np.zeros((4, 2)))


def test_table_and_json():
    totals = np.array([[5, 0, 0], [10, 0, 4], [6, 0, 0], [9, 0, 4]])
    res = compute_metrics(totals)
    md = format_table(res, ["a", "b", "c"])
    assert "| a | 50.00 | 55.56 |" in md
    assert "| b | nan | nan |" in md
    assert "| c | 0.00 | 0.00 |" in md
    assert "| 38.46 | 25.00 | 27.78 |" in md  # aAcc = 5/13, mIoU = mean(.5, 0), mAcc
    doc = json.loads(to_json(res, ["a", "b", "c"], checkpoint="x.npz"))
    assert doc["per_class"]["b"]["IoU"] is None and doc["checkpoint"] == "x.npz"
    assert doc["mIoU"] == pytest.approx(0.25)
    assert doc["per_class"]["a"]["area_label"] == 9
    with pytest.raises(ValueError, match="class names"):
        format_table(res, ["a"])
