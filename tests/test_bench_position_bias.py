"""`sarformer bench position_bias` on the CPU (a small grid, the kernel in the interpreter): both
rows run and the kernel's padded bias equals the XLA path's; a bad implementation is refused."""

import argparse

import pytest

from sarformer_jax.benchmarks import position_bias


def _run(argv):
    parser = argparse.ArgumentParser()
    position_bias.add_arguments(parser)
    return position_bias.run(parser.parse_args(argv))


def test_rows_run_and_agree(capsys):
    assert _run(["--impls", "xla,pallas_interpret", "--grid", "4", "5", "--heads", "2",
                 "--reps", "1"]) == 0
    rows = [r.rstrip(" |").split(" | ") for r in capsys.readouterr().out.splitlines()
            if r.startswith("| xla") or r.startswith("| pallas")]
    assert len(rows) == 2
    for cells in rows:
        assert float(cells[1]) > 0 and float(cells[3]) > 0, cells
    assert rows[1][4] == "yes"


def test_bad_implementation_is_refused():
    with pytest.raises(ValueError, match="'gather' is not one of"):
        _run(["--impls", "gather"])
