"""Small shared layers: PyTorch-exact bilinear resize, DropPath, initialisers, and attention
through `jax.nn.dot_product_attention` with cuDNN's constraints taken care of.

Legend: b batch, h w spatial, c channels.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@functools.lru_cache(maxsize=256)
def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] interpolation matrix of PyTorch `F.interpolate(mode="bilinear",
    align_corners=False, antialias=False)` along one axis.

    Source coordinate `src = (dst + 0.5) * in / out - 0.5`, clamped below at 0; the upper
    neighbour is clamped at `in - 1` (PyTorch's `area_pixel_compute_source_index`)."""
    scale = in_size / out_size
    dst = np.arange(out_size, dtype=np.float64)
    src = np.maximum((dst + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam = src - i0
    m = np.zeros((out_size, in_size), np.float64)
    m[np.arange(out_size), i0] += 1.0 - lam
    m[np.arange(out_size), i1] += lam
    return m.astype(np.float32)


def _downscale_by_integer(x: jax.Array, axis: int, factor: int) -> jax.Array:
    """PyTorch bilinear (align_corners=False) along `axis` for in = factor * out.

    Output i samples source `factor * i + (factor - 1) / 2`: one pixel for an odd factor, the
    mean of the two middle pixels of each block of `factor` for an even one (weights 1/2, 1/2).
    Bit-identical to the matrix product: 0.5 * (a + b) rounds as 0.5 * a + 0.5 * b does."""
    n = x.shape[axis]
    blocks = x.reshape(x.shape[:axis] + (n // factor, factor) + x.shape[axis + 1:])
    mid = factor // 2
    if factor % 2:
        return jax.lax.index_in_dim(blocks, mid, axis + 1, keepdims=False)
    a = jax.lax.index_in_dim(blocks, mid - 1, axis + 1, keepdims=False)
    b = jax.lax.index_in_dim(blocks, mid, axis + 1, keepdims=False)
    return (a + b) * jnp.asarray(0.5, x.dtype)


@functools.lru_cache(maxsize=64)
def upscale_taps(n: int, factor: int) -> np.ndarray:
    """[3, n, factor] float32: the weights of input rows i - 1, i and i + 1 in output row
    factor * i + k of PyTorch bilinear (align_corners=False) from n to factor * n rows, taken
    from `bilinear_matrix`, whose rows have no other nonzero entries for a whole factor."""
    m = bilinear_matrix(n, n * factor)
    taps = np.zeros((3, n, factor), np.float32)
    rest = m.copy()
    for i in range(n):
        for s in range(3):
            j = i + s - 1
            if 0 <= j < n:
                taps[s, i] = m[i * factor:(i + 1) * factor, j]
                rest[i * factor:(i + 1) * factor, j] = 0.0
    if np.any(rest):  # cannot happen for an integer upscale; a guard on the derivation
        raise AssertionError(f"bilinear {n} -> {n * factor} has weights beyond the neighbours")
    taps.setflags(write=False)  # cached and shared by every caller
    return taps


def _upscale_by_integer(x: jax.Array, axis: int, factor: int) -> jax.Array:
    """PyTorch bilinear (align_corners=False) along `axis` for out = factor * in, as weighted
    sums of each row's two neighbours (`upscale_taps`, the interpolation matrix's own weights):
    element-wise work that XLA can fuse with its consumer, and whose gradient is a sum over
    each block of `factor` outputs, instead of a product with the [out, in] matrix (on the GPU
    in float32 a CUDA-core GEMM)."""
    n = x.shape[axis]
    taps = upscale_taps(n, factor)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (1, 1)
    xp = jnp.pad(x, pad)
    out = None
    for s in range(3):
        part = jax.lax.slice_in_dim(xp, s, s + n, axis=axis)
        w = jnp.asarray(taps[s], x.dtype).reshape((n, factor) + (1,) * (x.ndim - axis - 1))
        term = jnp.expand_dims(part, axis + 1) * w
        out = term if out is None else out + term
    return out.reshape(x.shape[:axis] + (n * factor,) + x.shape[axis + 1:])


F32_DOT_METHODS = ("auto", "highest", "bf16x6", "bf16x3")


def f32_dot_precision(method: str | None = None):
    """The `precision` of a float32 product that must keep float32 accuracy (the loss's
    matching costs, the mask pooling, float32 resizes).

    Methods (`method`, else the environment's `SARFORMER_F32_DOT`, else "auto"):
    - "highest": `Precision.HIGHEST`.  On an H100 XLA runs such a product on the CUDA cores,
      at 22-31 TFLOP/s (the matching costs' product 0.69 ms, the auxiliary logits' upscale 2 x
      0.34 ms of the SARFormer-B step: docs/benchmarks.md, train run 37);
    - "bf16x6": `DotAlgorithmPreset.BF16_BF16_F32_X6`, each operand split into three bf16
      parts and six of their products summed in float32 on the tensor cores: float32 accuracy
      (the dropped products are below float32's rounding);
    - "bf16x3": `BF16_BF16_F32_X3`, three products: ~1e-5 relative, for A/B runs only;
    - "auto": "highest".  On an H100 bf16x6 passed its accuracy test (tests/test_f32_dot_gpu.py)
      and alone took the matching product from 0.71 to 0.53 ms (the upscale's not at all), but
      the SARFormer-B step was 1.5 ms slower with it (57.3 -> 58.8 ms pipelined: f32dot run 1
      and train run 38 in docs/benchmarks.md), so it stays opt-in."""
    method = method or os.environ.get("SARFORMER_F32_DOT") or "auto"
    if method not in F32_DOT_METHODS:
        raise ValueError(f"f32_dot_precision: method {method!r} is not one of {F32_DOT_METHODS}")
    if method == "auto":
        method = "highest"
    if method == "highest":
        return jax.lax.Precision.HIGHEST
    preset = jax.lax.DotAlgorithmPreset
    return preset.BF16_BF16_F32_X6 if method == "bf16x6" else preset.BF16_BF16_F32_X3


def resize_axis_by_matrix(x: jax.Array, axis: int, n_out: int,
                          method: str | None = None) -> jax.Array:
    """PyTorch bilinear (align_corners=False) along one axis as a product with its [out, in]
    interpolation matrix (full precision for float32: `f32_dot_precision(method)`)."""
    precision = f32_dot_precision(method) if x.dtype == jnp.float32 else None
    m = jnp.asarray(bilinear_matrix(x.shape[axis], n_out), x.dtype)
    return jnp.moveaxis(jnp.tensordot(m, jnp.moveaxis(x, axis, 0), axes=1, precision=precision),
                        0, axis)


RESIZE_UPSCALE_METHODS = ("matrix", "taps")


def resize_bilinear(x: jax.Array, size: tuple[int, int], axes: tuple[int, int] = (1, 2),
                    upscale: str = "matrix") -> jax.Array:
    """Resizes two axes of `x` (NHWC by default) like PyTorch bilinear, align_corners=False.

    A downscale by a whole factor (640 -> 160 for the mask pooling, 640 -> 20 for the first
    attention mask) reads one or two pixels of each block (`_downscale_by_integer`); any other
    size is two small matrix products (`resize_axis_by_matrix`: exact, differentiable, fast on
    GPUs).  Float32 inputs use full precision so results match PyTorch to ~1e-7.  The
    whole-factor path gives the matrix product's results bit for bit without its [out, in]
    product.  For the SARFormer-B proposals,
    [2, 100, 640, 640], that product ran as a float32 CUDA-core GEMM and a transpose (0.70 + 0.43
    ms of the H200 step's kernels, benchmarks.md train run 12).  `upscale="taps"` does an
    upscale by a whole factor as weighted sums of neighbours (`_upscale_by_integer`) instead
    of the product: the same weights, so the same results up to the rounding of a two-term
    sum."""
    if upscale not in RESIZE_UPSCALE_METHODS:
        raise ValueError(f"resize_bilinear: upscale must be one of {RESIZE_UPSCALE_METHODS}, "
                         f"got {upscale!r}")
    ah, aw = axes
    out_h, out_w = size
    in_h, in_w = x.shape[ah], x.shape[aw]
    for ax, n_in, n_out in ((ah, in_h, out_h), (aw, in_w, out_w)):
        if n_in == n_out:
            continue
        if n_out < n_in and n_in % n_out == 0:
            x = _downscale_by_integer(x, ax % x.ndim, n_in // n_out)
        elif upscale == "taps" and n_out > n_in and n_out % n_in == 0:
            x = _upscale_by_integer(x, ax % x.ndim, n_out // n_in)
        else:
            x = resize_axis_by_matrix(x, ax, n_out)
    return x


COLUMN_SUM_METHODS = ("auto", "sum", "blocks", "dot")


def column_sum(x: jax.Array, method: str | None = None, groups: int = 1) -> jax.Array:
    """float32 sum of `x` [n, c] over its rows.

    `groups`: the rows are that many equal runs (the images of a batch, `broadcast_param`
    passes its leading axis) and "blocks" never puts rows of two runs in one block.  Under a
    batch-sharded jit a block straddling two devices' rows made the partitioner move gradient
    rows between devices (collective-permutes and all-gathers in the backward, seen on 8 CPU
    devices); with whole runs each device sums its own rows and one all-reduce of [c] is left.

    Methods (`method`, else the environment's `SARFORMER_COLUMN_SUM`, else "auto"):
    - "sum": one `jnp.sum` (XLA's column reduction);
    - "blocks": two passes for long columns.  XLA's GPU emitter runs a column reduction of a
      few thousand rows (a parameter gradient of the batch's tokens: BEiT-B's [3202, 768]) as
      one pass with a handful of thread blocks per column tile: 300-430 GB/s
      (docs/benchmarks.md, train run 17).  Here the rows are summed in ~sqrt(n) blocks first,
      then the block sums; `optimization_barrier` keeps XLA from merging the two reductions
      back into one.  Outside [1024, 8192) rows it is one `jnp.sum`: fewer rows gain nothing
      from a second kernel, and XLA splits longer columns itself (the pixel decoder's 16800
      rows) and can fuse the sums that share an operand;
    - "dot": for 16-bit `x`, a matrix product with a [16, n] block of ones (row 0 kept), so a
      GEMM library reads `x` once with its split-K machinery and accumulates in float32; every
      product is exact (x times 1), so it is a float32 sum in another order.  The ones pass
      an `optimization_barrier` so that XLA does not turn the product back into a reduction.
      float32 `x` falls back to "blocks" (a GPU product would round it to TF32).  Alone it
      reads a BEiT-B layer's ten sums 21 % faster than "blocks", but the SARFormer-B step was
      2.2 ms slower with it on an H100 (docs/benchmarks.md, column sums run 1, train run 31);
    - "auto": "blocks".
    The methods sum in different orders, so they are not bit-identical to one another."""
    method = method or os.environ.get("SARFORMER_COLUMN_SUM") or "auto"
    if method not in COLUMN_SUM_METHODS:
        raise ValueError(f"column_sum: method {method!r} is not one of {COLUMN_SUM_METHODS}")
    n, c = x.shape
    if method == "dot" and jnp.dtype(x.dtype).itemsize == 2 and n >= 1024:
        ones = jax.lax.optimization_barrier(jnp.ones((16, n), x.dtype))
        return jnp.dot(ones, x, preferred_element_type=jnp.float32)[0]
    if method == "sum" or not 1024 <= n < 8192:
        return jnp.sum(x.astype(jnp.float32), axis=0)
    rows = _round_up(int(np.ceil(np.sqrt(n))), 8)
    if groups < 1 or n % groups:
        raise ValueError(f"column_sum: {n} rows do not split into {groups} equal groups")
    m = n // groups
    blocks = -(-m // rows)  # per group
    x = jnp.pad(x.reshape(groups, m, c), ((0, 0), (0, blocks * rows - m), (0, 0)))
    part = jnp.sum(x.reshape(groups, blocks, rows, c).astype(jnp.float32), axis=2)
    return jnp.sum(jax.lax.optimization_barrier(part), axis=(0, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _broadcast_param(p: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    return jnp.broadcast_to(p.astype(dtype), shape)


def _broadcast_param_fwd(p, shape, dtype):
    # the residual only carries the parameter's shape and dtype
    return _broadcast_param(p, shape, dtype), jnp.zeros(p.shape + (0,), p.dtype)


def _broadcast_param_bwd(shape, dtype, res, g):
    del dtype
    p_shape = res.shape[:-1]
    size = int(np.prod(p_shape, dtype=np.int64))
    # with two or more leading axes the first is the batch: its images are summed as runs
    groups = g.shape[0] if g.ndim >= len(p_shape) + 2 else 1
    total = column_sum(g.reshape(-1, size), groups=groups)
    return (total.reshape(p_shape).astype(res.dtype),)


_broadcast_param.defvjp(_broadcast_param_fwd, _broadcast_param_bwd)


def broadcast_param(p: jax.Array, shape: Sequence[int], dtype=None) -> jax.Array:
    """`p` (a parameter, [...]) cast to `dtype` and broadcast over the leading axes of `shape`
    (which ends with `p.shape`), with its gradient summed by `column_sum` in float32 (in two
    passes for 1024 to 8191 rows).  For the biases, scales and norms applied to every token of
    a batch, whose gradients are such sums."""
    shape = tuple(int(v) for v in shape)
    if shape[len(shape) - p.ndim:] != tuple(p.shape):
        raise ValueError(f"broadcast_param: parameter {tuple(p.shape)} does not end shape {shape}")
    return _broadcast_param(p, shape, jnp.dtype(dtype or p.dtype))


class Linear(nnx.Linear):
    """`nnx.Linear` (same parameters, same forward values) whose bias gradient is summed by
    `broadcast_param`."""

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        if self.bias is None:
            return super().__call__(inputs, out_sharding)
        kernel = self.kernel[...]
        bias = self.bias[...]
        inputs, kernel, bias_c = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
        kwargs = {"out_sharding": out_sharding}
        if self.preferred_element_type is not None:
            kwargs["preferred_element_type"] = self.preferred_element_type
        y = self.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())),
                             precision=self.precision, **kwargs)
        return y + broadcast_param(bias, y.shape, bias_c.dtype)


class LayerNorm(nnx.LayerNorm):
    """`nnx.LayerNorm` over the last axis (same parameters, same operations in the same order)
    whose scale and bias gradients are summed by `broadcast_param`."""

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        last = (-1, (-1,), x.ndim - 1, (x.ndim - 1,))
        if (mask is not None or self.axis_name is not None or self.reduction_axes not in last
                or self.feature_axes not in last):
            return super().__call__(x, mask=mask)
        from flax.nnx.nn.normalization import _compute_stats

        scale = self.scale[...] if self.scale is not None else None
        bias = self.bias[...] if self.bias is not None else None
        x, scale_c, bias_c = self.promote_dtype((x, scale, bias), dtype=self.dtype)
        mean, var = _compute_stats(x, -1, self.dtype, use_fast_variance=self.use_fast_variance)
        y = x - mean[..., None]
        mul = jax.lax.rsqrt(var[..., None] + self.epsilon)
        args = [x]
        if scale is not None:
            mul = mul * broadcast_param(scale, x.shape, scale_c.dtype)
            args.append(scale_c)
        y = y * mul
        if bias is not None:
            y = y + broadcast_param(bias, x.shape, bias_c.dtype)
            args.append(bias_c)
        return jnp.asarray(y, jnp.result_type(*args) if self.dtype is None else self.dtype)


class _HostCountedStream(nnx.RngStream):
    """An `nnx.RngStream` that counts its draws in Python instead of in a traced `RngCount`.

    It draws exactly the keys a fresh `nnx.RngStream` would (`fold_in(key, 0)`, `fold_in(key,
    1)`, ...), but building a model under `jit` / `eval_shape` no longer stores a traced counter
    per draw; each such store makes jax build a tracer-origin message over the whole trace so
    far, which made building SARFormer-B quadratic (7 s -> 1 s per build)."""

    def __init__(self, key, *, tag: str):
        super().__init__(key, tag=tag)
        self.host_count = 0

    def __call__(self) -> jax.Array:
        key = jax.random.fold_in(self.key[...], self.host_count)
        self.host_count += 1
        return key


def init_rngs(params: int | jax.Array = 0, dropout: int | jax.Array | None = None) -> nnx.Rngs:
    """`nnx.Rngs(params=..., dropout=...)` for building models: same parameters, cheap to trace
    (the `params` stream is host-counted, see `_HostCountedStream`).  Seeds are ints or PRNG
    keys; under `jit`, pass keys as arguments (`jax.random.key(seed)` gives the int's
    parameters): built from an int, every initialiser is a compile-time constant that XLA
    tries to constant-fold, which took minutes for SARFormer-L."""
    if dropout is None:
        if not isinstance(params, int):
            raise ValueError("init_rngs: with a key for `params`, give `dropout` too")
        dropout = params + 1
    rngs = nnx.Rngs(dropout=dropout)
    rngs.params = _HostCountedStream(params, tag="params")
    return rngs


def stacked_layers(layers) -> tuple[Any, Any, Any]:
    """(graphdef, parameters stacked along a new leading axis, the rest of the last layer's
    state) of modules with identical parameter structure, for a `lax.scan` whose body runs
    `nnx.merge(graphdef, params_i, rest)`.  The stack is built at trace time from the layers'
    own parameters, so the parameter tree (and checkpoints) keep one entry per layer and the
    gradients flow back through the stack."""
    splits = [nnx.split(layer, nnx.Param, ...) for layer in layers]
    graphdef, _, rest = splits[-1]
    params = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[p for _, p, _ in splits])
    return graphdef, params, rest


class DropPath(nnx.Module):
    """Stochastic depth: drops the whole residual branch per sample with probability `rate`."""

    def __init__(self, rate: float, *, rngs: nnx.Rngs | None = None, deterministic: bool = False):
        self.rate = float(rate)
        self.deterministic = deterministic
        self.rngs = rngs.fork() if (rngs is not None and self.rate > 0) else None

    def __call__(self, x: jax.Array, *, deterministic: bool | None = None) -> jax.Array:
        det = self.deterministic if deterministic is None else deterministic
        if det or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        key = self.rngs.dropout()
        mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU as PyTorch's `nn.GELU()` computes it, x/2 * (1 + erf(x / sqrt 2)), in float32
    whatever the input dtype, returned in the input dtype.

    `jax.nn.gelu(x, approximate=False)` evaluates x/2 * erfc(-x / sqrt 2) instead, and for bf16
    inputs in bf16 (with sqrt(1/2) rounded to bf16): XLA expands that erfc into two polynomial
    branches, an exponential and divisions, and a separate pass for the scaled argument -- on the
    GPU ~9 % of SAM vit_h's encoder time -- and its bf16 results are ~1e-3 off PyTorch's.  XLA's
    float32 erf is one rational polynomial, so this is one bandwidth-bound pass."""
    xf = x.astype(jnp.float32)
    return (0.5 * xf * (1.0 + jax.lax.erf(xf * np.float32(np.sqrt(0.5))))).astype(x.dtype)


trunc_normal_02 = nnx.initializers.truncated_normal(stddev=0.02, lower=-2.0 / 0.02, upper=2.0 / 0.02)
"""PyTorch `trunc_normal_(std=0.02)` (cut at +-2 absolute, i.e. +-100 sigma: effectively normal)."""


# ----------------------------------------------------------------------------------------------
# Attention

ATTENTION_IMPLEMENTATIONS = (None, "auto", "xla", "cudnn", "cudnn_narrow_v")
"""`cudnn_narrow_v`: cuDNN's fused attention with v at its own head dim (cuDNN's "multi-head latent
attention" support, Hopper and cuDNN >= 9.10) instead of v zero-padded to the q/k head dim; for
attention whose q/k carry extra channels (SAM's relative positions).  Forward only."""


def resolve_attention(implementation: str | None, dtype) -> str:
    """`None` / "auto" -> "cudnn" (fused flash attention) on a CUDA GPU for bf16 / fp16 compute,
    else "xla"; "xla" and "cudnn" are kept as given."""
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}: choose from "
                         f"{ATTENTION_IMPLEMENTATIONS}")
    if implementation in ("xla", "cudnn", "cudnn_narrow_v"):
        return implementation
    low = dtype is not None and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if low and jax.default_backend() == "gpu" else "xla"


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def pad_for_cudnn(q, k, v, bias=None):
    """(q, k, v, bias) padded to what cuDNN's fused attention accepts: one head dim for q, k and
    v (a multiple of 8), the bias in the compute dtype as [b|1, n|1, t, s], and even t and s when
    there is a bias (its gradient needs them).  Extra head channels add nothing to the logits, an
    extra query row is dropped by the caller, an extra key gets a large negative bias.  A bias
    whose last two sizes are already the padded ones is taken as it is."""
    b, t, n, d = q.shape
    s, dv = k.shape[1], v.shape[-1]
    dim = _round_up(max(d, dv), 8)
    pad_t, pad_s = (t % 2, s % 2) if bias is not None else (0, 0)

    def pad(x, rows, channels):
        return jnp.pad(x, ((0, 0), (0, rows), (0, 0), (0, channels))) if rows or channels else x

    q, k, v = pad(q, pad_t, dim - d), pad(k, pad_s, dim - d), pad(v, pad_s, dim - dv)
    if bias is not None:
        bias = jnp.asarray(bias, q.dtype)
        while bias.ndim < 4:
            bias = bias[None]
        if (pad_t or pad_s) and bias.shape[-2:] == (t + pad_t, s + pad_s):
            # already padded (`beit.relative_position_bias(..., pad_even=True)`)
            return q, k, v, jnp.broadcast_to(bias, bias.shape[:2] + (t + pad_t, s + pad_s))
        bias = jnp.broadcast_to(bias, bias.shape[:2] + (t, s))
        if pad_t:
            bias = jnp.pad(bias, ((0, 0), (0, 0), (0, 1), (0, 0)))
        if pad_s:
            neg = jnp.full(bias.shape[:-1] + (1,), -(2.0 ** 40), bias.dtype)
            bias = jnp.concatenate([bias, neg], axis=-1)
    return q, k, v, bias


def attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None = None, *,
              scale: float | None = None, implementation: str | None = "xla") -> jax.Array:
    """softmax(scale * q k^T + bias) v for q [b, t, n, d], k [b, s, n, d], v [b, s, n, dv],
    bias broadcastable to [b, n, t, s] (default scale d^-0.5); returns [b, t, n, dv].
    "cudnn" gets its operands through `pad_for_cudnn`, so any shapes work there too; a v narrower
    than q is zero-padded for the XLA implementation (it wants one head dim as well), and for
    "cudnn" (to q's head dim), but not for "cudnn_narrow_v"."""
    t, d, dv = q.shape[1], q.shape[-1], v.shape[-1]
    if implementation == "cudnn_narrow_v":
        return _cudnn_narrow_v(q, k, v, bias, d ** -0.5 if scale is None else scale)
    if implementation != "cudnn":
        if dv < d:
            v = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, d - dv)))
        return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale,
                                            implementation=implementation)[..., :dv]
    qp, kp, vp, bp = pad_for_cudnn(q, k, v, bias)
    out = jax.nn.dot_product_attention(qp, kp, vp, bias=bp, scale=d ** -0.5 if scale is None else scale,
                                       implementation="cudnn")
    return out[:, :t, :, :dv]


