"""`sarformer bench data`: training input throughput (images/s per CPU core) from full-size JPEGs.

Per-core figure: one process, no read-ahead threads, timing `TrainRecord` (read + decode +
RandomResize + RandomCrop(cat_max_ratio) + flip + PhotoMetricDistortion + pad, and the proposal
warp and bit packing when --proposals; the image stays uint8, as the loader ships it, and is
normalised on the device).  Loader figure: the grain loader with --workers processes.
The input never stalls training if  cores * per_core >= global_batch / step_time  per host.

  sarformer bench data                         # synthetic 512x683 JPEGs, the ADE20K-B config
  sarformer bench data --root /data/ADEChallengeData2016 --dataset ade20k
  sarformer bench data --step-time 0.45 --global-batch 16 --cores 16
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="ade20k_sarformer_b", help="config (crop, scale)")
    parser.add_argument("--root", default="", help="dataset root; empty: synthetic JPEGs")
    parser.add_argument("--dataset", default="ade20k")
    parser.add_argument("--size", default="512x683", help="synthetic image HxW (ADE20K median)")
    parser.add_argument("--num-images", type=int, default=48, help="synthetic images written")
    parser.add_argument("--records", type=int, default=64, help="records timed per core")
    parser.add_argument("--proposals", action="store_true", help="cached guidance (Q masks)")
    parser.add_argument("--workers", type=int, default=0, help="also time the loader with N")
    parser.add_argument("--batches", type=int, default=12, help="loader batches timed")
    parser.add_argument("--step-time", type=float, default=0.0, help="train step seconds")
    parser.add_argument("--global-batch", type=int, default=0, help="images per step (all hosts)")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="cores per host")
    parser.add_argument("--hosts", type=int, default=1)


def _config(args, root):
    from sarformer_jax.config import load_config

    cfg = load_config(args.config)
    cfg.data.update(dataset=args.dataset, root=root, num_workers=args.workers)
    cfg.guidance.source = "cached" if args.proposals else "none"
    cfg.guidance.cache_dir = os.path.join(root, "proposals")
    if args.dataset == "ade20k" and not args.root:
        cfg.data.num_classes = 8  # the synthetic set's classes, with reduce_zero_label
    return cfg


def run(args: argparse.Namespace) -> int:
    import cv2

    from sarformer_jax.data import pipeline, synthetic

    tmp = None
    root = args.root
    if not root:
        tmp = tempfile.TemporaryDirectory(prefix="bench_data_")
        root = tmp.name
        h, w = (int(v) for v in args.size.split("x"))
        t0 = time.perf_counter()
        synthetic.generate(root, num_train=args.num_images, num_val=0, image_size=(h, w),
                           num_classes=8, seed=0)
        print(f"wrote {args.num_images} synthetic {h}x{w} JPEGs in "
              f"{time.perf_counter() - t0:.1f} s")
    cfg = _config(args, root)
    source = pipeline.build_source(cfg, "training")
    record = pipeline.TrainRecord(source, cfg, normalize_image=False, compact_label=True)
    rng = np.random.default_rng(0)
    record(0, rng)  # warm caches
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # one core, as in a loader worker (OpenCV would use every core)
    t0 = time.perf_counter()
    for i in range(args.records):
        record(i % len(source), np.random.default_rng(i))
    per_core = args.records / (time.perf_counter() - t0)
    cv2.setNumThreads(threads)
    crop = tuple(cfg.data.crop_size)
    print(f"config {args.config}: crop {crop}, scale {tuple(cfg.data.scale)}, proposals "
          f"{'Q=%d' % cfg.model.head.num_queries if args.proposals else 'off'}")
    print(f"per core: {per_core:.1f} train images/s (single process, {args.records} records)")
    loader_rate = None
    if args.workers:
        with pipeline.build_train_loader(cfg, seed=0) as loader:
            # start-up (spawning workers) and their first round of batches are not timed
            for _ in range(args.workers):
                next(loader)
            t0 = time.perf_counter()
            for _ in range(args.batches):
                next(loader)
            rate = args.batches * loader.local_batch_size / (time.perf_counter() - t0)
        loader_rate = rate
        print(f"loader, {args.workers} workers: {rate:.1f} images/s")
    if args.step_time and args.global_batch:
        need = args.global_batch / args.step_time / args.hosts
        # the verdict uses the loader's measured rate when there is one: per-core x cores is
        # only an upper bound (the main process batches and hands over every record)
        have = loader_rate if loader_rate is not None else per_core * args.cores
        basis = (f"the {args.workers}-worker loader measured" if loader_rate is not None
                 else f"{args.cores} cores x per-core rate (upper bound; no loader measured)")
        print(f"needed per host: {need:.1f} images/s ({args.global_batch} per "
              f"{args.step_time} s step over {args.hosts} host(s)); {basis}: {have:.0f} "
              f"images/s -> {'met' if have >= need else 'NOT met'} ({have / need:.1f}x)")
    if tmp is not None:
        tmp.cleanup()
    return 0
