"""Detector boxes (`guidance.source="boxes"`): read per image, warped by the training geometry
exactly like the pixels they enclose, batched with NaN padding, and decoded by SAM as box
prompts in front of the automatic masks."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from micro import micro_config

from sarformer_jax.data import transforms as T
from sarformer_jax.data.sources import DataError


def _raster_bbox(mask):
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)


@pytest.mark.parametrize("flip", [False, True])
def test_warped_boxes_enclose_the_warped_pixels(flip):
    """Independent derivation: paint each box as a pixel mask, move the mask with the label's
    nearest-neighbour geometry (resize, crop, flip), and take the warped mask's bounding box."""
    src_hw, new_hw = (120, 160), (171, 228)
    crop = (30, 130, 40, 190)  # y1, y2, x1, x2
    boxes = np.array([[10, 20, 70, 90], [100, 5, 150, 60], [0, 100, 30, 119], [150, 110, 159, 118]],
                     np.float32)
    out = T.warp_boxes(boxes, src_hw, new_hw, crop, flip, max_boxes=6)
    ys = T.nearest_index(src_hw[0], new_hw[0])[crop[0]:crop[1]]
    xs = T.nearest_index(src_hw[1], new_hw[1])[crop[2]:crop[3]]
    if flip:
        xs = xs[::-1]
    kept = 0
    for b in boxes:
        m = np.zeros(src_hw, bool)
        m[int(b[1]):int(b[3]), int(b[0]):int(b[2])] = True
        warped = m[ys[:, None], xs[None, :]]
        if not warped.any():
            continue
        np.testing.assert_allclose(out[kept], _raster_bbox(warped), atol=1.5)
        kept += 1
    assert kept == 2  # the last two boxes fall outside the crop and are dropped
    assert np.isnan(out[kept:]).all() and out.dtype == np.float32


def _write_boxes(root, split, stems, rows):
    d = root / "boxes" / split
    d.mkdir(parents=True, exist_ok=True)
    for s in stems:
        (d / f"{s}.json").write_text(json.dumps(rows))
    return root / "boxes"


def test_loader_yields_boxes_and_names_a_missing_file(data_root, tmp_path):
    from sarformer_jax.data.pipeline import build_source, build_train_loader

    cfg = micro_config(root=data_root, **{"guidance.source": "cached"})
    stems = build_source(cfg, "training").stems
    boxes_dir = _write_boxes(tmp_path, "training", stems, [[4, 6, 40, 50, 0.9, 3], [0, 0, 2, 2, 0.5, 1]])
    cfg = micro_config(root=data_root, **{"guidance.source": "boxes", "guidance.boxes_dir": boxes_dir,
                                          "guidance.max_boxes": 5})
    batch = next(build_train_loader(cfg, seed=0))
    b = batch["boxes"]
    assert b.shape == (8, 5, 4) and b.dtype == np.float32
    real = ~np.isnan(b).any(-1)
    assert real.any(1).all() and np.isnan(b[:, 2:]).all()
    r = b[real]
    assert (r[:, 2] > r[:, 0]).all() and (r[:, 3] > r[:, 1]).all()
    assert (r >= 0).all() and (r[:, [0, 2]] <= 64).all() and (r[:, [1, 3]] <= 64).all()
    assert "proposals" not in batch  # SAM makes the masks online in this mode
    (boxes_dir / "training" / f"{stems[0]}.json").unlink()
    from sarformer_jax.data.pipeline import TrainRecord

    record_fn = TrainRecord(build_source(cfg, "training"), cfg)
    with pytest.raises(DataError, match=f"no detector boxes for this image: .*{stems[0]}.json"):
        record_fn(0, np.random.default_rng(0))


def test_sam_box_prompts_come_first_in_the_proposals(tmp_path):
    from test_guidance_online import ONLINE, _images, tiny_sam

    from sarformer_jax.guidance import amg_settings, sam_masks

    cfg = micro_config(root=tmp_path, **dict(ONLINE, **{"guidance.source": "boxes"}))
    sam = tiny_sam()
    _, x = _images(cfg)
    boxes = np.full((2, 3, 4), np.nan, np.float32)
    boxes[0, 0] = [10, 12, 40, 44]
    boxes[1, :2] = [[0, 0, 63, 63], [20, 16, 50, 40]]
    masks, valid = jax.jit(lambda b: sam_masks(sam, b, cfg, amg_settings(cfg)))({"image": x, "boxes": boxes})
    assert masks.shape == (2, 3 + 12, 64, 64)
    valid = np.asarray(valid)
    # box masks fill the first slots (as many as real boxes), automatic masks follow
    assert valid[0, 0] and valid[1, 0] and valid[1, 1]
    plain, plain_valid = jax.jit(lambda b: sam_masks(sam, b, micro_config(root=tmp_path, **ONLINE),
                                                     amg_settings(cfg)))({"image": x})
    assert valid[0].sum() <= 1 + plain_valid[0].sum()
