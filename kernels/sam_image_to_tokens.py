"""Pallas (Triton backend) kernel for the image-token update of SAM's two-way transformer: the
image-to-token cross-attention, its residual and the LayerNorm after it, fused.

In every `TwoWayAttentionBlock` each prompt's image tokens k [l, c] (l = 64 * 64, c = 256) are
updated by attending to the prompt's t tokens (7 in the generator):

  k' = LayerNorm(k + sum_n softmax_t((k + pe) W_q,n K_n^T / sqrt(d)) V_n W_o,n + b_o)

With the projections moved to the token side (`Attention.image_to_tokens`, "absorbed"), the
image side is two thin products per prompt: logits = (k + pe) @ m [c, n*t] and
out = attn @ u [n*t, c].  In XLA, the logits GEMM reads k, the output GEMM writes a [l, c]
tensor, and the residual + two-pass LayerNorm read and write [l, c] tensors again: about eight
passes over a prompt's image tokens, the largest share of the automatic mask generator's
decoder time (docs/benchmarks.md, SAM run 5).  Here one program instance loads `block_l` image
tokens and their positional encodings once, computes the 8 heads' logits, softmax and outputs
on chip, adds the residual and writes the normalised tokens: one read and one write.

Layout: tokens are padded to `tp` (a multiple of 16, the smallest product width, or of 8 when
the heads' products are merged) with zero columns in m and u and a -1e30 logit bias, so each
head's softmax runs over one [block_l, tp] tile.  Products take the inputs' dtype with float32
accumulation; the softmax weights are rounded to that dtype before the output product (as the
XLA path stores them); the residual and LayerNorm are float32.  Grid: (prompts, tokens /
block_l).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sarformer_jax.kernels.triton_backend import plgpu, require
from sarformer_jax.sharding import batch_partitioned, per_batch_shard

PAD_LOGIT = -1e30


def _i(k: int) -> jax.Array:
    return jnp.int32(k)  # static indices as int32 scalars (interpreter-safe)


def _layer_norm(acc, g_ref, be_ref, eps: float):
    """The float32 LayerNorm of the residual sum acc [block_l, c] (two-pass variance)."""
    c = acc.shape[-1]
    mu = jnp.sum(acc, axis=1)[:, None] * (1.0 / c)
    d = acc - mu
    var = jnp.sum(d * d, axis=1)[:, None] * (1.0 / c)
    return d * jax.lax.rsqrt(var + eps) * g_ref[...].astype(jnp.float32)[None, :] \
        + be_ref[...].astype(jnp.float32)[None, :]


def _kernel(k_ref, pe_ref, m_ref, bias_ref, u_ref, bo_ref, g_ref, be_ref, o_ref, *, block_l: int,
            heads: int, eps: float, shared: int):
    b, lb = pl.program_id(0), pl.program_id(1)
    prec = jax.lax.Precision.HIGHEST if k_ref.dtype == jnp.float32 else None
    ls = pl.ds(lb * block_l, block_l)
    row = b // shared  # the image tokens of this prompt (shared by `shared` prompts)
    x = k_ref[row, ls, :]  # [block_l, c]
    q = x + pe_ref[ls, :]
    acc = x.astype(jnp.float32) + bo_ref[...].astype(jnp.float32)[None, :]
    for n in range(heads):
        logits = jnp.dot(q, m_ref[b, _i(n), :, :], preferred_element_type=jnp.float32, precision=prec)
        logits = logits + bias_ref[b, _i(n), :][None, :]  # [block_l, tp]
        e = jnp.exp(logits - jnp.max(logits, axis=1)[:, None])
        a = (e / jnp.sum(e, axis=1)[:, None]).astype(x.dtype)
        acc = acc + jnp.dot(a, u_ref[b, _i(n), :, :], preferred_element_type=jnp.float32, precision=prec)
    o_ref[b, ls, :] = _layer_norm(acc, g_ref, be_ref, eps).astype(o_ref.dtype)


def _kernel_merged(k_ref, pe_ref, m_ref, bias_ref, u_ref, bo_ref, g_ref, be_ref, o_ref, *, block_l: int,
                   heads: int, eps: float, shared: int):
    """`_kernel` with the heads side by side: m [c, n*tp] and u [n*tp, c] per prompt, so the
    logits of all heads are one [block_l, c] x [c, n*tp] product and the outputs one
    [block_l, n*tp] x [n*tp, c] product (the head loop's products are n*tp / tp times narrower);
    each head's softmax runs over its tp columns of a [block_l, n, tp] view."""
    b, lb = pl.program_id(0), pl.program_id(1)
    prec = jax.lax.Precision.HIGHEST if k_ref.dtype == jnp.float32 else None
    ls = pl.ds(lb * block_l, block_l)
    x = k_ref[b // shared, ls, :]  # [block_l, c]
    q = x + pe_ref[ls, :]
    width = m_ref.shape[-1]
    tp = width // heads
    logits = jnp.dot(q, m_ref[b, :, :], preferred_element_type=jnp.float32, precision=prec)
    logits = (logits + bias_ref[b, :][None, :]).reshape(block_l, heads, tp)
    e = jnp.exp(logits - jnp.max(logits, axis=2)[:, :, None])
    a = (e / jnp.sum(e, axis=2)[:, :, None]).astype(x.dtype).reshape(block_l, width)
    acc = x.astype(jnp.float32) + bo_ref[...].astype(jnp.float32)[None, :]
    acc = acc + jnp.dot(a, u_ref[b, :, :], preferred_element_type=jnp.float32, precision=prec)
    o_ref[b, ls, :] = _layer_norm(acc, g_ref, be_ref, eps).astype(o_ref.dtype)


HEADS = ("merged", "loop")


def default_block_l(num_tokens: int) -> int:
    """Image tokens per program: 64 (the float32 [block_l, c] accumulator stays in registers
    with 4 warps: SAM run 7), or fewer for small maps."""
    for bl in (64, 32, 16):
        if num_tokens % bl == 0:
            return bl
    raise ValueError(f"sam image-to-token kernel: {num_tokens} image tokens are not a multiple of 16")


def default_launch(num_tokens: int, per_prompt: bool) -> tuple[int, int]:
    """(block_l, num_warps) when neither is given: `default_block_l` tokens on 4 warps for an
    image's tokens shared by its prompts (the first block), 128 tokens on 8 warps for one map per
    prompt (0.88 vs 1.03 ms for 2 x 64 prompts on an H200; shared tokens 0.84 vs 0.88 ms the
    other way round: SAM run 10)."""
    if per_prompt and num_tokens % 128 == 0:
        return 128, 8
    return default_block_l(num_tokens), 4


# one image's prompts stay on one device: the leading image axis g is the batch axis under a
# sharded jit (the online-guidance train step), every other axis replicated
_RULE = "g k l c, g l c, g p n c t, g p n t, g p n t c, g c, g c, g c -> g p l c"
_NOT_SHARDED = ("k", "l", "c", "p", "n", "t")  # in order of first appearance


def _call(keys, pe, m, bias, u, bo, ln_g, ln_b, *, eps: float, block_l: int, interpret: bool, num_warps: int,
          num_stages: int, heads: str):
    """The pallas_call on grouped arrays (see `image_to_tokens_norm`); per-image copies of the
    shared vectors (pe, bo, ln_g, ln_b: [g, ...]) so that every argument leads with g."""
    g, pk, l, c = keys.shape
    _, p, n, _, tp = m.shape
    if heads == "merged":
        kernel = functools.partial(_kernel_merged, block_l=block_l, heads=n, eps=eps, shared=p // pk)
        mats = (jnp.moveaxis(m, 3, 2).reshape(g * p, c, n * tp), bias.reshape(g * p, n * tp),
                u.reshape(g * p, n * tp, c))
    else:
        kernel = functools.partial(_kernel, block_l=block_l, heads=n, eps=eps, shared=p // pk)
        mats = (m.reshape(g * p, n, c, tp), bias.reshape(g * p, n, tp), u.reshape(g * p, n, tp, c))
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((g * p, l, c), keys.dtype),
        grid=(g * p, l // block_l),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="sam_image_to_tokens_norm",
    )(keys.reshape(g * pk, l, c), pe[0], *mats, bo[0], ln_g[0], ln_b[0])
    return out.reshape(g, p, l, c)


@functools.lru_cache(maxsize=None)
def _partitioned(eps: float, block_l: int, interpret: bool, num_warps: int, num_stages: int, heads: str):
    def fn(keys, pe, m, bias, u, bo, ln_g, ln_b):  # positional only: custom_partitioning binds by position
        return _call(keys, pe, m, bias, u, bo, ln_g, ln_b, eps=eps, block_l=block_l, interpret=interpret,
                     num_warps=num_warps, num_stages=num_stages, heads=heads)

    return batch_partitioned(fn, 1, _RULE, _NOT_SHARDED)


@functools.partial(jax.jit, static_argnames=("eps", "block_l", "interpret", "num_warps", "num_stages", "heads",
                                             "token_pad"))
def image_to_tokens_norm(keys: jax.Array, key_pe: jax.Array, m: jax.Array, bias: jax.Array, u: jax.Array,
                         out_bias: jax.Array, ln_scale: jax.Array, ln_bias: jax.Array, *, eps: float = 1e-5,
                         block_l: int | None = None, interpret: bool = False, num_warps: int | None = None,
                         num_stages: int = 1, heads: str = "merged", token_pad: int | None = None) -> jax.Array:
    """LayerNorm(keys + image-to-token attention output) for every prompt of every image:
    [g, p, l, c].  Under a jit whose inputs are sharded over the images (g), each device runs
    the kernel on its own images (`sharding.batch_partitioned`); under `vmap` the mapped axis
    joins g.

    Args:
      keys: image tokens [g, pk, l, c], pk in {1, p}: pk = 1, one map shared by the image's p
        prompts (before the first update); pk = p, one map per prompt.
      key_pe: their positional encoding [l, c].
      m: per prompt and head, the query-side matrix [g, p, n, c, t] (W_q,n K_n^T / sqrt(d)).
      bias: the logits' bias per prompt and head [g, p, n, t], float32 (b_q,n . K_n / sqrt(d)).
      u: per prompt and head, the value-output matrix [g, p, n, t, c] (V_n W_o,n).
      out_bias: the output projection's bias [c]; ln_scale, ln_bias: the LayerNorm [c] (`eps`).
      block_l, num_warps, num_stages: launch settings (None: `default_launch`; num_warps alone
        None: 8 from 128 tokens a program, else 4; 1 stage).
      heads: "merged" (`_kernel_merged`: all heads in one pair of wider products; 0.79 vs
        1.04 ms for the first block's shared tokens, 1.07 vs 1.08 ms per prompt, 2 x 64 prompts
        on an H200: SAM run 10) or "loop" (one pair of products per head).
      token_pad: the prompt tokens are padded to a multiple of this, 16 or 8.  8 needs "merged"
        heads and an even head count, whose products stay n * tp wide; the generator's 7 tokens
        then take 8 columns a head, not 16: half the products and exponentials (0.78 -> 0.58 ms
        for the first block's shared tokens, 0.80 -> 0.59 ms per prompt, 2 x 64 prompts on an
        H200: SAM run 14).  None: 8 where allowed, else 16.
    float32 `keys` runs only in the interpreter (`interpret=True`), as the upscaling kernel."""
    require("sam_image_to_tokens")
    g, pk, l, c = keys.shape
    p, n, t = m.shape[1], m.shape[2], m.shape[-1]
    if (key_pe.shape != (l, c) or m.shape != (g, p, n, c, t) or bias.shape != (g, p, n, t)
            or u.shape != (g, p, n, t, c) or pk not in (1, p)):
        raise ValueError(f"sam image-to-token kernel: keys {keys.shape}, key_pe {key_pe.shape}, m {m.shape}, "
                         f"bias {bias.shape}, u {u.shape} do not fit [g,pk,l,c], [l,c], [g,p,n,c,t], [g,p,n,t], "
                         "[g,p,n,t,c] with pk 1 or p")
    if block_l is None:
        block_l, warps = default_launch(l, pk > 1)
        num_warps = num_warps or warps
    num_warps = num_warps or (8 if block_l >= 128 else 4)
    if l % block_l:
        raise ValueError(f"sam image-to-token kernel: block_l={block_l} must divide the {l} image tokens")
    if keys.dtype == jnp.float32 and not interpret:
        raise ValueError("sam image-to-token kernel: float32 image tokens are not supported on the GPU "
                         "(full-precision Triton products); pass bfloat16, or use the 'absorbed' attention")
    if heads not in HEADS:
        raise ValueError(f"sam image-to-token kernel: heads must be one of {HEADS}, got {heads!r}")
    if token_pad is None:
        token_pad = 8 if heads == "merged" and n % 2 == 0 else 16
    if token_pad not in (8, 16) or (token_pad == 8 and (heads != "merged" or n * 8 % 16)):
        raise ValueError(f"sam image-to-token kernel: token_pad must be 16, or 8 with 'merged' heads and an even "
                         f"number of heads; got token_pad={token_pad}, heads={heads!r}, {n} heads")
    dtype = keys.dtype
    tp = -(-t // token_pad) * token_pad
    bias = bias.astype(jnp.float32)
    if tp != t:  # pad the tokens: zero columns, logits that vanish in the softmax
        m = jnp.pad(m, ((0, 0), (0, 0), (0, 0), (0, 0), (0, tp - t)))
        u = jnp.pad(u, ((0, 0), (0, 0), (0, 0), (0, tp - t), (0, 0)))
        bias = jnp.pad(bias, ((0, 0), (0, 0), (0, 0), (0, tp - t)), constant_values=PAD_LOGIT)
    per_image = lambda v: jnp.broadcast_to(v, (g,) + v.shape)
    fn = _partitioned(float(eps), block_l, interpret, num_warps, num_stages, heads)
    return per_batch_shard(fn, 1, keys, per_image(key_pe.astype(dtype)), m.astype(dtype), bias, u.astype(dtype),
                           per_image(out_bias), per_image(ln_scale), per_image(ln_bias))
