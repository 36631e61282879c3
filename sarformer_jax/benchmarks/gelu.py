"""`sarformer bench gelu`: the exact GELU's elementwise pass, by formula, vs PyTorch.

Times `gelu` formulas on the shapes where the step runs them as separate memory passes (SAM's
upscaling head: the second GELU over [2097152, 128] and the first over [2097152, 64] per
generator chunk of 128 prompts; BEiT-B's MLP hidden [3200, 3072], forward and forward+backward),
bf16 in and out with float32 math, against PyTorch's `F.gelu` (exact) on the same device when
torch has CUDA.  Each row also gives the pass's bandwidth (bytes in + out over the time) and
the largest error against the float64 exact GELU of the same inputs.

Formulas: `erf` (XLA's float32 erf, `layers.gelu`), `tanh` (the tanh approximation: not
exact, only a speed reference) and `copy` (2x: the bandwidth ceiling of a pass with the same
bytes).  A rational erf of our own (x P(x^2) / Q(x^2), by division or with 1/Q as rsqrt(Q)^2)
was slower than XLA's erf on an H200 and was removed (docs/benchmarks.md, GELU run 1).
"""

from __future__ import annotations

import argparse
import datetime

import numpy as np

SHAPES = {
    "sam_up2": (2097152, 128),
    "sam_up1": (2097152, 64),
    "beit_mlp": (3200, 3072),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", default=",".join(SHAPES),
                        help=f"comma list of {sorted(SHAPES)} or ROWSxCOLS")
    parser.add_argument("--formulas", default="erf,tanh,copy")
    parser.add_argument("--grad-shapes", default="beit_mlp", help="shapes also timed forward+backward")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--no-torch", action="store_true")


def formula(name: str):
    import jax
    import jax.numpy as jnp

    from sarformer_jax.models import layers

    def f32(fn):
        return lambda x: fn(x.astype(jnp.float32)).astype(x.dtype)

    if name == "erf":
        return layers.gelu
    if name == "tanh":
        return f32(lambda x: jax.nn.gelu(x, approximate=True))
    if name == "copy":
        return f32(lambda x: 2.0 * x)
    raise ValueError(f"unknown formula {name!r}")


def _parse_shape(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"bench gelu: shape {text!r} is neither one of {sorted(SHAPES)} nor ROWSxCOLS") from None
    return rows, cols


def run(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp
    from scipy.special import erf as erf64

    from sarformer_jax.benchmarks.msda import _time_jax

    print(f"# gelu bench: device {jax.devices()[0].device_kind}, jax {jax.__version__}, "
          f"{datetime.date.today().isoformat()}", flush=True)
    print("| shape | formula | fwd ms | GB/s | fwd+bwd ms | max abs err vs float64 |", flush=True)
    print("|---|---|---|---|---|---|", flush=True)
    grad_shapes = set(filter(None, args.grad_shapes.split(",")))
    for shape_name in args.shapes.split(","):
        shape = SHAPES[shape_name] if shape_name in SHAPES else _parse_shape(shape_name)
        x = jnp.asarray(np.random.default_rng(0).standard_normal(shape, np.float32) * 2.0, jnp.bfloat16)
        x64 = np.asarray(x.astype(jnp.float32), np.float64)
        exact = 0.5 * x64 * (1.0 + erf64(x64 / np.sqrt(2.0)))
        nbytes = 2 * x.size * x.dtype.itemsize
        for name in args.formulas.split(","):
            fn = formula(name)
            fwd = jax.jit(fn)
            err = float(np.abs(np.asarray(jax.jit(lambda v: fn(v.astype(jnp.float32)))(x), np.float64)
                               - exact).max()) if name != "copy" else float("nan")
            t = _time_jax(fwd, (x,), args.reps)
            tb = ""
            if shape_name in grad_shapes:
                g = jax.jit(jax.grad(lambda v: jnp.sum(fn(v).astype(jnp.float32) * 1e-3)))
                tb = f"{_time_jax(g, (x,), args.reps):.3f}"
            print(f"| {shape_name} {shape} | {name} | {t:.3f} | {nbytes / t / 1e6:.3g} | {tb} | {err:.2e} |",
                  flush=True)
        if not args.no_torch:
            _torch_row(shape_name, shape, x, nbytes, args.reps, shape_name in grad_shapes)
    return 0


def _torch_row(shape_name, shape, x, nbytes, reps, grad):
    from sarformer_jax.benchmarks.timing import torch_cuda_peer

    peer = torch_cuda_peer()
    if isinstance(peer, str):
        print(f"| {shape_name} {shape} | torch | ({peer}) | | | |", flush=True)
        return
    torch, do_bench = peer
    import torch.nn.functional as F
    xt = torch.from_numpy(np.array(x.astype(np.float32))).to("cuda", torch.bfloat16)
    t = do_bench(lambda: F.gelu(xt), rep=200)
    tb = ""
    if grad:
        xg = xt.clone().requires_grad_(True)
        tb = f"{do_bench(lambda: torch.autograd.grad((F.gelu(xg).float() * 1e-3).sum(), xg), rep=200):.3f}"
    print(f"| {shape_name} {shape} | torch F.gelu | {t:.3f} | {nbytes / t / 1e6:.3g} | {tb} | |", flush=True)
