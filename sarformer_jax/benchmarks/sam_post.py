"""`sarformer bench sam_post`: SAM's mask post-processing alone at the automatic generator's
chunk size -- low-res logits resized to the image and reduced to what the generator keeps of
each candidate (stability score and box, `Sam.mask_stats`): the XLA "taps" path against the
Pallas kernel (kernels/sam_mask_stats.py) over a sweep of launch settings.  Each variant's
resized logits are checked against the float32 "matmul" path at HIGHEST precision.

    sarformer bench sam_post --prompts 64 --block-rows 32,64 --block-cols 64,128 --num-warps 4,8
    python scripts/bench_sam_post.py

One call is one chunk: `--images` images x `--prompts` prompts x 3 masks of 256² logits, to
`--size` (square, or HxW).  Times are medians of --iters calls after --warmup, blocking on the
output.  Paste the table into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import platform

import numpy as np

from sarformer_jax.benchmarks.timing import int_list, median_time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", type=int, default=64, help="prompts per image and call (points_per_batch)")
    parser.add_argument("--images", type=int, default=2, help="images per call")
    parser.add_argument("--size", default="640", help="image size: a side or HxW (the original image)")
    parser.add_argument("--low", type=int, default=256, help="low-res logits side (256 for SAM)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="dtype of the low-res logits")
    parser.add_argument("--block-rows", default="32", help="comma list of output rows per program")
    parser.add_argument("--block-cols", default="128", help="comma list of output columns per program")
    parser.add_argument("--num-warps", default="4", help="comma list of warps per program")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)


def _sam():
    from sarformer_jax.sam.build import build_sam

    return build_sam("vit_b", encoder_depth=1, global_attn_indexes=(0,))  # only img_size and the threshold matter


def run(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp

    from sarformer_jax.kernels.sam_mask_stats import postprocess_stats

    on_gpu = jax.default_backend() == "gpu"
    h, w = (int(v) for v in (args.size.split("x") if "x" in args.size else (args.size, args.size)))
    sam = _sam()
    s = sam.img_size
    scale = s / max(h, w)
    input_size = (int(h * scale + 0.5), int(w * scale + 0.5))
    rng = np.random.default_rng(0)
    low = jnp.asarray((rng.normal(size=(args.images, args.prompts * 3, args.low, args.low)) * 4).astype(np.float32),
                      jnp.dtype(args.dtype))
    offset = 1.0

    def stats_fn(impl):
        sam.postprocess_implementation = impl
        return jax.jit(lambda x: sam.mask_stats(x, input_size, (h, w), offset))

    sam.postprocess_implementation = "matmul"
    ref = np.asarray(jax.jit(lambda x: sam.postprocess_masks(x, input_size, (h, w)))(low), np.float64)
    rows = []

    def timed(name, stats, logits):
        try:
            out = np.asarray(logits(low), np.float64)
            jax.block_until_ready(stats(low))
        except Exception as e:  # a launch setting Triton cannot compile: report and go on
            print(f"[sam_post] {name}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
            rows.append((name, None, None))
            return
        err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
        ms = median_time(lambda: jax.block_until_ready(stats(low)), args.iters, args.warmup)[0] * 1e3
        print(f"[sam_post] {name}: {ms:.3f} ms per call, logits rel err {err:.2e} vs float32", flush=True)
        rows.append((name, ms, err))

    sam.postprocess_implementation = "taps"
    timed("xla taps", stats_fn("taps"), jax.jit(lambda x: sam.postprocess_masks(x, input_size, (h, w))))
    kw = dict(img_size=s, input_size=input_size, original_size=(h, w), interpret=not on_gpu)
    for br, bc, nw in itertools.product(int_list(args.block_rows), int_list(args.block_cols),
                                        int_list(args.num_warps)):
        launch = dict(block_rows=br, block_cols=bc, num_warps=nw)
        stats = jax.jit(lambda x, launch=launch: postprocess_stats(
            x, mode="stats", thresholds=(offset, -offset, 0.0), **launch, **kw))
        logits = jax.jit(lambda x, launch=launch: postprocess_stats(x, mode="logits", **launch, **kw))
        timed(f"pallas rows {br} cols {bc} warps {nw}", stats, logits)
    dev = jax.devices()[0]
    print(f"# sarformer bench sam_post  {datetime.date.today()}  jax {jax.__version__}  device {dev.device_kind}  "
          f"{args.images} images x {args.prompts} prompts x 3 masks, {args.low}² {args.dtype} -> {h}x{w}  "
          f"host {platform.node()}")
    print("| variant | ms per call | vs XLA taps | logits rel err vs float32 |\n|---|---|---|---|")
    xla = rows[0][1]
    for name, ms, err in rows:
        if ms is None:
            print(f"| {name} | failed | - | - |")
        else:
            print(f"| {name} | {ms:.3f} | {'-' if xla is None else f'{xla / ms:.2f}x'} | {err:.1e} |")
    wrong = [name for name, ms, err in rows if err is not None and not err <= 1e-5]
    if wrong:
        print(f"[sam_post] logits rel err above 1e-05: {', '.join(wrong)}")
    return 1 if wrong else 0
