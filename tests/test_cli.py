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


def test_every_benchmark_module_and_script_is_registered():
    """`sarformer bench NAME` and `scripts/bench_NAME.py` cover the same benchmarks, each with
    its module in sarformer_jax.benchmarks."""
    import importlib
    from pathlib import Path

    from sarformer_jax import bench

    scripts = Path(__file__).resolve().parents[1] / "scripts"
    names = {p.stem[len("bench_"):] for p in scripts.glob("bench_*.py")}
    assert names == set(bench.BENCHMARKS)
    for name in names:
        module = importlib.import_module(f"sarformer_jax.benchmarks.{name}")
        assert callable(module.add_arguments) and callable(module.run), name


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


def test_default_xla_flags_add_to_the_users_and_can_be_turned_off():
    from sarformer_jax.cli import DEFAULT_XLA_FLAGS, apply_default_xla_flags

    env = {}
    assert apply_default_xla_flags(env) == " ".join(DEFAULT_XLA_FLAGS)
    env = {"XLA_FLAGS": "--xla_dump_to=/tmp/d"}
    assert apply_default_xla_flags(env).split() == ["--xla_dump_to=/tmp/d", *DEFAULT_XLA_FLAGS]
    # a flag the user set keeps the user's value
    env = {"XLA_FLAGS": "--xla_gpu_enable_command_buffer="}
    assert apply_default_xla_flags(env) == "--xla_gpu_enable_command_buffer="
    env = {"SARFORMER_JAX_XLA_DEFAULTS": "0"}
    assert apply_default_xla_flags(env) == "" and "XLA_FLAGS" not in env


def test_default_xla_flags_are_accepted_by_this_jax():
    """XLA aborts on a flag it does not know: the defaults must parse on the installed jax."""
    import os
    import subprocess
    import sys

    from sarformer_jax.cli import DEFAULT_XLA_FLAGS

    code = ("import jax, jax.numpy as jnp\n"
            "f = jax.jit(lambda x: jax.lax.while_loop(lambda c: c[0] < 3,"
            " lambda c: (c[0] + 1, c[1] * 2), (0, x)))\n"
            "print(int(f(jnp.ones(2))[1][0]))\n")
    env = dict(os.environ, XLA_FLAGS=" ".join(DEFAULT_XLA_FLAGS), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "8"
