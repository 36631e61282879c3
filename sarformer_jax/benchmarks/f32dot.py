"""`sarformer bench f32dot`: the step's float32-accurate products by `f32_dot_precision` method.

Times, at the SARFormer-B step's shapes, the two products that train run 37 found on the CUDA
cores at `Precision.HIGHEST` (22-31 TFLOP/s):
- `match`: the matching costs' product, [20, P, 2Q] x [20, P, K] over the points (10 layers x 2
  images, P = 12544, Q = 100, K = 150);
- `upscale`: the auxiliary logits' upscale along one axis ([640, 40] matrix x [2, 40, 40, 150])
  with its gradient (forward+backward).
For each method ("highest", "bf16x6", "bf16x3") the median time and the largest error against
float64 numpy relative to the largest exact value (the float32 rounding floor is ~1e-7).
"""

from __future__ import annotations

import argparse
import datetime

METHODS = ("highest", "bf16x6", "bf16x3")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {METHODS}")
    parser.add_argument("--points", type=int, default=12544, help="P of the matching product")
    parser.add_argument("--reps", type=int, default=20)


def _cases(points: int):
    import numpy as np

    rng = np.random.default_rng(0)
    lhs = (rng.normal(size=(20, points, 200)) * 3.0).astype(np.float32)
    tgt = rng.random((20, points, 150)).astype(np.float32)
    x = (rng.normal(size=(2, 40, 40, 150)) * 4.0).astype(np.float32)
    ct = rng.normal(size=(2, 640, 40, 150)).astype(np.float32)
    return {"match": (lhs, tgt), "upscale": (x, ct)}


def _exact(name, arrays):
    import numpy as np

    from sarformer_jax.models.layers import bilinear_matrix

    if name == "match":
        lhs, tgt = (a.astype(np.float64) for a in arrays)
        return [np.einsum("bpq,bpk->bqk", lhs, tgt)]
    x, ct = (a.astype(np.float64) for a in arrays)
    m = bilinear_matrix(40, 640).astype(np.float64)
    return [np.einsum("oi,bihk->bohk", m, x), np.einsum("oi,bohk->bihk", m, ct)]


def _fn(name, method):
    import jax

    from sarformer_jax.models.layers import f32_dot_precision, resize_axis_by_matrix

    prec = f32_dot_precision(method)
    if name == "match":
        return jax.jit(lambda a, b: [jax.lax.dot_general(a, b, (((1,), (1,)), ((0,), (0,))),
                                                         precision=prec)])

    def upscale(x, ct):
        out, vjp = jax.vjp(lambda x: resize_axis_by_matrix(x, 1, 640, method), x)
        return [out, vjp(ct)[0]]

    return jax.jit(upscale)


def run(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    from sarformer_jax.benchmarks.msda import _time_jax

    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"bench f32dot: method {m!r} is not one of {METHODS}")
    print(f"# f32dot bench: device {jax.devices()[0].device_kind}, jax {jax.__version__}, "
          f"{datetime.date.today().isoformat()}; P = {args.points}", flush=True)
    print("| product | method | ms | TFLOP/s | max error / max exact value |")
    print("|---|---|---|---|---|")
    for name, arrays in _cases(args.points).items():
        exact = _exact(name, arrays)
        flops = (2 * 20 * args.points * 200 * 150 if name == "match"
                 else 2 * 2 * 640 * 40 * 40 * 150 * 2)
        dev = [jax.device_put(a) for a in arrays]
        for m in methods:
            try:
                fn = _fn(name, m)
                got = fn(*dev)
                err = max(float(np.abs(np.asarray(g, np.float64) - e).max() / np.abs(e).max())
                          for g, e in zip(got, exact))
                ms = _time_jax(fn, dev, args.reps)
                print(f"| {name} | {m} | {ms:.4f} | {flops / ms / 1e9:.1f} | {err:.2e} |",
                      flush=True)
            except Exception as e:  # noqa: BLE001 -- one method's failure is its row
                print(f"| {name} | {m} | ({type(e).__name__}: {str(e)[:160]}) | | |", flush=True)
    return 0
