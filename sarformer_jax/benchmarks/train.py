"""`sarformer bench train`: one whole jitted training step of SARFormer-B and of the Mask2Former
ViT-Adapter-B baseline (640², bf16 compute, fp32 params, AdamW): compile time, median step time,
images/s, peak device memory, XLA FLOPs and MFU against a bf16 matmul ceiling measured in the
same process.

What is timed: `trainer.train_step` from `sarformer_jax.train.create_trainer(cfg)` exactly as the
training loop calls it (proposal preparation, forward, Hungarian-matched losses with deep
supervision and the auxiliary CE, backward, grad-norm, AdamW update, non-finite guard), on one
random batch that stays on the device (no input pipeline: it needs grain and would measure the
loader).  Batch: random uint8 images normalised with the config's mean/std, blocky random label
maps (about a dozen classes of [0, 150) per image, a band of 255 ignore), and for SARFormer
`guidance.source="cached"` proposals: 40-100 random rectangles per image as uint8 masks
[B, 100, H, W] with `num_proposals` (the rest are Bernoulli placeholders).  `sarformer_online`
runs SAM ViT-B's automatic mask generator (random weights, `guidance.sam` settings: 32x32 point
grid, bf16) on the de-normalised images inside the step; the MFU "excluding SAM" is that of the
cached-guidance model.  `sarformer_faithful` is the `faithful` config (§8): SAM sees the
normalised, transposed image and keeps the first image's embedding; its automatic masks are then
the same for every image, so they are decoded once before the step (`init_stale_embedding`)
and the step only prepares them.

Proposal share: the guidance (`trainer.proposal_fn`: for cached, subset, placeholders,
permutation, uint8 -> float32 [B, 100, 640, 640]; for online, SAM's encoder + point-grid decoding
+ NMS, then the same preparation) is jitted and timed on its own on the same batch; its time over
the step time is the share reported.  Inside the step XLA may fuse
it differently, so this is an estimate.  The proposal-dependent parts of the model (layer-0
attention mask, masked average pooling, the second pixel-decoder pass) are part of the forward
and are not in that share.

FLOPs: XLA's cost analysis of the *lowered* step (`lowered.cost_analysis()["flops"]`, the program
before XLA's GPU passes).  The compiled step's count (`compiled.cost_analysis()`, also recorded as
`flops_compiled`) is useless on the GPU: there the GEMMs become cuBLAS custom calls, which count
as 0 FLOPs (seen on the H100: 0.030 instead of 2.23 TFLOP for BEiT-B fwd+bwd).  XLA also counts
while-loop bodies (the Hungarian matcher, scanned layers) once, a `lax.cond` as its larger
branch (the loss's all-slots program, not the matched-slots one the step usually runs), and the
MSDA as its XLA-reference gathers on CPU or as Pallas custom calls (0) on GPU, so the count is
close to, not exactly, the work done; `--lower-only` counts it without compiling (on CPU), with
the backbone's and the pixel decoder's layers unrolled so that each is counted.  MFU = FLOPs /
step time / ceiling, where the ceiling is the median rate of an 8192³ bf16 matmul timed in the
same process (and, for reference, against the nominal dense bf16 peak of the device).

Each model runs in its own subprocess (so peak memory is per model and one model failing to
compile or running out of memory does not stop the other); `--in-process` turns that off.

Example (on the device): `sarformer bench train --out $OUT/train.json --log-dir $OUT`.
Results go to docs/benchmarks.md with command, device, date and jax version.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from sarformer_jax.benchmarks.timing import measuring_turn, median_time, pipelined_time

MODELS = {
    "sarformer": "ade20k_sarformer_b",  # cached guidance
    "sarformer_online": "ade20k_sarformer_b",  # SAM ViT-B automatic masks inside the step
    # online as the original ran (§8): one stale embedding, its masks decoded once and reused
    "sarformer_faithful": "ade20k_sarformer_b:faithful",
    "mask2former": "ade20k_mask2former_adapter_b",
}
# dense bf16 peak, TFLOP/s, by jax device_kind substring (nominal, for reference only)
NOMINAL_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="sarformer,mask2former",
                        help=f"comma list of: {', '.join(MODELS)}")
    parser.add_argument("--batch-per-device", type=int, default=2)
    parser.add_argument("--size", type=int, nargs="+", default=[640], help="H [W]")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="train.compute_dtype")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--matmul-size", type=int, default=8192, help="ceiling matmul n (n³)")
    parser.add_argument("--config", default=None,
                        help="config name or file instead of the model's (e.g. tiny, for a smoke run)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override, repeatable (e.g. model.backbone.depth=4)")
    parser.add_argument("--out", default=None, help="write results (json) here")
    parser.add_argument("--log-dir", default=None, help="per-model subprocess logs go here")
    parser.add_argument("--worker-timeout", type=float, default=None,
                        help="seconds per model subprocess (default: none)")
    parser.add_argument("--lower-only", action="store_true",
                        help="only build, lower and count FLOPs (no compile or timing; CPU ok)")
    parser.add_argument("--in-process", action="store_true",
                        help="run the models in this process (peak memory then accumulates)")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="also trace 5 steps into DIR and print GPU time by scope / kernel")
    parser.add_argument("--flops", type=parse_flops, default=None, metavar="TFLOP",
                        help="TFLOPs per step for the MFU when the device's lowered cost analysis "
                             "gives none (count them on CPU with --lower-only): one number for "
                             "every model, or MODEL=TFLOP,... per model (e.g. "
                             "sarformer=4.952,mask2former=4.166; a model not named gets none)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE;...",
                        help="a named set of overrides, repeatable; every model runs once per "
                             "variant, all compile at once and measure one at a time (A/B "
                             "in one call). KEY is a config key, or env.VAR for an environment "
                             "variable of that run, e.g. 'cmdbuf:env.XLA_FLAGS=--xla_gpu_...' "
                             "or 'noscan:model.backbone.scan_layers=False' "
                             "('xla:env.SARFORMER_JAX_XLA_DEFAULTS=0': without the command's "
                             "default XLA flags)")
    parser.add_argument("--compile-at-once", type=int, default=2, metavar="N",
                        help="variants compile N at a time (waves; 0 = all at once): on the "
                             "16-core device machine four SARFormer-B compiles at once took "
                             "350-376 s each against ~175 s for one or two (train run 31)")
    parser.add_argument("--compile-cache", default=None, metavar="DIR",
                        help="keep compiled steps in jax's persistent compilation cache in DIR, so "
                             "that a second call on the same machine with the same programs "
                             "loads them instead of compiling for minutes (the 'compile s' "
                             "column then counts loads; default: off, every step compiled)")
    parser.add_argument("--worker-json", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tag", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--sync-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--sync-names", default=None, help=argparse.SUPPRESS)


# ----------------------------------------------------------------------------------------------
# Inputs


def parse_flops(text: str) -> float | dict[str, float]:
    """`--flops`: "4.952" (every model) or "sarformer=4.952,mask2former=4.166" (per model)."""
    text = text.strip()
    try:
        if "=" not in text:
            return float(text)
        out = {}
        for item in text.split(","):
            name, _, value = item.partition("=")
            if name.strip() not in MODELS:
                raise ValueError(f"unknown model {name.strip()!r} (known: {', '.join(MODELS)})")
            out[name.strip()] = float(value)
        return out
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--flops {text!r}: {e}") from None


def format_flops(flops: float | dict[str, float]) -> str:
    if isinstance(flops, dict):
        return ",".join(f"{k}={v!r}" for k, v in flops.items())
    return repr(float(flops))


def flops_for(flops: float | dict[str, float] | None, model: str) -> float | None:
    """The `--flops` figure (TFLOP per step) that applies to `model`, or None."""
    if isinstance(flops, dict):
        return flops.get(model)
    return flops


def make_config(model: str, args: argparse.Namespace, num_devices: int):
    from sarformer_jax.config import load_config

    size = _size(args)
    sets = [
        f"train.batch_size={args.batch_per_device * num_devices}",
        f"train.compute_dtype={args.dtype}",
        f"model.image_size=({size[0]}, {size[1]})",
        f"data.crop_size=({size[0]}, {size[1]})",
    ]
    if model == "sarformer":
        sets.append("guidance.source=cached")
    elif model in ("sarformer_online", "sarformer_faithful"):
        sets.append("guidance.source=online")
    if getattr(args, "lower_only", False):
        # XLA's cost analysis counts a scanned loop's body once: on the CPU, where the layers
        # are scanned by default, the count would miss 5/6 of the pixel decoder and most of the
        # backbone (2.749 instead of 5.066 TFLOP for SARFormer-B: train run 27).  The count is
        # of the same layers unrolled; `--set` may still override these.
        sets += list(UNROLLED_FOR_COUNT)
    return load_config(args.config or MODELS[model], sets + list(args.set))


UNROLLED_FOR_COUNT = ("model.backbone.scan_layers=False",
                      "model.head.pixel_decoder.scan_layers=False")
"""Overrides of `--lower-only`: every layer unrolled, so that the FLOP count covers them all."""


def _size(args) -> tuple[int, int]:
    return tuple(args.size) if len(args.size) == 2 else (args.size[0], args.size[0])


def random_batch(cfg, seed: int = 0) -> dict[str, np.ndarray]:
    """A training batch in the loader's format (`data.pipeline.build_train_loader`): image uint8
    with image_hw, label uint8 / int32 with 255, and with cached guidance the proposals
    bit-packed along the width (`proposals_packed`) + num_proposals; the step normalises and
    unpacks on the device as in training."""
    from sarformer_jax.data.pipeline import label_dtype

    rng = np.random.default_rng(seed)
    b = int(cfg.train.batch_size)
    h, w = (int(s) for s in cfg.data.crop_size)
    k = int(cfg.model.head.num_classes)
    image = rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8)
    # blocky label maps: 16x16 cells, ~12 classes per image, a band of ignore at the bottom
    cells = 16
    label = np.empty((b, h, w), label_dtype(cfg))
    for i in range(b):
        classes = rng.choice(k, size=min(12, k), replace=False)
        grid = classes[rng.integers(0, len(classes), (cells, cells))]
        ys = np.minimum(np.arange(h) * cells // h, cells - 1)
        xs = np.minimum(np.arange(w) * cells // w, cells - 1)
        label[i] = grid[ys[:, None], xs[None, :]]
        label[i, int(0.9 * h):, :] = 255
    batch = {"image": image, "image_hw": np.tile(np.asarray([h, w], np.int32), (b, 1)),
             "label": label}
    if cfg.model.head.query_init == "sam_pooling":
        q = int(cfg.model.head.num_queries)
        props = np.zeros((b, q, h, w), np.uint8)
        num = rng.integers(q * 2 // 5, q + 1, b).astype(np.int32)
        for i in range(b):
            for j in range(int(num[i])):
                y0, y1 = np.sort(rng.integers(0, h + 1, 2))
                x0, x1 = np.sort(rng.integers(0, w + 1, 2))
                props[i, j, y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)] = 1
        batch["proposals_packed"] = np.packbits(props, axis=-1)
        batch["num_proposals"] = num
    return batch


# ----------------------------------------------------------------------------------------------
# Measurements


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return dict(cost or {})


_median_time = median_time


def matmul_ceiling(n: int, reps: int = 10, inner: int = 5) -> float:
    """Measured dense bf16 rate (FLOP/s): median over `reps` groups of `inner` back-to-back
    n³ products on random inputs (two input sets, alternated)."""
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(0), 4)
    sets = [(jax.random.normal(keys[2 * i], (n, n), jnp.bfloat16),
             jax.random.normal(keys[2 * i + 1], (n, n), jnp.bfloat16)) for i in range(2)]
    mm = jax.jit(jnp.matmul)
    jax.block_until_ready([mm(a, b) for a, b in sets])

    def group():
        outs = [mm(*sets[i % 2]) for i in range(inner)]
        jax.block_until_ready(outs)

    sec, _ = _median_time(group, reps, 2)
    return 2.0 * n ** 3 * inner / sec


def _peak_bytes(device) -> int | None:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats:
        return None
    return int(stats.get("peak_bytes_in_use", 0)) or None


def _wait_and_lock(args: argparse.Namespace, tag: str):
    """With --sync-dir (variants): wait until every run is compiled (or failed), then hold the
    measuring lock, so no timing shares the GPU with a compile, an initialisation or another
    run's steps.  Returns the open lock file (closing releases it), or None."""
    if not args.sync_dir:
        return None
    print(f"[{tag}] waiting for the other variants to compile", flush=True)
    return measuring_turn(args.sync_dir, tag, args.sync_names.split(","),
                          timeout=args.worker_timeout or 3600)


