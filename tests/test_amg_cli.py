"""`sarformer amg` end to end on a converted random-weight SAM (reduced-depth vit_b): the single
image mode (overlay PNG + COCO RLE JSON = the upstream-API generator's records) and the dataset
mode (the proposal cache = `generate_masks`, resumable, a corrupt image named in one line with
the images cached before it kept)."""

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("segment_anything")

import jax.numpy as jnp
from PIL import Image
from sam_oracle import natural_image, sam_pair  # noqa: F401

from sarformer_jax.cli import main
from sarformer_jax.sam import amg
from sarformer_jax.sam.automatic_mask_generator import SamAutomaticMaskGenerator, generate_masks

SETTINGS = dict(points_per_side=4, points_per_batch=16, pred_iou_thresh=0.3, stability_score_thresh=0.6)
FLAGS = ["--points-per-side", "4", "--points-per-batch", "16", "--pred-iou-thresh", "0.3",
         "--stability-score-thresh", "0.6"]


@pytest.fixture(scope="module")
def npz(sam_pair, tmp_path_factory):
    _, jsam, path = sam_pair
    dst = tmp_path_factory.mktemp("amg") / "sam.npz"
    assert main(["convert", "sam", str(path), str(dst), "--model-type", "vit_b", "--encoder-depth", "2",
                 "--global-attn-indexes", "1"]) == 0
    return dst, jsam


def test_single_image_overlay_and_rle(npz, tmp_path):
    dst, jsam = npz
    image = natural_image()
    Image.fromarray(image).save(tmp_path / "in.png")
    out, rle = tmp_path / "o" / "overlay.png", tmp_path / "masks.json"
    # the default --skip-low-iou (upscale only the prompts that can pass the IoU threshold) gives
    # the records of the generator that upscales every prompt
    assert main(["amg", str(tmp_path / "in.png"), "--sam-checkpoint", str(dst), "--out", str(out),
                 "--rle-json", str(rle), *FLAGS]) == 0
    ref = SamAutomaticMaskGenerator(jsam, **SETTINGS).generate(image)
    records = json.loads(rle.read_text())
    assert len(ref) > 0 and len(records) == len(ref)
    for r, q in zip(records, ref):
        np.testing.assert_array_equal(amg.rle_to_mask(r["segmentation"]), q["segmentation"])
        assert r["bbox"] == q["bbox"] and r["area"] == q["area"]
    painted = np.asarray(Image.open(out))
    assert painted.shape == image.shape
    union = np.any([q["segmentation"] for q in ref], axis=0)
    assert (painted[union] != image[union]).any() and (painted[~union] == image[~union]).all()


def test_dataset_cache_resumes_and_names_a_corrupt_image(npz, tmp_path, capsys):
    dst, jsam = npz
    root = tmp_path / "ade"
    (root / "images" / "training").mkdir(parents=True)
    image = natural_image()[:200, :300]
    Image.fromarray(image).save(root / "images" / "training" / "a.png")
    Image.fromarray(image[:, ::-1].copy()).save(root / "images" / "training" / "b.jpg", quality=95)
    cache = tmp_path / "cache"
    args = ["amg", "--dataset", str(root), "--split", "training", "--sam-checkpoint", str(dst),
            "--out", str(cache), "--max-masks", "32", *FLAGS]
    assert main(args) == 0
    for stem in ("a", "b"):
        got = np.load(cache / "training" / f"{stem}.npz")
        shape = tuple(got["shape"])
        masks = np.unpackbits(got["masks"], axis=-1, count=shape[-1]).astype(bool).reshape(shape)
        src = np.asarray(Image.open(next((root / "images" / "training").glob(f"{stem}.*"))).convert("RGB"))
        ref = generate_masks(jsam, jnp.asarray(src)[None], max_masks=32, **SETTINGS)
        n = int(np.asarray(ref["valid"][0]).sum())
        assert shape == (n,) + src.shape[:2]
        np.testing.assert_array_equal(masks, np.asarray(ref["masks"][0, :n]))
        np.testing.assert_allclose(got["scores"], np.asarray(ref["scores"][0, :n]), rtol=1e-6)
    before = (cache / "training" / "a.npz").stat().st_mtime_ns
    (root / "images" / "training" / "c.png").write_bytes(b"not an image")
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err  # tqdm's bar, then the one-line error
    last = err.strip().splitlines()[-1]
    assert last.startswith("sarformer amg: ") and "c.png: not a readable image" in last
    assert "Traceback" not in err
    assert (cache / "training" / "a.npz").stat().st_mtime_ns == before  # cached images kept, not redone
    assert not (cache / "training" / "c.npz").exists()
    # an image computed just before the bad one (its write waits for the next image) is kept
    want = (cache / "training" / "b.npz").read_bytes()
    (cache / "training" / "b.npz").unlink()
    assert main(args) == 2
    assert (cache / "training" / "b.npz").read_bytes() == want
    assert (cache / "training" / "a.npz").stat().st_mtime_ns == before


def test_skip_low_iou_is_the_default_and_can_be_turned_off():
    import argparse

    from sarformer_jax.sam.amg_cli import _settings, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = ["x.png", "--sam-checkpoint", "s.npz", "--out", "o.png", *FLAGS]
    assert _settings(parser.parse_args(args))["skip_low_iou"] is True
    assert _settings(parser.parse_args([*args, "--no-skip-low-iou"]))["skip_low_iou"] is False
