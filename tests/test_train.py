"""Training on 8 fake CPU devices (conftest): the sharded step equals the single-device step, a
killed and resumed run is bit-identical to an uninterrupted one, non-finite losses stop (or are
skipped and counted), failed saves leave the previous checkpoint intact, and resuming with other
shapes names them."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from sarformer_jax import checkpoint as ckpt_lib
from sarformer_jax.config import load_config
from sarformer_jax.train import (ConfigMismatchError, NonFiniteLossError, create_trainer,
                                 device_batch, train)


def micro_config(tmp_path_factory=None, root=None, **extra):
    """A SARFormer of the real architecture, small enough for CPU tests."""
    sets = [
        "model.image_size=(64, 64)", "model.backbone.embed_dim=32", "model.backbone.num_heads=2",
        "model.backbone.deform_num_heads=2", "model.backbone.conv_inplane=8",
        "model.backbone.rel_pos_grid=(4, 4)", "model.head.feat_channels=32",
        "model.head.num_queries=8", "model.head.pixel_decoder.num_heads=2",
        "model.head.pixel_decoder.ffn_dim=64", "model.head.pixel_decoder.num_feats=16",
        "model.head.pixel_decoder.gn_groups=8", "model.head.pixel_decoder.num_layers=1",
        "model.head.decoder.num_layers=2", "model.head.decoder.num_heads=2",
        "model.head.decoder.ffn_dim=64", "model.head.decoder.num_feats=16",
        "model.aux_head.in_channels=32", "model.aux_head.channels=16",
        "model.loss.num_points=256", "data.crop_size=(64, 64)", "data.scale=(256, 64)",
        f"data.root={root}", f"guidance.cache_dir={root}/proposals",
        "data_gen.num_train=16", "data_gen.num_val=2", "data_gen.image_size=(64, 80)",
        "train.batch_size=8", "train.num_steps=6", "train.ckpt_every=3", "train.eval_every=1000",
        "train.log_every=1", "eval.crop_size=(64, 64)", "eval.stride=(48, 48)",
        "eval.scale=(256, 64)",
    ]
    sets += [f"{k}={v}" for k, v in extra.items()]
    return load_config("tiny", sets)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from sarformer_jax.data import synthetic

    root = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(root, num_train=16, num_val=2, image_size=(64, 80), num_classes=8, seed=0)
    return root


def _first_batch(cfg):
    from sarformer_jax.data.pipeline import build_train_loader

    return next(build_train_loader(cfg, seed=0))


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(tree))]


def test_sharded_step_equals_single_device(data_root):
    cfg = micro_config(root=data_root)
    batch = _first_batch(cfg)
    assert len(jax.devices()) == 8
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        trainer, state = create_trainer(cfg, devices=devices)
        state, metrics = trainer.train_step(state, device_batch(batch, trainer.mesh))
        results.append((state, float(metrics["loss"])))
    (s1, l1), (s8, l8) = results
    assert np.isfinite(l1) and l1 == pytest.approx(l8, rel=1e-6)
    for a, b in zip(_leaves(s1["params"]), _leaves(s8["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    for a, b in zip(_leaves(s1["batch_stats"]), _leaves(s8["batch_stats"])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    # the batch really is split over the 8 devices
    gb = device_batch(batch, create_trainer(cfg)[0].mesh)
    assert len(gb["image"].sharding.device_set) == 8


def test_kill_and_resume_is_bit_identical(data_root, tmp_path):
    cfg = micro_config(root=data_root)
    full = train(cfg, tmp_path / "full", progress=False)
    part = train(cfg, tmp_path / "resumed", progress=False, stop_after=3)
    assert part["step"] == 3
    resumed = train(cfg, tmp_path / "resumed", progress=False)
    assert resumed["step"] == 6
    for key in ("params", "opt_state", "batch_stats", "key"):
        for a, b in zip(_leaves(full["state"][key]), _leaves(resumed["state"][key])):
            np.testing.assert_array_equal(a, b)
    # same data order: the saved iterator states agree at step 6
    e1 = ckpt_lib.Checkpointer(tmp_path / "full").restore_extra(6)[0]
    e2 = ckpt_lib.Checkpointer(tmp_path / "resumed").restore_extra(6)[0]
    assert e1["data_state"] == e2["data_state"]


def _nan_at(monkeypatch, bad_index):
    import sarformer_jax.data.pipeline as pipeline

    real = pipeline.build_train_loader

    class Poisoned:
        def __init__(self, inner):
            self.inner, self.i = inner, 0

        def __next__(self):
            b = next(self.inner)
            if self.i == bad_index:
                b = dict(b, image=np.full_like(b["image"], np.nan))
            self.i += 1
            return b

        def get_state(self):
            return self.inner.get_state()

    monkeypatch.setattr(pipeline, "build_train_loader", lambda *a, **k: Poisoned(real(*a, **k)))


def test_nonfinite_loss_stops_naming_step(data_root, tmp_path, monkeypatch):
    _nan_at(monkeypatch, 4)
    cfg = micro_config(root=data_root)
    with pytest.raises(NonFiniteLossError, match=r"step 4.*last good checkpoint: .*checkpoints/3"):
        train(cfg, tmp_path / "nan", progress=False)


def test_nonfinite_loss_skip_policy_counts(data_root, tmp_path, monkeypatch):
    _nan_at(monkeypatch, 1)
    cfg = micro_config(root=data_root, **{"train.nan_policy": "skip", "train.num_steps": 3})
    out = train(cfg, tmp_path / "skip", progress=False)
    assert int(out["state"]["bad_steps"]) == 1 and int(out["state"]["first_bad_step"]) == 1
    assert all(np.isfinite(x).all() for x in _leaves(out["state"]["params"]))


def test_failed_save_keeps_previous(data_root, tmp_path, monkeypatch):
    cfg = micro_config(root=data_root)
    train(cfg, tmp_path / "w", progress=False, stop_after=3)
    real_save = ckpt_lib.Checkpointer.save

    def failing(self, step, state, extra):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_lib.ocp.CheckpointManager, "save",
                        lambda self, *a, **k: failing(self, *a, **k))
    with pytest.raises(ckpt_lib.CheckpointSaveError, match="checkpoint \\(3\\) is intact"):
        train(cfg, tmp_path / "w", progress=False)
    monkeypatch.setattr(ckpt_lib.Checkpointer, "save", real_save)
    monkeypatch.undo()
    assert ckpt_lib.Checkpointer(tmp_path / "w").latest_step() == 3


def test_resume_with_other_shapes_names_them(data_root, tmp_path):
    cfg = micro_config(root=data_root, **{"train.num_steps": 1, "train.ckpt_every": 1})
    train(cfg, tmp_path / "w", progress=False)
    other = micro_config(root=data_root, **{"model.head.num_queries": 6})
    with pytest.raises(ConfigMismatchError, match="query_embed"):
        train(other, tmp_path / "w", progress=False)
