"""`sarformer bench backbone`: BEiT-B and the whole ViT-Adapter-B, jitted forward+backward, against
timm's BEiT in the same run (ratios printed).

What is timed: one training step's gradient computation (no optimizer), i.e. forward, a scalar
loss (mean of the outputs in float32) and the backward pass w.r.t. every parameter; batch
statistics are updated for the adapter (train mode).  Ours runs with bfloat16 compute and float32
parameters; timm runs under `torch.autocast(bfloat16)` with float32 parameters (the usual AMP
setup).  FLOPs come from XLA's cost analysis of the lowered step (the compiled GPU program counts
its cuBLAS GEMMs as 0 FLOPs; where the accelerator's lowered program gives no count, the same
model is lowered for the host CPU with XLA attention and MSDA); MFU = FLOPs / time / peak.

Two times per model: the blocking median (each call waits for its result, so the host's
dispatch latency is inside) and the pipelined time (calls dispatched back to back, one wait at
the end, as a training loop runs), for timm too.  `--scan-layers on,off` times the BEiT layers
as a `lax.scan` and unrolled.

Example (on the device): `sarformer bench backbone --batch 2 --size 640`.
Results go to docs/benchmarks.md with command, device, date and jax version.
"""

from __future__ import annotations

import argparse
import datetime
import functools

import numpy as np

from sarformer_jax.benchmarks.timing import median_time, pipelined_time

# dense bf16 peak, TFLOP/s, by jax device_kind substring
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, nargs="+", default=[640], help="H [W]")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--models", default="beit,adapter,timm",
                        help="comma list of: beit (ours), adapter (ours, whole ViT-Adapter-B), timm")
    parser.add_argument("--variant", choices=("b", "l"), default="b")
    parser.add_argument("--depth", type=int, default=None, help="override the depth (smoke runs)")
    parser.add_argument("--width", type=int, nargs=2, default=None, metavar=("DIM", "HEADS"),
                        help="override the embedding width and its heads (smoke runs)")
    parser.add_argument("--attention-implementation", default="auto",
                        help="comma list of attention implementations to time (auto: cuDNN on "
                             "a GPU in bf16, xla, cudnn)")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="also trace 5 steps of each JAX model into DIR and print its top kernels")
    parser.add_argument("--msda-implementation", default=None, help="kernels.ms_deform_attn implementation")
    parser.add_argument("--remat", action="store_true", help="activation checkpointing on the BEiT layers")
    parser.add_argument("--scan-layers", default="config",
                        help="comma list of: on (the BEiT layers of a group as one lax.scan), off "
                             "(unrolled), config (the config's default); each is timed")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="override the peak for MFU (default: the nominal dense bf16 peak)")
    parser.add_argument("--lower-only", action="store_true",
                        help="only count FLOPs (lowered program, no compile, no timing; runs on CPU)")


