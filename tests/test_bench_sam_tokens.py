"""`sarformer bench sam_tokens` on the CPU (the kernel in the Pallas interpreter): every variant
runs, for shared and per-prompt image tokens, and agrees with the float32 XLA path; a variant
outside the tolerance makes the benchmark fail."""

import argparse

from sarformer_jax.benchmarks import sam_tokens


def _run(capsys, *argv):
    parser = argparse.ArgumentParser()
    sam_tokens.add_arguments(parser)
    rc = sam_tokens.run(parser.parse_args(list(argv)))
    return rc, capsys.readouterr().out


def test_bench_runs_every_variant_and_checks_it(capsys):
    dtype = "bfloat16"  # the kernel's float32 accuracy is tested in test_sam_image_to_tokens_kernel.py
    rc, out = _run(capsys, "--prompts", "2", "--tokens", "8", "--block-l", "16,32", "--iters", "1",
                   "--warmup", "0", "--dtype", dtype)
    assert rc == 0, out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "ms per call" not in line]
    names = [tuple(r.split(" | ")[:2]) for r in rows]
    variants = [f"pallas heads {h} block_l {b} warps 4 stages 1" for h in ("loop", "merged") for b in (16, 32)]
    assert names == [(f"| {kind}", v) for kind in ("shared", "per prompt") for v in ["xla absorbed"] + variants]
    errs = [float(r.split(" | ")[4].rstrip(" |")) for r in rows]
    assert max(errs) <= 1e-2


def test_bench_fails_on_a_wrong_result(capsys, monkeypatch):
    real = sam_tokens._block

    def broken(dtype):  # the timed block reads a wrong LayerNorm bias; the float32 reference stays right
        import jax.numpy as jnp

        blk = real(dtype)
        if jnp.dtype(dtype) != jnp.float32:
            blk.norm4.bias[...] += 1.0
        return blk

    monkeypatch.setattr(sam_tokens, "_block", broken)
    rc, out = _run(capsys, "--prompts", "2", "--tokens", "8", "--block-l", "16", "--iters", "1", "--warmup", "0")
    assert rc == 1
    assert "rel err above 0.01 (the bfloat16 tolerance): shared: xla absorbed" in out
