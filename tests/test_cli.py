"""The `sarformer` entry point lists its subcommands and never fakes success."""

import subprocess
import sys

from sarformer_jax import cli

EXPECTED = ["train", "eval", "predict", "convert", "amg", "bench", "data"]


def test_help_lists_subcommands():
    proc = subprocess.run([sys.executable, "-m", "sarformer_jax.cli", "--help"],
                          capture_output=True, text=True)
    assert proc.returncode == 0
    for name in EXPECTED:
        assert name in proc.stdout
    assert list(cli.SUBCOMMANDS) == EXPECTED


def test_no_command_is_an_error(capsys):
    assert cli.main([]) == 2


def test_unbuilt_subcommand_exits_2(monkeypatch, capsys):
    monkeypatch.setitem(cli.SUBCOMMANDS, "train", ("sarformer_jax._no_such_module", "x"))
    assert cli.main(["train", "--config", "tiny"]) == 2
    assert "not built yet" in capsys.readouterr().err


def test_unbuilt_benchmark_exits_2(monkeypatch, capsys):
    from sarformer_jax import bench

    monkeypatch.setitem(bench.BENCHMARKS, "nosuch", "x")
    import argparse

    assert bench.run(argparse.Namespace(name="nosuch", bench_args=[])) == 2
    assert "not built yet" in capsys.readouterr().err
