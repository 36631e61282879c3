"""`sarformer bench point_select`: the loss's importance-sampling selection (the k most uncertain of
the candidate points), by method, vs PyTorch's `torch.topk`.

Mask2Former's point sampling keeps, per matched slot, the k = 0.75 * P candidates of 3 * P with
the smallest |logit|.  In the SARFormer-B step (112² points, 10 predictions, 2 images, the
loss's 32 capped slots) that is 640 rows of 37632 candidates, k = 9408, in one call.  This
times on that shape (or `--rows R --n N --k K`):
- `top_k`: `lax.top_k` (on a GPU a segmented radix sort of (key, index) pairs; the GPU default
  until session 33, now the CPU's on one device);
- `sort`: a stable argsort, the step's choice on CPUs when the batch is split over devices;
- `pallas[cC,rR,wW]`: `kernels.select_pallas.smallest_k_pallas` with chunk C, R radix bits per
  pass and W warps (`--pallas-configs C:R:W,...`);
- `torch topk`: what the original runs (`torch.topk(-|x|, k)`), when torch has CUDA.
Each JAX method's set is checked against `lax.top_k`'s (a mismatch is printed in the last column).
"""

from __future__ import annotations

import argparse
import datetime

import numpy as np

DEFAULT_CONFIGS = "512:3:4,1024:2:4,512:2:8,256:4:4,1024:1:4"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, default=640, help="rows (L x B x slots; default 640)")
    parser.add_argument("--n", type=int, default=37632, help="candidates per row (3 x 112²)")
    parser.add_argument("--k", type=int, default=9408, help="chosen per row (0.75 x 112²)")
    parser.add_argument("--methods", default="top_k,sort,pallas")
    parser.add_argument("--pallas-configs", default=DEFAULT_CONFIGS,
                        help="CHUNK:RADIX_BITS:WARPS,... for the pallas method "
                             f"(default {DEFAULT_CONFIGS})")
    parser.add_argument("--interpret", action="store_true",
                        help="the Pallas kernel in the interpreter (CPU checks of the bench)")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--no-torch", action="store_true")


def parse_configs(text: str) -> list[tuple[int, int, int]]:
    out = []
    for item in filter(None, text.split(",")):
        try:
            chunk, bits, warps = (int(v) for v in item.split(":"))
        except ValueError:
            raise ValueError(f"bench point_select: pallas config {item!r} is not CHUNK:RADIX_BITS:WARPS"
                             ) from None
        out.append((chunk, bits, warps))
    return out


def _fns(methods, configs, k: int, interpret: bool):
    import jax

    from sarformer_jax.kernels.select_pallas import smallest_k_pallas
    from sarformer_jax.losses import smallest_k

    fns = {}
    for m in methods:
        if m in ("top_k", "sort"):
            fns[m] = jax.jit(lambda x, m=m: smallest_k(x, k, m))
        elif m == "pallas":
            for chunk, bits, warps in configs:
                fns[f"pallas[c{chunk},r{bits},w{warps}]"] = jax.jit(
                    lambda x, c=chunk, r=bits, w=warps: smallest_k_pallas(
                        x, k, chunk=c, radix_bits=r, num_warps=w, interpret=interpret))
        else:
            raise ValueError(f"bench point_select: method {m!r} is not one of top_k, sort, pallas")
    return fns


def run(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp

    from sarformer_jax.benchmarks.msda import _time_jax

    methods = [m for m in args.methods.split(",") if m]
    fns = _fns(methods, parse_configs(args.pallas_configs), args.k, args.interpret)
    rng = np.random.default_rng(0)
    # |logits| of mask predictions: a spread of magnitudes, a few exact zeros
    x = np.abs(rng.standard_normal((args.rows, args.n)).astype(np.float32) * 3)
    x[:, ::997] = 0.0
    xj = jnp.asarray(x)
    want = np.sort(np.asarray(jax.lax.top_k(-xj, args.k)[1]), axis=-1)
    print(f"# select bench: device {jax.devices()[0].device_kind}, jax {jax.__version__}, "
          f"{datetime.date.today().isoformat()}; {args.rows} rows x {args.n}, k = {args.k}",
          flush=True)
    print("| method | ms | GB/s (keys read once) | same set as lax.top_k |", flush=True)
    print("|---|---|---|---|", flush=True)
    nbytes = x.size * 4
    for name, fn in fns.items():
        got = np.sort(np.asarray(fn(xj)), axis=-1)
        same = "yes" if np.array_equal(got, want) else f"NO ({int((got != want).sum())} differ)"
        t = _time_jax(fn, [xj], args.reps)
        print(f"| {name} | {t:.4f} | {nbytes / t / 1e6:.3g} | {same} |", flush=True)
    if not args.no_torch:
        _torch_row(x, args.k, nbytes)
    return 0


def _torch_row(x, k: int, nbytes: int):
    from sarformer_jax.benchmarks.timing import torch_cuda_peer

    peer = torch_cuda_peer()
    if isinstance(peer, str):
        print(f"| torch topk | ({peer}) | | |", flush=True)
        return
    torch, do_bench = peer
    xt = torch.from_numpy(x).cuda()
    t = do_bench(lambda: torch.topk(-xt, k, dim=1)[1], rep=200)
    print(f"| torch topk | {t:.4f} | {nbytes / t / 1e6:.3g} | |", flush=True)
