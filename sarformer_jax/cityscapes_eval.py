"""Cityscapes pixel-level evaluation on the 19 train ids, numerically equal to cityscapesscripts'
`evalPixelLevelSemanticLabeling` when its predictions are our train ids mapped to label ids.

Computed (all three levels of the official script):
  * class IoU: TP / (TP + FP + FN) per class from a dataset confusion matrix; FP only counts
    pixels whose ground truth is one of the 19 evaluated classes, FN counts every evaluated
    ground-truth pixel predicted as something else (including values outside the 19 ids);
  * category IoU over the 7 evaluated categories (flat, construction, object, nature, sky, human,
    vehicle), the same formula with classes merged (confusions inside a category are TPs);
  * instance-level iIoU (needs the *_gtFine_instanceIds.png maps): for the 8 instance classes,
    TP and FN are counted per ground-truth instance and weighted by (average instance size of
    the class) / (instance size); FP is as for IoU.  Category iIoU for human and vehicle.
Means skip NaN (a class or category with TP + FP + FN = 0).  Values are fractions in [0, 1].

Ground truth is given in train ids (255 = not evaluated; `labelids_to_trainids` converts the
official *_labelIds.png); predictions in train ids 0..18 (anything else counts as "no class").
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# (train id, name, label id, category) of the 19 evaluated classes (cityscapesscripts labels.py)
CLASSES: tuple[tuple[int, str, int, str], ...] = (
    (0, "road", 7, "flat"), (1, "sidewalk", 8, "flat"),
    (2, "building", 11, "construction"), (3, "wall", 12, "construction"),
    (4, "fence", 13, "construction"),
    (5, "pole", 17, "object"), (6, "traffic light", 19, "object"),
    (7, "traffic sign", 20, "object"),
    (8, "vegetation", 21, "nature"), (9, "terrain", 22, "nature"),
    (10, "sky", 23, "sky"),
    (11, "person", 24, "human"), (12, "rider", 25, "human"),
    (13, "car", 26, "vehicle"), (14, "truck", 27, "vehicle"), (15, "bus", 28, "vehicle"),
    (16, "train", 31, "vehicle"), (17, "motorcycle", 32, "vehicle"),
    (18, "bicycle", 33, "vehicle"),
)
NUM_CLASSES = 19
CLASS_NAMES = tuple(c[1] for c in CLASSES)
TRAINID_TO_LABELID = np.array([c[2] for c in CLASSES], np.uint8)
LABELID_TO_TRAINID = np.full(256, 255, np.uint8)  # every non-evaluated label id -> 255
LABELID_TO_TRAINID[TRAINID_TO_LABELID] = np.arange(NUM_CLASSES)

# Category order of the official table; "void" holds no evaluated class (always NaN, skipped).
CATEGORIES = ("void", "flat", "construction", "object", "nature", "sky", "human", "vehicle")
CATEGORY_TRAINIDS = {cat: tuple(c[0] for c in CLASSES if c[3] == cat) for cat in CATEGORIES}
# Categories whose every class has instances: only these get a category iIoU.
INSTANCE_CATEGORIES = ("human", "vehicle")

# Average instance size in pixels of the evaluated instance classes on the training set: the
# iIoU weights of the official script (its `avgClassSize`), keyed by train id.
AVG_INSTANCE_SIZE = {
    11: 3462.4756337644,  # person
    12: 3930.4788056518,  # rider
    13: 12794.0202738185,  # car
    14: 27855.1264367816,  # truck
    15: 35732.1511111111,  # bus
    16: 67583.7075812274,  # train
    17: 6298.7200839748,  # motorcycle
    18: 4672.3249222261,  # bicycle
}


def labelids_to_trainids(label_ids: np.ndarray) -> np.ndarray:
    """*_gtFine_labelIds values -> train ids (uint8, 255 for every non-evaluated id)."""
    return LABELID_TO_TRAINID[np.asarray(label_ids).astype(np.int64) & 255]


def trainids_to_labelids(train_ids: np.ndarray) -> np.ndarray:
    """Train ids 0..18 -> official label ids (uint8), e.g. for a test-server submission.
    Values outside 0..18 become 0 ("unlabeled")."""
    t = np.asarray(train_ids).astype(np.int64)
    ok = (t >= 0) & (t < NUM_CLASSES)
    return np.where(ok, TRAINID_TO_LABELID[np.where(ok, t, 0)], 0).astype(np.uint8)


class CityscapesEvaluator:
    """Accumulates a 19 x 20 confusion matrix (column 19 = prediction outside the 19 ids) and the
    per-instance weighted counts over the dataset; `compute()` gives the official numbers."""

    def __init__(self) -> None:
        self.conf = np.zeros((NUM_CLASSES, NUM_CLASSES + 1), np.int64)
        # [tp, fn, tp weighted, fn weighted] per instance class and per instance category
        self.inst_class = {c: [0, 0, 0.0, 0.0] for c in AVG_INSTANCE_SIZE}
        self.inst_cat = {c: [0, 0, 0.0, 0.0] for c in INSTANCE_CATEGORIES}
        self.has_instances = False
        self.num_images = 0

    def update(self, pred: np.ndarray, gt: np.ndarray,
               instance_ids: np.ndarray | None = None) -> None:
        """Adds one image.

        Args:
          pred: [H, W] predicted train ids.
          gt: [H, W] ground-truth train ids (255 or any value outside 0..18: not evaluated).
          instance_ids: [H, W] the *_gtFine_instanceIds map (label id * 1000 + index for
            instances, plain label id elsewhere), for iIoU; None skips the instance level.
        """
        pred = np.asarray(pred).astype(np.int64)
        gt = np.asarray(gt).astype(np.int64)
        if pred.shape != gt.shape or pred.ndim != 2:
            raise ValueError(f"CityscapesEvaluator.update: pred {pred.shape} and gt {gt.shape} "
                             "must be equal [H, W] shapes")
        rows = (gt >= 0) & (gt < NUM_CLASSES)
        cols = np.where((pred >= 0) & (pred < NUM_CLASSES), pred, NUM_CLASSES)
        code = gt[rows] * (NUM_CLASSES + 1) + cols[rows]
        self.conf += np.bincount(code, minlength=self.conf.size).reshape(self.conf.shape)
        self.num_images += 1
        if instance_ids is not None:
            inst = np.asarray(instance_ids).astype(np.int64)
            if inst.shape != pred.shape:
                raise ValueError(f"CityscapesEvaluator.update: instance_ids {inst.shape} != "
                                 f"pred {pred.shape}")
            self._add_instances(pred, inst)
            self.has_instances = True

    def _add_instances(self, pred: np.ndarray, inst: np.ndarray) -> None:
        # Instance pixels carry ids > 1000 (label id * 1000 + k); group regions keep the plain
        # label id and are not instances.
        sel = inst > 1000
        ids, index = np.unique(inst[sel], return_inverse=True)
        if ids.size == 0:
            return
        p = pred[sel]
        label_of = LABELID_TO_TRAINID[(ids // 1000) & 255].astype(np.int64)
        size = np.bincount(index, minlength=ids.size)
        hit_class = np.bincount(index, weights=(p == label_of[index]), minlength=ids.size)
        cat_of_pred = _CATEGORY_OF_TRAINID[np.where((p >= 0) & (p < NUM_CLASSES), p, NUM_CLASSES)]
        cat_of_inst = _CATEGORY_OF_TRAINID[np.minimum(label_of, NUM_CLASSES)]
        hit_cat = np.bincount(index, weights=(cat_of_pred == cat_of_inst[index]),
                              minlength=ids.size)
        # Sequential sums in increasing instance id, as the official loop adds them.
        for j in range(ids.size):
            t = int(label_of[j])
            if t not in AVG_INSTANCE_SIZE:  # non-evaluated (caravan, trailer, ...)
                continue
            n = int(size[j])
            weight = AVG_INSTANCE_SIZE[t] / float(n)
            tp = int(hit_class[j])
            _add(self.inst_class[t], tp, n - tp, weight)
            cat = CLASSES[t][3]
            cat_tp = int(hit_cat[j])
            _add(self.inst_cat[cat], cat_tp, n - cat_tp, weight)

    def compute(self) -> dict[str, Any]:
        """Returns dict with
          "class_iou", "class_iiou": {class name: value} (iIoU NaN for non-instance classes),
          "category_iou", "category_iiou": {category: value} (all 8 official categories),
          "mean_class_iou", "mean_class_iiou", "mean_category_iou", "mean_category_iiou",
          "confusion": the [19, 20] int64 matrix (rows ground truth, columns prediction).
        iIoU entries are NaN when no instance map was given."""
        conf = self.conf
        tp = np.diag(conf[:, :NUM_CLASSES])
        fn = conf.sum(1) - tp
        fp = conf[:, :NUM_CLASSES].sum(0) - tp
        class_iou, class_iiou = {}, {}
        for c in range(NUM_CLASSES):
            name = CLASS_NAMES[c]
            class_iou[name] = _ratio(tp[c], tp[c] + fp[c] + fn[c])
            class_iiou[name] = math.nan
            if c in AVG_INSTANCE_SIZE and self.has_instances:
                _, _, tpw, fnw = self.inst_class[c]
                class_iiou[name] = _ratio(tpw, tpw + float(fp[c]) + fnw)
        cat_iou, cat_iiou = {}, {}
        for cat in CATEGORIES:
            ids = list(CATEGORY_TRAINIDS[cat])
            cat_iou[cat] = cat_iiou[cat] = math.nan
            if not ids:
                continue
            others = [c for c in range(NUM_CLASSES) if c not in ids]
            ctp = int(conf[np.ix_(ids, ids)].sum())
            cfn = int(conf[ids].sum()) - ctp
            cfp = int(conf[np.ix_(others, ids)].sum())
            cat_iou[cat] = _ratio(ctp, ctp + cfp + cfn)
            if cat in INSTANCE_CATEGORIES and self.has_instances:
                _, _, tpw, fnw = self.inst_cat[cat]
                cat_iiou[cat] = _ratio(tpw, tpw + float(cfp) + fnw)
        return {
            "class_iou": class_iou,
            "class_iiou": class_iiou,
            "category_iou": cat_iou,
            "category_iiou": cat_iiou,
            "mean_class_iou": _nanmean(class_iou.values()),
            "mean_class_iiou": _nanmean(class_iiou.values()),
            "mean_category_iou": _nanmean(cat_iou.values()),
            "mean_category_iiou": _nanmean(cat_iiou.values()),
            "confusion": conf.copy(),
        }


_CATEGORY_INDEX = {cat: i for i, cat in enumerate(CATEGORIES)}
# train id (and 19 = "no class") -> category index; "no class" maps to void.
_CATEGORY_OF_TRAINID = np.array([_CATEGORY_INDEX[c[3]] for c in CLASSES] + [0], np.int64)


def _add(stats: list, tp: int, fn: int, weight: float) -> None:
    stats[0] += tp
    stats[1] += fn
    stats[2] += float(tp) * weight
    stats[3] += float(fn) * weight


def _ratio(num, den) -> float:
    return float(num) / den if den != 0 else math.nan


def _nanmean(values) -> float:
    total, n = 0.0, 0
    for v in values:  # sequential, in table order, like the official average
        if not math.isnan(v):
            total += v
            n += 1
    return total / n if n else math.nan


def format_summary(results: dict[str, Any]) -> str:
    """Markdown tables: per class IoU / iIoU, per category IoU / iIoU, and the four means
    (percent, 2 decimals)."""
    def pct(x: float) -> str:
        return "nan" if math.isnan(x) else f"{100 * x:.2f}"

    lines = ["| Class | IoU | iIoU |", "|---|---:|---:|"]
    for name in CLASS_NAMES:
        lines.append(f"| {name} | {pct(results['class_iou'][name])} | "
                     f"{pct(results['class_iiou'][name])} |")
    lines += ["", "| Category | IoU | iIoU |", "|---|---:|---:|"]
    for cat in CATEGORIES[1:]:
        lines.append(f"| {cat} | {pct(results['category_iou'][cat])} | "
                     f"{pct(results['category_iiou'][cat])} |")
    lines += ["", "| mIoU class | iIoU class | IoU category | iIoU category |",
              "|---:|---:|---:|---:|",
              (f"| {pct(results['mean_class_iou'])} | {pct(results['mean_class_iiou'])} | "
               f"{pct(results['mean_category_iou'])} | {pct(results['mean_category_iiou'])} |")]
    return "\n".join(lines) + "\n"
