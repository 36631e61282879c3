"""`sarformer bench attention`: BEiT's attention with its relative-position bias, by kernel.

In the SARFormer-B train step (640², batch 2) the 12 BEiT layers' attention is cuDNN's fused
attention with a [12, 1602, 1602] bias whose gradient it also computes: 6.7 ms of kernels a step
for 0.66 TFLOP (train run 34), ~100 TFLOP/s, against ~700 for the step's large GEMMs.  This times
one layer's attention (default: batch 2, 1601 tokens, 12 heads of 64) forward and forward+backward
by implementation, to show what the bias gradient costs and what the Pallas attention kernels
shipped with jax reach on these shapes:

- `cudnn_bias`: `layers.attention(..., implementation="cudnn")` with the bias differentiated, as
  BEiT runs it (tokens padded to an even 1602);
- `cudnn_bias_per_image`: the same bias broadcast to every image before the call, so that
  cuDNN returns a per-image bias gradient (summed over the images outside it);
- `cudnn_bias_nograd`: the same with the bias held constant (gradients for q, k, v only);
- `cudnn_nobias`: no bias, 1601 tokens;
- `xla_bias`: `jax.nn.dot_product_attention(implementation="xla")`, bias differentiated;
- `pallas_triton`: jax's Pallas Triton flash attention (`pallas.ops.gpu.attention.mha`), no bias,
  tokens padded to a multiple of 128 (its blocks need it; the padded keys are not masked, the
  figure is for the kernel's speed only);
- `pallas_mgpu`: jax's Mosaic GPU flash attention for Hopper (`attention_mgpu`), no bias, padded
  the same way;
- `torch_bias`: PyTorch's `scaled_dot_product_attention` with a differentiated float bias (the
  peer, as timm's BEiT runs it), when torch has CUDA.

FLOPs are counted at the true token count: 4·b·n·t²·d forward, 2.5× that for the backward.
"""

from __future__ import annotations

import argparse
import datetime

import numpy as np

IMPLS = ("cudnn_bias", "cudnn_bias_per_image", "cudnn_bias_nograd", "cudnn_nobias", "xla_bias", "pallas_triton",
         "pallas_mgpu", "torch_bias")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {IMPLS}")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1601, help="tokens (BEiT-B at 640²: 1601)")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--reps", type=int, default=20)


def _inputs(b: int, t: int, n: int, d: int):
    rng = np.random.default_rng(0)
    q, k, v, ct = (rng.standard_normal((b, t, n, d), np.float32) for _ in range(4))
    bias = rng.standard_normal((1, n, t, t), np.float32) * 0.5
    return q, k, v, bias, ct


def _pad_tokens(x, to: int):
    import jax.numpy as jnp

    return jnp.pad(x, ((0, 0), (0, to - x.shape[1]), (0, 0), (0, 0)))