@functools.lru_cache(maxsize=1)
def narrow_v_supported() -> bool:
    """Whether "cudnn_narrow_v" may run here: a Hopper-or-later CUDA GPU.  (jax's cuDNN lowering
    checks the rest -- cuDNN >= 9.10 -- when it traces, and raises NotImplementedError; callers
    that pick it automatically fall back to "cudnn" then.)"""
    if jax.default_backend() != "gpu":
        return False
    try:
        cc = tuple(int(v) for v in str(jax.devices()[0].compute_capability).split("."))
    except (AttributeError, ValueError):  # not a CUDA device
        return False
    return cc >= (9, 0)


def _cudnn_narrow_v(q, k, v, bias, scale):
    """cuDNN fused attention with q/k and v at different head dims (each padded to a multiple of
    8 only).  `jax.nn.dot_product_attention` insists on one head dim, so this calls jax's cuDNN
    lowering underneath it, which accepts a narrower v on Hopper with cuDNN >= 9.10."""
    try:
        from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_attention
    except ImportError as e:  # a jax without the module
        raise NotImplementedError("attention 'cudnn_narrow_v' needs jax's cuDNN attention module "
                                  "(jax._src.cudnn.fused_attention_stablehlo)") from e
    t, dv = q.shape[1], v.shape[-1]
    dim_v = _round_up(dv, 8)
    qp, kp, _, bp = pad_for_cudnn(q, k, k, bias)  # q / k widths, the bias's layout, even lengths
    if dim_v != dv or kp.shape[1] != k.shape[1]:
        v = jnp.pad(v, ((0, 0), (0, kp.shape[1] - k.shape[1]), (0, 0), (0, dim_v - dv)))
    out = cudnn_attention(qp, kp, v, bias=bp, scale=scale)
    return out[:, :t, :, :dv]


