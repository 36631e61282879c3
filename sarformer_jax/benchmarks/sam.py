"""`sarformer bench sam`: SAM image encoders and the automatic mask generator, JAX vs
segment-anything (PyTorch, bf16 autocast) in one run on the same device, random weights.

    sarformer bench sam --models vit_b vit_h --dtype bfloat16
    python scripts/bench_sam.py --models vit_b

Reports: encoder ms/image at 1024^2 (batch 1); the whole automatic generator per image at 1024^2
(batch 1) and at SARFormer's 640^2 crops (batch 2), JAX `generate_masks` (one jit) vs upstream
`SamAutomaticMaskGenerator.generate`.  Times are medians of --iters runs after --warmup runs;
JAX timings block on the outputs.  Paste the table into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import platform

import numpy as np

from sarformer_jax.benchmarks.timing import median_time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=["vit_b", "vit_h"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer")
    parser.add_argument("--amg-model", default="vit_b", help="model for the generator benchmark")
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--attention", default="auto",
                        help="comma list of image-encoder attention implementations to time "
                             "(auto, xla, cudnn); the generator uses the first")
    parser.add_argument("--no-amg", action="store_true", help="encoders only")
    parser.add_argument("--postprocess", default="matmul",
                        help="comma list of mask post-processing implementations to time in the "
                             "generator (matmul, taps: see Sam.postprocess_implementation)")


def _time(fn, iters: int, warmup: int) -> float:
    """Median milliseconds per call."""
    return median_time(fn, iters, warmup)[0] * 1e3


def _jax_encoder(model_type, dtype, iters, warmup, attention=None):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sarformer_jax.models.layers import init_rngs
    from sarformer_jax.sam import build_sam

    sam = build_sam(model_type, rngs=init_rngs(0), dtype=jnp.dtype(dtype),
                    attention_implementation=attention)
    graphdef, state = nnx.split(sam)
    f = jax.jit(lambda st, x: nnx.merge(graphdef, st).image_encoder(x)[0])
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 1024, 1024, 3)), jnp.float32)
    return _time(lambda: f(state, x).block_until_ready(), iters, warmup)


def _torch_sam(model_type):
    import torch
    from segment_anything import sam_model_registry

    return sam_model_registry[model_type]().cuda().eval() if torch.cuda.is_available() else sam_model_registry[model_type]().eval()


def _torch_encoder(model_type, dtype, iters, warmup):
    import torch

    sam = _torch_sam(model_type)
    dev = next(sam.parameters()).device
    x = torch.randn(1, 3, 1024, 1024, device=dev)

    def run():
        with torch.no_grad(), torch.autocast(dev.type, dtype=getattr(torch, dtype), enabled=dtype != "float32"):
            sam.image_encoder(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    return _time(run, iters, warmup)


def _images(size, batch):
    from skimage import data, transform

    img = transform.resize(data.astronaut(), (size, size), preserve_range=True).astype(np.uint8)
    return np.stack([img if i % 2 == 0 else img[:, ::-1] for i in range(batch)])


def _jax_amg(model_type, dtype, size, batch, pps, iters, warmup, attention=None,
             postprocess="matmul"):
    import jax.numpy as jnp
    from sarformer_jax.models.layers import init_rngs

    from sarformer_jax.sam import build_sam
    from sarformer_jax.sam.automatic_mask_generator import generate_masks

    sam = build_sam(model_type, rngs=init_rngs(0), dtype=jnp.dtype(dtype),
                    attention_implementation=attention)
    sam.postprocess_implementation = postprocess
    images = jnp.asarray(_images(size, batch))
    run = lambda: generate_masks(sam, images, points_per_side=pps)["masks"].block_until_ready()
    return _time(run, iters, warmup) / batch


def _torch_amg(model_type, dtype, size, batch, pps, iters, warmup):
    import torch
    from segment_anything import SamAutomaticMaskGenerator

    sam = _torch_sam(model_type)
    gen = SamAutomaticMaskGenerator(sam, points_per_side=pps)
    images = _images(size, batch)

    # upstream's generator cannot run under bf16 autocast (its MaskData.to_numpy() fails on
    # bfloat16 tensors), so the peer's generator runs in float32: the fastest way it works
    del dtype

    def run():
        with torch.no_grad():
            for im in images:
                gen.generate(im)

    return _time(run, max(1, iters // 3), 1) / batch


def run(args: argparse.Namespace) -> int:
    import jax

    rows = []

    def add(name, j, t):
        rows.append((name, j, t))
        print(f"[sam] {name}: JAX {j:.1f} ms, PyTorch {'-' if t is None else f'{t:.1f} ms'}", flush=True)

    impls = [a.strip() for a in args.attention.split(",") if a.strip()]
    for m in args.models:
        t = None if args.no_torch else _torch_encoder(m, args.dtype, args.iters, args.warmup)
        for impl in impls:
            j = _jax_encoder(m, args.dtype, args.iters, args.warmup, impl)
            add(f"encoder {m} 1024^2 b1 ({args.dtype}, attention {impl}; torch autocast)", j, t)
    posts = [a.strip() for a in args.postprocess.split(",") if a.strip()]
    for size, batch in (() if args.no_amg else ((1024, 1), (640, 2))):
        t = None if args.no_torch else _torch_amg(args.amg_model, args.dtype, size, batch, args.points_per_side,
                                                  args.iters, args.warmup)
        for post in posts:
            j = _jax_amg(args.amg_model, args.dtype, size, batch, args.points_per_side, args.iters,
                         args.warmup, impls[0], post)
            add(f"AMG {args.amg_model} {size}^2 b{batch} ({args.points_per_side}^2 pts), per image "
                f"(JAX {args.dtype}, post-processing {post}; torch float32)", j, t)
    dev = jax.devices()[0]
    print(f"# sarformer bench sam  {datetime.date.today()}  jax {jax.__version__}  device {dev.device_kind}  "
          f"dtype {args.dtype}  host {platform.node()}")
    print("| case | JAX ms | PyTorch ms | speed-up |\n|---|---|---|---|")
    for name, j, t in rows:
        print(f"| {name} | {j:.1f} | {'-' if t is None else f'{t:.1f}'} | {'-' if t is None else f'{t / j:.1f}x'} |")
    return 0
