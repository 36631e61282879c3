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
import itertools
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
                             "(auto, xla, cudnn, cudnn_narrow_v); the generator uses the first")
    parser.add_argument("--no-amg", action="store_true", help="encoders only")
    parser.add_argument("--encoder-weights", default="held",
                        help="comma list: 'held' (Linear / Conv weights held in the compute dtype, "
                             "Sam.inference_state(), as the predictor runs), 'float32' (cast at every call)")
    parser.add_argument("--postprocess", default="auto",
                        help="comma list of mask post-processing implementations to time in the "
                             "generator (auto, matmul, taps, pallas: see Sam.postprocess_implementation)")
    parser.add_argument("--upscale", default="auto",
                        help="comma list of mask-decoder upscaling implementations to time in the "
                             "generator (auto, upstream, blocks, blocks_pallas, pallas, pallas:rows, "
                             "pallas:tensor: see "
                             "MaskDecoder.upscale_implementation and upscale_products)")
    parser.add_argument("--decoder-attention", default="auto",
                        help="comma list of mask-decoder cross-attention implementations to time in "
                             "the generator (auto, upstream, absorbed, absorbed_pallas: see "
                             "TwoWayTransformer.attention_implementation)")
    parser.add_argument("--points-per-batch", default="64",
                        help="comma list of generator chunk sizes (prompts per image decoded at "
                             "once; the results do not depend on it, the memory does)")
    parser.add_argument("--amg-cases", default="1024x1,640x2",
                        help="comma list of generator cases SIZExBATCH (square images)")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="trace 3 calls of each encoder and generator case into DIR and print "
                             "their GPU kernels by SAM scope (encoder, mask decoder, post-processing, "
                             "NMS)")
    parser.add_argument("--pred-iou-thresh", type=float, default=0.88,
                        help="the generator's IoU threshold (upstream's default 0.88)")
    parser.add_argument("--skip-low-iou", default="0",
                        help="comma list of 0 / 1: the generator with AmgSettings.skip_low_iou off "
                             "and / or on (upscale only the prompts with a mask over the IoU "
                             "threshold; --stages prints the share of prompts that pass)")
    parser.add_argument("--stages", action="store_true",
                        help="also time the generator's stages separately (encoder; decoding "
                             "with post-processing, stability and boxes; NMS and the kept "
                             "masks), each as its own jit")


def _time(fn, iters: int, warmup: int) -> float:
    """Median milliseconds per call."""
    return median_time(fn, iters, warmup)[0] * 1e3


def _profile(trace_dir: str, compiled_hlo: str, run, name: str) -> None:
    """Trace three calls of `run` into `trace_dir` and print where the GPU time went."""
    import gzip
    import os

    import jax

    from sarformer_jax.benchmarks import profile as prof

    os.makedirs(trace_dir, exist_ok=True)
    with gzip.open(os.path.join(trace_dir, "compiled_hlo.txt.gz"), "wt") as f:
        f.write(compiled_hlo)  # to map the profile's fusion names back to ops
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    for _ in range(3):
        run()
    jax.profiler.stop_trace()
    prof.print_summary(prof.summarize(trace_dir, compiled_hlo, steps=3), name)


