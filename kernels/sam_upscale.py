"""Pallas (Triton backend) kernel for the end of SAM's mask decoder: the 4x upscaling of each
prompt's image tokens and the product with its mask tokens, fused.

Per prompt, the decoder upscales its 64 x 64 x 256 image tokens with a 2x2 stride-2 transposed
conv (to 64 channels), a channel LayerNorm and a GELU, a second 2x2 transposed conv (to 32
channels) and a GELU, and takes the dot product of every upscaled pixel with each mask token's
32-vector.  In XLA those steps write and read a [prompts, 128, 128, 64] and a [prompts, 256,
256, 32] tensor per chunk; here one program instance keeps `block_l` image tokens on chip from
the first product to the masks, so per prompt only its image tokens are read and its masks
written (the automatic mask generator runs this for 1024 prompts per image).

Layout: every output pixel belongs to one image token (i, j) and two sub-positions, s1 = 2x + y
of the first conv and s2 = 2X + Y of the second: row 4i + 2x + X, column 4j + 2y + Y.  The
kernel writes the masks in that layout directly (a block is part of one token row, so each of
its 16 (s1, s2) results is a stride-4 run of one mask row), or, when `block_l` does not divide
the row, as planes masks[b, m, 4 * s1 + s2, i * w + j] that `upscale_masks` interleaves
afterwards (a transpose of the masks' size).

Grid: (prompts, tokens / block_l).  Per program: 4 products [block_l, 256] x [256, 64] (one per
s1), LayerNorm and GELU in float32 on the result, then per s1 4 products [block_l, 64] x
[64, 32] (one per s2), GELU, and the mask-token dots as float32 multiply-adds (3 masks: too few
columns for a tensor-core product).  Products take the inputs' dtype with float32 accumulation;
the GELU outputs are rounded to that dtype where the XLA path stores them.

`products="tensor"` is the same kernel with wider products: per s1 one [block_l, 64] x [64, 128]
product for the four second-conv sub-positions, and the mask-token dots of all of them as one
product with a block-diagonal matrix (`hyper_blocks`), stored with computed indices.
`conv2_masks` is the second half alone (second conv, GELU, mask-token product) for rows of the
first conv's output, which the decoder's "blocks_pallas" upscaling feeds from XLA; with its GELU
as a polynomial (`_gelu_poly`, half precision) it makes the whole head 1.10-1.17 ms against
1.63-1.70 ms for XLA's "blocks" per 128 prompts on an H200 and is the decoder's GPU default.
The fused kernel in either form is slower than "blocks" (docs/benchmarks.md, SAM runs 6, 12, 13).

GELU is exact (erf) as in SAM, up to float32 rounding, in the "erf" form: Triton has no erf
lowering in Pallas, so erf is the Abramowitz-Stegun 7.1.26 rational approximation (absolute
error <= 1.5e-7 in exact arithmetic, <= 6e-7 in float32, where 1 - poly * exp(-x^2) cancels
near 0; GELU multiplies it by x / 2).  `conv2_masks` in half precision uses `_gelu_poly`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sarformer_jax.kernels.triton_backend import plgpu, require

_AS_P = 0.3275911
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def _erf(x: jax.Array) -> jax.Array:
    """float32 erf (Abramowitz-Stegun 7.1.26; |error| <= 6e-7 in float32)."""
    ax = jnp.abs(x)
    t = 1.0 / (1.0 + _AS_P * ax)
    poly = _AS_A[4]
    for a in _AS_A[3::-1]:
        poly = poly * t + a
    y = 1.0 - poly * t * jnp.exp(-ax * ax)
    return jnp.where(x < 0, -y, y)


def _gelu(x: jax.Array) -> jax.Array:
    return 0.5 * x * (1.0 + _erf(x * (1.0 / math.sqrt(2.0))))


# erf(x / sqrt 2) ~ x P(x^2) on |x| <= 4.5, +-1 beyond: our own fit (least squares reweighted
# toward equal ripple), max error 7.2e-6 in float64 and 1.6e-5 evaluated in float32
_PHI_CLAMP = 4.5
_PHI_P = (0.7978493571281433, -0.13284136354923248, 0.019783545285463333, -0.002285428810864687,
          0.00020346777455415577, -1.3627402040583547e-05, 6.55780070246692e-07, -2.1133983452159555e-08,
          4.0448216998001385e-10, -3.4525932460227615e-12)


def _gelu_poly(x: jax.Array) -> jax.Array:
    """GELU with erf(x / sqrt 2) as one odd polynomial: multiply-adds only (no division, no
    exponential).  |error| <= 1.6e-5 x / 2: far below half a bf16 / fp16 step of the result, so
    only for outputs rounded to half precision."""
    xc = jnp.clip(x, -_PHI_CLAMP, _PHI_CLAMP)
    t = xc * xc
    p = jnp.float32(_PHI_P[-1])
    for c in _PHI_P[-2::-1]:
        p = p * t + c
    return 0.5 * x * (1.0 + jnp.clip(xc * p, -1.0, 1.0))


def _i(k: int) -> jax.Array:
    return jnp.int32(k)  # static indices as int32 scalars (as the MSDA kernel: interpreter-safe)


def _kernel(x_ref, w1_ref, b1_ref, g_ref, be_ref, w2_ref, b2_ref, h_ref, o_ref, *, block_l: int,
            eps: float, n_masks: int, row_blocks: int | None):
    b, lb = pl.program_id(0), pl.program_id(1)
    # float32 products in full precision (not TF32), so that the float32 path matches SAM's
    prec = jax.lax.Precision.HIGHEST if x_ref.dtype == jnp.float32 else None
    ls = pl.ds(lb * block_l, block_l)
    x = x_ref[b, ls, :]  # [block_l, c]
    c1 = w1_ref.shape[-1]
    b1 = b1_ref[...].astype(jnp.float32)[None, :]
    g = g_ref[...].astype(jnp.float32)[None, :]
    be = be_ref[...].astype(jnp.float32)[None, :]
    b2 = b2_ref[...].astype(jnp.float32)[None, :]
    hyper = [h_ref[b, _i(k), :].astype(jnp.float32)[None, :] for k in range(n_masks)]
    if row_blocks is not None:  # the block is tokens (i, j0 .. j0 + block_l - 1) of one row
        i, j0 = lb // row_blocks, (lb % row_blocks) * block_l
    for s1 in range(4):
        y = jnp.dot(x, w1_ref[_i(s1), :, :], preferred_element_type=jnp.float32, precision=prec) + b1  # [block_l, c1]
        mu = jnp.sum(y, axis=1)[:, None] * (1.0 / c1)
        d = y - mu
        var = jnp.sum(d * d, axis=1)[:, None] * (1.0 / c1)
        y = d * jax.lax.rsqrt(var + eps) * g + be
        y = _gelu(y).astype(x.dtype)
        for s2 in range(4):
            z = jnp.dot(y, w2_ref[_i(s2), :, :], preferred_element_type=jnp.float32, precision=prec) + b2  # [block_l, c2]
            z = _gelu(z).astype(x.dtype).astype(jnp.float32)
            for k in range(n_masks):
                v = jnp.sum(z * hyper[k], axis=1).astype(o_ref.dtype)
                if row_blocks is None:
                    o_ref[b, _i(k), _i(4 * s1 + s2), ls] = v
                else:  # row 4i + 2x + X, columns 4j + 2y + Y: a stride-4 store into the final masks
                    (sx, sy), (tx, ty) = divmod(s1, 2), divmod(s2, 2)
                    o_ref[b, _i(k), 4 * i + (2 * sx + tx), pl.ds(4 * j0 + (2 * sy + ty), block_l, stride=4)] = v


def _kernel_tensor(x_ref, w1_ref, b1_ref, g_ref, be_ref, w2_ref, b2_ref, h_ref, o_ref, *, block_l: int,
                   eps: float, n_masks: int, width: int):
    """`products="tensor"`: per s1 the four second-conv products as one [block_l, c1] x [c1, 4 c2]
    product, and the mask-token dots of all four s2 and all masks as one product with a
    block-diagonal matrix (h_ref[b] [4 c2, 4 mp], column 4k + s2 holds mask k's vector in rows
    s2 c2 .. s2 c2 + c2 - 1, zeros elsewhere), stored with computed row/column indices straight
    into the final masks (any block_l: a block may span token rows)."""
    b, lb = pl.program_id(0), pl.program_id(1)
    prec = jax.lax.Precision.HIGHEST if x_ref.dtype == jnp.float32 else None
    x = x_ref[b, pl.ds(lb * block_l, block_l), :]  # [block_l, c]
    c1 = w1_ref.shape[-1]
    cols = h_ref.shape[-1]  # 4 * mp
    b1 = b1_ref[...].astype(jnp.float32)[None, :]
    g = g_ref[...].astype(jnp.float32)[None, :]
    be = be_ref[...].astype(jnp.float32)[None, :]
    b2 = b2_ref[...].astype(jnp.float32)[None, :]  # [1, 4 c2]
    w2 = w2_ref[...]  # [c1, 4 c2]
    hm = h_ref[b, :, :]  # [4 c2, 4 mp]
    t = lb * block_l + jax.lax.broadcasted_iota(jnp.int32, (block_l, cols), 0)  # flat token index
    q = jax.lax.broadcasted_iota(jnp.int32, (block_l, cols), 1)
    k, s2 = q // 4, q % 4
    i, j = t // width, t % width
    kk = jnp.minimum(k, n_masks - 1)  # padding columns: the last mask again (`hyper_blocks`)
    for s1 in range(4):
        y = jnp.dot(x, w1_ref[_i(s1), :, :], preferred_element_type=jnp.float32, precision=prec) + b1
        mu = jnp.sum(y, axis=1)[:, None] * (1.0 / c1)
        d = y - mu
        var = jnp.sum(d * d, axis=1)[:, None] * (1.0 / c1)
        y = _gelu(d * jax.lax.rsqrt(var + eps) * g + be).astype(x.dtype)
        z = jnp.dot(y, w2, preferred_element_type=jnp.float32, precision=prec) + b2  # [block_l, 4 c2]
        z = _gelu(z).astype(x.dtype)
        r = jnp.dot(z, hm, preferred_element_type=jnp.float32, precision=prec)  # [block_l, 4 mp]
        sx, sy = divmod(s1, 2)
        rows = 4 * i + 2 * sx + s2 // 2
        cols_ = 4 * j + 2 * sy + s2 % 2
        o_ref[b, kk, rows, cols_] = r.astype(o_ref.dtype)


def hyper_blocks(hyper: jax.Array) -> jax.Array:
    """The mask tokens [b, m, c2] as the tensor kernel's block-diagonal matrices [b, 4 c2, 4 mp]
    (mp = m rounded up to a power of two, at least 4): entry [s2 c2 + ch, 4 k + s2] = hyper[k, ch]
    (hyper[m - 1] for k >= m)."""
    bsz, m, c2 = hyper.shape
    mp = max(4, 1 << (m - 1).bit_length())
    # columns of masks k >= m repeat the last mask: the kernel stores them onto that mask's
    # pixels, the same values, so no store mask is needed
    hp = jnp.pad(hyper, ((0, 0), (0, mp - m), (0, 0)), mode="edge")  # [b, mp, c2]
    eye = jnp.eye(4, dtype=hyper.dtype)
    return jnp.einsum("bkc,st->bsckt", hp, eye).reshape(bsz, 4 * c2, mp * 4)


def _w2_side_by_side(w2: jax.Array, dtype) -> jax.Array:
    """The second conv's blocks [2, 2, c1, c2] as one [c1, 4 c2] matrix, sub-position s2 = 2X + Y
    in columns s2 c2 .. s2 c2 + c2 - 1 (one product for all four)."""
    c1, c2 = w2.shape[-2:]
    return w2.reshape(4, c1, c2).transpose(1, 0, 2).reshape(c1, 4 * c2).astype(dtype)


def _conv2_kernel(*refs, block_n: int, per_program: int, gelu: str, first: bool, eps: float):
    if first:
        y_ref, b1_ref, g_ref, be_ref, w2_ref, b2_ref, h_ref, o_ref = refs
    else:
        y_ref, w2_ref, b2_ref, h_ref, o_ref = refs
    b, nb = pl.program_id(0), pl.program_id(1)
    prec = jax.lax.Precision.HIGHEST if y_ref.dtype == jnp.float32 else None
    act = _gelu_poly if gelu == "poly" else _gelu
    w2 = w2_ref[...]
    b2 = b2_ref[...].astype(jnp.float32)[None, :]
    hb = h_ref[b, :, :]
    if first:
        b1 = b1_ref[...].astype(jnp.float32)[None, :]
        g = g_ref[...].astype(jnp.float32)[None, :]
        be = be_ref[...].astype(jnp.float32)[None, :]

    def rows(i):
        ns = pl.ds((nb * per_program + i) * block_n, block_n)
        y = y_ref[b, ns, :]  # [block_n, c1]
        if first:  # the first conv's bias, the channel LayerNorm and the first GELU, per row
            c1 = y.shape[-1]
            v = y.astype(jnp.float32) + b1
            mu = jnp.sum(v, axis=1)[:, None] * (1.0 / c1)
            d = v - mu
            var = jnp.sum(d * d, axis=1)[:, None] * (1.0 / c1)
            y = act(d * jax.lax.rsqrt(var + eps) * g + be).astype(y.dtype)
        z = jnp.dot(y, w2, preferred_element_type=jnp.float32, precision=prec)
        z = act(z + b2).astype(y.dtype)  # [block_n, 4 c2]
        r = jnp.dot(z, hb, preferred_element_type=jnp.float32, precision=prec)  # [block_n, 4 mp]
        o_ref[b, ns, :] = r.astype(o_ref.dtype)

    if per_program == 1:
        rows(0)
    else:  # a loop Triton can software-pipeline (num_stages > 1: the next rows load during this block)
        jax.lax.fori_loop(0, per_program, lambda i, c: (rows(i), c)[1], 0)


@functools.partial(jax.jit, static_argnames=("block_n", "per_program", "gelu", "eps", "interpret", "num_warps",
                                             "num_stages"))
def conv2_masks(y: jax.Array, w2: jax.Array, b2: jax.Array, hyper: jax.Array, *,
                first: tuple[jax.Array, jax.Array, jax.Array] | None = None, eps: float = 1e-6,
                block_n: int | None = None, per_program: int = 1, gelu: str | None = None,
                interpret: bool = False, num_warps: int = 4, num_stages: int = 1) -> jax.Array:
    """The second half of SAM's upscaling head as one streaming kernel: the second 2x2
    transposed conv, its GELU and the mask-token dots, for rows of first-conv outputs.

    Args:
      y: [b, n, c1] the first conv's outputs after LayerNorm and GELU, one row per (token,
        first sub-position), in the products' dtype.
      w2: [2, 2, c1, c2] the second conv as blocks (w2[X, Y] maps a row to sub-position (X, Y));
        b2 [c2].
      hyper: [b, m, c2] the mask tokens.
    Returns [b, n, 4 mp] in y's dtype: column 4 k + 2 X + Y is mask k at sub-position (X, Y)
    (mp = `hyper_blocks`' padded mask count; columns of k >= m repeat mask m - 1).  Per row the
    GELU output stays on chip, so it is neither written nor read back, and the mask products
    run on the tensor cores against the block-diagonal `hyper_blocks`.  A program does
    `per_program` consecutive blocks of `block_n` rows in a loop (the weights loaded once), which
    Triton pipelines with `num_stages` > 1.  `gelu`: "erf" (the module's float32 erf) or
    "poly" (`_gelu_poly`: multiply-adds only; half-precision inputs only; the whole head 1.10-1.17
    vs 1.27-1.52 ms per 128 prompts on an H200, SAM run 13); None (the default): "poly" for
    bfloat16 / float16 inputs, else "erf".  `first` = (b1 [c1], scale [c1], offset [c1]): `y` is
    then the first conv's product before its bias, and the kernel also adds that bias and applies
    the channel LayerNorm (epsilon `eps`) and the first GELU per row, so XLA's pass for them (and
    its output) is not needed either."""
    require("sam_conv2_masks")
    bsz, n, c1 = y.shape
    if gelu is None:
        gelu = "poly" if y.dtype in (jnp.bfloat16, jnp.float16) else "erf"
    c2 = w2.shape[-1]
    m = hyper.shape[1]
    if w2.shape != (2, 2, c1, c2) or b2.shape != (c2,) or hyper.shape != (bsz, m, c2):
        raise ValueError(f"sam conv2 kernel: y {y.shape}, w2 {w2.shape}, b2 {b2.shape}, hyper {hyper.shape} "
                         "do not fit [b,n,c1], [2,2,c1,c2], [c2], [b,m,c2]")
    if first is not None and (len(first) != 3 or any(a.shape != (c1,) for a in first)):
        raise ValueError(f"sam conv2 kernel: first must be (bias, scale, offset) of shape ({c1},) each, got "
                         f"{[tuple(a.shape) for a in first]}")
    if block_n is None:
        # 64 rows on 4 warps was the fastest of 32 / 64 / 128 rows on 4 / 8 warps (SAM run 12)
        block_n = next((bn for bn in (64, 32, 16) if n % bn == 0), None)
        if block_n is None:
            raise ValueError(f"sam conv2 kernel: {n} rows are not a multiple of 16")
    if n % block_n:
        raise ValueError(f"sam conv2 kernel: block_n={block_n} must divide the {n} rows")
    if per_program < 1 or (n // block_n) % per_program:
        raise ValueError(f"sam conv2 kernel: per_program={per_program} must divide the {n // block_n} "
                         f"blocks of {block_n} rows")
    if gelu not in ("erf", "poly"):
        raise ValueError(f"sam conv2 kernel: gelu must be 'erf' or 'poly', got {gelu!r}")
    if gelu == "poly" and y.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"sam conv2 kernel: gelu='poly' (error up to 1.6e-5) is for bfloat16 / float16 "
                         f"inputs, got {y.dtype}")
    if y.dtype == jnp.float32 and not interpret:
        raise ValueError("sam conv2 kernel: float32 inputs are not supported on the GPU (full-precision "
                         "Triton products); pass bfloat16, or use the decoder's 'blocks' upscaling")
    dtype = y.dtype
    w2cat = _w2_side_by_side(w2, dtype)
    hb = hyper_blocks(hyper.astype(dtype))
    return pl.pallas_call(
        functools.partial(_conv2_kernel, block_n=block_n, per_program=per_program, gelu=gelu,
                          first=first is not None, eps=float(eps)),
        out_shape=jax.ShapeDtypeStruct((bsz, n, hb.shape[-1]), dtype),
        grid=(bsz, n // (block_n * per_program)),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="sam_upscale_conv2_masks" if first is None else "sam_upscale_norm_conv2_masks",
    )(y, *(first or ()), w2cat, jnp.tile(b2, 4), hb)


def default_block_l(num_tokens: int) -> int:
    """Image tokens per program: 64 (register budget of the [block_l, 64] float32 LayerNorm
    input and the [block_l, 32] GELU output with 4 warps), or fewer for small maps."""
    for bl in (64, 32, 16):
        if num_tokens % bl == 0:
            return bl
    raise ValueError(f"sam upscale kernel: {num_tokens} image tokens are not a multiple of 16")


@functools.partial(jax.jit, static_argnames=("eps", "block_l", "interpret", "num_warps", "num_stages", "direct",
                                             "products"))
def upscale_masks(x: jax.Array, w1: jax.Array, b1: jax.Array, ln_scale: jax.Array, ln_bias: jax.Array,
                  w2: jax.Array, b2: jax.Array, hyper: jax.Array, *, eps: float = 1e-6,
                  block_l: int | None = None, interpret: bool = False, num_warps: int = 4,
                  num_stages: int = 1, direct: bool | None = None, products: str = "rows") -> jax.Array:
    """Masks [b, m, 4h, 4w] of SAM's upscaling head.

    Args:
      x: image tokens [b, h, w, c] (one map per prompt), the products' dtype.
      w1: first transposed conv as blocks [2, 2, c, c1] (`StridedConvTranspose.blocks`' kernel:
        w1[x, y] maps a token to sub-position (x, y)); b1 [c1].
      ln_scale, ln_bias: the channel LayerNorm [c1] (epsilon `eps`).
      w2: second transposed conv as blocks [2, 2, c1, c2]; b2 [c2].
      hyper: the mask tokens' hypernetwork outputs [b, m, c2].
      block_l, num_warps, num_stages: launch settings (`default_block_l`, 4 warps, 1 stage by
        default; `sarformer bench sam_upscale` sweeps them).
      direct: write the masks in their final interleaved layout with stride-4 stores (needs
        `block_l` to divide the token row `w`; the default where it does) instead of as 16
        sub-position planes that an XLA transpose interleaves afterwards.
      products: "rows" (per s1 four [block_l, c1] x [c1, c2] products and the mask-token dots as
        float32 row sums) or "tensor" (per s1 one [block_l, c1] x [c1, 4 c2] product and the
        mask-token dots as one product with `hyper_blocks`, stored with computed indices into
        the final masks for any block_l; `direct` does not apply).
    Same values as the XLA path up to rounding (float32 LayerNorm input, erf approximation).
    float32 `x` runs only in the interpreter (`interpret=True`)."""
    require("sam_upscale_masks")
    bsz, h, w, c = x.shape
    c1, c2 = w1.shape[-1], w2.shape[-1]
    m = hyper.shape[1]
    if w1.shape != (2, 2, c, c1) or w2.shape != (2, 2, c1, c2) or hyper.shape != (bsz, m, c2):
        raise ValueError(f"sam upscale kernel: x {x.shape}, w1 {w1.shape}, w2 {w2.shape}, hyper {hyper.shape} "
                         "do not fit [b,h,w,c], [2,2,c,c1], [2,2,c1,c2], [b,m,c2]")
    n = h * w
    block_l = block_l or default_block_l(n)
    if n % block_l:
        raise ValueError(f"sam upscale kernel: block_l={block_l} must divide the {n} image tokens")
    if x.dtype == jnp.float32 and not interpret:
        raise ValueError("sam upscale kernel: float32 image tokens are not supported on the GPU (with full-precision, "
                         "non-TF32 Triton products one call did not finish within 100 s on an H200); pass bfloat16, "
                         "or use the decoder's 'blocks' upscaling in float32")
    if products == "tensor":
        if direct is False:
            raise ValueError("sam upscale kernel: products='tensor' always writes the final masks (direct=False "
                             "is the 'rows' kernel's planes layout)")
        dtype = x.dtype
        w2cat = _w2_side_by_side(w2, dtype)
        kernel = functools.partial(_kernel_tensor, block_l=block_l, eps=float(eps), n_masks=m, width=w)
        return pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct((bsz, m, 4 * h, 4 * w), dtype),
            grid=(bsz, n // block_l),
            compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
            interpret=interpret,
            name="sam_upscale_masks",
        )(x.reshape(bsz, n, c), w1.reshape(4, c, c1).astype(dtype), b1, ln_scale, ln_bias, w2cat,
          jnp.tile(b2, 4), hyper_blocks(hyper.astype(dtype)))
    if products != "rows":
        raise ValueError(f"sam upscale kernel: products must be 'rows' or 'tensor', got {products!r}")
    if direct is None:
        direct = w % block_l == 0
    elif direct and w % block_l:
        raise ValueError(f"sam upscale kernel: direct=True needs block_l={block_l} to divide the row of {w} tokens")
    dtype = x.dtype
    kernel = functools.partial(_kernel, block_l=block_l, eps=float(eps), n_masks=m,
                               row_blocks=w // block_l if direct else None)
    out_shape = (bsz, m, 4 * h, 4 * w) if direct else (bsz, m, 16, n)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(out_shape, dtype),
        grid=(bsz, n // block_l),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="sam_upscale_masks",
    )(x.reshape(bsz, n, c), w1.reshape(4, c, c1).astype(dtype), b1, ln_scale, ln_bias,
      w2.reshape(4, c1, c2).astype(dtype), b2, hyper.astype(dtype))
    if direct:
        return out
    out = out.reshape(bsz, m, 2, 2, 2, 2, h, w)  # (x, y, X, Y) of s1 = 2x + y, s2 = 2X + Y
    return out.transpose(0, 1, 6, 2, 4, 7, 3, 5).reshape(bsz, m, 4 * h, 4 * w)
