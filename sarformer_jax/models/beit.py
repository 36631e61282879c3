"""BEiT encoder with relative position bias (Bao et al. 2022), as used by SARFormer's backbone.

Mirrors mmseg's `BEiT` layers as `BEiT_adapter` builds them (ARCHITECTURE.md §2.3-§2.4):
patch embedding (no absolute position embedding), a learned cls token, pre-norm layers with
layer scale, attention with q/v biases and a per-layer relative position bias table that also
holds three entries for the cls row, column and corner.  Attribute names follow the mmseg
state dict (`patch_embed.projection`, `layers.{i}.{ln1, ln2, attn.*, ffn.layers.{0.0, 1},
gamma_1, gamma_2}`) so converters are tables.

Relative position tables for other grids.  A table is sized for the grid `rel_pos_grid`
(40x40 for SARFormer at 640 px, 79*79 + 3 rows).  An input whose token grid differs derives its
table at run time, per axis (CHECKPOINTS.md §5.3):
  * an axis with at most as many tokens as the table's grid takes the centre `2n - 1` offsets:
    those offsets are a subset of the table's, so this is exact;
  * a longer axis is resampled with BEiT's geometric-sequence bicubic interpolation (§2.4): a
    not-a-knot cubic spline through source offsets spaced geometrically, evaluated at integer
    offsets.  That spline is linear in the table, so it is applied as a constant [2n-1, 2N-1]
    matrix (numpy, float64, built once) and stays differentiable.
The three cls entries are kept as they are.  The spline here equals scipy's
`RectBivariateSpline(kx=ky=3, s=0)` used by the converter (a tensor-product interpolating spline
is separable); tests check the two agree.

The bias itself is built by two matrix products with constant one-hot offset matrices rather
than an index gather, so its gradient is two GEMMs, not a scatter-add with heavy index
collisions (nor a sum of shifted slices, which cost ~15 ms of BEiT-B's backward on an H100).
`relative_position_index` is the reference definition (the persistent buffer of the original)
and tests compare against it.

Legend: b batch, h w token grid, t tokens (1 + h*w), c channels, n heads, d head dim.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sarformer_jax.models.layers import (
    DropPath,
    LayerNorm,
    Linear,
    attention,
    broadcast_param,
    gelu,
    resolve_attention,
    stacked_layers,
    trunc_normal_02,
)
from sarformer_jax.sharding import num_batch_shards

NUM_EXTRA = 3  # cls->patch, patch->cls, cls->cls rows at the end of every table

# PyTorch's default Conv2d init (kaiming_uniform with a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
torch_conv_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int):
    """PyTorch's default Conv2d / Linear bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# ----------------------------------------------------------------------------------------------
# Relative position index and table geometry (numpy, static)


def table_rows(grid: Sequence[int]) -> int:
    """Rows of a relative position table for a token grid (h, w): (2h-1)(2w-1) + 3."""
    h, w = grid
    return (2 * h - 1) * (2 * w - 1) + NUM_EXTRA


@functools.lru_cache(maxsize=16)
def relative_position_index(grid: tuple[int, int]) -> np.ndarray:
    """[1 + h*w, 1 + h*w] int32 rows into the table: token 0 is cls, then patches row-major.

    patch p=(r_p, c_p) -> patch q: (r_p - r_q + h - 1) * (2w - 1) + (c_p - c_q + w - 1);
    row 0 (cls query) = G, column 0 (cls key) = G + 1, cell (0, 0) = G + 2, G = (2h-1)(2w-1)."""
    h, w = grid
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    r, c = r.reshape(-1), c.reshape(-1)
    dr = r[:, None] - r[None, :] + h - 1
    dc = c[:, None] - c[None, :] + w - 1
    g = (2 * h - 1) * (2 * w - 1)
    index = np.empty((h * w + 1, h * w + 1), np.int32)
    index[1:, 1:] = dr * (2 * w - 1) + dc
    index[0, :] = g
    index[:, 0] = g + 1
    index[0, 0] = g + 2
    return index