def _jax_encoder(model_type, dtype, iters, warmup, attention=None, profile=None, weights="held"):
    """(blocking ms, pipelined ms) of the image encoder at 1024² b1.  `weights`: "held" runs on
    `Sam.inference_state()` (Linear / Conv weights held in the compute dtype, as the predictor
    and the generators do), "float32" on the float32 parameters cast at every call."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sarformer_jax.benchmarks.timing import pipelined_time
    from sarformer_jax.models.layers import init_rngs
    from sarformer_jax.sam import build_sam

    sam = build_sam(model_type, rngs=init_rngs(0), dtype=jnp.dtype(dtype),
                    attention_implementation=attention)
    if weights not in ("held", "float32"):
        raise ValueError(f"encoder weights {weights!r}: choose 'held' or 'float32'")
    graphdef, state = nnx.graphdef(sam), (sam.inference_state() if weights == "held" else nnx.state(sam))
    f = jax.jit(lambda st, x: nnx.merge(graphdef, st).image_encoder(x)[0])
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 1024, 1024, 3)), jnp.float32)
    run = lambda: f(state, x).block_until_ready()
    ms = _time(run, iters, warmup)
    out = []
    piped = pipelined_time(lambda: out.append(f(state, x)), lambda: (jax.block_until_ready(out), out.clear()),
                           iters)[0] * 1e3
    if profile:
        import os

        _profile(os.path.join(profile, f"encoder_{model_type}_{attention}_{weights}"),
                 f.lower(state, x).compile().as_text(), run, f"encoder {model_type} {attention} {weights}")
    return ms, piped


def _torch_sam(model_type):
    import torch
    from segment_anything import sam_model_registry

    return sam_model_registry[model_type]().cuda().eval() if torch.cuda.is_available() else sam_model_registry[model_type]().eval()


def _torch_encoder(model_type, dtype, iters, warmup):
    import torch

    sam = _torch_sam(model_type)
    dev = next(sam.parameters()).device
    x = torch.randn(1, 3, 1024, 1024, device=dev)

    def dispatch():
        with torch.no_grad(), torch.autocast(dev.type, dtype=getattr(torch, dtype), enabled=dtype != "float32"):
            sam.image_encoder(x)

    def wait():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def run():
        dispatch()
        wait()

    from sarformer_jax.benchmarks.timing import pipelined_time

    return _time(run, iters, warmup), pipelined_time(dispatch, wait, iters)[0] * 1e3


def _images(size, batch):
    from skimage import data, transform

    img = transform.resize(data.astronaut(), (size, size), preserve_range=True).astype(np.uint8)
    return np.stack([img if i % 2 == 0 else img[:, ::-1] for i in range(batch)])


def _jax_amg(model_type, dtype, size, batch, pps, iters, warmup, attention=None,
             postprocess="matmul", ppb=64, stages=False, profile=None, upscale="upstream",
             decoder_attention="upstream", pred_iou_thresh=0.88, skip_low_iou=False):
    """Median ms per image of `generate_masks`; with `stages`, also a dict of per-stage ms per
    image (each stage jitted alone, so their sum includes extra dispatches and copies)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sarformer_jax.models.layers import init_rngs
    from sarformer_jax.sam import amg, build_sam
    from sarformer_jax.sam import automatic_mask_generator as gen
    from sarformer_jax.sam.transforms import get_preprocess_shape, resize_uint8

    sam = build_sam(model_type, rngs=init_rngs(0), dtype=jnp.dtype(dtype),
                    attention_implementation=attention)
    sam.postprocess_implementation = postprocess
    sam.mask_decoder.upscale_implementation, _, products = upscale.partition(":")
    if products:  # "pallas:tensor": the kernel's product form
        sam.mask_decoder.upscale_products = products
    sam.mask_decoder.transformer.attention_implementation = decoder_attention
    images = jnp.asarray(_images(size, batch))
    generate = gen.mask_generator(sam, points_per_side=pps, points_per_batch=ppb,  # split once
                                  pred_iou_thresh=pred_iou_thresh, skip_low_iou=skip_low_iou)
    run = lambda: generate(images)["masks"].block_until_ready()
    total = _time(run, iters, warmup) / batch
    graphdef, state = nnx.split(sam)
    s = gen.AmgSettings(points_per_side=pps, points_per_batch=ppb,
                        pred_iou_thresh=float(pred_iou_thresh), skip_low_iou=bool(skip_low_iou))
    if profile:
        import os

        name = f"amg_{size}x{batch}_{postprocess}_ppb{ppb}_{upscale}_{decoder_attention}"
        hlo = gen._generate.lower(graphdef, state, images, None, s, False).compile().as_text()
        _profile(os.path.join(profile, name), hlo, run, name)
    if not stages:
        return total, None
    input_size = get_preprocess_shape(size, size, sam.img_size)
    grid = amg.build_point_grid(pps)
    enc = jax.jit(lambda st, im: nnx.merge(graphdef, st).embed_image(resize_uint8(im, input_size)))
    cand = jax.jit(lambda st, e: gen._candidates(nnx.merge(graphdef, st), images, grid, s, emb=e))

    def select(st, c):
        m = nnx.merge(graphdef, st)
        out = gen._select(m, c, s, (size, size), s.max_masks)
        return m.threshold_masks(out["low_res"], input_size, (size, size))

    select = jax.jit(select)
    emb = enc(state, images)
    c = cand(state, emb)
    times = {
        "encoder": _time(lambda: enc(state, images).block_until_ready(), iters, warmup),
        "decode + post-process + stability + boxes": _time(
            lambda: jax.block_until_ready(cand(state, emb)), iters, warmup),
        "NMS + kept masks": _time(lambda: select(state, c).block_until_ready(), iters, warmup),
    }
    kept = float(jnp.mean(jnp.sum(c["valid"], axis=1)))
    n_pts = grid.shape[0]
    best = c["iou"].reshape(batch, -1, 3)[:, :n_pts].max(-1)
    passing = float(jnp.mean(best > pred_iou_thresh))
    print(f"[sam] stages ({size}^2 b{batch}, ppb {ppb}, {postprocess}, upscale {upscale}, attention {decoder_attention}, "
          f"skip_low_iou {bool(skip_low_iou)}; prompts with a mask over IoU {pred_iou_thresh}: {100 * passing:.1f} %; "
          f"candidates passing the thresholds per image: {kept:.0f} of {c['valid'].shape[1]}): "
          + ", ".join(f"{k} {v / batch:.1f} ms/img" for k, v in times.items()), flush=True)
    return total, {k: v / batch for k, v in times.items()}


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
    weights = [a.strip() for a in args.encoder_weights.split(",") if a.strip()]
    for m in args.models:
        t = (None, None) if args.no_torch else _torch_encoder(m, args.dtype, args.iters, args.warmup)
        for impl, w in itertools.product(impls, weights):
            j = _jax_encoder(m, args.dtype, args.iters, args.warmup, impl, args.profile, w)
            for i, mode in enumerate(("blocking", "pipelined")):
                add(f"encoder {m} 1024^2 b1 ({args.dtype}, attention {impl}, weights {w}, {mode}; "
                    f"torch autocast)", j[i], t[i])
    posts = [a.strip() for a in args.postprocess.split(",") if a.strip()]
    ppbs = [int(a) for a in args.points_per_batch.split(",") if a.strip()]
    ups = [a.strip() for a in args.upscale.split(",") if a.strip()]
    dec_atts = [a.strip() for a in args.decoder_attention.split(",") if a.strip()]
    cases = [tuple(int(v) for v in c.lower().split("x")) for c in args.amg_cases.split(",") if c.strip()]
    skips = []
    for v in (a.strip() for a in args.skip_low_iou.split(",") if a.strip()):
        if v not in ("0", "1"):
            raise SystemExit(f"--skip-low-iou {args.skip_low_iou!r}: a comma list of 0 and 1")
        skips.append(v == "1")
    stage_rows = []
    for size, batch in (() if args.no_amg else cases):
        t = None if args.no_torch else _torch_amg(args.amg_model, args.dtype, size, batch, args.points_per_side,
                                                  args.iters, args.warmup)
        for post, ppb, up, da, skip in itertools.product(posts, ppbs, ups, dec_atts, skips):
            j, st = _jax_amg(args.amg_model, args.dtype, size, batch, args.points_per_side, args.iters,
                             args.warmup, impls[0], post, ppb, args.stages, args.profile, up, da,
                             args.pred_iou_thresh, skip)
            tag = f", IoU threshold {args.pred_iou_thresh}" + (", skip_low_iou" if skip else "")
            add(f"AMG {args.amg_model} {size}^2 b{batch} ({args.points_per_side}^2 pts), per image "
                f"(JAX {args.dtype}, post-processing {post}, {ppb} points per batch, upscaling {up}, "
                f"decoder attention {da}{tag}; torch float32)", j, t)
            if st:
                stage_rows.append((f"{size}^2 b{batch}, {post}, ppb {ppb}, upscaling {up}, attention {da}{tag}", st))
    dev = jax.devices()[0]
    print(f"# sarformer bench sam  {datetime.date.today()}  jax {jax.__version__}  device {dev.device_kind}  "
          f"dtype {args.dtype}  host {platform.node()}")
    print("| case | JAX ms | PyTorch ms | speed-up |\n|---|---|---|---|")
    for name, j, t in rows:
        print(f"| {name} | {j:.1f} | {'-' if t is None else f'{t:.1f}'} | {'-' if t is None else f'{t / j:.1f}x'} |")
    if stage_rows:
        names = list(stage_rows[0][1])
        print("\n| generator stages, ms per image | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
        for name, st in stage_rows:
            print(f"| {name} | " + " | ".join(f"{st[k]:.1f}" for k in names) + " |")
    return 0
