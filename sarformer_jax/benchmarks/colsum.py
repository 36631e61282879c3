"""`sarformer bench colsum`: the parameter gradients' column sums, by method, vs PyTorch.

Every bias, LayerNorm scale and layer scale applied to all tokens of a batch gets its gradient
as a float32 sum over the tokens of a bf16 [n, c] cotangent (`layers.column_sum`).  In the
SARFormer-B step these are a few hundred small reductions (the backbone's took ~3.4 ms a step on
an H200, train run 27).  This times each method of `column_sum` ("sum", "blocks", "dot") on the step's shapes
(BEiT-B at 640², batch 2: n = 3202 tokens; the adapter's 16800), alone and as one BEiT layer's
group of sums in one program, and gives the read bandwidth (bytes of x over the time) and the
largest relative error against the float64 sum of the same values.  PyTorch's
`x.sum(0, dtype=torch.float32)` is timed beside them when torch has CUDA.
"""

from __future__ import annotations

import argparse
import datetime
import functools

import numpy as np

SHAPES = {
    "beit_768": (3202, 768),
    "beit_qkv": (3202, 2304),
    "beit_mlp": (3202, 3072),
    "adapter_768": (16800, 768),
}
# one BEiT-B layer's parameter sums: q/v bias (as 2 x 768 of the qkv cotangent's columns),
# proj bias, fc1 bias, fc2 bias, two LayerNorms (scale and bias each) and two layer scales
GROUP = [(3202, 1536), (3202, 768), (3202, 3072), (3202, 768)] + [(3202, 768)] * 6


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", default=",".join(SHAPES) + ",group",
                        help=f"comma list of {sorted(SHAPES)}, 'group' (one BEiT-B layer's sums) "
                             "or ROWSxCOLS")
    parser.add_argument("--methods", default="sum,blocks,dot")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--no-torch", action="store_true")


def _parse_shape(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"bench colsum: shape {text!r} is neither one of {sorted(SHAPES)}, 'group' "
                         "nor ROWSxCOLS") from None
    return rows, cols


def _inputs(shapes):
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    return [jnp.asarray(rng.standard_normal(s, np.float32) + 0.25, jnp.bfloat16) for s in shapes]


def _rel_err(got, xs) -> float:
    err = 0.0
    for g, x in zip(got, xs):
        want = np.asarray(x.astype(np.float32), np.float64).sum(0)
        err = max(err, float(np.abs(np.asarray(g, np.float64) - want).max() / np.abs(want).max()))
    return err


def run(args: argparse.Namespace) -> int:
    import jax

    from sarformer_jax.benchmarks.msda import _time_jax
    from sarformer_jax.models.layers import COLUMN_SUM_METHODS, column_sum

    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in COLUMN_SUM_METHODS:
            raise ValueError(f"bench colsum: method {m!r} is not one of {COLUMN_SUM_METHODS}")
    print(f"# colsum bench: device {jax.devices()[0].device_kind}, jax {jax.__version__}, "
          f"{datetime.date.today().isoformat()}", flush=True)
    print("| shape | method | ms | GB/s | max rel err vs float64 |", flush=True)
    print("|---|---|---|---|---|", flush=True)
    for name in filter(None, args.shapes.split(",")):
        shapes = GROUP if name == "group" else [SHAPES[name] if name in SHAPES else _parse_shape(name)]
        label = f"group ({len(GROUP)} sums)" if name == "group" else f"{name} {shapes[0]}"
        xs = _inputs(shapes)
        nbytes = sum(x.size * x.dtype.itemsize for x in xs)
        for m in methods:
            fn = jax.jit(lambda *xs, m=m: [column_sum(x, m) for x in xs])
            err = _rel_err(fn(*xs), xs)
            t = _time_jax(fn, xs, args.reps)
            print(f"| {label} | {m} | {t:.4f} | {nbytes / t / 1e6:.3g} | {err:.2e} |", flush=True)
        if not args.no_torch:
            _torch_row(label, xs, nbytes)
    return 0


def _torch_row(label, xs, nbytes):
    from sarformer_jax.benchmarks.timing import torch_cuda_peer

    peer = torch_cuda_peer()
    if isinstance(peer, str):
        print(f"| {label} | torch | ({peer}) | | |", flush=True)
        return
    torch, do_bench = peer
    xt = [torch.from_numpy(np.array(x.astype(np.float32))).to("cuda", torch.bfloat16) for x in xs]
    fn = functools.partial(lambda ts: [t.sum(0, dtype=torch.float32) for t in ts], xt)
    t = do_bench(fn, rep=200)
    print(f"| {label} | torch sum | {t:.4f} | {nbytes / t / 1e6:.3g} | |", flush=True)
