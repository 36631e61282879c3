"""`sarformer bench point_select` on the CPU (the kernel in the interpreter, a small shape): every
method and config gets a row with a time, and the set column compares each with lax.top_k."""

import argparse

import pytest

from sarformer_jax.benchmarks import point_select


def _run(argv):
    parser = argparse.ArgumentParser()
    point_select.add_arguments(parser)
    return point_select.run(parser.parse_args(argv))


def test_bench_times_each_method_and_checks_its_set(capsys):
    assert _run(["--rows", "3", "--n", "300", "--k", "75", "--reps", "1", "--no-torch",
                 "--interpret", "--pallas-configs", "64:3:4,128:1:4"]) == 0
    rows = [r.rstrip(" |").split(" | ") for r in capsys.readouterr().out.splitlines()
            if r.startswith("| ") and "---" not in r][1:]
    assert [r[0].lstrip("| ") for r in rows] == ["top_k", "sort", "pallas[c64,r3,w4]",
                                                 "pallas[c128,r1,w4]"]
    for r in rows:
        assert float(r[1]) > 0 and r[3] == "yes", r


def test_bad_config_and_method_are_refused():
    with pytest.raises(ValueError, match="'64:3' is not CHUNK:RADIX_BITS:WARPS"):
        point_select.parse_configs("64:3")
    with pytest.raises(ValueError, match="method 'heap'"):
        _run(["--methods", "heap", "--no-torch"])
