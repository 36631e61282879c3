"""`sarformer bench resize`: the head's proposal resizes, whole-factor path vs matrix products.

Times `resize_bilinear` of uint8 proposals [B, Q, H, W] cast to float32 (as the head's mask
pooling and first attention mask do) to each target size, by the whole-factor path (the default
for in = k * out) and by the two float32 matrix products it replaced, in one process, with the
same inputs; checks that both give the same values.  Median over groups of back-to-back calls.
"""

from __future__ import annotations

import argparse
import datetime


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", default="2,100,640,640", help="B,Q,H,W of the proposals")
    parser.add_argument("--sizes", default="160,20", help="square target sizes")
    parser.add_argument("--reps", type=int, default=20)


def _by_matrices(x, size):
    from sarformer_jax.models.layers import resize_axis_by_matrix

    return resize_axis_by_matrix(resize_axis_by_matrix(x, 2, size[0]), 3, size[1])


def run(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sarformer_jax.benchmarks.msda import _time_jax
    from sarformer_jax.models.layers import resize_bilinear

    shape = tuple(int(v) for v in args.shape.split(","))
    print(f"# resize bench: device {jax.devices()[0].device_kind}, jax {jax.__version__}, "
          f"{datetime.date.today().isoformat()}, proposals {shape}", flush=True)
    masks = jnp.asarray(np.random.default_rng(0).integers(0, 2, shape, np.uint8))
    for s in (int(v) for v in args.sizes.split(",")):
        size = (s, s)
        new = jax.jit(lambda m, size=size: resize_bilinear(m.astype(jnp.float32), size, axes=(2, 3)))
        old = jax.jit(lambda m, size=size: _by_matrices(m.astype(jnp.float32), size))
        same = bool(jnp.array_equal(new(masks), old(masks)))
        t_new = _time_jax(new, (masks,), args.reps)
        t_old = _time_jax(old, (masks,), args.reps)
        print(f"| {shape[2]}x{shape[3]} -> {s}x{s} | whole-factor {t_new:.3f} ms | matrix products "
              f"{t_old:.3f} ms | {t_old / t_new:.1f}x | same values: {same} |", flush=True)
    return 0
