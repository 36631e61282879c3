"""Palettes, colourised maps, overlays with a legend, label PNGs."""

import numpy as np
import pytest
from PIL import Image

from sarformer_jax import visualize as vis


def test_dataset_tables():
    names, palette = vis.dataset_meta("ade20k")
    assert len(names) == len(set(names)) == 150 and palette.shape == (150, 3)
    assert names[0] == "wall" and names[7] == "bed" and names[149] == "flag"
    assert palette[0].tolist() == [120, 120, 120] and palette[149].tolist() == [92, 0, 255]
    names, palette = vis.dataset_meta("cityscapes")
    assert len(names) == 19 and palette.shape == (19, 3)
    with pytest.raises(ValueError, match="unknown dataset"):
        vis.dataset_meta("voc")


def test_cityscapes_palette_matches_cityscapesscripts():
    labels = pytest.importorskip("cityscapesscripts.helpers.labels")
    for label in labels.labels:
        if 0 <= label.trainId < 19 and not label.ignoreInEval:
            assert vis.CITYSCAPES_CLASSES[label.trainId] == label.name
            assert tuple(vis.CITYSCAPES_PALETTE[label.trainId]) == label.color


def _scene(rng, h=60, w=90):
    label = np.full((h, w), 10, np.int64)  # sky
    label[h // 2:] = 0  # road
    label[h // 3: h // 2 + 8, 10:40] = 13  # car
    label[h // 4: h // 2 + 4, 60:66] = 11  # person
    label[:3, :] = 255  # ignored strip
    image = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
    return image, label


def test_colorize_and_overlay_pixels(rng):
    image, label = _scene(rng)
    pal = vis.CITYSCAPES_PALETTE
    col = vis.colorize(label, pal)
    assert col.dtype == np.uint8 and col.shape == label.shape + (3,)
    assert (col[label == 13] == pal[13]).all() and (col[label == 255] == 0).all()
    out = np.asarray(vis.overlay(image, label, pal, alpha=0.25, legend=False))
    assert out.shape == image.shape
    want = np.rint(0.75 * image.astype(np.float64) + 0.25 * pal[np.clip(label, 0, 18)])
    valid = label != 255
    assert np.abs(out[valid].astype(np.int64) - want[valid]).max() <= 1
    assert (out[~valid] == image[~valid]).all()  # ignored pixels keep the image
    with pytest.raises(ValueError, match="matching label"):
        vis.overlay(image[:10], label, pal)


def test_legend_lists_exactly_the_present_classes(rng):
    image, label = _scene(rng)
    entries = vis.legend_entries(label, vis.CITYSCAPES_CLASSES)
    assert [e[0] for e in entries] == [0, 10, 13, 11]  # largest first, 255 left out
    assert [e[1] for e in entries] == ["road", "sky", "car", "person"]
    assert sum(e[2] for e in entries) == int((label != 255).sum())
    out = vis.overlay(image, label, vis.CITYSCAPES_PALETTE,
                      class_names=vis.CITYSCAPES_CLASSES)
    arr = np.asarray(out)
    assert arr.shape[0] == image.shape[0] and arr.shape[1] > image.shape[1]
    assert (arr[:, : image.shape[1]] == np.asarray(vis.overlay(
        image, label, vis.CITYSCAPES_PALETTE, legend=False))).all()
    strip = arr[:, image.shape[1]:].reshape(-1, 3)
    colours = {tuple(c) for c in np.unique(strip, axis=0)} - {(255, 255, 255), (0, 0, 0)}
    assert colours == {tuple(vis.CITYSCAPES_PALETTE[c]) for c in (0, 10, 11, 13)}


def test_legend_wraps_into_columns_for_many_classes(rng):
    label = np.arange(40 * 30).reshape(40, 30) % 150
    image = np.zeros((40, 30, 3), np.uint8)
    out = vis.overlay(image, label, vis.ADE20K_PALETTE, class_names=vis.ADE20K_CLASSES)
    assert out.size[1] == 40 and out.size[0] > 30 + 5 * 60  # 150 rows of 18 px in 40 px


def test_save_label_png_roundtrip(tmp_path, rng):
    label = rng.integers(0, 19, (13, 17)).astype(np.uint8)
    label[0, :4] = 255
    vis.save_label_png(label, tmp_path / "raw.png")
    vis.save_label_png(label, tmp_path / "pal.png", palette=vis.CITYSCAPES_PALETTE)
    raw, pal = Image.open(tmp_path / "raw.png"), Image.open(tmp_path / "pal.png")
    assert raw.mode == "L" and pal.mode == "P"
    assert (np.asarray(raw) == label).all() and (np.asarray(pal) == label).all()
    assert tuple(np.asarray(pal.convert("RGB"))[1, 1]) == tuple(
        vis.CITYSCAPES_PALETTE[label[1, 1]])
    with pytest.raises(ValueError, match="8 bits"):
        vis.save_label_png(np.full((2, 2), 300), tmp_path / "bad.png")
