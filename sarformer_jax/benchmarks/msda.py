"""`sarformer bench msda`: multi-scale deformable attention timings on the device.

Times, in one run, the Pallas kernels, the XLA reference (jit of `ms_deform_attn_reference`,
backward by autodiff) and a PyTorch grid_sample version (our own port of Deformable-DETR's
`ms_deform_attn_core_pytorch` semantics) on the three SARFormer-B cases of shared/anchors.md,
forward and forward+backward, fp32 and bf16.  No CUDA peer: `deformops` is not in the package
index this project can reach (docs/msda_notes.md); anchors.md holds the CUDA op's figures.
JAX timings: median over groups of 10 back-to-back calls, one sync a group; fwd+bwd is
`jit(value_and_grad)` of a loss on the output, so the forward runs as it does in training; torch:
triton.testing.do_bench median of forward + autograd.grad.  Writes a markdown table (stdout and --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import time

import numpy as np

CASES = {
    # name: (batch, queries, value levels, heads, points, head dim)
    "pixdec_enc": (2, 8400, ((80, 80), (40, 40), (20, 20)), 8, 4, 32),
    "adapter_inj": (2, 1600, ((80, 80), (40, 40), (20, 20)), 12, 4, 32),
    "adapter_ext": (2, 8400, ((40, 40),), 12, 4, 32),
}


FWDBWD_MODES = ("vjp", "loss")  # what "fwd+bwd" times: see _jax_fns
# The query grids whose pixel centres are the cases' reference points (the pixel decoder's and
# the extractor's queries are the pixels of the three feature maps; the injector's the 40 x 40
# ViT tokens).
QUERY_GRIDS = {
    "pixdec_enc": ((80, 80), (40, 40), (20, 20)),
    "adapter_inj": ((40, 40),),
    "adapter_ext": ((80, 80), (40, 40), (20, 20)),
}
# "uniform": anchors.md's locations, uniform in [-0.05, 1.05] on every level.  "init": as the
# model samples at initialisation, Deformable-DETR's: each query's reference point (its pixel
# centre) plus, for head h and point p, (p + 1) pixels of the level along the head's direction
# (cos, sin of 2 pi h / H, scaled so the larger component is 1), jittered by N(0, 0.5) pixels as
# a trained offset head moves them.  Neighbouring queries then sample neighbouring rows, so
# the value gradient's adds pile onto the same rows (which "uniform" never shows).
LOCATIONS = ("uniform", "init")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--impls", default="pallas,xla,torch")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--block-q", type=int, default=None, help="override forward block_q")
    parser.add_argument("--block-q-bwd", type=int, default=None)
    parser.add_argument("--num-warps", type=int, default=None)
    parser.add_argument("--grid-orders", default=None, metavar="ORDERS",
                        help="also time the Pallas kernels launched in these grid orders "
                             "(comma-separated permutations of 'bqh', fastest axis first; "
                             "BlockSizes.grid_order)")
    parser.add_argument("--skip-outside", default="default",
                        choices=("default", "on", "off", "both"),
                        help="BlockSizes.skip_outside / skip_outside_bwd (corners outside the "
                             "map neither gathered nor scattered; the default skips in the "
                             "backward only): 'on' times the Pallas variants skipping in both "
                             "kernels, 'off' in neither, 'both' the default and those twins")
    parser.add_argument("--value-grad", default=None, metavar="METHODS",
                        help="also time the Pallas variants with these BlockSizes.value_grad "
                             "methods (comma list of scatter, pull; named NAME/METHOD)")
    parser.add_argument("--pull-configs", default=None, metavar="R:C:S[:E],...",
                        help="with a 'pull' variant, also time it at these BlockSizes "
                             "block_rows_pull : chunks_pull : num_stages_pull [: "
                             "pull_run_entries] (comma list, e.g. 16:1:1,32:4:1,32:1:1:16; named "
                             "NAME/pull[rR,cC,sS] or NAME/pull[rR,cC,sS,eE])")
    parser.add_argument("--tile-point-grads", action="store_true",
                        help="also time each Pallas variant with BlockSizes.tile_point_grads "
                             "flipped (the backward's location and weight gradients stored as "
                             "one tile a program; named NAME+tile or NAME-tile)")
    parser.add_argument("--configs", default=None, metavar="FQ:FW:BQ:BW,...",
                        help="also time the Pallas kernels at these launch settings: forward "
                             "block_q : forward num_warps : backward block_q : backward num_warps "
                             "(comma list, e.g. 64:8:16:2,64:8:32:8; named "
                             "pallas[fFQwFW,bBQwBW]); the other settings stay the default's")
    parser.add_argument("--sweep", action="store_true",
                        help="also time a small block-size sweep of the Pallas kernel")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="also trace the Pallas fwd+bwd of each case and dtype into DIR and "
                             "print its GPU kernels (zero fill, kernels, casts) per call")
    parser.add_argument("--roofline", action="store_true",
                        help="also time the backward's parts alone (value-gradient atomics at "
                             "the real rows, at consecutive positions, and plain stores): "
                             "benchmarks/msda_roofline.py")
    parser.add_argument("--fwdbwd", default="vjp", choices=FWDBWD_MODES,
                        help="what fwd+bwd times: 'vjp' the output and gradients for a given "
                             "cotangent, as the torch peer; 'loss' value_and_grad of "
                             "sum(out * ct), as MSDA runs 3-7")
    parser.add_argument("--copies", type=int, default=1,
                        help="calls per jitted program, each on its own copy of the inputs "
                             "(time per call = program time / copies): >1 takes the host's "
                             "dispatch out of short calls")
    parser.add_argument("--locations", default="uniform", choices=LOCATIONS,
                        help="sampling locations: 'uniform' as anchors.md, or 'init' as the "
                             "model samples (reference points plus Deformable-DETR's initial "
                             "offsets, jittered): LOCATIONS")
    parser.add_argument("--out", default=None, help="write results (json) here")


def init_locations(case: str, rng) -> np.ndarray:
    """The "init" locations of `case` ([B, Lq, H, L, P, 2], see LOCATIONS)."""
    b, q, shapes, n, p, _ = CASES[case]
    refs = []
    for h, w in QUERY_GRIDS[case]:
        ys, xs = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
        refs.append(np.stack([xs.ravel(), ys.ravel()], -1))
    ref = np.concatenate(refs)  # [Lq, 2] as (x, y)
    assert ref.shape[0] == q, (case, ref.shape)
    theta = np.arange(n) * (2.0 * np.pi / n)
    direction = np.stack([np.cos(theta), np.sin(theta)], -1)
    direction /= np.abs(direction).max(-1, keepdims=True)  # [H, 2]
    steps = np.arange(1, p + 1, dtype=np.float64)  # [P]
    offsets = direction[:, None, None, :] * steps[None, None, :, None]  # [H, 1, P, 2] pixels
    offsets = offsets + rng.normal(0.0, 0.5, (b, q, n, len(shapes), p, 2))
    size = np.asarray([(w, h) for h, w in shapes], np.float64)  # [L, 2] as (w, h)
    loc = ref[None, :, None, None, None, :] + offsets / size[None, None, None, :, None, :]
    return loc.astype(np.float32)


def make_inputs(case: str, seed: int = 0, locations: str = "uniform"):
    if locations not in LOCATIONS:
        raise ValueError(f"--locations {locations!r}: choose from {', '.join(LOCATIONS)}")
    b, q, shapes, n, p, d = CASES[case]
    rng = np.random.default_rng(seed)
    s = sum(h * w for h, w in shapes)
    n_lvl = len(shapes)
    value = rng.standard_normal((b, s, n, d)).astype(np.float32)
    loc = rng.uniform(-0.05, 1.05, (b, q, n, n_lvl, p, 2)).astype(np.float32)
    if locations == "init":
        loc = init_locations(case, rng)
    logits = rng.standard_normal((b, q, n, n_lvl * p)).astype(np.float32)
    att = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return shapes, value, loc, att.reshape(b, q, n, n_lvl, p).astype(np.float32)


def _time_copies(fn, args, reps: int, copies: int) -> float:
    """Time per call of `fn` with `copies` calls inside one jitted program, each on its own
    copy of the inputs (separate buffers: XLA can neither merge the calls nor hoist them).  One
    dispatch then covers `copies` calls, so calls shorter than the host's dispatch time (the
    forwards of the small cases, ~0.04 ms) are timed by the device, not by the host."""
    import jax
    import jax.numpy as jnp

    if copies < 1:
        raise ValueError(f"--copies must be >= 1, got {copies}")
    if copies == 1:
        return _time_jax(fn, args, reps)
    n = len(args)

    @jax.jit
    def many(*flat):
        return [fn(*flat[i * n:(i + 1) * n]) for i in range(copies)]

    flat = [jnp.array(a, copy=True) for _ in range(copies) for a in args]
    return _time_jax(many, flat, reps) / copies


def _time_jax(fn, args, reps: int, inner: int = 10) -> float:
    """Median over `reps` groups of the mean time of `inner` back-to-back calls (one sync per
    group, so host dispatch overlaps device work as it does in a training step)."""
    import jax

    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / inner)
    return float(np.median(times)) * 1e3


def _jax_fns(impl: str, shapes, block_sizes, mode: str = "vjp"):
    """Jitted forward and forward+backward.  `mode` says what fwd+bwd times:

    - "vjp" (default): the output and the three gradients for a given cotangent, what the
      PyTorch peer times (`autograd.grad(out, inputs, ct)`): the two kernels and the zero
      fill of the value gradient;
    - "loss": `value_and_grad` of sum(out * ct) (MSDA runs 3-7), which also reduces the output
      to the scalar and builds the cotangent from ct in the graph: ~0.02 ms more at pixdec_enc.
    Both return the forward's result too, so XLA cannot drop the forward kernel (with `grad` of a
    sum alone the loss is dead code: runs 1 and 2 of docs/benchmarks.md timed the backward only).
    """
    import jax
    import jax.numpy as jnp

    from sarformer_jax.kernels import ms_deform_attn

    if mode not in FWDBWD_MODES:
        raise ValueError(f"fwd+bwd mode {mode!r}: expected one of {FWDBWD_MODES}")

    def fwd(v, loc, att):
        return ms_deform_attn(v, shapes, loc, att, implementation=impl, block_sizes=block_sizes)

    if mode == "vjp":
        def fwd_bwd(v, loc, att, ct):
            out, pull = jax.vjp(fwd, v, loc, att)
            return out, pull(ct.reshape(out.shape).astype(out.dtype))

        return jax.jit(fwd), jax.jit(fwd_bwd)

    def loss(v, loc, att, ct):
        return jnp.sum(fwd(v, loc, att).astype(jnp.float32) * ct)

    return jax.jit(fwd), jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def cotangent(shape, dtype: str, mode: str):
    """The cotangent fwd+bwd is timed with, made before the timing: in "vjp" mode in the
    output's dtype, as the peer's (`torch.randn_like(out)`) and as a model's backward hands it
    over; "loss" multiplies it with the float32 output, so float32.  (MSDA runs 8-12 made it in
    float32 in both modes, so their bf16 "vjp" figures include a cast of it to bf16 inside the
    timed program: ~0.01 ms at pixdec_enc that fp32 did not pay.)"""
    import jax.numpy as jnp

    ct = np.random.default_rng(1).standard_normal(shape)
    return jnp.asarray(ct, jnp.dtype(dtype) if mode == "vjp" else jnp.float32)


def torch_msda(value, shapes, loc, att):
    """grid_sample formulation: per level, sample [B*H, D, Lq, P] and weight-sum."""
    import torch
    import torch.nn.functional as F

    b, s, n, d = value.shape
    _, q, _, n_lvl, p, _ = loc.shape
    per_level = value.split([h * w for h, w in shapes], dim=1)
    grid = 2 * loc - 1
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        v = per_level[lvl].flatten(2).transpose(1, 2).reshape(b * n, d, h, w)
        g = grid[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # [b*n, q, p, 2]
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))  # [b*n, d, q, p]
    a = att.transpose(1, 2).reshape(b * n, 1, q, n_lvl * p)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * a).sum(-1).view(b, n * d, q)
    return out.transpose(1, 2).contiguous()


def _time_torch(case, dtype: str, backward: bool, impl: str, locations: str = "uniform"):
    import torch
    from triton.testing import do_bench

    shapes, value, loc, att = make_inputs(case, locations=locations)
    tdt = torch.float32 if dtype == "float32" else torch.bfloat16
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    v = torch.tensor(value, device="cuda", dtype=tdt, requires_grad=backward)
    lo = torch.tensor(loc, device="cuda", dtype=tdt, requires_grad=backward)
    a = torch.tensor(att, device="cuda", dtype=tdt, requires_grad=backward)
    del impl
    fn = lambda: torch_msda(v, shapes, lo, a)  # noqa: E731
    if not backward:
        with torch.no_grad():
            return do_bench(fn, warmup=25, rep=200, return_mode="median")
    ct = torch.randn_like(fn())

    def step():
        out = fn()
        torch.autograd.grad(out, (v, lo, a), ct)

    return do_bench(step, warmup=25, rep=200, return_mode="median")


def _profile_call(fn, args, trace_dir: str, tag: str, calls: int = 10) -> None:
    """Trace `calls` back-to-back calls of the jitted `fn` and print its kernels per call."""
    import gzip
    import os

    import jax

    from sarformer_jax.benchmarks import profile as prof

    hlo = fn.lower(*args).compile().as_text()
    os.makedirs(trace_dir, exist_ok=True)
    with gzip.open(os.path.join(trace_dir, "compiled_hlo.txt.gz"), "wt") as f:
        f.write(hlo)
    jax.block_until_ready(fn(*args))
    jax.profiler.start_trace(trace_dir)
    for _ in range(calls):
        out = fn(*args)
    jax.block_until_ready(out)
    jax.profiler.stop_trace()
    prof.print_summary(prof.summarize(trace_dir, hlo, steps=calls, top=12), tag)


def _roofline(args) -> list[dict]:
    """Time the backward's parts alone (see benchmarks/msda_roofline.py); the value-gradient
    atomics do not depend on the input dtype (fp32 adds of an fp32 gradient)."""
    import jax.numpy as jnp

    from sarformer_jax.benchmarks import msda_roofline as rl
    from sarformer_jax.kernels.msda_pallas import default_block_sizes

    out = []
    for case in args.cases.split(","):
        b, q, shapes, n, p, d = CASES[case]
        bs = default_block_sizes(d, q)
        block_q = args.block_q_bwd or bs.block_q_bwd
        warps = args.num_warps or bs.num_warps_bwd
        _, _, loc, att = make_inputs(case, locations=getattr(args, "locations", "uniform"))
        g = np.random.default_rng(2).standard_normal((b, q, n, d)).astype(np.float32)
        jargs = (jnp.asarray(loc), jnp.asarray(att), jnp.asarray(g))
        adds = rl.atomic_count(CASES[case])
        for probe in rl.PROBES:
            try:
                t = _time_jax(rl.probe_fn(probe, shapes, block_q, warps), jargs, args.reps)
            except Exception as e:
                print(f"{case} roofline {probe}: FAILED {type(e).__name__}: {e}"[:400])
                continue
            rate = adds / (t * 1e-3) / 1e9
            print(f"{case:12s} roofline  {probe:12s} {t:8.3f} ms  {adds / 1e6:.0f} M fp32 "
                  f"elements, {rate:.0f} G/s ({rate * 4 / 1e3:.2f} TB/s)", flush=True)
            out.append(dict(case=case, dtype="float32", impl=f"probe:{probe}", fwd_ms=float("nan"),
                            fwdbwd_ms=t, elements=adds))
        if args.profile:
            import os
            fn = rl.probe_fn("scatter", shapes, block_q, warps)
            _profile_call(fn, jargs, os.path.join(args.profile, f"{case}_probe_scatter"),
                          f"{case} probe scatter")
    return out


def _grid_order_variants(bs, orders: str | None) -> list:
    """("pallas", bs), then one ("pallas[ORDER]", bs launched in ORDER) per other grid order."""
    import dataclasses

    variants = [("pallas", bs)]
    for order in (orders.split(",") if orders else []):
        if order != bs.grid_order:
            variants.append((f"pallas[{order}]", dataclasses.replace(bs, grid_order=order)))
    return variants


def _config_variants(bs, configs: str | None) -> list:
    """One ("pallas[fFQwFW,bBQwBW]", bs at those launch settings) per entry of --configs that
    differs from bs."""
    out = []
    for text in (configs.split(",") if configs else []):
        parts = text.split(":")
        if len(parts) != 4 or not all(v.isdigit() and int(v) > 0 for v in parts):
            raise ValueError(f"--configs entry {text!r}: expected FQ:FW:BQ:BW, four positive "
                             "integers")
        fq, fw, bq, bw = map(int, parts)
        alt = dataclasses.replace(bs, block_q=fq, num_warps=fw, block_q_bwd=bq, num_warps_bwd=bw)
        if alt != bs:
            out.append((f"pallas[f{fq}w{fw},b{bq}w{bw}]", alt))
    return out


def _tile_variants(variants: list, on: bool) -> list:
    """With `on`, each Pallas variant followed by its twin with `tile_point_grads` flipped
    (NAME+tile or NAME-tile)."""
    if not on:
        return list(variants)
    out = []
    for name, bs in variants:
        flip = not bs.tile_point_grads
        out += [(name, bs), (f"{name}{'+' if flip else '-'}tile",
                             dataclasses.replace(bs, tile_point_grads=flip))]
    return out


def _skip_outside_variants(variants: list, mode: str) -> list:
    """The Pallas variants as they are ("default"), with corners outside the map skipped in
    both kernels ("on": named NAME+skip) or in neither ("off": NAME-skip), or all three
    ("both": each variant followed by those of its twins that differ from it)."""
    if mode not in ("default", "on", "off", "both"):
        raise ValueError(f"--skip-outside must be default, on, off or both, got {mode!r}")
    if mode == "default":
        return list(variants)
    out = []
    for name, bs in variants:
        twins = {m: (f"{name}{sign}skip", dataclasses.replace(bs, skip_outside=m == "on",
                                                             skip_outside_bwd=m == "on"))
                 for m, sign in (("off", "-"), ("on", "+"))}
        if mode != "both":
            out.append(twins[mode])
            continue
        out.append((name, bs))
        out += [t for t in twins.values()
                if (t[1].skip_outside, t[1].skips_bwd) != (bs.skip_outside, bs.skips_bwd)]
    return out


def _parse_pull_configs(text: str | None) -> list[tuple[int, int, int, int]]:
    """ROWS:CHUNKS:STAGES[:ENTRIES] items -> (block_rows_pull, chunks_pull, num_stages_pull,
    pull_run_entries), ENTRIES 0 when left out."""
    out = []
    for item in filter(None, (text or "").split(",")):
        try:
            vals = [int(v) for v in item.split(":")]
            if len(vals) not in (3, 4):
                raise ValueError
        except ValueError:
            raise ValueError(f"--pull-configs {item!r}: expected ROWS:CHUNKS:STAGES[:ENTRIES], "
                             "e.g. 32:4:1 or 32:1:1:16") from None
        out.append(tuple(vals) + (0,) * (4 - len(vals)))
    return out


def _value_grad_variants(variants: list, methods: str | None, configs: str | None = None) -> list:
    """Each Pallas variant, followed by its twins with another value-gradient method
    (BlockSizes.value_grad: NAME/METHOD) and, for "pull", other (rows, chunks, stages[,
    entries]) of its kernel (NAME/pull[rR,cC,sS] or NAME/pull[rR,cC,sS,eE])."""
    from sarformer_jax.kernels.msda_pallas import VALUE_GRAD_METHODS

    if not methods:
        return list(variants)
    wanted = [m for m in methods.split(",") if m]
    for m in wanted:
        if m not in VALUE_GRAD_METHODS:
            raise ValueError(f"--value-grad {m!r}: choose from {', '.join(VALUE_GRAD_METHODS)}")
    pull_configs = _parse_pull_configs(configs)
    out = []
    for name, bs in variants:
        out.append((name, bs))
        for m in wanted:
            twin = dataclasses.replace(bs, value_grad=m)
            if m != bs.value_grad:
                out.append((f"{name}/{m}", twin))
            if m != "pull":
                continue
            for r, c, st, e in pull_configs:
                alt = dataclasses.replace(twin, block_rows_pull=r, chunks_pull=c,
                                          num_stages_pull=st, pull_run_entries=e)
                if alt != twin:
                    out.append((f"{name}/pull[r{r},c{c},s{st}{f',e{e}' if e else ''}]", alt))
    return out


def run(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp

    from sarformer_jax.kernels.msda_pallas import default_block_sizes

    impls = args.impls.split(",")
    results = []
    device = str(jax.devices()[0].device_kind)
    locations = getattr(args, "locations", "uniform")
    print(f"# msda bench: device {device}, jax {jax.__version__}, "
          f"{datetime.date.today().isoformat()}, locations {locations}", flush=True)
    for case in args.cases.split(","):
        b, q, shapes, n, p, d = CASES[case]
        bs = default_block_sizes(d, q)
        if args.block_q or args.block_q_bwd or args.num_warps:
            bs = dataclasses.replace(bs, block_q=args.block_q or bs.block_q,
                                     num_warps=args.num_warps or bs.num_warps,
                                     block_q_bwd=args.block_q_bwd or bs.block_q_bwd,
                                     num_warps_bwd=args.num_warps or bs.num_warps_bwd)
        variants = _grid_order_variants(bs, args.grid_orders) if "pallas" in impls else []
        variants = _skip_outside_variants(variants, getattr(args, "skip_outside", "default"))
        variants = _value_grad_variants(variants, getattr(args, "value_grad", None),
                                        getattr(args, "pull_configs", None))
        if "pallas" in impls:
            variants += _config_variants(bs, getattr(args, "configs", None))
        variants = _tile_variants(variants, getattr(args, "tile_point_grads", False))
        if args.sweep and "pallas" in impls:
            for bq, bqb, nw, rel in ((64, 32, 4, False), (32, 16, 4, True), (64, 16, 4, True),
                                     (32, 32, 4, True), (64, 32, 8, True), (64, 16, 2, True),
                                     (64, 64, 4, True), (128, 64, 8, True)):
                alt = dataclasses.replace(bs, block_q=bq, num_warps=nw, block_q_bwd=bqb,
                                          num_warps_bwd=nw, relaxed_atomics=rel)
                if alt != bs:
                    variants.append((f"pallas[{bq},{bqb},w{nw}{'' if rel else ',acqrel'}]", alt))
        if "xla" in impls:
            variants.append(("xla", None))
        for dtype in args.dtypes.split(","):
            shapes_, value, loc, att = make_inputs(case, locations=locations)
            jdt = jnp.dtype(dtype)
            jargs = (jnp.asarray(value, jdt), jnp.asarray(loc, jdt), jnp.asarray(att, jdt))
            ct = cotangent((b, q, n * d), dtype, args.fwdbwd)
            for name, vbs in variants:
                impl = "xla" if name == "xla" else "pallas"
                try:
                    fwd, grad = _jax_fns(impl, shapes_, vbs, args.fwdbwd)
                    t_f = _time_copies(fwd, jargs, args.reps, args.copies)
                    t_fb = _time_copies(grad, jargs + (ct,), args.reps, args.copies)
                except Exception as e:  # report and go on: one variant failing is a result
                    print(f"{case} {dtype} {name}: FAILED {type(e).__name__}: {e}"[:400])
                    continue
                results.append(dict(case=case, dtype=dtype, impl=name, fwd_ms=t_f, fwdbwd_ms=t_fb,
                                    block_sizes=None if vbs is None else vbs.__dict__))
                if args.profile and name in ("pallas", "pallas/pull"):
                    import os
                    _profile_call(grad, jargs + (ct,),
                                  os.path.join(args.profile, f"{case}_{dtype}_{name.replace('/', '_')}"),
                                  f"{case} {dtype} {name} fwd+bwd")
                print(f"{case:12s} {dtype:9s} {name:22s} fwd {t_f:8.3f} ms  fwd+bwd {t_fb:8.3f} ms",
                      flush=True)
            for name in ("torch",):
                if name not in impls:
                    continue
                try:
                    t_f = _time_torch(case, dtype, False, name, locations)
                    t_fb = _time_torch(case, dtype, True, name, locations)
                except Exception as e:
                    print(f"{case} {dtype} {name}: not timed ({type(e).__name__}: {e})"[:300])
                    continue
                results.append(dict(case=case, dtype=dtype, impl=name, fwd_ms=t_f,
                                    fwdbwd_ms=t_fb))
                print(f"{case:12s} {dtype:9s} {name:22s} fwd {t_f:8.3f} ms  fwd+bwd {t_fb:8.3f} ms",
                      flush=True)
    if args.roofline and "pallas" in impls:
        results += _roofline(args)
    print("\n| case | dtype | impl | fwd ms | fwd+bwd ms |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['case']} | {r['dtype']} | {r['impl']} | {r['fwd_ms']:.3f} | "
              f"{r['fwdbwd_ms']:.3f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=device, jax=jax.__version__, date=datetime.date.today().isoformat(),
                           fwdbwd=args.fwdbwd, copies=args.copies, locations=locations,
                           results=results), f, indent=1)
    return 0
