"""`train.init_from`: the first step starts from converted weights — a BEiT backbone converted
from a timm BEiT .pth (as the original trained from BEiT weights), its BEiT part only, or a
whole model — and `sarformer eval / predict --checkpoint FILE.npz` evaluate converted weights.
Bad files are one-line errors naming the file."""

import jax
import numpy as np
import pytest
from flax import nnx

from micro import micro_config
from sarformer_jax.cli import main
from sarformer_jax.convert.common import CheckpointError, save_params
from sarformer_jax.models.sarformer import build_model
from sarformer_jax.train import create_trainer, load_initial_weights

torch = pytest.importorskip("torch")
timm_beit = pytest.importorskip("timm.models.beit")


def _float_leaves(tree):
    return [x for x in jax.tree_util.tree_leaves(tree)
            if hasattr(x, "dtype") and np.issubdtype(x.dtype, np.floating)]


def _flat(tree) -> dict[str, np.ndarray]:
    return {".".join(str(p) for p in path): np.asarray(var.get_value())
            for path, var in nnx.to_flat_state(tree)}


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return micro_config(root=tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def beit_files(cfg, tmp_path_factory):
    """A random timm BEiT of the micro backbone's sizes, saved as a real .pth and converted with
    the adapter (format beit_adapter) and without (format beit), as `sarformer convert beit`
    writes them."""
    from sarformer_jax.convert.beit import convert_beit

    bb = cfg.model.backbone
    size = tuple(cfg.model.image_size)
    torch.manual_seed(0)
    model = timm_beit.Beit(img_size=size[0], patch_size=16, embed_dim=int(bb.embed_dim),
                           depth=int(bb.depth), num_heads=int(bb.num_heads),
                           use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1,
                           num_classes=0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    out = tmp_path_factory.mktemp("beit")
    pth = out / "beit.pth"
    torch.save({"model": model.state_dict()}, pth)
    files = {}
    for adapter in (True, False):
        flat, report = convert_beit(pth, bb, size, adapter=adapter, seed=3)
        fmt = "beit_adapter" if adapter else "beit"
        files[fmt] = (out / f"{fmt}.npz", flat)
        save_params(files[fmt][0], flat, {"format": fmt, "model": "micro", **report})
    return files, model.state_dict()


def test_backbone_from_beit_and_the_rest_seeded(cfg, beit_files):
    files, sd = beit_files
    _, seeded = create_trainer(cfg, init_from="")
    seeded_params = {**_flat(seeded["params"]), **_flat(seeded["batch_stats"])}
    for fmt, (path, flat) in files.items():
        _, state = create_trainer(cfg, init_from=str(path))
        params = {**_flat(state["params"]), **_flat(state["batch_stats"])}
        assert params.keys() == seeded_params.keys()
        from_file = {f"backbone.{k}" for k in flat}
        assert from_file <= params.keys()
        for k in from_file:
            np.testing.assert_array_equal(params[k], flat[k[len("backbone."):]], err_msg=k)
        for k in params.keys() - from_file:  # the head, and the adapter for BEiT-only files
            np.testing.assert_array_equal(params[k], seeded_params[k], err_msg=k)
        # independent of our converter's naming: timm's first fc1 weight, transposed
        np.testing.assert_array_equal(params["backbone.layers.0.ffn.layers.0.0.kernel"],
                                      sd["blocks.0.mlp.fc1.weight"].numpy().T)
        assert not any(np.abs(np.asarray(m)).sum() for m in
                       _float_leaves(state["opt_state"]))  # fresh moments
    assert any(k.startswith("spm.") for k in files["beit_adapter"][1])
    assert not any(k.startswith("spm.") for k in files["beit"][1])


def test_whole_model_from_npz_for_training_and_evaluation(cfg, tmp_path, capsys):
    from sarformer_jax.evaluate import evaluate_state

    trainer, src = create_trainer(_seeded(cfg, 5), init_from="")
    flat = {**_flat(src["params"]), **_flat(src["batch_stats"])}
    path = tmp_path / "whole.npz"
    save_params(path, flat, {"format": "sarformer_mmseg", "config": "micro"})

    _, state = create_trainer(cfg, init_from=str(path))  # seed 0 model, weights of seed 5
    got = {**_flat(state["params"]), **_flat(state["batch_stats"])}
    assert got.keys() == flat.keys()
    for k in flat:
        np.testing.assert_array_equal(got[k], flat[k], err_msg=k)

    expected = evaluate_state(cfg, trainer, src, progress=False)["mIoU"]
    sets = [x for s in _overrides(cfg) for x in ("--set", s)]
    assert main(["eval", "--config", "tiny", "--checkpoint", str(path), *sets]) == 0
    out = capsys.readouterr().out
    assert f"mIoU {100 * expected:.2f} on" in out and "converted weights" in out, out[-500:]
    assert (tmp_path / "results.json").is_file()


def _seeded(cfg, seed):
    out = cfg.copy()
    out.train.seed = seed
    return out


def _overrides(cfg):
    from micro import MICRO_EVAL, MICRO_MODEL

    return MICRO_MODEL + MICRO_EVAL + [
        "data.crop_size=(64, 64)", "data.scale=(256, 64)", f"data.root={cfg.data.root}",
        f"guidance.cache_dir={cfg.guidance.cache_dir}", "data_gen.num_train=16",
        "data_gen.num_val=2", "data_gen.image_size=(64, 80)", "train.batch_size=8"]


def test_bad_init_files_are_one_line_errors(cfg, beit_files, tmp_path, capsys):
    files, _ = beit_files
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"PK\x03\x04 not really a zip")
    sam_like = tmp_path / "sam.npz"
    save_params(sam_like, {"image_encoder.pos_embed": np.zeros((1, 4, 4, 8), np.float32)},
                {"model_type": "vit_b"})
    path, flat = files["beit_adapter"]
    wrong = tmp_path / "wrong.npz"  # one table of another size, one entry missing
    bad = dict(flat)
    bad.pop("layers.0.attn.proj.bias")
    bad["level_embed"] = np.zeros((3, 7), np.float32)
    save_params(wrong, bad, {"format": "beit_adapter"})

    model = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
    with pytest.raises(CheckpointError, match=r"wrong\.npz.*missing: layers\.0\.attn\.proj\.bias"
                                              r".*mis-shaped: level_embed: expected \(3, 32\)"):
        load_initial_weights(model, wrong)

    workdir = tmp_path / "w"
    for f, says in ((tmp_path / "missing.npz", "missing.npz: no such file"),
                    (junk, "junk.npz: not an .npz of arrays"),
                    (sam_like, "format is None"),
                    (wrong, "wrong.npz (model.backbone): does not fit")):
        sets = [x for s in _overrides(cfg) + ["train.num_steps=1", f"train.init_from={f}"]
                for x in ("--set", s)]
        assert main(["train", "--config", "tiny", "--workdir", str(workdir), "--no-progress",
                     *sets]) == 1
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
        assert len(err) == 1 and says in err[0], (says, err)
        assert not (workdir / "checkpoints").exists() or not any((workdir / "checkpoints").iterdir())
    for f in (files["beit"][0], junk):
        assert main(["eval", "--config", "tiny", "--checkpoint", str(f),
                     *[x for s in _overrides(cfg) for x in ("--set", s)]]) == 1
        err = capsys.readouterr().err
        assert f.name in err and "Traceback" not in err, err


def test_train_starts_from_the_file_and_resumes_without_it(cfg, tmp_path, capsys):
    trainer, src = create_trainer(_seeded(cfg, 7), init_from="")
    path = tmp_path / "start.npz"
    save_params(path, {**_flat(src["params"]), **_flat(src["batch_stats"])},
                {"format": "sarformer_mmseg"})
    workdir = tmp_path / "w"

    def run(steps, extra=()):
        sets = [x for s in _overrides(cfg) + [f"train.num_steps={steps}", "train.ckpt_every=1",
                                              "train.eval_every=1000", *extra]
                for x in ("--set", s)]
        return main(["train", "--config", "tiny", "--workdir", str(workdir), "--no-progress", *sets])

    assert run(1, [f"train.init_from={path}"]) == 0
    assert f"initialised every parameter and BatchNorm statistic from {path}" in capsys.readouterr().out
    path.unlink()  # a resumed run takes its weights from its checkpoint, not the file
    assert run(2, [f"train.init_from={path}"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "initialised" not in out
