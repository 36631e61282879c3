"""`sarformer bench f32dot` on the CPU (small P): every method's row runs, and its error against
float64 is at float32's level (the CPU computes all three in float32); a bad method is refused."""

import argparse

import pytest

from sarformer_jax.benchmarks import f32dot


def _run(argv):
    parser = argparse.ArgumentParser()
    f32dot.add_arguments(parser)
    return f32dot.run(parser.parse_args(argv))


def test_rows_run_with_float32_errors(capsys):
    assert _run(["--points", "64", "--reps", "1"]) == 0
    rows = [r.rstrip(" |").split(" | ") for r in capsys.readouterr().out.splitlines()
            if r.startswith("| match") or r.startswith("| upscale")]
    assert len(rows) == 6
    for cells in rows:
        assert float(cells[2]) > 0, cells
        assert 0 <= float(cells[4]) < 1e-6, cells


def test_bad_method_is_refused():
    with pytest.raises(ValueError, match="method 'tf32' is not one of"):
        _run(["--methods", "tf32"])
