"""`sarformer bench sam_tokens`: the image-token update of SAM's two-way transformer alone
(image-to-token attention, residual, LayerNorm) at the automatic generator's chunk size: the
XLA "absorbed" path (`Attention.image_to_tokens` + `norm4`) against the fused Pallas kernel
(`Attention.image_to_tokens_norm`) over a sweep of launch settings, each checked against the
float32 XLA path, with the image tokens shared by an image's prompts (the first block) and with
one map per prompt (the second).

    sarformer bench sam_tokens --prompts 64 --block-l 32,64,128 --num-warps 4,8 --heads loop,merged --token-pad 8,16
    python scripts/bench_sam_tokens.py

One call is one block's update for one chunk of `--prompts` prompts per image, 2 images (the
640² batch of 2).  Times are medians of --iters calls after --warmup, blocking on the output.
Paste the table into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import platform

import numpy as np

from sarformer_jax.benchmarks.timing import add_launch_arguments, int_list, median_time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", type=int, default=64, help="prompts per image and call (points_per_batch)")
    parser.add_argument("--images", type=int, default=2, help="images per call")
    parser.add_argument("--tokens", type=int, default=64, help="image-token grid side (64 for SAM)")
    parser.add_argument("--prompt-tokens", type=int, default=7, help="tokens per prompt (7 in the generator)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    add_launch_arguments(parser)
    parser.add_argument("--heads", default="loop,merged",
                        help="comma list of the kernel's head layouts (loop: a pair of products per head; "
                             "merged: all heads in one pair)")
    parser.add_argument("--token-pad", default="0",
                        help="comma list of the prompt tokens' padding multiple (16, or 8 with merged heads; "
                             "0: the kernel's default)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)


def _block(dtype):
    """A two-way block with random weights (same seed for every dtype), norm4 moved off 1 and 0."""
    import jax.numpy as jnp

    from sarformer_jax.models.layers import init_rngs
    from sarformer_jax.sam.transformer import TwoWayAttentionBlock

    blk = TwoWayAttentionBlock(embedding_dim=256, num_heads=8, rngs=init_rngs(0),
                               dtype=None if dtype == jnp.float32 else dtype)
    rng = np.random.default_rng(1)
    blk.norm4.scale[...] = jnp.asarray(1.0 + 0.1 * rng.normal(size=blk.norm4.scale.shape), jnp.float32)
    blk.norm4.bias[...] = jnp.asarray(0.1 * rng.normal(size=blk.norm4.bias.shape), jnp.float32)
    return blk


def run(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    on_gpu = jax.default_backend() == "gpu"
    dtype = jnp.dtype(args.dtype)
    c, g, p, t, l = 256, args.images, args.prompts, args.prompt_tokens, args.tokens ** 2
    rng = np.random.default_rng(0)
    pe = rng.normal(size=(1, 1, l, c)).astype(np.float32)
    tok_q, tok_v = (rng.normal(size=(g, p, t, c)).astype(np.float32) for _ in range(2))
    keys_of = {"shared": rng.normal(size=(g, 1, l, c)).astype(np.float32),
               "per prompt": rng.normal(size=(g, p, l, c)).astype(np.float32)}

    def update(keys, fused, dt, **settings):
        blk = _block(dt)
        graphdef, state = nnx.split(blk)

        def f(st, k, pe, q, v):
            blk = nnx.merge(graphdef, st)
            att = blk.cross_attn_image_to_token
            if fused is None:
                return blk.norm4(k + att.image_to_tokens(k + pe, q, v))
            return att.image_to_tokens_norm(k, pe, q, v, blk.norm4, interpret=fused == "interpret", **settings)

        f = jax.jit(f)
        xs = [jnp.asarray(a, dt) for a in (keys, pe, tok_q, tok_v)]
        return lambda: f(state, *xs)

    rows = []
    tol = 1e-2 if dtype == jnp.bfloat16 else 1e-5
    kernel = "gpu" if on_gpu else "interpret"
    for kind, keys in keys_of.items():
        with jax.default_matmul_precision("highest"):
            ref = np.asarray(update(keys, None, jnp.float32)(), np.float64)

        def timed(name, f):
            try:
                out = f()
                out.block_until_ready()
            except Exception as e:  # a launch setting Triton cannot compile: report and go on
                print(f"[sam_tokens] {kind}, {name}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                      flush=True)
                rows.append((kind, name, None, None))
                return
            err = float(np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref))
            ms = median_time(lambda: f().block_until_ready(), args.iters, args.warmup)[0] * 1e3
            print(f"[sam_tokens] {kind}, {name}: {ms:.3f} ms per call, rel err {err:.2e} vs float32", flush=True)
            rows.append((kind, name, ms, err))

        timed("xla absorbed", update(keys, None, dtype))
        layouts = [h for h in args.heads.split(",") if h.strip()]
        for hl, bl, nw, ns, tpad in itertools.product(layouts, int_list(args.block_l), int_list(args.num_warps),
                                                      int_list(args.num_stages), int_list(args.token_pad)):
            if hl != "merged" and tpad == 8:
                continue  # padding to 8 is a setting of the merged kernel only
            timed(f"pallas heads {hl} block_l {bl} warps {nw} stages {ns}" + (f" pad {tpad}" if tpad else ""),
                  update(keys, kernel, dtype, block_l=bl, num_warps=nw, num_stages=ns, heads=hl,
                         token_pad=tpad or None))
    dev = jax.devices()[0]
    print(f"# sarformer bench sam_tokens  {datetime.date.today()}  jax {jax.__version__}  device "
          f"{dev.device_kind}  dtype {args.dtype}  {g} images x {p} prompts x {l} tokens x {c}, {t} prompt tokens  "
          f"host {platform.node()}")
    print("| image tokens | variant | ms per call | vs XLA | rel err vs float32 |\n|---|---|---|---|---|")
    for kind, name, ms, err in rows:
        xla = next(r[2] for r in rows if r[0] == kind and r[1] == "xla absorbed")
        if ms is None:
            print(f"| {kind} | {name} | failed | - | - |")
        else:
            ratio = "-" if xla is None else f"{xla / ms:.2f}x"
            print(f"| {kind} | {name} | {ms:.3f} | {ratio} | {err:.1e} |")
    wrong = [f"{kind}: {name}" for kind, name, ms, err in rows if err is not None and not err <= tol]
    if wrong:
        print(f"[sam_tokens] rel err above {tol:g} (the {args.dtype} tolerance): {', '.join(wrong)}")
    return 1 if wrong else 0
