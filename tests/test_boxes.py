"""Detector boxes (`guidance.source="boxes"`): read per image, warped by the training geometry
exactly like the pixels they enclose, batched with NaN padding, and decoded by SAM as box
prompts in front of the automatic masks."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
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
    boxes_dir = _write_boxes(tmp_path, "training", stems, [[0, 0, 999, 999, 0.9, 3], [0, 0, 2, 2, 0.5, 1]])
    # the first box covers every image, so every crop keeps a part of it
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


def test_box_rasters_carry_boxes_through_scale_window_and_flip():
    """Eval: boxes drawn as channels at the eval scale, cut into a window (and flipped), come
    back as that window's boxes to the pixel; boxes outside the window are empty slots."""
    from sarformer_jax.evaluate import box_channels, boxes_from_channels

    boxes = np.asarray([[10.0, 20.0, 50.0, 44.0], [0.0, 0.0, 8.0, 8.0], [70, 5, 79, 30]], np.float32)
    ch = box_channels(boxes, (60, 120), (30, 80), max_boxes=4)  # 2x rows, 1.5x columns
    assert ch.shape == (60, 120, 4) and not ch[..., 3].any()
    full = np.asarray(boxes_from_channels(jnp.asarray(ch)[None]))[0]
    want = np.minimum(boxes * np.asarray([1.5, 2.0, 1.5, 2.0], np.float32), [120, 60, 120, 60])
    np.testing.assert_allclose(full[:3], want, atol=1.0)
    assert np.isnan(full[3]).all()
    # a window [y 0:60, x 40:110]: boxes 0 and 2 clipped to it, box 1 outside
    cut = ch[0:60, 40:110]
    win = np.asarray(boxes_from_channels(jnp.asarray(cut)[None]))[0]
    np.testing.assert_allclose(win[0], [0, 40, 35, 60], atol=1.0)
    assert np.isnan(win[1]).all()
    np.testing.assert_allclose(win[2], [65, 10, 70, 60], atol=1.0)
    # flipped window: x -> width - x
    flip = np.asarray(boxes_from_channels(jnp.asarray(cut[:, ::-1])[None]))[0]
    np.testing.assert_allclose(flip[[0, 2]][:, [0, 1, 2, 3]],
                               np.stack([70 - win[[0, 2], 2], win[[0, 2], 1],
                                         70 - win[[0, 2], 0], win[[0, 2], 3]], -1), atol=1e-6)


def test_evaluation_with_detector_boxes_uses_them_per_window(data_root, tmp_path):
    """guidance.source="boxes" evaluates (slide windows, SAM per window with the window's
    boxes as prompts); the boxes change the prediction, and a missing box file is named."""
    from test_guidance_online import ONLINE, tiny_sam

    from sarformer_jax.data.pipeline import build_eval_dataset, build_source
    from sarformer_jax.evaluate import cached_window_fn, evaluate_state, predict_scores
    from sarformer_jax.train import create_trainer

    stems = build_source(micro_config(root=data_root), "validation").stems
    a = _write_boxes(tmp_path / "a", "validation", stems, [[4, 6, 40, 50, 0.9, 3], [30, 2, 70, 30]])
    b = _write_boxes(tmp_path / "b", "validation", stems, [[50, 40, 79, 63]])
    cfgs = [micro_config(root=data_root, **dict(ONLINE, **{
        "guidance.source": "boxes", "guidance.boxes_dir": d, "guidance.max_boxes": 4,
        "eval.mode": "slide"})) for d in (a, b)]
    sam = tiny_sam()
    trainer, state = create_trainer(cfgs[0], devices=jax.devices()[:1], sam=sam)
    res = evaluate_state(cfgs[0], trainer, state, progress=False)
    assert res["num_images"] == len(stems) and np.isfinite(res["aAcc"])
    scores = []
    for cfg in cfgs:
        record = build_eval_dataset(cfg, "validation")[0]
        assert record["boxes"].shape[1] == 4
        fn = cached_window_fn(cfg, trainer, with_proposals=False)
        scores.append(predict_scores(cfg, fn, state["params"], state["batch_stats"], record, 0,
                                     mode="slide", aug_test=False, with_proposals=False))
    assert scores[0].shape == scores[1].shape and not np.allclose(scores[0], scores[1])
    # `sarformer predict`: boxes found as <dir>/<stem>.json or <dir>/<split>/<stem>.json
    from sarformer_jax import predict

    record = build_eval_dataset(cfgs[1], "validation")[0]
    found = predict._find_boxes(b, stems[0])  # split layout
    np.testing.assert_array_equal(found, record["boxes"])
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / f"{stems[0]}.json").write_text(json.dumps([[1, 2, 30, 40]]))
    np.testing.assert_array_equal(predict._find_boxes(flat, stems[0]), [[1, 2, 30, 40]])
    with pytest.raises(FileNotFoundError, match="no detector boxes for 'nope'"):
        predict._find_boxes(flat, "nope")
    (overlay,) = predict.predict_records(cfgs[1], trainer, state,
                                         [dict(record, boxes=found)], tmp_path / "pred")
    assert overlay.exists()
    (a / "validation" / f"{stems[0]}.json").unlink()
    with pytest.raises(DataError, match=f"no detector boxes for this image: .*{stems[0]}.json"):
        build_eval_dataset(cfgs[0], "validation")[0]