def bench_model(model: str, args: argparse.Namespace) -> dict:
    import jax

    from sarformer_jax.guidance import init_stale_embedding, uses_sam
    from sarformer_jax.train import create_trainer, device_batch

    tag = args.tag or model
    if args.compile_cache:  # before the first compile of this process
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    devices = jax.devices()
    dev = devices[0]
    cfg = make_config(model, args, len(devices))
    res = dict(model=model, variant=tag.partition("@")[2] or None, overrides=list(args.set),
               config=args.config or MODELS[model], devices=len(devices),
               device_kind=dev.device_kind, global_batch=int(cfg.train.batch_size),
               size=list(cfg.data.crop_size), dtype=args.dtype, jax=jax.__version__,
               date=datetime.date.today().isoformat(), guidance=cfg.guidance.source,
               compile_cache=args.compile_cache)
    t0 = time.perf_counter()
    sam = None
    if cfg.guidance.source == "online":  # random weights: timing does not depend on them
        import jax.numpy as jnp

        from sarformer_jax.sam.build import build_sam

        sam = build_sam(cfg.guidance.sam.model_type,
                        dtype=jnp.dtype(cfg.guidance.sam.get("dtype", "float32")))
    trainer, state = create_trainer(cfg, sam=sam)
    jax.block_until_ready(state)
    res["init_s"] = time.perf_counter() - t0
    res["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    print(f"[{tag}] trainer built and state initialised in {res['init_s']:.1f} s", flush=True)
    res["params"] = int(sum(x.size for x in jax.tree_util.tree_leaves(state["params"])))
    batch = device_batch(random_batch(cfg), trainer.mesh)
    if uses_sam(cfg) and cfg.guidance.seed_compat:  # what `Trainer.step` does at the first step
        from sarformer_jax.data.pipeline import device_inputs
        from sarformer_jax.sharding import replicated

        t0 = time.perf_counter()
        images = device_inputs(batch, cfg.data.mean, cfg.data.std)["image"]
        trainer.guide = init_stale_embedding(cfg, trainer.sam_graphdef, trainer.guide, images,
                                             replicated(trainer.mesh))
        jax.block_until_ready(trainer.guide)
        res["stale_init_s"] = time.perf_counter() - t0
        print(f"[{tag}] stale embedding and its masks (compile + run) in "
              f"{res['stale_init_s']:.1f} s", flush=True)

    t0 = time.perf_counter()
    lowered = trainer.train_step.lower(state, batch, trainer.guide)
    t1 = time.perf_counter()
    res["trace_lower_s"] = t1 - t0
    cost = _cost(lowered)
    res["flops"] = float(cost.get("flops", float("nan")))
    res["bytes_accessed_lowered"] = float(cost.get("bytes accessed", float("nan")))
    print(f"[{tag}] step traced and lowered in {t1 - t0:.1f} s, {res['flops'] / 1e12:.3f} "
          f"TFLOP/step (lowered program){'' if args.lower_only else '; compiling'}", flush=True)
    if args.lower_only:
        return res
    compiled = lowered.compile()
    res["compile_s"] = time.perf_counter() - t1
    cost = _cost(compiled)
    res["flops_compiled"] = float(cost.get("flops", float("nan")))
    res["bytes_accessed"] = float(cost.get("bytes accessed", float("nan")))
    print(f"[{tag}] compiled in {res['compile_s']:.1f} s; the compiled program's cost analysis "
          f"says {res['flops_compiled'] / 1e12:.3f} TFLOP/step", flush=True)

    holder = {"state": state}
    lock = _wait_and_lock(args, tag)  # variants compiled at once measure one at a time

    def step():
        holder["state"], metrics = compiled(holder["state"], batch, trainer.guide)
        jax.block_until_ready((holder["state"], metrics))
        holder["metrics"] = metrics

    t0 = time.perf_counter()
    step()
    res["first_step_s"] = time.perf_counter() - t0
    if cfg.train.get("freeze_gc", True):  # as the training loop does after its first step
        from sarformer_jax.train import freeze_heap

        res["gc_frozen_objects"] = freeze_heap()
    sec, times = _median_time(step, args.steps, args.warmup)
    res["step_s"], res["step_times_s"] = sec, times
    res["step_min_s"], res["step_max_s"] = float(np.min(times)), float(np.max(times))
    res["images_per_s"] = res["global_batch"] / sec
    # As the training loop runs it: steps dispatched back to back, one wait at the end, so the
    # host's dispatch of step n+1 overlaps the device's step n (the median above waits for
    # every step and so also counts each step's dispatch and launch latency).
    def dispatch():
        holder["state"], holder["metrics"] = compiled(holder["state"], batch, trainer.guide)

    # the step is warm: the blocking median above ran it
    res["pipelined_step_s"], res["pipelined_windows_s"] = pipelined_time(
        dispatch, lambda: jax.block_until_ready((holder["state"], holder["metrics"])),
        args.steps)
    print(f"[{tag}] pipelined: {res['pipelined_step_s'] * 1e3:.1f} ms/step (median of 3 windows "
          f"of {args.steps} steps dispatched back to back; blocking median {sec * 1e3:.1f} ms)",
          flush=True)
    m = jax.device_get(holder["metrics"])
    res["loss"] = float(m["loss"])
    res["finite"] = bool(m["finite"])
    res["peak_bytes"] = _peak_bytes(dev)
    print(f"[{tag}] step median {sec * 1e3:.1f} ms (min {res['step_min_s'] * 1e3:.1f}, "
          f"max {res['step_max_s'] * 1e3:.1f}), loss {res['loss']:.3f}, finite {res['finite']}, "
          f"peak {(res['peak_bytes'] or 0) / 2**30:.2f} GiB", flush=True)

    if args.profile:
        from sarformer_jax.benchmarks import profile as prof

        trace_dir = os.path.join(args.profile, tag.replace("@", "_"))
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        for _ in range(5):
            step()
        jax.profiler.stop_trace()
        hlo_text = compiled.as_text()
        with open(os.path.join(trace_dir, "step.hlo.txt"), "w") as f:  # for checking the mapping
            f.write(hlo_text)
        summary = prof.summarize(trace_dir, hlo_text, steps=5, top=40)
        if "gpu_kernel_ms_per_step" in summary:  # time the GPU waits (host syncs, launches)
            summary["idle_ms_per_step"] = sec * 1e3 - summary["gpu_busy_ms_per_step"]
        # the memory-bound kernels against the HBM bandwidth, with their source lines
        every = prof.kernel_bandwidth(trace_dir, hlo_text, steps=5, top=10 ** 6,
                                      classes={"elementwise", "reduction", "copy"})
        summary["kernel_bandwidth"] = every[:80]
        summary["time_by_source"] = prof.time_by_source(every, top=30)
        # the matrix kernels' FLOP rates (library kernels match only with command buffers off)
        summary["matrix_efficiency"] = prof.matrix_efficiency(trace_dir, hlo_text, steps=5, top=40)
        res["profile"] = summary
        prof.print_summary(summary, tag)
        prof.print_kernel_bandwidth(summary["kernel_bandwidth"], tag)
        print(f"[{tag}] memory-bound kernels by model source line (ms per step, kernels):", flush=True)
        for cls, src, ms, n in summary["time_by_source"]:
            print(f"[{tag}]   src {ms:7.3f} ms {cls[:11]:11s} x{n:<4d} {src}", flush=True)
        prof.print_matrix_efficiency(summary["matrix_efficiency"], tag)

    # the guidance alone: cached preparation, or SAM's automatic masks + preparation (online)
    res["proposal_s"] = None
    if trainer.proposal_fn is not None:
        from sarformer_jax.data.pipeline import device_inputs

        mean, std = trainer.cfg.data.mean, trainer.cfg.data.std
        prop = jax.jit(lambda b, k, g: trainer.proposal_fn(device_inputs(b, mean, std), k, False, g))
        key = jax.random.key(1)
        jax.block_until_ready(prop(batch, key, trainer.guide))
        res["proposal_s"], _ = _median_time(
            lambda: jax.block_until_ready(prop(batch, key, trainer.guide)), args.steps, args.warmup)
        print(f"[{tag}] proposal preparation alone {res['proposal_s'] * 1e3:.2f} ms "
              f"({100 * res['proposal_s'] / sec:.1f} % of the step)", flush=True)

    holder.clear()  # the train state's buffers are freed before the matmul
    ceiling = matmul_ceiling(args.matmul_size)
    res["matmul_flops_per_s"] = ceiling
    nominal = next((v for k, v in NOMINAL_TFLOPS.items() if k in dev.device_kind), None)
    res["nominal_flops_per_s"] = nominal * 1e12 if nominal else None
    given = flops_for(args.flops, model)
    if not np.isfinite(res["flops"]) and given:
        res["flops"] = given * 1e12
        res["flops_source"] = "--flops (counted on CPU with --lower-only)"
    res["achieved_flops_per_s"] = res["flops"] / sec
    res["mfu_measured"] = res["achieved_flops_per_s"] / ceiling
    classes = (res.get("profile") or {}).get("by_class_ms")
    if classes:
        # an upper bound from the profile: the MFU if every kernel but the matrix products and
        # the fused attention took no time (and nothing else waited)
        matrix_s = (classes.get("matrix", 0.0) + classes.get("attention", 0.0)) / 1e3
        res["matrix_ms_per_step"] = matrix_s * 1e3
        res["mfu_matrix_only"] = res["flops"] / matrix_s / ceiling if matrix_s > 0 else None
        if res["mfu_matrix_only"] is not None:
            print(f"[{tag}] matrix products + fused attention {matrix_s * 1e3:.1f} ms of the "
                  f"step's kernels: MFU {100 * res['mfu_matrix_only']:.1f} % if nothing else "
                  "took time", flush=True)
    res["mfu_nominal"] = (res["achieved_flops_per_s"] / res["nominal_flops_per_s"]
                          if nominal else None)
    if lock is not None:
        lock.close()
    print(f"[{tag}] {res['achieved_flops_per_s'] / 1e12:.1f} TFLOP/s achieved; "
          f"{args.matmul_size}³ bf16 matmul {ceiling / 1e12:.1f} TFLOP/s -> MFU "
          f"{100 * res['mfu_measured']:.1f} %", flush=True)
    return res


# ----------------------------------------------------------------------------------------------
# Driver


def parse_variant(spec: str) -> tuple[str, list[str], dict[str, str]]:
    """'NAME:KEY=VALUE;KEY=VALUE' -> (name, config overrides, environment).  KEY env.VAR sets
    the run's environment variable VAR (e.g. XLA_FLAGS); a bare NAME is the unchanged config."""
    name, _, rest = spec.partition(":")
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise SystemExit(f"--variant {spec!r}: the name before ':' must be letters, digits, _ or -")
    sets, env = [], {}
    for item in filter(None, (x.strip() for x in rest.split(";"))):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"--variant {spec!r}: {item!r} is not KEY=VALUE")
        if key.startswith("env."):
            env[key[4:]] = value
        else:
            sets.append(item)
    return name, sets, env


