"""Training on 8 fake CPU devices (conftest): the sharded step equals the single-device step, a
killed and resumed run is bit-identical to an uninterrupted one, non-finite losses stop (or are
skipped and counted), failed saves leave the previous checkpoint intact, and resuming with other
shapes names them."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from hlo import collectives_in_loops
from micro import micro_config

from sarformer_jax import checkpoint as ckpt_lib
from sarformer_jax.train import (
    ConfigMismatchError,
    NonFiniteLossError,
    create_trainer,
    device_batch,
    train,
)


def _first_batch(cfg):
    from sarformer_jax.data.pipeline import build_train_loader

    return next(build_train_loader(cfg, seed=0))


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(tree))]


def test_sharded_step_equals_single_device(data_root):
    # Adam's first step is lr * sign(g) wherever |g| >> eps, which turns gradients that are zero
    # up to rounding (e.g. positional encodings at the Deformable-DETR init) into +-lr updates
    # of random sign; a large eps makes the update proportional to the gradient, so the
    # comparison measures the sharded step itself.  The 8-device mesh is 4 (data) x 2 (fsdp):
    # the batch is split 8 ways and the larger parameters and their Adam moments 2 ways.
    cfg = micro_config(root=data_root, **{"train.eps": 1.0})
    cfg8 = micro_config(root=data_root, **{"train.eps": 1.0, "train.mesh.fsdp": 2,
                                           "train.mesh.fsdp_min_size": 512})
    batch = _first_batch(cfg)
    assert len(jax.devices()) == 8
    results = []
    for c, devices in ((cfg, jax.devices()[:1]), (cfg8, jax.devices())):
        trainer, state = create_trainer(c, devices=devices)
        gb = device_batch(batch, trainer.mesh)
        compiled = trainer.train_step.lower(state, gb, trainer.guide).compile()
        state, metrics = compiled(state, gb, trainer.guide)
        results.append((state, float(metrics["loss"])))
    # The loss and the guidance hold no parameters: a collective there other than a reduction
    # means the partitioner gathered activations of the whole batch onto every device (it did
    # for lax.top_k in the point sampling).
    gathers = [ln.strip()[:160] for ln in compiled.as_text().splitlines()
               if re.search(r"\b(all-gather|all-to-all|collective-permute)(-start)?\(", ln)
               and re.search(r'op_name="[^"]*\b(loss|guidance)\b', ln)]
    assert not gathers, gathers
    # No loop of the step decides its trip count across devices (the matcher's vmapped while
    # loops did: an all-reduce of the predicate in every iteration).
    assert not collectives_in_loops(compiled.as_text())
    (s1, l1), (s8, l8) = results
    assert np.isfinite(l1) and l1 == pytest.approx(l8, rel=1e-6)
    for a, b in zip(_leaves(s1["params"]), _leaves(s8["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    for a, b in zip(_leaves(s1["batch_stats"]), _leaves(s8["batch_stats"])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    # the batch really is split over the 8 devices ...
    gb = device_batch(batch, create_trainer(cfg8)[0].mesh)
    assert len(gb["image"].sharding.device_set) == 8
    # ... and the large parameters and their optimiser moments really are split over fsdp
    sharded = [x for x in jax.tree_util.tree_leaves(s8["params"]) if x.size >= 512]
    assert sharded and all("fsdp" in str(x.sharding.spec) for x in sharded)
    assert all(x.addressable_shards[0].data.size == x.size // 2 for x in sharded)
    small = [x for x in jax.tree_util.tree_leaves(s8["params"]) if x.size < 512]
    assert all(x.sharding.is_fully_replicated for x in small)
    mu = [x for x in jax.tree_util.tree_leaves(s8["opt_state"]) if x.size >= 512]
    assert mu and all("fsdp" in str(x.sharding.spec) for x in mu)


def test_initial_state_is_the_seeded_host_build_on_any_mesh(data_root):
    """The initial parameters are the model built op by op on the host's CPU from the config's
    seeds (no jitted init program: its compile took minutes for the large models), and then
    placed: one device and a 4 x 2 (data x fsdp) mesh hold the same values, bit for bit; the
    optimiser starts at zero and the step key is key(seed + 2)."""
    from flax import nnx

    from sarformer_jax.models.layers import init_rngs
    from sarformer_jax.models.sarformer import build_model

    cfg = micro_config(root=data_root, **{"train.seed": 3})
    _, state = create_trainer(cfg, devices=jax.devices()[:1])
    cfg8 = micro_config(root=data_root, **{"train.seed": 3, "train.mesh.fsdp": 2,
                                           "train.mesh.fsdp_min_size": 512})
    _, state8 = create_trainer(cfg8)
    with jax.default_device(jax.devices("cpu")[0]):
        built = nnx.state(build_model(cfg, rngs=init_rngs(3, 4)), nnx.Param)
    assert jax.tree_util.tree_structure(built) == jax.tree_util.tree_structure(state["params"])
    for a, b, c in zip(_leaves(built), _leaves(state["params"]), _leaves(state8["params"])):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    assert any("fsdp" in str(x.sharding.spec) for x in jax.tree_util.tree_leaves(state8["params"]))
    assert all(not np.any(x) for x in _leaves(state["opt_state"]) if x.dtype.kind == "f")
    np.testing.assert_array_equal(np.asarray(state["key"]),
                                  np.asarray(jax.random.key_data(jax.random.key(5))))
    # a different seed is a different model
    _, other = create_trainer(micro_config(root=data_root, **{"train.seed": 4}),
                              devices=jax.devices()[:1])
    assert not all(np.array_equal(a, b) for a, b in zip(_leaves(built), _leaves(other["params"])))


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
    from sarformer_jax.data import pipeline

    real = pipeline.build_train_loader

    class Poisoned:
        def __init__(self, inner):
            self.inner, self.i = inner, 0

        def __next__(self):
            b = next(self.inner)
            if self.i == bad_index:
                # a float image passes the step's uint8 normalisation unchanged
                b = dict(b, image=np.full(b["image"].shape, np.nan, np.float32))
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
    cfg = micro_config(root=data_root, **{"train.nan_policy": "skip"})
    out = train(cfg, tmp_path / "skip", progress=False, stop_after=3)
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
    cfg = micro_config(root=data_root, **{"train.ckpt_every": 1})
    train(cfg, tmp_path / "w", progress=False, stop_after=1)
    other = micro_config(root=data_root, **{"model.head.num_queries": 6})
    with pytest.raises(ConfigMismatchError, match="query_embed"):
        train(other, tmp_path / "w", progress=False)


def test_profile_traces_the_configured_steps(data_root, tmp_path, capsys, monkeypatch):
    """`train.profile` writes a jax.profiler trace of the window's steps; a bad window is named.
    The loop freezes the host's heap once, after its first step (`train.freeze_gc`)."""
    import gc

    from sarformer_jax import train as train_mod

    frozen = []
    real_freeze = train_mod.freeze_heap
    monkeypatch.setattr(train_mod, "freeze_heap", lambda: frozen.append(real_freeze()))
    cfg = micro_config(root=data_root, **{"train.profile": str(tmp_path / "prof"),
                                          "train.profile_window": "(1, 1)"})
    train(cfg, tmp_path / "p", progress=False, stop_after=3)
    assert len(frozen) == 1 and frozen[0] > 10_000 and 0 < gc.get_freeze_count() <= frozen[0]
    gc.unfreeze()
    off = micro_config(root=data_root, **{"train.freeze_gc": False})
    train(off, tmp_path / "off", progress=False, stop_after=1)
    assert len(frozen) == 1 and gc.get_freeze_count() == 0
    traces = list((tmp_path / "prof").rglob("*.xplane.pb"))
    assert traces and traces[0].stat().st_size > 0
    assert "profile of steps 2-2 of this run written to" in capsys.readouterr().out
    bad = micro_config(root=data_root, **{"train.profile": str(tmp_path / "prof2"),
                                          "train.profile_window": "(0, 0)"})
    with pytest.raises(ValueError, match=r"train.profile_window .*\(0, 0\)"):
        train(bad, tmp_path / "q", progress=False, stop_after=1)


