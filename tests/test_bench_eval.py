"""`sarformer bench eval` on the CPU with a micro SARFormer: both paths (`per_image`, which
waits for each image, and `parallel`, the stream of `evaluate.parallel_predictions`) run on the
same images and print their rows; an unknown path is refused."""

import argparse

import pytest
from micro import MICRO_EVAL, MICRO_MODEL

from sarformer_jax.benchmarks import eval as bench_eval

# the micro architecture on the B config's 12-layer backbone: 4 layers, one an interaction each
MICRO = MICRO_MODEL + MICRO_EVAL + [
    "model.backbone.depth=4",
    "model.backbone.interaction_indexes=((0, 0), (1, 1), (2, 2), (3, 3))"]


def _run(extra):
    parser = argparse.ArgumentParser()
    bench_eval.add_arguments(parser)
    argv = ["--models", "sarformer", "--sizes", "64x80", "--images", "2", "--dtype", "float32"]
    for s in MICRO:
        argv += ["--set", s]
    return bench_eval.run(parser.parse_args(argv + extra))


def test_both_paths_time_the_same_images(capsys):
    assert _run(["--path", "parallel,per_image"]) == 0
    out = capsys.readouterr().out
    rows = [r for r in out.splitlines() if r.startswith("| sarformer")]
    assert len(rows) == 2, out
    per_image, parallel = rows
    assert float(per_image.rstrip(" |").split(" | ")[-1]) > 0
    assert "parallel path" in parallel and float(parallel.rstrip(" |").split(" | ")[-1]) > 0
    assert "over 2 images" in out  # the warm-up image is not in the stream's time


def test_unknown_path_is_refused():
    with pytest.raises(ValueError, match="--path 'batched': choose from per_image, parallel"):
        _run(["--path", "batched"])
