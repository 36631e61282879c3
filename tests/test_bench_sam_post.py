"""`sarformer bench sam_post` on the CPU (the kernel in the Pallas interpreter): every launch
setting runs and its logits agree with the float32 matmul path; a variant outside the tolerance
makes the benchmark fail."""

import argparse

from sarformer_jax.benchmarks import sam_post

ARGS = ("--prompts", "1", "--images", "1", "--size", "50x33", "--low", "16", "--iters", "1", "--warmup", "0")


def _run(capsys, *argv):
    parser = argparse.ArgumentParser()
    sam_post.add_arguments(parser)
    rc = sam_post.run(parser.parse_args(list(argv)))
    return rc, capsys.readouterr().out


def _small_sam():  # a 64-pixel SAM: 16² low-res logits as in the kernel's own tests
    from sarformer_jax.models.layers import init_rngs
    from sarformer_jax.sam.build import SamConfig, build_sam_from_config

    return build_sam_from_config(SamConfig(32, 1, 2, (0,), image_size=64), rngs=init_rngs(0))


def test_bench_runs_every_variant_and_checks_it(capsys, monkeypatch):
    monkeypatch.setattr(sam_post, "_sam", _small_sam)
    rc, out = _run(capsys, *ARGS, "--block-rows", "16,32", "--block-cols", "16,64")
    assert rc == 0, out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "ms per call" not in line]
    names = [r.split(" | ")[0].lstrip("| ") for r in rows]
    assert names == ["xla taps"] + [f"pallas rows {r} cols {c} warps 4" for r in (16, 32) for c in (16, 64)]
    errs = [float(r.split(" | ")[3].rstrip(" |")) for r in rows]
    assert max(errs) <= 1e-5


def test_bench_fails_on_a_wrong_result(capsys, monkeypatch):
    from sarformer_jax.kernels import sam_mask_stats

    monkeypatch.setattr(sam_post, "_sam", _small_sam)
    real = sam_mask_stats.postprocess_stats

    def broken(x, **kw):  # the kernel reads the logits shifted by one
        return real(x + 1, **kw)

    monkeypatch.setattr(sam_mask_stats, "postprocess_stats", broken)
    rc, out = _run(capsys, *ARGS, "--block-rows", "16")
    assert rc == 1
    assert "logits rel err above 1e-05: pallas rows 16 cols 128 warps 4" in out
