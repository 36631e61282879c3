"""`sarformer bench sam_upscale` on the CPU (the kernel in the Pallas interpreter): every
variant runs and agrees with the float32 upstream path, so the GPU sweep measures the real
decoder code; a variant outside the tolerance makes the benchmark fail."""

import argparse

import jax.numpy as jnp
import pytest

from sarformer_jax.benchmarks import sam_upscale


def _run(capsys, *argv):
    parser = argparse.ArgumentParser()
    sam_upscale.add_arguments(parser)
    rc = sam_upscale.run(parser.parse_args(list(argv)))
    return rc, capsys.readouterr().out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bench_runs_every_variant_and_checks_it(capsys, dtype):
    rc, out = _run(capsys, "--prompts", "2", "--tokens", "8", "--block-l", "8,16", "--direct", "1,0",
                   "--products", "rows,tensor", "--conv2-fuse-norm", "0,1" if dtype == "bfloat16" else "0",
                   "--iters", "1", "--warmup", "0", "--dtype", dtype)
    assert rc == 0, out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "ms per call" not in line]
    names = [r.split(" | ")[0][2:] for r in rows]
    # block_l 16 does not divide the row of 8 tokens: no direct variant for it
    # the tensor form always writes the final masks, for any block_l
    assert names == ["xla blocks", "xla upstream", "blocks + pallas conv2 block_n 64 warps 4"] + \
        (["blocks + pallas conv2 block_n 64 warps 4 + norm"] if dtype == "bfloat16" else []) + [
        "pallas rows block_l 8 warps 4 stages 1 direct",
        "pallas rows block_l 8 warps 4 stages 1 planes", "pallas rows block_l 16 warps 4 stages 1 planes",
        "pallas tensor block_l 8 warps 4 stages 1", "pallas tensor block_l 16 warps 4 stages 1"]
    errs = [float(r.split(" | ")[3].rstrip(" |")) for r in rows]
    assert max(errs) <= (1e-5 if dtype == "float32" else 1e-2)


def test_bench_fails_on_a_wrong_result(capsys, monkeypatch):
    real = sam_upscale._decoder

    def broken(dtype):  # a decoder whose kernel path reads a wrong LayerNorm bias
        dec = real(dtype)
        if jnp.dtype(dtype) != jnp.float32:  # the float32 reference stays right
            dec.output_upscaling[1].bias[...] += 1.0
        return dec

    monkeypatch.setattr(sam_upscale, "_decoder", broken)
    rc, out = _run(capsys, "--prompts", "1", "--tokens", "8", "--block-l", "8", "--direct", "1",
                   "--iters", "1", "--warmup", "0", "--no-xla")
    assert rc == 1 and "rel err above 0.01 (the bfloat16 tolerance): blocks + pallas conv2 block_n 64 warps 4, " \
        "pallas rows block_l 8 warps 4 stages 1 direct, pallas tensor block_l 8 warps 4 stages 1" in out
