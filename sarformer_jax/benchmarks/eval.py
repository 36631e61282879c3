"""`sarformer bench eval`: evaluation throughput (images/s) of SARFormer-B and the Mask2Former
ViT-Adapter-B baseline on ADE20K-sized images, with the original's test setting (§1.3): resize to
(2560, 640) keeping the ratio, slide windows 640² with stride 426, windows batched, class scores
resized back to the original size, argmax.

What is timed per image is what `sarformer eval` does for it (`evaluate.predict_scores`: host
resize and normalisation, proposal channels for cached guidance, the jitted window batch, the
score resize and the argmax on the device, the labels to the host), after one warm-up image per
shape (compile time is reported separately).  Images: random uint8 at --sizes (default 512x683
and 640x480, ADE20K's typical shapes; short side 512-640 -> 640 after the resize: 2 windows
each).  Weights are random (speed
does not depend on them).  Models: `sarformer` (cached proposals: 60 random rectangles per image),
`sarformer_online` (SAM ViT-B's automatic masks computed per window inside the jit, random SAM
weights), `sarformer_faithful` (the `faithful` config, §8: SAM keeps the first window's
embedding, whose automatic masks are decoded once and reused for every window) and
`mask2former`.

  sarformer bench eval --out $OUT/eval.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import numpy as np

MODELS = {"sarformer": "ade20k_sarformer_b", "sarformer_online": "ade20k_sarformer_b",
          # online as the original ran (§8): the first window's embedding and its masks, reused
          "sarformer_faithful": "ade20k_sarformer_b:faithful",
          "mask2former": "ade20k_mask2former_adapter_b"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="sarformer,mask2former,sarformer_online")
    parser.add_argument("--sizes", default="512x683,640x480", help="comma list of HxW")
    parser.add_argument("--images", type=int, default=8, help="timed images per size")
    parser.add_argument("--mode", choices=("slide", "whole"), default="slide")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--path", default="per_image",
                        help="comma list of: per_image (`predict_scores`, waiting for each image), "
                             "parallel (`evaluate.parallel_predictions`: windows of consecutive "
                             "images over the devices, each result fetched once the next image is "
                             "queued; timed as the whole stream of images over their number)")
    parser.add_argument("--out", default=None, help="results json")


def _records(sizes, n, q, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for h, w in sizes:
        for _ in range(n + 1):  # +1: the warm-up image of this shape
            masks = np.zeros((q, h, w), bool)
            for j in range(q):
                y0, y1 = np.sort(rng.integers(0, h, 2))
                x0, x1 = np.sort(rng.integers(0, w, 2))
                masks[j, y0:y1 + 1, x0:x1 + 1] = True
            out.append({"image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
                        "label": np.zeros((h, w), np.uint8),
                        "proposals": masks, "proposal_scores": rng.random(q)})
    return out


def bench_model(model: str, args) -> dict:
    import jax
    import jax.numpy as jnp

    from sarformer_jax.config import load_config
    from sarformer_jax.evaluate import cached_window_fn, predict_scores
    from sarformer_jax.train import create_trainer

    sets = [f"train.compute_dtype={args.dtype}"]
    if model == "sarformer":
        sets.append("guidance.source=cached")
    elif model in ("sarformer_online", "sarformer_faithful"):
        sets.append("guidance.source=online")
    cfg = load_config(MODELS[model], sets + list(args.set))
    sam = None
    if model in ("sarformer_online", "sarformer_faithful"):
        from sarformer_jax.sam.build import build_sam

        sam = build_sam(cfg.guidance.sam.model_type, dtype=jnp.dtype(cfg.guidance.sam.dtype))
    t0 = time.perf_counter()
    trainer, state = create_trainer(cfg, sam=sam)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    cached = model == "sarformer"
    window_fn = cached_window_fn(cfg, trainer, with_proposals=cached)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    records = _records(sizes, args.images, 60 if cached else 0)
    res = dict(model=model, config=MODELS[model], device_kind=jax.devices()[0].device_kind,
               jax=jax.__version__, date=datetime.date.today().isoformat(), mode=args.mode,
               dtype=args.dtype, window_batch=int(cfg.eval.batch_size), init_s=init_s,
               sizes=args.sizes, per_size={})
    paths = _paths(args.path)
    if "parallel" in paths:
        res["parallel"] = bench_parallel(model, args, cfg, trainer, state, window_fn, cached,
                                         records, sizes)
    if "per_image" not in paths:
        res["images_per_s"] = res["parallel"]["images_per_s"]
        return res
    total_t, total_n = 0.0, 0
    i = 0
    params = trainer.params_tree(state["params"])
    for size in sizes:
        recs = records[i:i + args.images + 1]
        i += args.images + 1
        t0 = time.perf_counter()
        predict_scores(cfg, window_fn, params, state["batch_stats"], recs[0], 0,
                       mode=args.mode, aug_test=False, with_proposals=cached, labels=True)
        first = time.perf_counter() - t0
        times = []
        for j, rec in enumerate(recs[1:]):
            t0 = time.perf_counter()
            predict_scores(cfg, window_fn, params, state["batch_stats"], rec, j + 1,
                           mode=args.mode, aug_test=False, with_proposals=cached, labels=True)
            times.append(time.perf_counter() - t0)
        med = float(np.median(times))
        res["per_size"]["x".join(map(str, size))] = dict(first_s=first, median_s=med,
                                                         images_per_s=1.0 / med)
        total_t += sum(times)
        total_n += len(times)
        print(f"[{model}] {size[0]}x{size[1]}: first image (compile) {first:.1f} s, then median "
              f"{med * 1e3:.1f} ms/image ({1.0 / med:.2f} img/s)", flush=True)
    res["images_per_s"] = total_n / total_t
    return res


def bench_parallel(model: str, args, cfg, trainer, state, window_fn, cached, records, sizes) -> dict:
    """The same images through `parallel_predictions`: the warm-up image of each size first
    (compiles), then all timed images as one stream."""
    from sarformer_jax.evaluate import parallel_predictions, parallel_refusal

    params = trainer.params_tree(state["params"])
    refusal = parallel_refusal(cfg, trainer, args.mode, False)
    if refusal:
        raise ValueError(f"the parallel path does not apply: {refusal}")
    n = args.images + 1
    warm = [records[i * n] for i in range(len(sizes))]
    timed = [r for i in range(len(sizes)) for r in records[i * n + 1:(i + 1) * n]]

    def stream(recs):
        return sum(1 for _ in parallel_predictions(cfg, window_fn, params,
                                                   state["batch_stats"], recs, trainer.mesh,
                                                   with_proposals=cached))

    t0 = time.perf_counter()
    stream(warm)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    count = stream(timed)
    total = time.perf_counter() - t0
    print(f"[{model} parallel] first images (compile) {first:.1f} s, then {total / count * 1e3:.1f} "
          f"ms/image over {count} images ({count / total:.2f} img/s)", flush=True)
    return dict(first_s=first, mean_s=total / count, images_per_s=count / total, images=count)


def _paths(text: str) -> list[str]:
    paths = [p.strip() for p in text.split(",") if p.strip()]
    if set(paths) - {"per_image", "parallel"} or not paths:
        raise ValueError(f"--path {text!r}: choose from per_image, parallel")
    return paths


def run(args: argparse.Namespace) -> int:
    import jax

    _paths(args.path)
    results = []
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        if model not in MODELS:
            raise SystemExit(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
        try:
            results.append(bench_model(model, args))
        except Exception as e:  # one model failing is a result; go on
            results.append(dict(model=model, failed=True, error=f"{type(e).__name__}: {e}"[:400]))
            print(f"[{model}] FAILED: {results[-1]['error']}", flush=True)
    print(f"\n# sarformer bench eval  {datetime.date.today()}  {jax.devices()[0].device_kind}  "
          f"jax {jax.__version__}  mode {args.mode}  {args.dtype}")
    print("| model | " + " | ".join(f"{s} ms/img" for s in args.sizes.split(",")) + " | img/s |")
    print("|---|" + "---|" * (len(args.sizes.split(",")) + 1))
    for r in results:
        if r.get("failed"):
            print(f"| {r['model']} | FAILED: {r['error']} |")
            continue
        if r["per_size"]:
            cells = " | ".join(f"{v['median_s'] * 1e3:.1f}" for v in r["per_size"].values())
            print(f"| {r['model']} | {cells} | {r['images_per_s']:.2f} |")
        if "parallel" in r:
            p = r["parallel"]
            cells = " | ".join(["(stream)"] * len(args.sizes.split(",")))
            print(f"| {r['model']}, parallel path ({p['mean_s'] * 1e3:.1f} ms/img) | {cells} | "
                  f"{p['images_per_s']:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if all(not r.get("failed") for r in results) else 1