class StridedConvTranspose(nnx.Module):
    """ConvTranspose2d whose kernel equals its stride (no overlap, VALID), as a matrix product and
    a depth-to-space reshape: out[2i + a, 2j + b] = x[i, j] @ W[a, b] + bias for stride 2.

    Same parameters, layout and initialisation order as `nnx.ConvTranspose(..., padding="VALID",
    transpose_kernel=False)` (kernel (kh, kw, I, O), spatially flipped against torch's; the
    converters' `conv_transpose_kernel`), and the same sums.  It exists for speed: XLA's CPU
    backend runs the kernel gradient of the dilated convolution that `nnx.ConvTranspose` lowers
    to through a naive loop (62 s of a 78 s ViT-Adapter-B gradient at 640², 2 cores), while this
    is one GEMM on every backend.  SAM's mask decoder uses it too (its upscaling runs once per
    prompt)."""

    def __init__(self, in_features: int, out_features: int, stride: int, *,
                 kernel_init=nnx.initializers.lecun_normal(),
                 bias_init=nnx.initializers.zeros_init(), dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.stride = int(stride)
        self.dtype = dtype
        shape = (self.stride, self.stride, in_features, out_features)
        self.kernel = nnx.Param(kernel_init(rngs.params(), shape, param_dtype))
        self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or jnp.result_type(x, self.kernel[...])
        k = self.kernel[...].astype(dtype)[::-1, ::-1]  # flax's transposed-conv flip
        b, h, w, _ = x.shape
        s = self.stride
        y = jnp.einsum("bhwc,xyco->bhxwyo", x.astype(dtype), k)
        return y.reshape(b, h * s, w * s, -1) + self.bias[...].astype(dtype)

    def block_kernel(self) -> jax.Array:
        """[s, s, in, out] (parameter dtype): block (a, c) maps an input pixel to output pixel
        (s*i + a, s*j + c) -- the stored kernel with flax's transposed-conv flip undone."""
        return self.kernel[...][::-1, ::-1]

    def blocks(self, x: jax.Array, *, bias: bool = True) -> jax.Array:
        """The output before the depth-to-space step: [b, h, w, s, s, out] with
        `blocks(x)[:, i, j, a, c] == self(x)[:, s*i + a, s*j + c]` (same sums), for a consumer
        that can contract or reduce the blocks without the interleaved copy (`bias=False`: the
        product alone, for a consumer that adds the bias itself)."""
        dtype = self.dtype or jnp.result_type(x, self.kernel[...])
        k = self.block_kernel().astype(dtype)
        y = jnp.einsum("bhwc,xyco->bhwxyo", x.astype(dtype), k)
        return y + self.bias[...].astype(dtype) if bias else y


def _casts_at_use(module) -> bool:
    """Whether `module` casts its `kernel` and `bias` to its compute dtype before using them (flax's
    Linear / Conv / ConvTranspose through `promote_dtype`, and `StridedConvTranspose`)."""
    return (isinstance(module, (nnx.Linear, nnx.Conv, nnx.ConvTranspose, StridedConvTranspose))
            and getattr(module, "dtype", None) is not None)


def state_with_compute_dtype_weights(module: nnx.Module, within: str | None = None) -> nnx.State:
    """`nnx.split(module)[1]` with the kernels and biases of the layers that cast them to their
    compute dtype at every call (Linear / Conv with a `dtype`) held in that dtype already.

    For inference with frozen weights: the layers use the same bf16 values (they would round the
    same float32 ones), but each call no longer reads the float32 weights and writes bf16 copies
    (for SAM vit_h's encoder ~2.5 GB read and 1.3 GB written per image).  Every
    other parameter (norms, embeddings, tables) keeps its dtype.  The results equal those with
    float32-held weights up to where XLA rounds bf16 intermediates (its fusions change with the
    casts gone).  `within`: only the layers under this attribute (e.g. "image_encoder").  The
    module is not modified."""
    targets = {}
    root = module if within is None else getattr(module, within)
    prefix = () if within is None else (within,)
    for path, sub in nnx.iter_modules(root):
        if _casts_at_use(sub):
            for name in ("kernel", "bias"):
                targets[prefix + tuple(path) + (name,)] = jnp.dtype(sub.dtype)
    _, state = nnx.split(module)
    flat = []
    for path, var in nnx.to_flat_state(state):
        dtype = targets.get(tuple(path))
        if dtype is not None and isinstance(var, nnx.Param):
            value = var.get_value()
            if value is not None and jnp.dtype(value.dtype).itemsize > dtype.itemsize:
                var = var.replace(value.astype(dtype))
        flat.append((path, var))
    return nnx.from_flat_state(flat)
