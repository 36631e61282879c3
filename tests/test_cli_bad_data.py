"""Bad data through the CLI: a corrupt image stops `sarformer train` / `sarformer eval` with one
line naming the file (and, for training, the last good checkpoint, which stays intact); cached
guidance without its cache is refused before anything is built; the tiny config's proposals
follow `data.root`."""

import pathlib

import pytest

from micro import MICRO_EVAL, MICRO_MODEL
from sarformer_jax.cli import main
from sarformer_jax.config import load_config
from sarformer_jax.data.pipeline import proposal_cache_dir


def test_tiny_proposals_follow_the_data_root(tmp_path):
    cfg = load_config("tiny", [f"data.root={tmp_path}/elsewhere"])
    assert pathlib.Path(proposal_cache_dir(cfg)) == tmp_path / "elsewhere" / "proposals"
    cfg = load_config("tiny", [f"guidance.cache_dir={tmp_path}/mine"])
    assert pathlib.Path(proposal_cache_dir(cfg)) == tmp_path / "mine"
    assert proposal_cache_dir(load_config("tiny", ["guidance.source=online"])) is None


@pytest.mark.parametrize("cache, says", [("", "needs guidance.cache_dir=CACHE"),
                                         ("/nonexistent/cache", "/nonexistent/cache: no such directory")])
@pytest.mark.parametrize("command", ["train", "eval"])
def test_cached_guidance_without_its_cache_is_refused(command, cache, says, tmp_path, capsys):
    sets = ["--set", "guidance.source=cached", "--set", f"guidance.cache_dir={cache}"]
    where = ["--workdir", str(tmp_path)] if command == "train" else ["--checkpoint", str(tmp_path)]
    assert main([command, "--config", "ade20k_sarformer_b", *where, *sets]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"sarformer {command}: ") and says in err[0], err
    assert not any(tmp_path.iterdir())  # refused before anything was written


def _sets(root, steps):
    # no guidance.cache_dir: the proposals are found under data.root, written with the data
    return [x for s in MICRO_MODEL + MICRO_EVAL + [
        "data.crop_size=(64, 64)", "data.scale=(256, 64)", f"data.root={root}",
        "data_gen.num_train=16", "data_gen.num_val=2", "data_gen.image_size=(64, 80)",
        "train.batch_size=8", f"train.num_steps={steps}", "train.ckpt_every=2",
        "train.eval_every=1000", "train.log_every=1"] for x in ("--set", s)]


def test_corrupt_image_stops_train_and_eval_with_one_line(tmp_path, capsys):
    root, work = tmp_path / "data", tmp_path / "work"
    assert main(["train", "--config", "tiny", "--workdir", str(work), "--no-progress",
                 *_sets(root, 2)]) == 0
    ckpt = work / "checkpoints" / "2"
    assert ckpt.is_dir() and (root / "proposals" / "training").is_dir()
    before = sorted(p.relative_to(ckpt) for p in ckpt.rglob("*"))
    capsys.readouterr()

    # every training image corrupt: the resumed run's next batch cannot be read
    for p in (root / "images" / "training").glob("*.jpg"):
        p.write_bytes(b"\xff\xd8 not a jpeg")
    bad = sorted((root / "images" / "training").glob("*.jpg"))
    assert main(["train", "--config", "tiny", "--workdir", str(work), "--no-progress",
                 *_sets(root, 4)]) == 1
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error")]
    assert len(err) == 1, err
    assert any(p.name in err[0] for p in bad), err[0]
    assert "after step 2" in err[0] and str(ckpt) in err[0], err[0]
    assert sorted(p.relative_to(ckpt) for p in ckpt.rglob("*")) == before
    assert not (work / "checkpoints" / "4").exists()

    val = sorted((root / "images" / "validation").glob("*.jpg"))[0]
    val.write_bytes(b"\xff\xd8 not a jpeg")
    out = tmp_path / "results"
    assert main(["eval", "--config", "tiny", "--checkpoint", str(work), "--out", str(out),
                 *[x for x in _sets(root, 4)]]) == 1
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error")]
    assert len(err) == 1 and val.name in err[0], err
    assert not (out / "results.json").exists()


def test_amg_with_an_unreadable_sam_file_is_one_line(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    sam = tmp_path / "sam.npz"
    sam.write_bytes(b"\x80\x04 pickled? never loaded")
    assert main(["amg", str(image), "--sam-checkpoint", str(sam), "--out", str(tmp_path / "o.png")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sarformer amg: ") and "sam.npz" in err[0], err
    assert not (tmp_path / "o.png").exists()