def test_flat_params_step_equals_tree_step_and_checkpoints_hold_the_tree(data_root, tmp_path):
    """`train.flat_params`: the state holds the flat optimiser's group vectors; one step gives
    the parameters and moments of the step on the parameter tree (to rounding: the updates are
    fused differently); a killed and resumed run is bit-identical to an uninterrupted one, its
    checkpoints hold the parameter tree, and a run without `flat_params` resumes from them."""
    cfg = micro_config(root=data_root)
    flat_cfg = micro_config(root=data_root, **{"train.flat_params": True})
    batch = _first_batch(cfg)
    out = []
    for c in (cfg, flat_cfg):
        trainer, state = create_trainer(c, devices=jax.devices()[:1])
        state, metrics = trainer.train_step(state, device_batch(batch, trainer.mesh),
                                            trainer.guide)
        out.append((trainer, state, float(metrics["loss"])))
    (t0, s0, l0), (t1, s1, l1) = out
    assert isinstance(s1["params"], tuple) and len(s1["params"]) == len(t1.tx.groups.members)
    assert all(x.ndim == 1 for x in s1["params"])
    assert l0 == l1
    tree1 = t1.params_tree(s1["params"])
    assert jax.tree_util.tree_structure(tree1) == jax.tree_util.tree_structure(s0["params"])
    for a, b in zip(_leaves(s0["params"]), _leaves(tree1)):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
    for a, b in zip(_leaves(s0["opt_state"]), _leaves(s1["opt_state"])):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-12)
    # exact resume with the flat layout; the checkpoints hold the tree
    full = train(flat_cfg, tmp_path / "full", progress=False)
    train(flat_cfg, tmp_path / "resumed", progress=False, stop_after=3)
    resumed = train(flat_cfg, tmp_path / "resumed", progress=False)
    assert resumed["step"] == 6
    for key in ("params", "opt_state", "batch_stats", "key"):
        for a, b in zip(_leaves(full["state"][key]), _leaves(resumed["state"][key])):
            np.testing.assert_array_equal(a, b)
    tree_state = resumed["trainer"].checkpoint_state(resumed["state"])
    saved, _, _ = ckpt_lib.Checkpointer(tmp_path / "resumed").restore(
        ckpt_lib.abstract_like(tree_state), 6)
    for a, b in zip(_leaves(tree_state["params"]), _leaves(saved["params"])):
        np.testing.assert_array_equal(a, b)
    # a run on the tree layout resumes from the flat run's checkpoint of step 3 (`cfg`, whose
    # step the earlier tests of this file compiled: the persistent cache has it)
    import shutil

    shutil.copytree(tmp_path / "full", tmp_path / "other")
    for kept in ("checkpoints", "best"):  # as if the run had stopped at step 3
        for d in (tmp_path / "other" / kept).iterdir():
            if d.name.isdigit() and int(d.name) > 3:
                shutil.rmtree(d)
    other = train(cfg, tmp_path / "other", progress=False)
    assert other["step"] == 6
    assert not isinstance(other["state"]["params"], tuple)


def test_flat_params_sharded_step_equals_single_device(data_root):
    """`train.flat_params` on 8 devices (data parallel; the flat vectors replicated) gives the
    single-device flat step, and the compiled step gathers nothing (only reductions)."""
    sets = {"train.eps": 1.0, "train.flat_params": True}
    cfg = micro_config(root=data_root, **sets)
    batch = _first_batch(cfg)
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        trainer, state = create_trainer(cfg, devices=devices)
        gb = device_batch(batch, trainer.mesh)
        compiled = trainer.train_step.lower(state, gb, trainer.guide).compile()
        state, metrics = compiled(state, gb, trainer.guide)
        results.append((state, float(metrics["loss"])))
    gathers = [ln.strip()[:160] for ln in compiled.as_text().splitlines()
               if re.search(r"\b(all-gather|all-to-all|collective-permute)(-start)?\(", ln)]
    assert not gathers, gathers
    (s1, l1), (s8, l8) = results
    assert l1 == pytest.approx(l8, rel=1e-6)
    assert all(x.sharding.is_fully_replicated for x in s8["params"])
    for a, b in zip(_leaves(s1["params"]), _leaves(s8["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
