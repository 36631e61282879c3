"""`sarformer eval` / `predict` end to end on the synthetic set with a checkpoint written by the
training loop: eval reproduces the loop's mIoU, predict writes label PNGs and overlays that
align with the image, undecodable images are skipped by name, and a checkpoint of another
architecture is refused naming the mismatch."""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np
import pytest
from micro import micro_config
from PIL import Image

from sarformer_jax import evaluate, predict
from sarformer_jax.train import train


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    cfg = micro_config(root=data_root, **{"train.ckpt_every": 2, "train.eval_every": 2})
    out = train(cfg, workdir, progress=False, stop_after=2)
    return cfg, workdir, out


def test_eval_reports_the_training_loops_miou(trained, tmp_path, capsys):
    cfg, workdir, out = trained
    assert out["evals"], "the loop evaluated"
    loop_miou = out["evals"][-1][1]
    args = argparse.Namespace(config="tiny", checkpoint=str(workdir), data_root=None, mode=None,
                              aug_test=False, split="validation", out=str(tmp_path),
                              set=_sets(cfg))
    assert evaluate.run(args) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["mIoU"] == pytest.approx(loop_miou, abs=1e-9)
    assert "mIoU" in (tmp_path / "results.md").read_text()
    assert "mIoU" in capsys.readouterr().out


def _sets(cfg):
    """The micro config as --set overrides of `tiny` (what a user would type)."""
    flat = []

    def walk(node, prefix):
        for k, v in node.items():
            if hasattr(v, "items"):
                walk(v, f"{prefix}{k}.")
            else:
                flat.append(f"{prefix}{k}={v!r}" if isinstance(v, str) else f"{prefix}{k}={v}")

    walk(cfg, "")
    return flat


def test_predict_writes_aligned_overlay_and_skips_bad_images(trained, tmp_path, capsys):
    cfg, workdir, _ = trained
    root = cfg.data.root
    good = sorted((pathlib.Path(root) / "images" / "validation").glob("*.jpg"))[0]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    args = argparse.Namespace(images=[str(good), str(bad)], config="tiny",
                              checkpoint=str(workdir), out=str(tmp_path / "pred"), mode=None,
                              set=_sets(cfg))
    assert predict.run(args) == 0
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "skipped" in err
    label = np.asarray(Image.open(tmp_path / "pred" / f"{good.stem}_label.png"))
    image = np.asarray(Image.open(good))
    assert label.shape == image.shape[:2]
    assert label.max() < cfg.model.head.num_classes
    overlay = np.asarray(Image.open(tmp_path / "pred" / f"{good.stem}_overlay.png").convert("RGB"))
    # the overlay starts with the blended image at full size, a legend strip to its right
    assert overlay.shape[0] >= image.shape[0] and overlay.shape[1] > image.shape[1]
    # images are read one at a time, each written after the next is queued: every good image
    # of a list with a bad one in the middle gets its files; none good at all is a failure
    goods = sorted((pathlib.Path(root) / "images" / "validation").glob("*.jpg"))
    args.images = [str(goods[0]), str(bad), str(goods[1])]
    args.out = str(tmp_path / "pred2")
    assert predict.run(args) == 0
    assert sorted(p.name for p in (tmp_path / "pred2").iterdir()) == sorted(
        f"{g.stem}_{kind}.png" for g in goods[:2] for kind in ("label", "overlay"))
    args.images, args.out = [str(bad)], str(tmp_path / "pred3")
    assert predict.run(args) == 1
    assert not (tmp_path / "pred3").exists()
    assert "1 image(s) skipped" in capsys.readouterr().err


def test_other_architecture_is_refused(trained, tmp_path, capsys):
    cfg, workdir, _ = trained
    other = micro_config(root=cfg.data.root, **{"model.head.num_queries": 6})
    args = argparse.Namespace(config="tiny", checkpoint=str(workdir), data_root=None, mode=None,
                              aug_test=False, split="validation", out=str(tmp_path),
                              set=_sets(other))
    assert evaluate.run(args) == 1
    err = capsys.readouterr().err
    assert "decode_head.query_embed" in err and "(8, 32)" in err and "(6, 32)" in err


def test_device_proposal_channels_equal_opencv_nearest():
    """The eval path resizes the cached proposals on the device: the same channels as OpenCV's
    INTER_NEAREST on the host (first Q by score, empty slots zero)."""
    from sarformer_jax.evaluate import _proposal_channels, proposal_channels_on_device

    rng = np.random.default_rng(0)
    masks = rng.random((5, 37, 53)) > 0.6
    record = {"proposals": masks, "proposal_scores": rng.random(5)}
    for size in ((64, 91), (20, 30), (37, 53)):
        want = _proposal_channels(record, size, 7)
        got = np.asarray(proposal_channels_on_device(record, size, 7))
        np.testing.assert_array_equal(got, want.astype(np.float32))
    assert not np.asarray(proposal_channels_on_device({}, (8, 8), 3)).any()