def _worker_argv(args: argparse.Namespace, model: str, json_path: str,
                 variant=None, sync=None) -> list[str]:
    argv = [sys.executable, "-m", "sarformer_jax.cli", "bench", "train", "--models", model,
            "--batch-per-device", str(args.batch_per_device), "--size", *map(str, args.size),
            "--dtype", args.dtype, "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--matmul-size", str(args.matmul_size), "--worker-json", json_path]
    if args.profile:
        argv += ["--profile", args.profile]
    if args.flops:
        argv += ["--flops", format_flops(args.flops)]
    if args.lower_only:
        argv.append("--lower-only")
    if args.config:
        argv += ["--config", args.config]
    if args.worker_timeout is not None:
        argv += ["--worker-timeout", str(args.worker_timeout)]
    if args.compile_cache:
        argv += ["--compile-cache", args.compile_cache]
    for s in args.set + (variant[1] if variant else []):
        argv += ["--set", s]
    if variant:
        argv += ["--tag", f"{model}@{variant[0]}"]
    if sync:
        argv += ["--sync-dir", sync[0], "--sync-names", ",".join(sync[1])]
    return argv


def _run_isolated(model: str, args: argparse.Namespace, variant=None, sync=None) -> dict:
    tag = f"{model}@{variant[0]}" if variant else model
    fd, json_path = tempfile.mkstemp(suffix=f".{tag}.json")
    os.close(fd)
    log_path = (os.path.join(args.log_dir, f"train_{tag.replace('@', '__')}.log")
                if args.log_dir else None)
    log = open(log_path, "w") if log_path else None
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if sync:  # several processes share the GPU: none may take 75 % of its memory up front
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    if variant:
        env.update(variant[2])
    try:
        proc = subprocess.Popen(_worker_argv(args, model, json_path, variant, sync),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, env=env)
        tail: list[str] = []
        timer = None
        if args.worker_timeout is not None:  # kills the worker even when it prints nothing
            timer = threading.Timer(args.worker_timeout, proc.kill)
            timer.start()
        for line in proc.stdout:
            if log:
                log.write(line)
                log.flush()
            if line.startswith(f"[{tag}]"):
                print(line, end="", flush=True)
            tail = (tail + [line.rstrip()])[-40:]
        rc = proc.wait()
        timed_out = timer is not None and not timer.is_alive() and rc < 0
        if timer is not None:
            timer.cancel()
        if sync and rc != 0:  # the others stop waiting for this run
            open(os.path.join(sync[0], f"failed.{tag}"), "w").close()
        try:
            with open(json_path) as f:
                text = f.read()
            if text.strip():
                return json.loads(text)
        except OSError:
            pass
        error = next((ln for ln in reversed(tail) if "Error" in ln or "error" in ln), None)
        return dict(model=model, variant=variant[0] if variant else None, config=MODELS[model],
                    failed=True, returncode=rc, timed_out=timed_out, error=error,
                    tail=tail[-15:], log=log_path)
    finally:
        if log:
            log.close()
        os.unlink(json_path)


