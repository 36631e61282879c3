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


def test_online_guidance_without_sam_weights_is_refused(tmp_path, capsys):
    """SARFormer trains with online SAM guidance by default: without SAM's weights the command
    says what to pass (or how to use a proposal cache) instead of failing later."""
    assert cli.main(["train", "--config", "ade20k_sarformer_b", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "guidance.sam.checkpoint=SAM.npz" in err and "guidance.source=cached" in err
    missing = str(tmp_path / "nope.npz")
    assert cli.main(["eval", "--config", "ade20k_sarformer_b", "--checkpoint", str(tmp_path),
                     "--set", f"guidance.sam.checkpoint={missing}"]) == 2
    assert f"guidance.sam.checkpoint={missing}: no such file" in capsys.readouterr().err
