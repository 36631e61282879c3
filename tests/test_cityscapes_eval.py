"""Cityscapes evaluation against cityscapesscripts' evalPixelLevelSemanticLabeling, on small
label-id / instance-id / prediction PNGs written to a temp dir."""

import math

import numpy as np
import pytest
from PIL import Image

from sarformer_jax import cityscapes_eval as ce
from sarformer_jax.metrics import IoUAccumulator

cs_labels = pytest.importorskip("cityscapesscripts.helpers.labels")


def _fake_image(rng, h=48, w=64, block=8):
    """Blocky ground truth over all 34 label ids; instance-class blocks are instances (some are
    'group' regions without an instance index); predictions are noisy train ids."""
    gh, gw = h // block, w // block
    grid = rng.integers(0, 34, (gh, gw))
    grid[grid == 31] = 26  # "train" absent from the ground truth ...
    label_ids = np.kron(grid, np.ones((block, block), np.int64))
    inst = label_ids.copy()
    for n, (i, j) in enumerate(np.ndindex(gh, gw)):
        lid = grid[i, j]
        if cs_labels.id2label[lid].hasInstances and rng.random() < 0.8:
            ys, xs = slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block)
            inst[ys, xs] = lid * 1000 + n
            # split some instances in two, so instance sizes differ
            if rng.random() < 0.5:
                inst[ys, xs][:, : block // 2 - 1] = lid * 1000 + 500 + n
    train = ce.labelids_to_trainids(label_ids).astype(np.int64)
    pred = np.where(train == 255, rng.integers(0, 19, train.shape), train)
    noise = rng.random(train.shape) < 0.3
    pred[noise] = rng.integers(0, 19, int(noise.sum()))
    pred[pred == 16] = 15  # ... and never predicted: its IoU is NaN
    return label_ids.astype(np.uint8), inst.astype(np.uint16), pred.astype(np.uint8)


def _official(tmp_path, images, monkeypatch):
    monkeypatch.setenv("CITYSCAPES_DATASET", str(tmp_path))
    # numpy >= 2.4 removed np.in1d, which the official instance-level code still calls.
    monkeypatch.setattr(np, "in1d", lambda a, b, invert=False: np.isin(np.ravel(a), b,
                                                                        invert=invert),
                        raising=False)
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as ev

    monkeypatch.setattr(ev.args, "JSONOutput", False)
    monkeypatch.setattr(ev.args, "quiet", True)
    monkeypatch.setattr(ev.args, "evalInstLevelScore", True)
    monkeypatch.setattr(ev.args, "evalPixelAccuracy", False)
    gt_dir = tmp_path / "gtFine" / "val" / "aachen"
    pred_dir = tmp_path / "results"
    gt_dir.mkdir(parents=True)
    pred_dir.mkdir()
    gts, preds = [], []
    for k, (label_ids, inst, pred) in enumerate(images):
        stem = f"aachen_000000_{k:06d}"
        Image.fromarray(label_ids).save(gt_dir / f"{stem}_gtFine_labelIds.png")
        Image.fromarray(inst).save(gt_dir / f"{stem}_gtFine_instanceIds.png")
        Image.fromarray(ce.trainids_to_labelids(pred)).save(pred_dir / f"{stem}_pred.png")
        gts.append(str(gt_dir / f"{stem}_gtFine_labelIds.png"))
        preds.append(str(pred_dir / f"{stem}_pred.png"))
    return ev.evaluateImgLists(preds, gts, ev.args)


def _assert_same(ours: dict, theirs: dict):
    for key, val in ours.items():
        ref = theirs[key]
        if math.isnan(val):
            assert math.isnan(ref), key
        else:
            assert val == pytest.approx(ref, rel=1e-12, abs=0), key


def test_matches_cityscapesscripts(tmp_path, monkeypatch, rng):
    images = [_fake_image(rng) for _ in range(3)]
    ref = _official(tmp_path, images, monkeypatch)
    ev = ce.CityscapesEvaluator()
    for label_ids, inst, pred in images:
        # read back as the data pipeline would (16-bit instance PNG)
        ev.update(pred, ce.labelids_to_trainids(label_ids), inst)
    ours = ev.compute()
    names = set(ce.CLASS_NAMES)
    _assert_same(ours["class_iou"], {k: v for k, v in ref["classScores"].items() if k in names})
    _assert_same(ours["class_iiou"],
                 {k: v for k, v in ref["classInstScores"].items() if k in names})
    _assert_same(ours["category_iou"], ref["categoryScores"])
    _assert_same(ours["category_iiou"], ref["categoryInstScores"])
    for mine, theirs in [("mean_class_iou", "averageScoreClasses"),
                         ("mean_class_iiou", "averageScoreInstClasses"),
                         ("mean_category_iou", "averageScoreCategories"),
                         ("mean_category_iiou", "averageScoreInstCategories")]:
        assert ours[mine] == pytest.approx(ref[theirs], rel=1e-12), mine
    assert math.isnan(ours["class_iou"]["train"])
    assert not math.isnan(ours["class_iiou"]["person"])
    # The class level is mmseg's IoU on train ids as well.
    acc = IoUAccumulator(19)
    for label_ids, _, pred in images:
        acc.update(pred, ce.labelids_to_trainids(label_ids))
    np.testing.assert_allclose(acc.compute()["IoU"], list(ours["class_iou"].values()),
                               rtol=1e-12, equal_nan=True)
    assert "| person |" in ce.format_summary(ours)


def test_label_tables_match_cityscapesscripts():
    for label in cs_labels.labels:
        if label.id < 0:
            continue
        want = 255 if label.ignoreInEval else label.trainId
        assert ce.LABELID_TO_TRAINID[label.id] == want, label.name
        if not label.ignoreInEval:
            assert ce.CLASS_NAMES[label.trainId] == label.name
            assert ce.CLASSES[label.trainId][3] == label.category
            assert (label.trainId in ce.AVG_INSTANCE_SIZE) == label.hasInstances
    t = np.arange(-1, 21)
    assert (ce.labelids_to_trainids(ce.trainids_to_labelids(t))[1:20] == np.arange(19)).all()


def test_no_instances_gives_nan_iiou(rng):
    label_ids, _, pred = _fake_image(rng)
    ev = ce.CityscapesEvaluator()
    ev.update(pred, ce.labelids_to_trainids(label_ids))
    res = ev.compute()
    assert math.isnan(res["mean_class_iiou"]) and not math.isnan(res["mean_class_iou"])
    with pytest.raises(ValueError, match="pred"):
        ev.update(pred[:3], ce.labelids_to_trainids(label_ids))