def waves(jobs: list, at_once: int) -> list[list]:
    """`jobs` in consecutive groups of at most `at_once` (all of them for 0 or less)."""
    if at_once <= 0:
        return [list(jobs)]
    return [list(jobs[i:i + at_once]) for i in range(0, len(jobs), at_once)]


def _run_variants(models: list[str], args: argparse.Namespace) -> list[dict]:
    """Every (model, variant) in its own subprocess.  They run in waves of
    `--compile-at-once`: a wave's subprocesses start at once, and each measures only when all
    of its wave are compiled, one at a time (`_wait_and_lock`)."""
    variants = [parse_variant(v) for v in args.variant]
    names = [v[0] for v in variants]
    if len(set(names)) != len(names):
        raise SystemExit(f"--variant names repeat: {names}")
    jobs = [(m, v) for m in models for v in variants]
    results: list[dict | None] = [None] * len(jobs)
    for wave in waves(list(enumerate(jobs)), int(getattr(args, "compile_at_once", 0))):
        sync_dir = tempfile.mkdtemp(prefix="bench_train_sync.")
        sync = (sync_dir, [f"{m}@{v[0]}" for _, (m, v) in wave])

        def work(i, m, v, sync=sync):
            results[i] = _run_isolated(m, args, v, sync)

        threads = [threading.Thread(target=work, args=(i, m, v)) for i, (m, v) in wave]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return results