def _config(args, scan: str = "config"):
    from sarformer_jax.configs.common import beit_adapter_b, beit_adapter_l

    cfg = beit_adapter_b() if args.variant == "b" else beit_adapter_l()
    cfg.with_cp = bool(args.remat)
    if scan not in ("config", "on", "off"):
        raise SystemExit(f"--scan-layers: {scan!r} is not one of config, on, off")
    if scan != "config":
        cfg.scan_layers = scan == "on"
    if args.depth:
        per = max(args.depth // 4, 1)
        depth = 4 * per
        cfg.update(depth=depth, interaction_indexes=tuple((s * per, s * per + per - 1) for s in range(4)))
    if getattr(args, "width", None):
        dim, heads = args.width
        if dim % heads:
            raise SystemExit(f"--width: {dim} is not a multiple of its {heads} heads")
        cfg.update(embed_dim=dim, num_heads=heads, deform_num_heads=heads)
    return cfg


def _time(fn, steps: int, warmup: int) -> float:
    """Median seconds per call; `fn` must block until its result is ready."""
    return median_time(fn, steps, warmup)[0]


def _pipelined(run, steps: int) -> float:
    """Seconds per call with calls dispatched back to back (as a training loop runs)."""
    return pipelined_time(run.dispatch, run.wait, steps)[0]


def _step_fn(model, *, train: bool, adapter: bool):
    """(jitted step(params, rest, x) -> (loss, grads, rest), params, rest) for `model`."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(m, x):
        if adapter:
            feats, raw, _ = m(x, train=train)
            return sum(jnp.mean(f.astype(jnp.float32)) for f in feats + raw)
        tokens, _ = m(x, train=train)
        return jnp.mean(tokens.astype(jnp.float32))

    @jax.jit
    def step(p, rest, x):
        m = nnx.merge(graphdef, p, rest)
        loss, grads = nnx.value_and_grad(loss_fn)(m, x)
        return loss, grads, nnx.state(m, nnx.Not(nnx.Param))

    return step, params, rest


def _flops(lowered) -> float:
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


def cpu_lowered_flops(build, x_shape, *, train: bool, adapter: bool) -> float:
    """FLOPs of the same step lowered for the host CPU, with XLA attention and the XLA MSDA
    reference (the same arithmetic): `build(attention_implementation, msda_implementation)`
    makes the model.  Used where the accelerator's lowered program gives no count (jax 0.11.2
    on the H200 returned none)."""
    import jax

    from sarformer_jax.sharding import host_device

    with jax.default_device(host_device()):
        model = build("xla", "xla")
        step, params, rest = _step_fn(model, train=train, adapter=adapter)
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (params, rest))
        return _flops(step.lower(*abstract, jax.ShapeDtypeStruct(x_shape, jax.numpy.float32)))


def _jax_step(model, x, *, train: bool, adapter: bool, lower_only: bool = False):
    """Returns (step() -> blocks, flops per step); step is None when `lower_only`."""
    import jax

    step, params, rest = _step_fn(model, train=train, adapter=adapter)
    lowered = step.lower(params, rest, x)
    # FLOPs of the lowered (pre-optimisation) program: in the compiled GPU program the GEMMs are
    # cuBLAS custom calls, which XLA's cost analysis counts as 0 FLOPs (seen on the H100).
    flops = _flops(lowered)
    if lower_only:
        return None, flops
    compiled = lowered.compile()
    state = {"rest": rest}

    def dispatch():
        loss, grads, state["rest"] = compiled(params, state["rest"], x)
        state["last"] = (loss, grads)

    def run():
        dispatch()
        jax.block_until_ready(state["last"])

    run.compiled = compiled
    run.dispatch = dispatch
    run.wait = lambda: jax.block_until_ready(state["last"])
    return run, flops


def _profile(run, directory: str, tag: str) -> None:
    import jax

    from sarformer_jax.benchmarks import profile as prof

    jax.profiler.start_trace(directory, create_perfetto_trace=True)
    for _ in range(5):
        run()
    jax.profiler.stop_trace()
    prof.print_summary(prof.summarize(directory, run.compiled.as_text(), steps=5), tag)


def _timm_step(args, size, device):
    import torch
    from timm.models.beit import Beit

    c, depth, heads = (768, 12, 12) if args.variant == "b" else (1024, 24, 16)
    if args.depth:
        depth = args.depth
    model = Beit(img_size=size, patch_size=16, embed_dim=c, depth=depth, num_heads=heads,
                 use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1,
                 num_classes=0).to(device).train()
    x = torch.randn(args.batch, 3, *size, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def dispatch():
        model.zero_grad(set_to_none=True)
        with autocast:
            loss = model.forward_features(x).float().mean()
        loss.backward()

    def wait():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run():
        dispatch()
        wait()

    run.dispatch, run.wait = dispatch, wait
    return run


def run(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp
    from sarformer_jax.models.beit import BEiT
    from sarformer_jax.models.layers import init_rngs
    from sarformer_jax.models.vit_adapter import BEiTAdapter

    size = tuple(args.size) if len(args.size) == 2 else (args.size[0], args.size[0])
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    scans = [a.strip() for a in args.scan_layers.split(",") if a.strip()] or ["config"]
    cfg = _config(args, scans[0])  # validates; the header's depth
    dev = jax.devices()[0]
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in dev.device_kind), None)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(args.batch, *size, 3)), jnp.float32)
    print(f"# sarformer bench backbone  {datetime.date.today()}  jax {jax.__version__}  "
          f"device {dev.device_kind}  batch {args.batch}  size {size[0]}x{size[1]}  {args.dtype}  "
          f"depth {cfg.depth}  attention {args.attention_implementation}  remat {args.remat}  scan {args.scan_layers}")
    results = {}
    impls = [a.strip() for a in args.attention_implementation.split(",") if a.strip()]
    runs = [(m, impl, scan) for m in models
            for impl in (impls if m in ("beit", "adapter") else [None])
            for scan in (scans if m in ("beit", "adapter") else [None])]
    for name, impl, scan in runs:
        tag = name
        if impl is not None and len(impls) > 1:
            tag += f"/{impl}"
        if scan is not None and len(scans) > 1:
            tag += f"/scan-{scan}"
        pipe = float("nan")
        if name in ("beit", "adapter"):
            cls = BEiT if name == "beit" else BEiTAdapter

            def build(attention, msda, scan=scan, cls=cls, name=name):
                extra = {"msda_implementation": msda} if name == "adapter" else {}
                return cls(_config(args, scan), size, dtype=dtype, param_dtype=jnp.float32,
                           rngs=init_rngs(0), attention_implementation=attention, **extra)

            model = build(impl, args.msda_implementation)
            step, flops = _jax_step(model, x, train=True, adapter=name == "adapter",
                                    lower_only=args.lower_only)
            if name == "adapter" and model.scan_layers:
                # a while loop's body is counted once, not per trip (the standalone BEiT runs
                # its layers one by one whatever the flag, so its count stands)
                flops = float("nan")
            if not np.isfinite(flops):
                flops = cpu_lowered_flops(functools.partial(build, scan="off"), x.shape,
                                          train=True, adapter=name == "adapter")
            if args.lower_only:
                print(f"| {tag:8s} | {flops / 1e12:9.6f} TFLOP/step (lowered program) |")
                continue
            sec = _time(step, args.steps, args.warmup)
            pipe = _pipelined(step, args.steps)
            if args.profile:
                import os

                _profile(step, os.path.join(args.profile, tag.replace("/", "_")), tag)
        elif name == "timm" and args.lower_only:
            continue
        elif name == "timm":
            import torch

            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            timm_run = _timm_step(args, size, device)
            sec = _time(timm_run, args.steps, args.warmup)
            pipe = _pipelined(timm_run, args.steps)
            flops = results.get("beit", (None, None, float("nan")))[2]
        else:
            raise SystemExit(f"unknown model {name!r}; choose from beit, adapter, timm")
        best = results.get(name)
        if best is None or pipe < best[1] or (np.isnan(pipe) and sec < best[0]):
            results[name] = (sec, pipe, flops)

        def mfu(t):
            return 100 * flops / t / (peak * 1e12) if peak and np.isfinite(flops) else float("nan")

        print(f"| {tag:8s} | fwd+bwd {sec * 1e3:8.2f} ms | pipelined {pipe * 1e3:8.2f} ms | "
              f"{flops / 1e12:7.3f} TFLOP/step | MFU {mfu(sec):5.1f}% blocking, "
              f"{mfu(pipe):5.1f}% pipelined (of {peak} TFLOP/s) |")
    if "beit" in results and "timm" in results:
        (ts, tp, _), (os_, op, _) = results["timm"], results["beit"]
        print(f"timm / ours (BEiT): {ts / os_:.2f}x blocking, {tp / op:.2f}x pipelined")
    return 0