def geometric_coordinates(src_len: int, dst_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Source and target offsets of BEiT's geometric-sequence resize (CHECKPOINTS.md §2.4).

    `src_len` = 2*src_grid - 1 offsets spread geometrically over the target range (dense near
    0), `dst_len` integer target offsets.  The ratio q solves sum_{i<src_half} q^i = dst_half by
    bisection on [1.01, 1.5]; the last midpoint is used, as the original does."""
    src_half, dst_half = src_len // 2, dst_len // 2
    left, right = 1.01, 1.5
    q = left
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if (1.0 - q**src_half) / (1.0 - q) > dst_half:
            right = q
        else:
            left = q
    dis = np.cumsum(q ** np.arange(src_half, dtype=np.float64))  # 1, 1+q, 1+q+q^2, ...
    x = np.concatenate([-dis[::-1], [0.0], dis])
    dx = np.arange(-dst_half, dst_half + 0.1, 1.0)
    return x, dx


def not_a_knot_matrix(x: np.ndarray, e: np.ndarray) -> np.ndarray:
    """[len(e), len(x)] float64: the values at `e` of the not-a-knot cubic spline through
    (x, y), as a linear map of y.  `e` outside [x0, x_end] is clamped (FITPACK behaviour).

    Not-a-knot = one cubic on each of [x0, x2] and [x_{m-3}, x_{m-1}]: exactly FITPACK's
    interpolating (s=0) cubic spline, whose interior knots are x[2:-2]."""
    x = np.asarray(x, np.float64)
    m = len(x)
    if m < 4:
        raise ValueError(f"cubic spline interpolation needs at least 4 points, got {m}")
    hs = np.diff(x)
    a = np.zeros((m, m))
    d = np.zeros((m, m))  # second derivatives s'' = solve(a, d @ y)
    a[0, :3] = hs[1], -(hs[0] + hs[1]), hs[0]  # s''' continuous at x1
    a[-1, -3:] = hs[-1], -(hs[-2] + hs[-1]), hs[-2]  # s''' continuous at x_{m-2}
    for i in range(1, m - 1):
        a[i, i - 1 : i + 2] = hs[i - 1], 2.0 * (hs[i - 1] + hs[i]), hs[i]
        d[i, i - 1 : i + 2] = 6.0 / hs[i - 1], -6.0 / hs[i - 1] - 6.0 / hs[i], 6.0 / hs[i]
    m2 = np.linalg.solve(a, d)  # [m, m]: y -> s''(x_i)
    e = np.clip(np.asarray(e, np.float64), x[0], x[-1])
    i = np.clip(np.searchsorted(x, e, side="right") - 1, 0, m - 2)
    hh = (x[i + 1] - x[i])[:, None]
    tl = (x[i + 1] - e)[:, None]
    tr = (e - x[i])[:, None]
    eye = np.eye(m)
    return (m2[i] * tl**3 / (6 * hh) + m2[i + 1] * tr**3 / (6 * hh)
            + (eye[i] / hh - m2[i] * hh / 6) * tl + (eye[i + 1] / hh - m2[i + 1] * hh / 6) * tr)


@functools.lru_cache(maxsize=32)
def offset_map(src_grid: int, dst_grid: int) -> np.ndarray | slice:
    """How a table axis of 2*src_grid - 1 offsets becomes 2*dst_grid - 1 offsets: a centre
    slice when dst <= src (exact), else the [2dst-1, 2src-1] geometric-spline matrix."""
    if dst_grid <= src_grid:
        return slice(src_grid - dst_grid, src_grid + dst_grid - 1)
    x, dx = geometric_coordinates(2 * src_grid - 1, 2 * dst_grid - 1)
    return not_a_knot_matrix(x, dx)


def derive_table(table: jax.Array, table_grid: Sequence[int], grid: Sequence[int]) -> jax.Array:
    """[(2H-1)(2W-1)+3, n] table for `table_grid` (H, W) -> table for `grid` (h, w)."""
    (th, tw), (h, w) = tuple(table_grid), tuple(grid)
    if (th, tw) == (h, w):
        return table
    n = table.shape[-1]
    t = table[:-NUM_EXTRA].reshape(2 * th - 1, 2 * tw - 1, n)
    for axis, (src, dst) in enumerate(((th, h), (tw, w))):
        op = offset_map(src, dst)
        if isinstance(op, slice):
            t = t[op] if axis == 0 else t[:, op]
        else:
            mat = jnp.asarray(op, jnp.float32)
            spec = "ia,abn->ibn" if axis == 0 else "jb,abn->ajn"
            t = jnp.einsum(spec, mat, t.astype(jnp.float32),
                           precision=jax.lax.Precision.HIGHEST).astype(table.dtype)
    return jnp.concatenate([t.reshape(-1, n), table[-NUM_EXTRA:]], axis=0)


@functools.lru_cache(maxsize=32)
def offset_onehot(n: int) -> np.ndarray:
    """[2n-1, n, n] one-hot: entry [a, i, j] is 1 where a = i - j + n - 1."""
    a = np.arange(n)[:, None] - np.arange(n)[None, :] + n - 1
    return (np.arange(2 * n - 1)[:, None, None] == a[None]).astype(np.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _position_bias(table: jax.Array, grid: tuple[int, int], dtype) -> jax.Array:
    """Two matrix products with constant one-hot offset matrices (rows, then columns):
    bias[n, (r1, c1), (r2, c2)] = sum_ab g[a, b, n] Ay[a, r1, r2] Ax[b, c1, c2], each output one
    table entry times one (exact in any dtype); then the cls row and column."""
    h, w = grid
    n = table.shape[-1]
    hw = h * w
    prec = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
    g = table[:-NUM_EXTRA].reshape(2 * h - 1, 2 * w - 1, n).astype(dtype)
    ay = jnp.asarray(offset_onehot(h), dtype)
    ax = jnp.asarray(offset_onehot(w), dtype)
    rows = jnp.einsum("abn,ars->nrsb", g, ay, precision=prec,
                      preferred_element_type=jnp.float32).astype(dtype)  # [n, h, h, 2w-1]
    p = jnp.einsum("nrsb,bct->nrcst", rows, ax, precision=prec,
                   preferred_element_type=jnp.float32).astype(dtype)  # [n, h, w, h, w]
    p = p.reshape(n, hw, hw)
    extra = table[-NUM_EXTRA:].T.astype(dtype)  # [n, 3]: cls->patch, patch->cls, cls->cls
    top = jnp.concatenate([extra[:, 2, None, None],
                           jnp.broadcast_to(extra[:, 0, None, None], (n, 1, hw))], -1)
    body = jnp.concatenate([jnp.broadcast_to(extra[:, 1, None, None], (n, hw, 1)), p], -1)
    return jnp.concatenate([top, body], axis=1)


def _position_bias_fwd(table, grid, dtype):
    return _position_bias(table, grid, dtype), None


def _position_bias_bwd(grid, dtype, _, ct):
    """The table's gradient, the sum of `ct` over every pair of each offset: for the patch
    pairs two products with constant one-hot offset matrices (columns, then rows), so no
    scatter-add with heavy index collisions.  The first reads `ct` in its own dtype (bf16 on
    the GPU) and accumulates in float32; everything after it is float32."""
    h, w = grid
    n = ct.shape[0]
    hw = h * w
    f32 = jnp.float32
    prec = jax.lax.Precision.HIGHEST
    in_dtype = ct.dtype if ct.dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) else f32
    ax = jnp.asarray(offset_onehot(w), in_dtype)  # [2w-1, w, w]: b = c1 - c2 + w - 1
    ay = jnp.asarray(offset_onehot(h), f32)  # [2h-1, h, h]: a = r1 - r2 + h - 1
    dp = ct[:, 1:, 1:].astype(in_dtype).reshape(n, h, w, h, w)  # [n, r1, c1, r2, c2]
    rows = jnp.einsum("nrcst,bct->nrsb", dp, ax, precision=prec,
                      preferred_element_type=f32)  # [n, r1, r2, b]
    g = jnp.einsum("nrsb,ars->abn", rows, ay, precision=prec,
                   preferred_element_type=f32)  # [2h-1, 2w-1, n]
    ct32 = ct.astype(f32)
    extra = jnp.stack([jnp.sum(ct32[:, 0, 1:], axis=-1),  # cls query -> patch keys
                       jnp.sum(ct32[:, 1:, 0], axis=-1),  # patch queries -> cls key
                       ct32[:, 0, 0]])  # cls -> cls
    # kept out of the kernels that use them (XLA had fused such row and column sums into the
    # gradient's other transposes, where a few threads summed 1600 strided elements each)
    extra = jax.lax.optimization_barrier(extra)
    return (jnp.concatenate([g.reshape(-1, n), extra], axis=0),)


_position_bias.defvjp(_position_bias_fwd, _position_bias_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _position_bias_kernel(table: jax.Array, grid: tuple[int, int], dtype, pad_even: bool,
                          interpret: bool) -> jax.Array:
    """The bias from the Pallas kernel (`kernels.position_bias_pallas`), padded for cuDNN when
    `pad_even`; its gradient is `_position_bias_bwd`'s, on the unpadded part."""
    from sarformer_jax.kernels.position_bias_pallas import position_bias

    return position_bias(table, grid, dtype, pad_even=pad_even, interpret=interpret)


def _position_bias_kernel_fwd(table, grid, dtype, pad_even, interpret):
    return _position_bias_kernel(table, grid, dtype, pad_even, interpret), None


def _position_bias_kernel_bwd(grid, dtype, pad_even, interpret, _, ct):
    t = 1 + grid[0] * grid[1]
    return _position_bias_bwd(grid, dtype, None, ct[:, :t, :t])


_position_bias_kernel.defvjp(_position_bias_kernel_fwd, _position_bias_kernel_bwd)

POSITION_BIAS_IMPLEMENTATIONS = ("xla", "pallas", "pallas_interpret")


def relative_position_bias(table: jax.Array, grid: Sequence[int], dtype=jnp.float32, *,
                           implementation: str = "xla", pad_even: bool = False) -> jax.Array:
    """[n, t, t] bias from a [(2h-1)(2w-1)+3, n] table; equals table[relative_position_index]
    transposed to heads first, in `dtype` (the compute dtype: bf16 on the GPU).

    Built by two matrix products with constant one-hot offset matrices (`_position_bias`), so
    that the gradient w.r.t. the table (the sum over all pairs of one offset) is two such
    products too (`_position_bias_bwd`), not the gather's scatter-add with heavy index
    collisions.  The gradient reads the cotangent in its own dtype (bf16 on the GPU) and sums
    in float32: left to autodiff, the first product's transpose ran in float32 on a float32
    copy of the cotangent (1.03 against 0.59 ms a SARFormer-B step on the H100, train run 35).
    (A gather of the table fused with cuDNN's padding was tried for the forward: 2.16 ms a
    step against 1.65 ms for the products and their copies, train run 35.)

    `pad_even`: with an odd token count, one more row (zeros: an extra query) and column
    (-2**40: an extra key) -- the padding `layers.pad_for_cudnn` adds for cuDNN, which then
    takes the bias as it is.  `implementation` "pallas" ("pallas_interpret" on the CPU) writes
    the (padded) bias in one Pallas kernel instead of the products and their layout copies; its
    gradient is the same two products."""
    h, w = (int(v) for v in grid)
    n = table.shape[-1]
    if table.shape[0] != table_rows((h, w)):
        raise ValueError(f"relative position table has {table.shape[0]} rows; grid {(h, w)} "
                         f"needs {table_rows((h, w))}")
    if implementation not in POSITION_BIAS_IMPLEMENTATIONS:
        raise ValueError(f"position bias implementation {implementation!r} is not one of "
                         f"{POSITION_BIAS_IMPLEMENTATIONS}")
    if implementation != "xla":
        return _position_bias_kernel(table.astype(jnp.float32), (h, w), jnp.dtype(dtype),
                                     bool(pad_even), implementation == "pallas_interpret")
    t = h * w + 1
    out = _position_bias(table.astype(jnp.float32), (h, w), jnp.dtype(dtype)).reshape(n, t, t)
    if pad_even and t % 2:
        out = jnp.pad(out, ((0, 0), (0, 1), (0, 0)))
        out = jnp.concatenate([out, jnp.full((n, t + 1, 1), -(2.0 ** 40), out.dtype)], axis=-1)
    return out


# ----------------------------------------------------------------------------------------------
# Modules


class PatchEmbed(nnx.Module):
    """Conv patch embedding (`patch_embed.projection`), no norm."""

    def __init__(self, embed_dim: int, patch_size: int, *, in_chans: int = 3, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        fan_in = in_chans * patch_size * patch_size
        self.projection = nnx.Conv(in_chans, embed_dim, (patch_size, patch_size),
                                   strides=(patch_size, patch_size), padding="VALID",
                                   kernel_init=torch_conv_init, bias_init=torch_bias_init(fan_in),
                                   dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.projection(x)  # [b, h, w, c]


class BEiTAttention(nnx.Module):
    """Multi-head attention with q/v biases (no k bias) and a relative position bias table."""

    def __init__(self, dim: int, num_heads: int, table_grid: Sequence[int], *, qv_bias: bool = True,
                 implementation: str | None = None, position_bias: str = "xla", dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.table_grid = tuple(int(g) for g in table_grid)
        self.implementation = implementation
        if position_bias not in ("xla", "pallas"):
            raise ValueError(f"model.backbone.position_bias must be 'xla' or 'pallas', got "
                             f"{position_bias!r}")
        self.position_bias = position_bias
        self.dtype = dtype
        # (mesh, batch axes) when each device should build the bias and attend on its own batch
        # shard (`set_attention_per_batch_shard`, for data-parallel training); None otherwise
        self.batch_shard_mesh = None
        lin = dict(kernel_init=trunc_normal_02, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv = Linear(dim, 3 * dim, use_bias=False, **lin)
        self.q_bias = nnx.Param(jnp.zeros((dim,), param_dtype)) if qv_bias else None
        self.v_bias = nnx.Param(jnp.zeros((dim,), param_dtype)) if qv_bias else None
        self.relative_position_bias_table = nnx.Param(
            jnp.zeros((table_rows(self.table_grid), num_heads), param_dtype))
        self.proj = Linear(dim, dim, **lin)

    def bias(self, grid: Sequence[int], dtype=jnp.float32, table: jax.Array | None = None,
             for_cudnn: bool = False) -> jax.Array:
        """[n, t, t] relative position bias for a token grid (h, w), in `dtype`, from this
        layer's table (or `table`, a value of it).  `for_cudnn`: with `position_bias="pallas"`
        on a GPU, written by the Pallas kernel already padded to cuDNN's even sizes."""
        table = self.relative_position_bias_table[...] if table is None else table
        table = derive_table(table, self.table_grid, grid)
        if for_cudnn and self.position_bias == "pallas" and jax.default_backend() == "gpu":
            return relative_position_bias(table.astype(jnp.float32), grid, dtype,
                                          implementation="pallas", pad_even=True)
        return relative_position_bias(table.astype(jnp.float32), grid, dtype)

    def __call__(self, x: jax.Array, grid: Sequence[int]) -> jax.Array:
        """x: [b, t, c] with t = 1 + h*w (cls first). Returns [b, t, c]."""
        b, t, c = x.shape
        n = self.num_heads
        qkv = self.qkv(x)
        if self.q_bias is not None:
            zeros = jnp.zeros_like(self.v_bias[...])
            qv = jnp.concatenate([self.q_bias[...], zeros, self.v_bias[...]])
            qkv = qkv + broadcast_param(qv, qkv.shape, qkv.dtype)
        q, k, v = jnp.split(qkv.reshape(b, t, 3, n, c // n), 3, axis=2)  # [b, t, 1, n, d]
        impl = resolve_attention(self.implementation, q.dtype)
        # cuDNN takes the bias in the compute dtype; the XLA path adds a float32 bias
        bias_dtype = q.dtype if impl == "cudnn" else jnp.float32
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
        if self.batch_shard_mesh is None or b % num_batch_shards(*self.batch_shard_mesh):
            # (a batch the mesh does not divide, e.g. evaluation windows: as one program)
            out = attention(q, k, v, self.bias(grid, bias_dtype, for_cudnn=impl == "cudnn")[None],
                            implementation=impl)
        else:
            out = self._attend_per_batch_shard(q, k, v, grid, bias_dtype, impl)
        return self.proj(out.reshape(b, t, c))

    def _attend_per_batch_shard(self, q, k, v, grid, bias_dtype, impl):
        """The bias built and the attention run on each device's batch shard (`shard_map`), the
        table passed in replicated.  The bias is shared by the batch, so its gradient is a sum
        over the batch: under a plain batch-sharded jit the devices finish that sum on the dense
        [n, t, t] gradient (jax's cuDNN attention psums it inside its partitioning; for
        SARFormer-B 12 x 117 MiB a step, 3x the bytes of every parameter gradient together).
        Here each device maps its gradient back to the table first, and the devices sum
        [rows, n] tables at the shard_map boundary."""
        from jax.sharding import PartitionSpec as P

        mesh, axes = self.batch_shard_mesh

        def attend(q, k, v, table):
            return attention(q, k, v, self.bias(grid, bias_dtype, table,
                                                for_cudnn=impl == "cudnn")[None],
                             implementation=impl)

        spec = P(axes)
        return jax.shard_map(attend, mesh=mesh, in_specs=(spec, spec, spec, P()),
                             out_specs=spec, check_vma=False)(
            q, k, v, self.relative_position_bias_table[...])


class FFN(nnx.Module):
    """mmcv FFN without identity: `layers.0.0` Linear(c, hidden) -> GELU -> `layers.1` Linear."""

    def __init__(self, dim: int, hidden: int, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        lin = dict(kernel_init=trunc_normal_02, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([nnx.List([Linear(dim, hidden, **lin)]),
                                Linear(hidden, dim, **lin)])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.layers[1](gelu(self.layers[0][0](x)))


class BEiTLayer(nnx.Module):
    """Pre-norm transformer layer with layer scale: x + dp(g1*attn(ln1 x)), x + dp(g2*ffn(ln2 x))."""

    def __init__(self, dim: int, num_heads: int, table_grid: Sequence[int], *, mlp_ratio: float,
                 qv_bias: bool, eps: float, init_values: float | None, drop_path: float,
                 attention_implementation: str | None = None, position_bias: str = "xla",
                 dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.ln1 = LayerNorm(dim, epsilon=eps, **common)
        self.attn = BEiTAttention(dim, num_heads, table_grid, qv_bias=qv_bias,
                                  implementation=attention_implementation,
                                  position_bias=position_bias, **common)
        self.ln2 = LayerNorm(dim, epsilon=eps, **common)
        self.ffn = FFN(dim, int(dim * mlp_ratio), **common)
        if init_values is not None and init_values > 0:
            self.gamma_1 = nnx.Param(jnp.full((dim,), init_values, param_dtype))
            self.gamma_2 = nnx.Param(jnp.full((dim,), init_values, param_dtype))
        else:
            self.gamma_1 = self.gamma_2 = None
        self.drop_path = DropPath(drop_path, rngs=rngs)

    def __call__(self, x: jax.Array, grid: Sequence[int], *, train: bool = False,
                 drop=None) -> jax.Array:
        """`drop(y, i)` replaces this layer's DropPath on residual branch i (0 attention, 1 FFN);
        the scanned layer groups pass one (`BEiT.run_layers`)."""
        if drop is None:
            drop = lambda y, _: self.drop_path(y, deterministic=not train)  # noqa: E731
        y = self.attn(self.ln1(x), grid)
        if self.gamma_1 is not None:
            y = y * broadcast_param(self.gamma_1[...], y.shape, y.dtype)
        x = x + drop(y, 0)
        y = self.ffn(self.ln2(x))
        if self.gamma_2 is not None:
            y = y * broadcast_param(self.gamma_2[...], y.shape, y.dtype)
        return x + drop(y, 1)


def _apply_layer(layer: BEiTLayer, x: jax.Array, grid: tuple[int, int], train: bool) -> jax.Array:
    return layer(x, grid, train=train)


_apply_layer_remat = nnx.remat(_apply_layer, static_argnums=(2, 3))


def table_grid_of(cfg: Any, image_size: Sequence[int] | int) -> tuple[int, int]:
    """The token grid the relative position tables are sized for: `cfg.rel_pos_grid`, or the
    grid of `image_size` when that is None."""
    grid = cfg.get("rel_pos_grid") if hasattr(cfg, "get") else getattr(cfg, "rel_pos_grid", None)
    if grid is None:
        hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        grid = (hw[0] // cfg.patch_size, hw[1] // cfg.patch_size)
    return (int(grid[0]), int(grid[1]))


def resolve_scan_layers(flag) -> bool:
    """`scan_layers`: True / False, or "auto" = scan on the CPU (it cuts compile time there) and
    unrolled on an accelerator, where the scan's per-iteration parameter stacking and gradient
    updates cost step time (H200, SARFormer-B 640² b2 train step: 84.5 ms pipelined with the
    backbone scanned, 81.8 ms unrolled; docs/benchmarks.md, train run 6)."""
    if isinstance(flag, str):
        if flag != "auto":
            raise ValueError(f"scan_layers must be True, False or 'auto', got {flag!r}")
        return jax.default_backend() == "cpu"
    return bool(flag)


class BEiT(nnx.Module):
    """BEiT encoder: patch embedding, cls token, `depth` layers.  No final norm (SARFormer and
    the adapter use the raw tokens).

    Args:
      cfg: backbone config with the fields of `configs.common.beit_adapter_b()` (embed_dim,
        depth, num_heads, mlp_ratio, patch_size, qv_bias, layer_norm_eps, drop_path_rate,
        init_values, with_cp, rel_pos_grid).
      image_size: int or (H, W); sets the table grid when `cfg.rel_pos_grid` is None.  Inputs of
        other sizes (multiples of the patch size) work; see the module docstring.
      attention_implementation: None / "auto" (cuDNN fused attention on a GPU in bf16 / fp16, else XLA), "xla" or "cudnn".
    """

    def __init__(self, cfg: Any, image_size: Sequence[int] | int = 640, *, dtype=None,
                 param_dtype=jnp.float32, attention_implementation: str | None = None,
                 rngs: nnx.Rngs):
        c = int(cfg.embed_dim)
        self.embed_dim = c
        self.patch_size = int(cfg.patch_size)
        self.table_grid = table_grid_of(cfg, image_size)
        self.with_cp = bool(cfg.get("with_cp", False))
        self.scan_layers = resolve_scan_layers(cfg.get("scan_layers", False))
        self.patch_embed = PatchEmbed(c, self.patch_size, dtype=dtype, param_dtype=param_dtype,
                                      rngs=rngs)
        self.cls_token = nnx.Param(jnp.zeros((1, 1, c), param_dtype))
        rates = np.linspace(0.0, float(cfg.drop_path_rate), int(cfg.depth))
        self.layers = nnx.List([
            BEiTLayer(c, int(cfg.num_heads), self.table_grid, mlp_ratio=float(cfg.mlp_ratio),
                      qv_bias=bool(cfg.qv_bias), eps=float(cfg.layer_norm_eps),
                      init_values=cfg.init_values, drop_path=float(rate),
                      attention_implementation=attention_implementation,
                      position_bias=str(cfg.get("position_bias", "xla")), dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs)
            for rate in rates
        ])
        self.dtype = dtype

    def embed(self, x: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
        """[b, H, W, 3] -> patch tokens [b, h*w, c] and the grid (h, w)."""
        b, hgt, wid, _ = x.shape
        if hgt % self.patch_size or wid % self.patch_size:
            raise ValueError(f"input {hgt}x{wid} is not a multiple of the patch size {self.patch_size}")
        p = self.patch_embed(x)
        grid = (p.shape[1], p.shape[2])
        return p.reshape(b, grid[0] * grid[1], self.embed_dim), grid

    def run_layers(self, t: jax.Array, grid: tuple[int, int], start: int, stop: int, *,
                   train: bool = False) -> jax.Array:
        """Runs layers[start..stop] (inclusive) on tokens [b, 1 + h*w, c]: one `lax.scan` over
        the group when `cfg.scan_layers` (XLA compiles one layer instead of stop - start + 1),
        else unrolled."""
        if self.scan_layers and stop > start:
            return self._scan_layers(t, tuple(grid), start, stop, bool(train))
        for i in range(start, stop + 1):
            if self.with_cp:
                t = _apply_layer_remat(self.layers[i], t, tuple(grid), bool(train))
            else:
                t = self.layers[i](t, grid, train=train)
        return t

    def _scan_layers(self, t: jax.Array, grid: tuple[int, int], start: int, stop: int,
                     train: bool) -> jax.Array:
        """layers[start..stop] as one scan.  The layers' parameters are stacked on the fly (the
        parameter tree keeps one entry per layer, as checkpoints name them) and their gradients
        flow back through the stack.  Stochastic depth is applied here with each layer's own
        rate: a key per layer split from one draw of the group's first dropping layer's stream
        (the same distribution as the unrolled layers' own streams, other random numbers)."""
        layers = [self.layers[i] for i in range(start, stop + 1)]
        graphdef, params, rest = stacked_layers(layers)
        rates = np.asarray([layer.drop_path.rate for layer in layers], np.float32)
        dropping = train and bool((rates > 0).any())
        if dropping:
            first = next(layer for layer in layers if layer.drop_path.rngs is not None)
            keys = jax.random.split(first.drop_path.rngs.dropout(), len(layers))
        else:
            keys = jnp.zeros((len(layers),), jnp.uint32)  # unused

        def body(x, xs):
            p, rate, key = xs
            layer = nnx.merge(graphdef, p, rest)
            if not dropping:
                return layer(x, grid, train=False), None
            branch_keys = jax.random.split(key)

            def drop(y, i):
                keep = 1.0 - rate
                mask = jax.random.bernoulli(branch_keys[i], keep,
                                            (y.shape[0],) + (1,) * (y.ndim - 1))
                return jnp.where(mask, y / keep.astype(y.dtype), jnp.zeros_like(y))

            return layer(x, grid, train=True, drop=drop), None

        if self.with_cp:
            body = jax.checkpoint(body, prevent_cse=False)
        t, _ = jax.lax.scan(body, t, (params, jnp.asarray(rates), keys))
        return t

    def __call__(self, x: jax.Array, *, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        """x: [b, H, W, 3] normalised.  Returns tokens [b, 1 + h*w, c] (cls first) after the
        last layer, and intermediates {"patch_embed", "layers.{i}"}."""
        p, grid = self.embed(x)
        inter = {"patch_embed": p}
        cls = jnp.broadcast_to(self.cls_token[...].astype(p.dtype), (p.shape[0], 1, self.embed_dim))
        t = jnp.concatenate([cls, p], axis=1)
        for i in range(len(self.layers)):
            t = self.run_layers(t, grid, i, i, train=train)
            inter[f"layers.{i}"] = t
        return t, inter


def set_attention_per_batch_shard(model: nnx.Module, mesh, axes) -> int:
    """Runs every BEiT attention of `model` per batch shard of `mesh` (batch split over the
    mesh axes `axes`): see `BEiTAttention._attend_per_batch_shard`.  Same numbers; returns how
    many attentions were switched."""
    count = 0
    for _, m in nnx.iter_modules(model):
        if isinstance(m, BEiTAttention):
            m.batch_shard_mesh = (mesh, tuple(axes))
            count += 1
    return count