def _fmt(x, scale=1.0, spec=".1f", none="-"):
    return none if x is None or (isinstance(x, float) and not np.isfinite(x)) else \
        format(x * scale, spec)


def _label(r: dict) -> str:
    return f"{r['model']} @{r['variant']}" if r.get("variant") else r["model"]


def print_table(results: list[dict]) -> None:
    print("\n| model | batch | build + init s | compile s | step ms (median) | pipelined ms | img/s "
          "| peak GiB | TFLOP/step (XLA, lowered) | TFLOP/s | matmul TFLOP/s | MFU (measured) "
          "| MFU (nominal) | proposal prep ms (share) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if r.get("failed"):
            print(f"| {_label(r)} | FAILED (rc {r.get('returncode')}, "
                  f"timed out {r.get('timed_out')}): {r.get('error')} |")
            continue
        prop = "-" if r.get("proposal_s") is None else \
            f"{r['proposal_s'] * 1e3:.2f} ({100 * r['proposal_s'] / r['step_s']:.1f} %)"
        if "step_s" not in r:  # --lower-only
            print(f"| {_label(r)} | {r['global_batch']} | - | - | - | - | - | - | "
                  f"{_fmt(r['flops'], 1e-12, '.3f')} | - | - | - | - | - |")
            continue
        print(f"| {_label(r)} | {r['global_batch']} | {_fmt(r.get('init_s'), 1, '.0f')} | "
              f"{r['trace_lower_s'] + r['compile_s']:.0f} | {r['step_s'] * 1e3:.1f} | "
              f"{_fmt(r.get('pipelined_step_s'), 1e3)} | "
              f"{r['images_per_s']:.2f} | {_fmt(r.get('peak_bytes'), 2**-30, '.2f')} | "
              f"{_fmt(r['flops'], 1e-12, '.3f')} | {_fmt(r['achieved_flops_per_s'], 1e-12)} | "
              f"{_fmt(r['matmul_flops_per_s'], 1e-12)} | {_fmt(r['mfu_measured'], 100)} % | "
              f"{_fmt(r.get('mfu_nominal'), 100)} % | {prop} |")


def run(args: argparse.Namespace) -> int:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad:
        raise SystemExit(f"unknown model(s) {bad}; choose from {', '.join(MODELS)}")
    if args.worker_json:  # subprocess: one model, results to the json file
        res = bench_model(models[0], args)
        with open(args.worker_json, "w") as f:
            json.dump(res, f)
        return 0
    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)
    print(f"# sarformer bench train  {datetime.date.today()}  batch/device "
          f"{args.batch_per_device}  size {_size(args)}  {args.dtype}  steps {args.steps}  "
          f"overrides {args.set}", flush=True)
    results = []
    if args.variant:
        if args.in_process:
            raise SystemExit("--variant runs every variant in its own subprocess: drop --in-process")
        results = _run_variants(models, args)
        models = []
        for r in results:
            if r.get("failed"):
                print(f"[{r['model']}@{r.get('variant')}] FAILED: {r.get('error')}", flush=True)
                for line in r.get("tail", []):
                    print(f"    {line}")
    for model in models:
        if args.in_process:
            try:
                results.append(bench_model(model, args))
            except Exception as e:  # report and go on: one model failing is a result
                results.append(dict(model=model, config=MODELS[model], failed=True,
                                    error=f"{type(e).__name__}: {e}"[:500]))
        else:
            results.append(_run_isolated(model, args))
        if results[-1].get("failed"):
            print(f"[{model}] FAILED: {results[-1].get('error')}", flush=True)
            for line in results[-1].get("tail", []):
                print(f"    {line}")
    ok = [r for r in results if not r.get("failed")]
    if ok:
        r = ok[0]
        print(f"\ndevice {r['device_kind']} x{r['devices']}, jax {r['jax']}, {r['date']}")
    print_table(results)
    if args.compile_cache:
        print(f"(compile s: compiled or loaded from the persistent cache {args.compile_cache})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if ok and len(ok) == len(results) else 1
