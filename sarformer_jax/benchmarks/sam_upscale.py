"""`sarformer bench sam_upscale`: the end of SAM's mask decoder alone (4x upscaling of each
prompt's image tokens and the product with its mask tokens), at the automatic generator's chunk
size: `MaskDecoder.upscale_masks` with the XLA "blocks" and "upstream" paths and with the fused
Pallas kernel over a sweep of launch settings, each checked against the float32 upstream path.

    sarformer bench sam_upscale --prompts 64 --block-l 32,64,128 --num-warps 4,8 --products rows,tensor
    python scripts/bench_sam_upscale.py

The generator decodes `points_per_batch` prompts per image at once, each with its own copy of
the 64 x 64 x 256 image tokens: one call here is one such chunk.  Times are medians of --iters
calls after --warmup, blocking on the output.  Paste the table into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import platform

import numpy as np

from sarformer_jax.benchmarks.timing import add_launch_arguments, int_list, median_time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", type=int, default=64, help="prompts per call (points_per_batch)")
    parser.add_argument("--tokens", type=int, default=64, help="image-token grid side (64 for SAM)")
    parser.add_argument("--masks", type=int, default=3, help="masks per prompt (3 in the generator)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    add_launch_arguments(parser)
    parser.add_argument("--direct", default="1,0",
                        help="comma list: 1 = stride-4 stores into the final masks (needs block_l | 64), "
                             "0 = sub-position planes + an XLA transpose")
    parser.add_argument("--products", default="rows,tensor",
                        help="comma list of the kernel's product forms: rows (mask dots as row sums) and/or "
                             "tensor (second conv and mask dots as tensor-core products, indexed stores)")
    parser.add_argument("--conv2-block-n", default="64",
                        help="comma list of row blocks for the 'blocks_pallas' conv2 kernel (empty: skip it)")
    parser.add_argument("--conv2-gelu", default="auto",
                        help="comma list of the conv2 kernel's GELU forms: auto (its default: poly in half "
                             "precision, else erf), erf, poly (multiply-adds only)")
    parser.add_argument("--conv2-fuse-norm", default="0",
                        help="comma list: 1 = the conv2 kernel also does the first conv's bias, LayerNorm and GELU")
    parser.add_argument("--conv2-per-program", default="1",
                        help="comma list of row blocks each conv2 program loops over (with --num-stages: "
                             "Triton's software pipelining of the loop)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-xla", action="store_true", help="time only the kernel")


def _decoder(dtype):
    """A mask decoder with random weights (the same for every dtype: same seed), its LayerNorm
    scale and bias moved off 1 and 0 so that they matter."""
    import jax.numpy as jnp

    from sarformer_jax.models.layers import init_rngs
    from sarformer_jax.sam.mask_decoder import MaskDecoder

    dec = MaskDecoder(rngs=init_rngs(0), dtype=None if dtype == jnp.float32 else dtype)
    norm = dec.output_upscaling[1]
    rng = np.random.default_rng(1)
    norm.scale[...] = jnp.asarray(1.0 + 0.1 * rng.normal(size=norm.scale.shape), jnp.float32)
    norm.bias[...] = jnp.asarray(0.1 * rng.normal(size=norm.bias.shape), jnp.float32)
    return dec


def run(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    on_gpu = jax.default_backend() == "gpu"
    dtype = jnp.dtype(args.dtype)
    c = 256
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.prompts, args.tokens, args.tokens, c)).astype(np.float32)
    hyper = rng.normal(size=(args.prompts, args.masks, c // 8)).astype(np.float32)

    def upscaler(implementation, dt, **settings):
        dec = _decoder(dt)
        dec.upscale_implementation = implementation
        graphdef, state = nnx.split(dec)
        f = jax.jit(lambda st, x, hy: nnx.merge(graphdef, st).upscale_masks(x, hy, **settings))
        xs, hs = jnp.asarray(x, dt), jnp.asarray(hyper, dt)
        return lambda: f(state, xs, hs)

    with jax.default_matmul_precision("highest"):
        ref = np.asarray(upscaler("upstream", jnp.float32)(), np.float64)
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
        for impl in ("blocks", "upstream"):
            timed(f"xla {impl}", upscaler(impl, dtype))
    kernel = "pallas" if on_gpu else "pallas_interpret"
    # XLA's first conv, LayerNorm and GELU, then the second half as one kernel (block_l -> block_n)
    conv2 = "blocks_pallas" if on_gpu else "blocks_pallas_interpret"
    gelus = [g.strip() for g in args.conv2_gelu.split(",") if g.strip()]
    for bn, nw, pp, ns, ge, fn in itertools.product(int_list(args.conv2_block_n), int_list(args.num_warps),
                                                    int_list(args.conv2_per_program), int_list(args.num_stages),
                                                    gelus, int_list(args.conv2_fuse_norm)):
        if pp == 1 and ns > 1:
            continue  # no loop to pipeline
        if ge == "poly" and dtype == jnp.float32:
            continue  # half precision only
        loop = f" x{pp} stages {ns}" if pp > 1 else ""
        name = f"blocks + pallas conv2 block_n {bn} warps {nw}{loop}{'' if ge == 'auto' else ' gelu ' + ge}"
        timed(name + (" + norm" if fn else ""),
              upscaler(conv2, dtype, block_n=bn, num_warps=nw, per_program=pp, num_stages=ns,
                       gelu=None if ge == "auto" else ge, fuse_norm=bool(fn)))
    products = [p.strip() for p in args.products.split(",") if p.strip()]
    for pr, bl, nw, ns in itertools.product(products, int_list(args.block_l), int_list(args.num_warps),
                                            int_list(args.num_stages)):
        for d in (int_list(args.direct) if pr == "rows" else [None]):
            if d and args.tokens % bl:
                continue
            layout = "" if d is None else (" direct" if d else " planes")
            timed(f"pallas {pr} block_l {bl} warps {nw} stages {ns}{layout}",
                  upscaler(kernel, dtype, block_l=bl, num_warps=nw, num_stages=ns,
                           direct=None if d is None else bool(d), products=pr))
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
    tol = 1e-2 if dtype == jnp.bfloat16 else 1e-5
    wrong = [name for name, ms, err in rows if err is not None and not err <= tol]
    if wrong:
        print(f"[sam_upscale] rel err above {tol:g} (the {args.dtype} tolerance): {', '.join(wrong)}")
    return 1 if wrong else 0
