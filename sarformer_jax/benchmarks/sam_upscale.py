"""`sarformer bench sam_upscale`: the end of SAM's mask decoder alone (4x upscaling of each
prompt's image tokens and the product with its mask tokens), at the automatic generator's chunk
size, for the XLA "blocks" path, the XLA "upstream" path and the fused Pallas kernel over a
sweep of launch settings; the kernel's output is checked against the float32 XLA path.

    sarformer bench sam_upscale --prompts 64 --block-l 32,64,128 --num-warps 4,8
    python scripts/bench_sam_upscale.py

The generator decodes `points_per_batch` prompts per image at once, each with its own copy of
the 64 x 64 x 256 image tokens: one call here is one such chunk.  Times are medians of --iters
calls after --warmup, blocking on the output.  Paste the table into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import math
import platform

import numpy as np

from sarformer_jax.benchmarks.timing import median_time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", type=int, default=64, help="prompts per call (points_per_batch)")
    parser.add_argument("--tokens", type=int, default=64, help="image-token grid side (64 for SAM)")
    parser.add_argument("--masks", type=int, default=3, help="masks per prompt (3 in the generator)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--block-l", default="64", help="comma list of image tokens per program")
    parser.add_argument("--num-warps", default="4", help="comma list of warps per program")
    parser.add_argument("--num-stages", default="1", help="comma list of pipeline stages")
    parser.add_argument("--direct", default="1,0",
                        help="comma list: 1 = stride-4 stores into the final masks (needs block_l | 64), "
                             "0 = sub-position planes + an XLA transpose")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-xla", action="store_true", help="time only the kernel")


def _ints(s: str) -> list[int]:
    return [int(a) for a in s.split(",") if a.strip()]


def _weights(b, h, c, m, dtype):
    import jax.numpy as jnp

    c1, c2 = c // 4, c // 8
    rng = np.random.default_rng(0)
    shapes = [(b, h, h, c), (2, 2, c, c1), (c1,), (c1,), (c1,), (2, 2, c1, c2), (c2,), (b, m, c2)]
    a = [rng.normal(size=s).astype(np.float32) for s in shapes]
    a[1] /= math.sqrt(c)
    a[5] /= math.sqrt(c1)
    a[3] = 1.0 + 0.1 * a[3]
    return [jnp.asarray(v, dtype) for v in a]


def _layer_norm(y, g, be, eps=1e-6):
    import jax
    import jax.numpy as jnp

    y32 = y.astype(jnp.float32)
    mu = y32.mean(-1, keepdims=True)
    var = jnp.square(y32 - mu).mean(-1, keepdims=True)
    return ((y32 - mu) * jax.lax.rsqrt(var + eps) * g + be).astype(y.dtype)


def xla_blocks(x, w1, b1, g, be, w2, b2, hyper):
    """The decoder's "blocks" path: both transposed convs as blocks of their token, the masks
    interleaved at the end."""
    import jax
    import jax.numpy as jnp

    b, h, w, _ = x.shape
    y = jnp.einsum("bhwc,xyco->bhwxyo", x, w1) + b1
    y = jax.nn.gelu(_layer_norm(y, g, be), approximate=False)
    y = jnp.einsum("bhwc,xyco->bhwxyo", y.reshape(b, h, 4 * w, -1), w2) + b2
    y = jax.nn.gelu(y, approximate=False).reshape(b, h, w, 2, 2, 2, 2, -1)
    masks = jnp.einsum("bmc,bhwxyXYc->bmhxXwyY", hyper, y)
    return masks.reshape(b, hyper.shape[1], 4 * h, 4 * w)


def xla_upstream(x, w1, b1, g, be, w2, b2, hyper):
    """Upstream's order: each transposed conv interleaved to the full grid, then the product."""
    import jax
    import jax.numpy as jnp

    def up(v, k, bias):
        b, h, w, _ = v.shape
        return jnp.einsum("bhwc,xyco->bhxwyo", v, k).reshape(b, 2 * h, 2 * w, -1) + bias

    y = jax.nn.gelu(_layer_norm(up(x, w1, b1), g, be), approximate=False)
    y = jax.nn.gelu(up(y, w2, b2), approximate=False)
    return jnp.einsum("bmc,bhwc->bmhw", hyper, y)


def run(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp

    from sarformer_jax.kernels.sam_upscale import upscale_masks

    on_gpu = jax.default_backend() == "gpu"
    dtype = jnp.dtype(args.dtype)
    c = 256
    w = _weights(args.prompts, args.tokens, c, args.masks, dtype)
    with jax.default_matmul_precision("highest"):
        ref = np.asarray(jax.jit(xla_blocks)(*[v.astype(jnp.float32) for v in w]), np.float64)
    rows = []

    def timed(name, f):
        try:
            out = f()
            out.block_until_ready()
        except Exception as e:  # a launch setting Triton cannot compile: report and go on
            print(f"[sam_upscale] {name}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
            rows.append((name, None, None))
            return
        err = float(np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref))
        ms = median_time(lambda: f().block_until_ready(), args.iters, args.warmup)[0] * 1e3
        print(f"[sam_upscale] {name}: {ms:.3f} ms per call, rel err {err:.2e} vs float32", flush=True)
        rows.append((name, ms, err))

    if not args.no_xla:
        for name, fn in (("xla blocks", xla_blocks), ("xla upstream", xla_upstream)):
            jf = jax.jit(fn)
            timed(name, lambda jf=jf: jf(*w))
    for bl, nw, ns, d in itertools.product(_ints(args.block_l), _ints(args.num_warps), _ints(args.num_stages),
                                           _ints(args.direct)):
        if d and args.tokens % bl:
            continue
        kw = dict(block_l=bl, num_warps=nw, num_stages=ns, direct=bool(d), interpret=not on_gpu)
        # g, be and the biases stay float32 as the decoder passes them
        args_k = [w[0], w[1], *(v.astype(jnp.float32) for v in w[2:5]), w[5], w[6].astype(jnp.float32), w[7]]
        timed(f"pallas block_l {bl} warps {nw} stages {ns} {'direct' if d else 'planes'}", lambda kw=kw, a=args_k: upscale_masks(*a, **kw))
    dev = jax.devices()[0]
    print(f"# sarformer bench sam_upscale  {datetime.date.today()}  jax {jax.__version__}  device "
          f"{dev.device_kind}  dtype {args.dtype}  {args.prompts} prompts x {args.tokens}^2 x {c}, "
          f"{args.masks} masks  host {platform.node()}")
    best = min((r[1] for r in rows if r[1] is not None), default=None)
    print("| variant | ms per call | vs best | rel err vs float32 |\n|---|---|---|---|")
    for name, ms, err in rows:
        if ms is None:
            print(f"| {name} | failed | - | - |")
        else:
            print(f"| {name} | {ms:.3f} | {ms / best:.2f}x | {err:.1e} |")
    return 0
