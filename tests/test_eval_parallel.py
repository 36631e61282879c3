"""Slide evaluation with the windows of consecutive images split over the mesh's devices
(`evaluate.parallel_predictions`, on 3 of the 8 fake CPU devices): the same class scores per image as the
one-image-at-a-time path (`predict_scores`), the same metrics from `evaluate_state`, windows
really sharded over every device, and the settings it cannot serve refused with the reason."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from micro import micro_config

from sarformer_jax import evaluate
from sarformer_jax.data.pipeline import build_eval_dataset
from sarformer_jax.train import create_trainer


@pytest.fixture(scope="module")
def setup(data_root):
    # validation images of 64 x 80: 2 windows each at crop 64, stride 48; 3 windows a call
    # (eval.batch_size 2 rounds up to the 3 devices): the second image's windows straddle two
    # calls, and the last call is padded with a zero window
    cfg = micro_config(root=data_root, **{"eval.mode": "slide", "eval.batch_size": 2})
    trainer, state = create_trainer(cfg, devices=jax.devices()[:3])
    return cfg, trainer, state


def test_parallel_scores_equal_the_per_image_path(setup):
    cfg, trainer, state = setup
    assert trainer.mesh.size == 3
    assert evaluate.parallel_refusal(cfg, trainer, "slide", False) is None
    with_proposals = cfg.model.head.query_init == "sam_pooling" and cfg.guidance.source == "cached"
    assert with_proposals  # the proposals travel as channels on this path too
    window_fn = evaluate.cached_window_fn(cfg, trainer, with_proposals=with_proposals)
    seen = []

    def spy(params, stats, windows, key):
        seen.append((windows.shape[0], len(windows.sharding.device_set)))
        return window_fn(params, stats, windows, key)

    params, stats = state["params"], state["batch_stats"]
    dataset = build_eval_dataset(cfg)
    got = list(evaluate.parallel_predictions(cfg, spy, params, stats, iter(dataset),
                                             trainer.mesh, with_proposals=with_proposals,
                                             labels=False))
    assert len(got) == len(dataset) >= 2
    n_windows = 2 * len(dataset)
    assert n_windows % 3  # a padded last call
    assert seen and all(shape == (3, 3) for shape in seen)  # every call split over 3 devices
    assert len(seen) == -(-n_windows // 3)
    for i, (label, scores) in enumerate(got):
        record = dataset[i]
        np.testing.assert_array_equal(label, record["label"])
        want = evaluate.predict_scores(cfg, window_fn, params, stats, record, i, mode="slide",
                                       aug_test=False, with_proposals=with_proposals)
        assert scores.shape == want.shape == record["image"].shape[:2] + (cfg.model.head.num_classes,)
        np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-6)


def test_evaluate_state_gives_the_same_metrics_either_way(setup):
    cfg, trainer, state = setup
    par = evaluate.evaluate_state(cfg, trainer, state, progress=False)
    seq_cfg = cfg.copy()
    seq_cfg.eval.parallel = False
    seq = evaluate.evaluate_state(seq_cfg, trainer, state, progress=False)
    assert par["num_images"] == seq["num_images"] == len(build_eval_dataset(cfg))
    assert par["mIoU"] == pytest.approx(seq["mIoU"], abs=1e-6)
    assert par["aAcc"] == pytest.approx(seq["aAcc"], abs=1e-6)
    np.testing.assert_array_equal(par["area_union"], seq["area_union"])


def test_settings_it_cannot_serve_keep_the_per_image_path(setup):
    cfg, trainer, _ = setup
    refusal = evaluate.parallel_refusal
    assert "mode 'whole'" in refusal(cfg, trainer, "whole", False)
    assert "aug_test" in refusal(cfg, trainer, "slide", True)
    c = cfg.copy()
    c.guidance.deterministic_eval = False
    assert "deterministic_eval=False" in refusal(c, trainer, "slide", False)
    c = cfg.copy()
    c.eval.parallel = False
    assert refusal(c, trainer, "slide", False) == "eval.parallel=False"
    c.eval.parallel = True
    with pytest.raises(ValueError, match="eval.parallel=True, but .*mode 'whole'"):
        refusal(c, trainer, "whole", False)
    c.eval.parallel = "yes"
    with pytest.raises(ValueError, match="eval.parallel must be auto, True or False"):
        refusal(c, trainer, "slide", False)


def test_online_guidance_runs_sam_on_the_sharded_windows(data_root):
    """With SAM inside the window function, the windows' automatic masks come from each
    device's own windows: the scores still equal the per-image path's."""
    from test_guidance_online import ONLINE, tiny_sam

    cfg = micro_config(root=data_root, **ONLINE, **{"eval.mode": "slide", "eval.batch_size": 2})
    trainer, state = create_trainer(cfg, devices=jax.devices()[:3], sam=tiny_sam())
    assert evaluate.parallel_refusal(cfg, trainer, "slide", False) is None
    window_fn = evaluate.cached_window_fn(cfg, trainer, with_proposals=False)
    params, stats = state["params"], state["batch_stats"]
    dataset = build_eval_dataset(cfg)
    got = list(evaluate.parallel_predictions(cfg, window_fn, params, stats, iter(dataset),
                                             trainer.mesh, with_proposals=False, labels=False))
    assert len(got) == len(dataset)
    for i, (_, scores) in enumerate(got):
        want = evaluate.predict_scores(cfg, window_fn, params, stats, dataset[i], i, mode="slide",
                                       aug_test=False, with_proposals=False)
        np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-6)
    c = cfg.copy()
    c.guidance.seed_compat = True
    assert "seed_compat" in evaluate.parallel_refusal(c, trainer, "slide", False)


def test_one_device_takes_the_parallel_path_with_the_same_scores(data_root):
    """On one device (batch 1) the parallel path runs the per-image path's window programs in
    another order, and hands each image to the host only once the next one is queued."""
    cfg = micro_config(root=data_root, **{"eval.mode": "slide"})
    trainer, state = create_trainer(cfg, devices=jax.devices()[:1])
    assert evaluate.parallel_refusal(cfg, trainer, "slide", False) is None
    window_fn = evaluate.cached_window_fn(cfg, trainer, with_proposals=True)
    params, stats = state["params"], state["batch_stats"]
    dataset = build_eval_dataset(cfg)
    handed = []

    def records():
        for i in range(len(dataset)):
            handed.append(i)
            yield dataset[i]

    got = []
    for label, scores in evaluate.parallel_predictions(cfg, window_fn, params, stats, records(),
                                                       trainer.mesh, with_proposals=True,
                                                       labels=False):
        got.append(scores)
        if len(got) < len(dataset):  # image i is yielded after image i + 1 was taken
            assert len(handed) >= len(got) + 1
    assert len(got) == len(dataset)
    for i, scores in enumerate(got):
        want = evaluate.predict_scores(cfg, window_fn, params, stats, dataset[i], i, mode="slide",
                                       aug_test=False, with_proposals=True)
        np.testing.assert_array_equal(scores, want)