def _jax_fns(impl: str, t: int, d: int):
    """(forward(q, k, v, bias), the differentiated arguments' indices) for a jax implementation;
    raises ImportError / NotImplementedError / ValueError when it cannot run here."""
    import jax
    import jax.numpy as jnp

    from sarformer_jax.models.layers import attention

    scale = d ** -0.5
    if impl in ("cudnn_bias", "cudnn_bias_nograd"):
        if jax.default_backend() != "gpu":
            raise NotImplementedError("cuDNN needs a GPU")

        def fwd(q, k, v, bias):
            return attention(q, k, v, bias, scale=scale, implementation="cudnn")

        return fwd, (0, 1, 2, 3) if impl == "cudnn_bias" else (0, 1, 2)
    if impl == "cudnn_bias_per_image":
        if jax.default_backend() != "gpu":
            raise NotImplementedError("cuDNN needs a GPU")

        def fwd(q, k, v, bias):
            per_image = jnp.broadcast_to(bias, (q.shape[0],) + bias.shape[1:])
            return attention(q, k, v, per_image, scale=scale, implementation="cudnn")

        return fwd, (0, 1, 2, 3)
    if impl == "cudnn_nobias":
        if jax.default_backend() != "gpu":
            raise NotImplementedError("cuDNN needs a GPU")
        return (lambda q, k, v, bias: attention(q, k, v, None, scale=scale,
                                                implementation="cudnn")), (0, 1, 2)
    if impl == "xla_bias":
        return (lambda q, k, v, bias: jax.nn.dot_product_attention(
            q, k, v, bias=bias.astype(q.dtype), scale=scale, implementation="xla")), (0, 1, 2, 3)
    padded = -(-t // 128) * 128
    if impl == "pallas_triton":
        if jax.default_backend() != "gpu":
            raise NotImplementedError("the Triton kernel runs on a GPU here (interpret mode is "
                                      "not timed)")
        from jax.experimental.pallas.ops.gpu import attention as pallas_attention

        def fwd(q, k, v, bias):
            del bias
            qp, kp, vp = (_pad_tokens(x, padded) for x in (q, k, v))
            out = pallas_attention.mha(qp, kp, vp, None, sm_scale=scale)
            return out[:, :t]

        return fwd, (0, 1, 2)
    if impl == "pallas_mgpu":
        if jax.default_backend() != "gpu":
            raise NotImplementedError("Mosaic GPU needs a Hopper GPU")
        from jax.experimental.pallas.ops.gpu import attention_mgpu

        config = attention_mgpu.TuningConfig(
            block_q=64, block_kv=128, max_concurrent_steps=2, block_q_dkv=64, block_kv_dkv=64,
            block_q_dq=64, block_kv_dq=64)

        def fwd(q, k, v, bias):
            del bias
            qp, kp, vp = (_pad_tokens(x, padded) for x in (q, k, v))
            out = attention_mgpu.attention(qp * jnp.asarray(scale, q.dtype), kp, vp, config)
            return out[:, :t]

        return fwd, (0, 1, 2)
    raise ValueError(f"bench attention: implementation {impl!r} is not one of {IMPLS}")


def _time_jax_impl(impl, arrays, reps):
    import jax
    import jax.numpy as jnp

    from sarformer_jax.benchmarks.msda import _time_jax

    q, k, v, ct = (jnp.asarray(arrays[i], jnp.bfloat16) for i in (0, 1, 2, 4))
    bias = jnp.asarray(arrays[3], jnp.float32)  # the model hands over a float32 bias
    t, d = q.shape[1], q.shape[-1]
    fwd, argnums = _jax_fns(impl, t, d)
    args = (q, k, v, bias)

    def fwd_bwd(q, k, v, bias, ct):
        full = [q, k, v, bias]

        def part(*xs):
            a = list(full)
            for i, x in zip(argnums, xs):
                a[i] = x
            return fwd(*a)

        out, pull = jax.vjp(part, *[full[i] for i in argnums])
        return out, pull(ct.astype(out.dtype))

    f = jax.jit(fwd)
    fb = jax.jit(fwd_bwd)
    out = f(*args)
    t_f = _time_jax(f, args, reps)
    t_fb = _time_jax(fb, args + (ct,), reps)
    return t_f, t_fb, out


def _time_torch(arrays):
    from sarformer_jax.benchmarks.timing import torch_cuda_peer

    peer = torch_cuda_peer()
    if isinstance(peer, str):
        raise NotImplementedError(peer)
    torch, do_bench = peer
    q, k, v, bias, ct = arrays
    dev = "cuda"

    def tt(a, grad=True):  # [b, t, n, d] -> torch's [b, n, t, d]
        x = torch.tensor(np.ascontiguousarray(a.transpose(0, 2, 1, 3)), device=dev,
                         dtype=torch.bfloat16)
        return x.requires_grad_(grad)

    qt, kt, vt, ctt = tt(q), tt(k), tt(v), tt(ct, False)
    bt = torch.tensor(bias, device=dev, dtype=torch.bfloat16).expand(q.shape[0], -1, -1, -1)
    bt = bt.contiguous().requires_grad_(True)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with torch.no_grad():
        t_f = do_bench(lambda: sdpa(qt, kt, vt, attn_mask=bt), warmup=25, rep=200,
                       return_mode="median")

    def step():
        out = sdpa(qt, kt, vt, attn_mask=bt)
        return torch.autograd.grad(out, (qt, kt, vt, bt), ctt)

    t_fb = do_bench(step, warmup=25, rep=200, return_mode="median")
    return t_f, t_fb


def run(args: argparse.Namespace) -> int:
    import jax

    impls = [i for i in args.impls.split(",") if i]
    for i in impls:
        if i not in IMPLS:
            raise ValueError(f"bench attention: implementation {i!r} is not one of {IMPLS}")
    b, t, n, d = args.batch, args.tokens, args.heads, args.head_dim
    arrays = _inputs(b, t, n, d)
    flops = 4 * b * n * t * t * d
    print(f"# attention bench: device {jax.devices()[0].device_kind}, jax {jax.__version__}, "
          f"{datetime.date.today().isoformat()}; batch {b}, {t} tokens, {n} heads of {d}, bf16; "
          f"{flops / 1e9:.2f} GFLOP forward, {3.5 * flops / 1e9:.2f} forward+backward", flush=True)
    print("| implementation | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s | fwd max abs err vs float64 |",
          flush=True)
    print("|---|---|---|---|---|---|", flush=True)
    ref = None
    for impl in impls:
        try:
            if impl == "torch_bias":
                t_f, t_fb = _time_torch(arrays)
                out = None
            else:
                t_f, t_fb, out = _time_jax_impl(impl, arrays, args.reps)
        except Exception as e:  # noqa: BLE001 -- one implementation failing (an API that
            # differs in this jax, a kernel that does not fit) is reported in its row
            msg = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
            print(f"| {impl} | ({type(e).__name__}: {msg}) | | | | |", flush=True)
            continue
        diff = ""
        if out is not None and "bias" in impl and "nobias" not in impl:
            o = np.asarray(out, np.float32)
            if ref is None:
                ref = _reference(arrays)
            diff = f"{float(np.abs(o - ref).max()):.2e}"
        print(f"| {impl} | {t_f:.4f} | {t_fb:.4f} | {flops / t_f / 1e9:.1f} | "
              f"{3.5 * flops / t_fb / 1e9:.1f} | {diff} |", flush=True)
    return 0


def _reference(arrays) -> np.ndarray:
    """The attention in float64 of the inputs rounded to bf16 (what every implementation sees)."""
    import jax.numpy as jnp

    q, k, v, bias, _ = (np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32), np.float64)
                        for a in arrays)
    d = q.shape[-1]
    logits = np.einsum("btnd,bsnd->bnts", q, k) * d ** -0.5 + bias
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnd->btnd", p, v)
