"""`sarformer bench backbone` on the CPU, lowering only: the FLOP count of a scanned backbone is
the unrolled one's (XLA's cost analysis counts a while loop's body once, so the bench counts the
unrolled program), and the scan choices are refused by name when unknown."""

from __future__ import annotations

import argparse
import re

import pytest

from sarformer_jax.benchmarks import backbone


def _run(capsys, *argv):
    parser = argparse.ArgumentParser()
    backbone.add_arguments(parser)
    assert backbone.run(parser.parse_args(list(argv))) == 0
    return capsys.readouterr().out


def test_scanned_adapter_counts_the_unrolled_flops(capsys):
    out = _run(capsys, "--models", "adapter", "--depth", "8", "--width", "96", "3", "--size", "64",
               "--lower-only", "--scan-layers", "on,off")
    flops = dict(re.findall(r"\| (adapter/scan-\w+)\s*\|\s*([\d.]+) TFLOP/step", out))
    assert set(flops) == {"adapter/scan-on", "adapter/scan-off"}, out
    assert float(flops["adapter/scan-off"]) > 0
    assert flops["adapter/scan-on"] == flops["adapter/scan-off"]


def test_unknown_scan_choice_is_named(capsys):
    with pytest.raises(SystemExit, match="--scan-layers: 'maybe'"):
        _run(capsys, "--models", "beit", "--depth", "4", "--size", "64", "--lower-only",
             "--scan-layers", "maybe")
