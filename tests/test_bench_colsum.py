"""`sarformer bench colsum` on the CPU: every method runs on a named shape, a ROWSxCOLS shape
and the grouped layer, and the error column measures each sum against float64 (float32 sums
of bf16 values: far below bf16's own rounding, so a method that summed in bf16 would show)."""

import argparse

import pytest

from sarformer_jax.benchmarks import colsum


def _run(argv):
    parser = argparse.ArgumentParser()
    colsum.add_arguments(parser)
    return colsum.run(parser.parse_args(argv))


def test_bench_times_each_method_and_measures_its_error(capsys):
    assert _run(["--shapes", "beit_768,1100x40,group", "--reps", "1", "--no-torch"]) == 0
    out = capsys.readouterr().out
    rows = [r.rstrip(" |").split(" | ") for r in out.splitlines() if r.startswith("| ") and "---" not in r][1:]
    assert len(rows) == 9
    assert {r[1] for r in rows} == {"sum", "blocks", "dot"}
    assert {r[0].lstrip("| ").split(" ")[0] for r in rows} == {"beit_768", "1100x40", "group"}
    for r in rows:
        assert float(r[2]) > 0 and float(r[3]) > 0
        assert float(r[4]) < 1e-5, r


def test_bad_method_and_shape_are_refused():
    with pytest.raises(ValueError, match="method 'rows' is not one of"):
        _run(["--shapes", "beit_768", "--methods", "rows", "--no-torch"])
    with pytest.raises(ValueError, match="shape 'big' is neither one of"):
        colsum._parse_shape("big")
