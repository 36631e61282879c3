"""The synthetic dataset: exact ADE20K / Cityscapes layouts, determinism, label values, and the
proposal cache agreeing with the labels."""

import hashlib
import json
import pathlib

import cv2
import numpy as np
import pytest

from sarformer_jax.cli import main as cli_main
from sarformer_jax.data import synthetic
from sarformer_jax.data.proposals import load_proposals

SIZE = (64, 80)
K = 8


def _tree(root: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ade(tmp_path_factory):
    out = tmp_path_factory.mktemp("ade")
    synthetic.generate(out, num_train=6, num_val=3, image_size=SIZE, num_classes=K, seed=3)
    return out


def test_ade_layout_is_exact(ade):
    expected = {"synthetic.json"}
    for split, short, n in (("training", "train", 6), ("validation", "val", 3)):
        for i in range(1, n + 1):
            stem = f"ADE_{short}_{i:08d}"
            expected |= {f"images/{split}/{stem}.jpg", f"annotations/{split}/{stem}.png",
                         f"proposals/{split}/{stem}.npz"}
    assert set(_tree(ade)) == expected
    meta = json.loads((ade / "synthetic.json").read_text())
    assert meta["num_classes"] == K and meta["layout"] == "ade20k"


def test_deterministic_given_seed(ade, tmp_path):
    synthetic.generate(tmp_path / "same", num_train=6, num_val=3, image_size=SIZE,
                       num_classes=K, seed=3)
    assert _tree(tmp_path / "same") == _tree(ade)
    synthetic.generate(tmp_path / "other", num_train=6, num_val=3, image_size=SIZE,
                       num_classes=K, seed=4)
    other = _tree(tmp_path / "other")
    assert other["images/training/ADE_train_00000001.jpg"] != \
        _tree(ade)["images/training/ADE_train_00000001.jpg"]
    # A sample does not depend on how many were generated.
    synthetic.generate(tmp_path / "fewer", num_train=2, num_val=0, image_size=SIZE,
                       num_classes=K, seed=3)
    fewer = _tree(tmp_path / "fewer")
    assert fewer["images/training/ADE_train_00000002.jpg"] == \
        _tree(ade)["images/training/ADE_train_00000002.jpg"]


def test_labels_images_and_proposals_agree(ade):
    seen = set()
    for label_path in sorted(ade.glob("annotations/*/*.png")):
        split, stem = label_path.parent.name, label_path.stem
        label = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)
        image = cv2.imread(str(ade / "images" / split / f"{stem}.jpg"), cv2.IMREAD_COLOR)
        assert label.dtype == np.uint8 and label.shape == SIZE
        assert image.shape == SIZE + (3,)
        assert set(np.unique(label)) <= set(range(K + 1))
        seen |= set(np.unique(label).tolist())
        masks, scores = load_proposals(ade / "proposals" / split / f"{stem}.npz")
        assert masks.shape[1:] == SIZE and scores.shape == (len(masks),)
        assert np.all((scores > 0) & (scores <= 1))
        covered = np.zeros(SIZE, bool)
        for m in masks:
            assert m.any()
            assert len(np.unique(label[m])) == 1, f"{stem}: a proposal spans several labels"
            covered |= m
        # Every object pixel is in some proposal except instances left with < 20 visible pixels.
        assert (label > 0).sum() - (covered & (label > 0)).sum() < 20 * 6
        # The background proposal, when present, is exactly the "other" region.
        bg = [m for m in masks if label[m][0] == 0]
        assert len(bg) <= 1 and (not bg or np.array_equal(bg[0], label == 0))
    assert len(seen) >= 4  # several classes occur in 9 images


def test_class_styles_are_distinct():
    styles = [synthetic.class_style(k, K) for k in range(1, K + 1)]
    assert len({s.shape for s in styles}) == K and len({s.texture for s in styles}) == K
    assert len({(s.shape, s.texture) for s in (synthetic.class_style(k, 150)
                                                for k in range(1, 151))}) >= 64


def test_cityscapes_layout_and_ids(tmp_path):
    from cityscapesscripts.helpers.labels import id2label

    synthetic.generate(tmp_path, num_train=3, num_val=2, image_size=SIZE, num_classes=19,
                       seed=0, layout="cityscapes")
    files = set(_tree(tmp_path))
    expected = {"synthetic.json"}
    for split, cities, n in (("train", synthetic.CS_TRAIN_CITIES, 3),
                             ("val", synthetic.CS_VAL_CITIES, 2)):
        for i in range(n):
            city = cities[i % len(cities)]
            base = f"{city}_{i // len(cities):06d}_000019"
            expected |= {f"leftImg8bit/{split}/{city}/{base}_leftImg8bit.png",
                         f"gtFine/{split}/{city}/{base}_gtFine_labelIds.png",
                         f"gtFine/{split}/{city}/{base}_gtFine_labelTrainIds.png",
                         f"proposals/{split}/{base}_leftImg8bit.npz"}
    assert files == expected
    for ids_path in tmp_path.glob("gtFine/*/*/*_labelIds.png"):
        ids = cv2.imread(str(ids_path), cv2.IMREAD_UNCHANGED)
        train = cv2.imread(str(ids_path).replace("_labelIds", "_labelTrainIds"),
                           cv2.IMREAD_UNCHANGED)
        oracle = np.vectorize(lambda i: id2label[int(i)].trainId)(ids)
        np.testing.assert_array_equal(train, oracle)
        assert set(np.unique(train)) <= set(range(19)) | {255}


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="layout"):
        synthetic.generate(tmp_path, layout="coco")
    with pytest.raises(ValueError, match="19 train ids"):
        synthetic.generate(tmp_path, num_classes=20, layout="cityscapes")


def test_cli(tmp_path, capsys):
    rc = cli_main(["data", "synth", "--out", str(tmp_path), "--num-train", "2", "--num-val", "1",
                   "--size", "48x56", "--classes", "5", "--seed", "1"])
    assert rc == 0
    label = cv2.imread(str(tmp_path / "annotations/training/ADE_train_00000002.png"),
                       cv2.IMREAD_UNCHANGED)
    assert label.shape == (48, 56) and label.max() <= 5
    assert json.loads((tmp_path / "synthetic.json").read_text())["num_classes"] == 5
