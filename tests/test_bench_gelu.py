"""`sarformer bench gelu` on the CPU: every formula runs, and the error column measures each
against the float64 exact GELU (the exact one within float32 rounding, the tanh approximation
visibly off), so a wrong formula would show in the table the GPU run prints."""

import argparse

from sarformer_jax.benchmarks import gelu


def test_bench_times_each_formula_and_measures_its_error(capsys):
    parser = argparse.ArgumentParser()
    gelu.add_arguments(parser)
    rc = gelu.run(parser.parse_args(["--shapes", "512x384", "--grad-shapes", "512x384", "--reps", "1", "--no-torch"]))
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = {r.split(" | ")[1]: r.rstrip(" |").split(" | ") for r in out.splitlines() if r.startswith("| 512x384")}
    assert sorted(rows) == ["copy", "erf", "tanh"]
    assert float(rows["erf"][5]) < 1e-6 < 1e-4 < float(rows["tanh"][5])
    assert all(float(rows[f][4]) > 0 for f in rows)  # forward+backward timed for the grad shape


def test_unknown_formula_and_bad_shape_are_refused():
    import pytest

    with pytest.raises(ValueError, match="unknown formula 'sigmoid'"):
        gelu.formula("sigmoid")
    with pytest.raises(ValueError, match="shape 'big' is neither one of .* nor ROWSxCOLS"):
        gelu._parse_shape("big")
