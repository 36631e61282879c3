"""`sarformer bench NAME ...`: dispatches to `sarformer_jax.benchmarks.NAME`.

Benchmarks measure speed on the device (and the peer in the same run); results go to
docs/benchmarks.md with command, device, date and jax version.  `scripts/bench_NAME.py` runs the
same code from a checkout.
"""

from __future__ import annotations

import argparse
import importlib
import sys

BENCHMARKS = {
    "msda": "multi-scale deformable attention: Pallas vs XLA vs torch grid_sample (vs CUDA peer)",
    "backbone": "BEiT-B / ViT-Adapter-B forward+backward vs timm",
    "sam": "SAM encoders and the automatic mask generator vs segment-anything",
    "sam_upscale": "SAM's mask upscaling head alone: XLA paths vs the fused Pallas kernel's launch settings",
    "sam_tokens": "SAM's two-way image-token update alone: XLA vs the fused Pallas kernel's launch settings",
    "sam_post": "SAM's mask post-processing alone: XLA taps vs the Pallas kernel's launch settings",
    "train": "SARFormer-B and Mask2Former train steps: step time, img/s, memory, MFU",
    "eval": "slide inference images/s, SARFormer-B vs Mask2Former",
    "data": "input pipeline images/s per CPU core",
    "matcher": "the step's Hungarian matchings on the device (while loops) vs scipy on the host",
    "scaling": "the sharded train step over 1..N GPUs: weak scaling and loss-trajectory equivalence",
    "gelu": "the exact GELU's elementwise pass by formula vs torch F.gelu",
    "colsum": "the parameter gradients' column sums by method (sum, blocks, GEMM with ones) vs torch",
    "resize": "the head's proposal resizes: whole-factor path vs float32 matrix products",
    "attention": "BEiT's biased attention by kernel: cuDNN with / without the bias gradient, XLA, jax's Pallas kernels, torch SDPA",
    "f32dot": "the step's float32-accurate products by method: HIGHEST vs bf16x6 / bf16x3 tensor-core products",
    "position_bias": "BEiT's relative position bias for cuDNN: XLA products + padding vs the Pallas kernel writing it padded",
    "point_select": "the loss's importance-sampling top-k: lax.top_k, sort, the Pallas radix select vs torch.topk",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark")
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments of the benchmark")


def run(args: argparse.Namespace) -> int:
    try:
        module = importlib.import_module(f"sarformer_jax.benchmarks.{args.name}")
    except ModuleNotFoundError as e:
        if e.name == f"sarformer_jax.benchmarks.{args.name}":
            print(f"sarformer bench {args.name}: not built yet in this version", file=sys.stderr)
            return 2
        raise
    parser = argparse.ArgumentParser(prog=f"sarformer bench {args.name}",
                                     description=BENCHMARKS[args.name])
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(args.bench_args)) or 0)
