"""`sarformer bench train` pieces that run on the CPU: its batch is in the loader's format, and
its table carries both the blocking and the pipelined step time.  (Speed is never asserted.)"""

import argparse

import numpy as np
import pytest

from sarformer_jax.benchmarks import train as bench_train
from sarformer_jax.config import load_config
from sarformer_jax.data.pipeline import device_inputs


def test_random_batch_is_in_the_loaders_format():
    cfg = load_config("tiny", ["data.crop_size=(32, 48)", "train.batch_size=2"])
    batch = bench_train.random_batch(cfg)
    assert batch["image"].dtype == np.uint8 and batch["image"].shape == (2, 32, 48, 3)
    assert batch["label"].dtype == np.uint8 and (batch["image_hw"] == [32, 48]).all()
    q = int(cfg.model.head.num_queries)
    assert batch["proposals_packed"].shape == (2, q, 32, 6)
    x = device_inputs(batch, cfg.data.mean, cfg.data.std)["image"]
    assert x.dtype == np.float32 and abs(float(x.mean())) < 1.0


def test_table_has_blocking_and_pipelined_step_times(capsys):
    # (the step itself is exercised by the train tests; compiling it again here costs minutes)
    res = dict(model="sarformer", global_batch=2, init_s=22.0, trace_lower_s=10.0, compile_s=150.0,
               step_s=0.0986, pipelined_step_s=0.0912, images_per_s=20.3, peak_bytes=9.47 * 2**30,
               flops=4.952e12, achieved_flops_per_s=50.2e12, matmul_flops_per_s=672.4e12,
               mfu_measured=0.075, mfu_nominal=0.051, proposal_s=0.00062)
    old = dict(res)
    del old["pipelined_step_s"]  # results written before the column existed
    bench_train.print_table([res, old, dict(model="mask2former", failed=True, returncode=1,
                                            timed_out=False, error="boom")])
    lines = capsys.readouterr().out.strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:4]]
    assert header[2:6] == ["build + init s", "compile s", "step ms (median)", "pipelined ms"]
    assert all(len(r) == len(header) for r in rows)
    assert rows[0][2:6] == ["22", "160", "98.6", "91.2"] and rows[1][5] == "-"
    assert "FAILED" in lines[4]


def test_variant_specs():
    assert bench_train.parse_variant("base:") == ("base", [], {})
    assert bench_train.parse_variant("base") == ("base", [], {})
    name, sets, env = bench_train.parse_variant(
        "cmdbuf:env.XLA_FLAGS=--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL;"
        "model.backbone.scan_layers=False; train.flat_optimizer=False")
    assert name == "cmdbuf"
    assert sets == ["model.backbone.scan_layers=False", "train.flat_optimizer=False"]
    assert env == {"XLA_FLAGS": "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL"}
    for bad in ("a b:x=1", ":x=1", "v:novalue"):
        with pytest.raises(SystemExit):
            bench_train.parse_variant(bad)
    # the variant reaches the worker as overrides and a tag; variants wait for each other
    args = bench_train.argparse.Namespace(
        batch_per_device=2, size=[640], dtype="bfloat16", steps=3, warmup=1, matmul_size=256,
        profile=None, flops=None, lower_only=False, config=None, worker_timeout=None,
        set=["train.seed=1"], compile_cache=None)
    argv = bench_train._worker_argv(args, "sarformer", "/tmp/x.json", (name, sets, env),
                                    ("/tmp/sync", ["sarformer@cmdbuf", "sarformer@base"]))
    assert argv[argv.index("--tag") + 1] == "sarformer@cmdbuf"
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--set"] == ["train.seed=1"] + sets
    assert argv[argv.index("--sync-names") + 1] == "sarformer@cmdbuf,sarformer@base"
    assert "--compile-cache" not in argv  # off unless asked for
    args.compile_cache = "/tmp/xla_cache"
    argv = bench_train._worker_argv(args, "sarformer", "/tmp/x.json", (name, sets, env))
    assert argv[argv.index("--compile-cache") + 1] == "/tmp/xla_cache"
    parser = argparse.ArgumentParser()
    bench_train.add_arguments(parser)
    assert parser.parse_args([]).compile_cache is None
    assert parser.parse_args(["--compile-cache", "/c"]).compile_cache == "/c"


def test_variants_compile_in_waves():
    jobs = list("abcde")
    assert bench_train.waves(jobs, 2) == [["a", "b"], ["c", "d"], ["e"]]
    assert bench_train.waves(jobs, 0) == [jobs] == bench_train.waves(jobs, -1)
    assert bench_train.waves(jobs, 9) == [jobs]
    parser = argparse.ArgumentParser()
    bench_train.add_arguments(parser)
    assert parser.parse_args([]).compile_at_once == 2


def test_lower_only_counts_unrolled_layers():
    """XLA's cost analysis counts a scanned loop's body once, and the CPU scans the layers by
    default: `--lower-only` (the FLOP count for the MFU) builds them unrolled, and `--set` can
    still override that."""
    args = bench_train.argparse.Namespace(batch_per_device=2, size=[64], dtype="float32",
                                          config="tiny", set=[], lower_only=True)
    cfg = bench_train.make_config("sarformer", args, 1)
    assert cfg.model.backbone.scan_layers is False
    assert cfg.model.head.pixel_decoder.scan_layers is False
    args.lower_only = False
    cfg = bench_train.make_config("sarformer", args, 1)
    assert cfg.model.backbone.scan_layers == "auto"
    assert cfg.model.head.pixel_decoder.scan_layers == "auto"
    args.lower_only, args.set = True, ["model.head.pixel_decoder.scan_layers=True"]
    cfg = bench_train.make_config("sarformer", args, 1)
    assert cfg.model.head.pixel_decoder.scan_layers is True


def test_flops_per_model():
    """`--flops` takes one figure for every model or MODEL=TFLOP pairs, and passes either form
    on to the per-model worker unchanged; a bad model name or number is refused by name."""
    one = bench_train.parse_flops("4.952")
    assert one == 4.952 and bench_train.flops_for(one, "mask2former") == 4.952
    per = bench_train.parse_flops("sarformer=4.952, mask2former=4.166")
    assert bench_train.flops_for(per, "mask2former") == 4.166
    assert bench_train.flops_for(per, "sarformer") == 4.952
    assert bench_train.flops_for(per, "sarformer_online") is None
    assert bench_train.flops_for(None, "sarformer") is None
    for value in (one, per):
        assert bench_train.parse_flops(bench_train.format_flops(value)) == value
    for bad, what in (("segformer=1.0", "segformer"), ("sarformer=x", "sarformer=x"),
                      ("lots", "lots")):
        with pytest.raises(bench_train.argparse.ArgumentTypeError, match=what):
            bench_train.parse_flops(bad)
    args = bench_train.argparse.Namespace(
        batch_per_device=2, size=[640], dtype="bfloat16", steps=3, warmup=1, matmul_size=256,
        profile=None, flops=per, lower_only=False, config=None, worker_timeout=None, set=[],
        compile_cache=None)
    argv = bench_train._worker_argv(args, "mask2former", "/tmp/x.json")
    assert bench_train.parse_flops(argv[argv.index("--flops") + 1]) == per
