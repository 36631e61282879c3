"""`sarformer bench attention` on the CPU: the XLA row runs and its error against the float64
reference is at bf16's level (a wrong scale or a dropped bias would be far off); the GPU-only
rows say why they did not run; a bad implementation name is refused."""

import argparse

import numpy as np
import pytest

from sarformer_jax.benchmarks import attention


def _run(argv):
    parser = argparse.ArgumentParser()
    attention.add_arguments(parser)
    return attention.run(parser.parse_args(argv))


def test_xla_row_runs_and_matches_float64(capsys):
    assert _run(["--tokens", "33", "--heads", "2", "--head-dim", "16", "--reps", "1"]) == 0
    rows = {r.split(" | ")[0].lstrip("| "): r for r in capsys.readouterr().out.splitlines()
            if r.startswith("| ") and "---" not in r}
    cells = rows["xla_bias"].rstrip(" |").split(" | ")
    assert float(cells[1]) > 0 and float(cells[2]) > 0
    assert 0 < float(cells[5]) < 3e-2
    for impl in ("cudnn_bias", "pallas_mgpu", "torch_bias"):
        assert "(" in rows[impl], rows[impl]


def test_reference_sees_the_bias_and_the_scale():
    arrays = attention._inputs(1, 9, 2, 8)
    ref = attention._reference(arrays)
    no_bias = list(arrays)
    no_bias[3] = np.zeros_like(arrays[3])
    assert np.abs(attention._reference(tuple(no_bias)) - ref).max() > 1e-2


def test_bad_implementation_is_refused():
    with pytest.raises(ValueError, match="implementation 'flash' is not one of"):
        _run(["--impls", "flash"])
