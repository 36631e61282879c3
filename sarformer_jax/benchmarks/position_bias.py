"""`sarformer bench position_bias`: BEiT's relative position bias for cuDNN, XLA path vs the
Pallas kernel.

One layer's bias as the SARFormer-B step builds it for cuDNN's fused attention (default: 40 x 40
token grid, 12 heads, bf16, padded to 1602 x 1602), from its float32 table:
- `xla`: `beit.relative_position_bias` (two one-hot products, the query-major transpose, the cls
  row and column) then `layers.pad_for_cudnn`'s padding, as `model.backbone.position_bias=xla`;
- `pallas`: `relative_position_bias(..., implementation="pallas", pad_even=True)`, one kernel
  writing the padded bias (`kernels/position_bias_pallas.py`), as `position_bias=pallas`.
Forward (the bias) and forward+backward (the table's gradient from a cotangent of the bias's
shape; the backward is the same two products in both), median ms, the forward's write rate, and
whether the two biases agree bit for bit.  On the CPU only `pallas_interpret` runs the kernel
(`--impls xla,pallas_interpret`, small grids)."""

from __future__ import annotations

import argparse
import datetime

IMPLS = ("xla", "pallas", "pallas_interpret")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--impls", default="xla,pallas", help=f"comma list of {IMPLS}")
    parser.add_argument("--grid", type=int, nargs=2, default=(40, 40), metavar=("H", "W"))
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--reps", type=int, default=20)


def _bias_fn(impl: str, grid, dtype):
    import jax.numpy as jnp

    from sarformer_jax.models.beit import relative_position_bias
    from sarformer_jax.models.layers import pad_for_cudnn

    if impl == "xla":
        def bias(table):
            b = relative_position_bias(table, grid, dtype)
            q = jnp.zeros((1, b.shape[-1], b.shape[0], 8), dtype)
            return pad_for_cudnn(q, q, q, b[None])[3][0]
        return bias
    return lambda table: relative_position_bias(table, grid, dtype, implementation=impl,
                                                pad_even=True)


def run(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sarformer_jax.benchmarks.msda import _time_jax

    impls = [i for i in args.impls.split(",") if i]
    for i in impls:
        if i not in IMPLS:
            raise ValueError(f"bench position_bias: implementation {i!r} is not one of {IMPLS}")
    h, w = (int(g) for g in args.grid)
    n = int(args.heads)
    dtype = jnp.dtype(args.dtype)
    rows = (2 * h - 1) * (2 * w - 1) + 3
    rng = np.random.default_rng(0)
    table = jax.device_put(jnp.asarray(rng.normal(size=(rows, n)), jnp.float32))
    t = 1 + h * w
    t_out = t + t % 2
    ct = jax.device_put(jnp.asarray(rng.normal(size=(n, t_out, t_out)), dtype))
    out_bytes = n * t_out * t_out * dtype.itemsize
    print(f"# position_bias bench: device {jax.devices()[0].device_kind}, jax {jax.__version__}, "
          f"{datetime.date.today().isoformat()}; grid {h}x{w}, {n} heads, {dtype.name}, bias "
          f"[{n}, {t_out}, {t_out}] ({out_bytes / 1e6:.1f} MB)", flush=True)
    print("| implementation | forward ms | write GB/s | fwd+bwd ms | equals the first row |")
    print("|---|---|---|---|---|")
    first = None
    for impl in impls:
        try:
            fn = _bias_fn(impl, (h, w), dtype)
            fwd = jax.jit(fn)

            def fwd_bwd(table, ct, fn=fn):
                out, vjp = jax.vjp(fn, table)
                return out, vjp(ct)[0]

            fwd_bwd = jax.jit(fwd_bwd)
            got = np.asarray(fwd(table), np.float32)
            same = "-" if first is None else ("yes" if np.array_equal(got, first) else "NO")
            first = got if first is None else first
            ms = _time_jax(fwd, (table,), args.reps)
            ms_b = _time_jax(fwd_bwd, (table, ct), args.reps)
            print(f"| {impl} | {ms:.4f} | {out_bytes / ms / 1e6:.0f} | {ms_b:.4f} | {same} |",
                  flush=True)
        except Exception as e:  # noqa: BLE001 -- one implementation's failure is its row
            print(f"| {impl} | ({type(e).__name__}: {str(e)[:160]}) | | | |", flush=True)
    return 0
