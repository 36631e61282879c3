"""Pallas (Triton backend) kernel: BEiT's relative position bias written in one pass, already
padded the way cuDNN's fused attention takes it.

The XLA path (`models.beit._position_bias`) builds the [n, t, t] bias (t = 1 + h*w tokens) from
its [(2h-1)(2w-1)+3, n] table with two one-hot products, then a transpose into query-major
order, the cls row and column, and `layers.pad_for_cudnn`'s even padding: for SARFormer-B at
640² (t = 1601, 12 heads, 12 layers) three kernels of ~0.05 ms each a layer that write and
re-read the 61.5 MB bias (train run 40: `input_transpose_fusion` 0.65 ms and `loop_pad_fusion`
0.57 ms a step, plus the products).  The bias is pure data movement -- entry (i, j) of head n is
one table entry -- so this kernel computes each entry's table row from (i, j) and gathers it
from the small table (12.5 KB a head, cached on chip): one write of the padded bias.

Entry (i, j) of head n, with patch p = i - 1 at (r, c) = divmod(p, w) and likewise for j:
- i, j >= 1: table[(ri - rj + h - 1) * (2w - 1) + (ci - cj + w - 1), n];
- i = 0, j >= 1: table[-3] (cls query -> patch keys); i >= 1, j = 0: table[-2]; i = j = 0:
  table[-1];
- with `pad_even` and t odd, one extra row (an extra query, dropped by the caller: zeros) and
  one extra column (an extra key: -2**40, so no query attends to it), as `pad_for_cudnn` pads.

One program writes `block_rows` whole rows of one head; the grid is (heads, row blocks), plus
one program a head for the rows left over, which it writes in power-of-two chunks (Triton's tiles
are powers of two in every dimension: 1602 = 200 blocks of 8 rows + 2 rows).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sarformer_jax.kernels.triton_backend import plgpu, require

PAD_KEY_BIAS = -(2.0 ** 40)  # the extra key's bias (as `layers.pad_for_cudnn`)
NUM_EXTRA = 3  # cls -> patch, patch -> cls, cls -> cls rows at the table's end


def padded_tokens(grid: tuple[int, int], pad_even: bool) -> int:
    t = 1 + grid[0] * grid[1]
    return t + (t % 2) if pad_even else t


def _pow2_chunks(n: int) -> list[tuple[int, int]]:
    """(start, size) of power-of-two chunks tiling [0, n) exactly, largest first."""
    out, start = [], 0
    for bit in reversed(range(n.bit_length())):
        if n & (1 << bit):
            out.append((start, 1 << bit))
            start += 1 << bit
    return out


def _row_plan(t_out: int, block_rows: int) -> tuple[int, list[tuple[int, int]]]:
    """(full blocks of `block_rows` rows, power-of-two row chunks (start, size) of the rest).
    Triton needs every tile dimension a power of two, so the rows left over after the full
    blocks (t_out % block_rows of them) go to one extra program in power-of-two chunks."""
    full = t_out // block_rows
    tail = [(full * block_rows + s, n) for s, n in _pow2_chunks(t_out - full * block_rows)]
    return full, tail


def _rows(table_ref, out_ref, head, r0, n_r: int, *, h: int, w: int, t: int, t_out: int,
          n_rows: int):
    """Rows [r0, r0 + n_r) of one head (n_r a power of two), in power-of-two column chunks that
    tile the row exactly: every store is unmasked and in bounds (the interpreter runs it as the
    GPU does)."""
    i = r0 + jnp.arange(n_r, dtype=jnp.int32)[:, None]
    pi = jnp.maximum(i - 1, 0)
    ri, ci = pi // w, pi % w
    for c0, size in _pow2_chunks(t_out):
        j = c0 + jnp.arange(size, dtype=jnp.int32)[None, :]
        pj = jnp.maximum(j - 1, 0)
        rj, cj = pj // w, pj % w
        idx = (ri - rj + (h - 1)) * (2 * w - 1) + (ci - cj + (w - 1))
        idx = jnp.where(i == 0, jnp.where(j == 0, n_rows - 1, n_rows - 3),
                        jnp.where(j == 0, n_rows - 2, idx))
        idx = jnp.clip(idx, 0, n_rows - 1)  # the padding row and column
        vals = table_ref[head * n_rows + idx]  # the table transposed and flat: [n * rows]
        vals = jnp.where(i >= t, 0.0, vals)
        vals = jnp.where(j >= t, PAD_KEY_BIAS, vals)
        out_ref[head, pl.ds(r0, n_r), pl.ds(c0, size)] = vals.astype(out_ref.dtype)


def _kernel(table_ref, out_ref, *, block_rows: int, full: int, tail, **shape):
    """Program (head, b): rows [b * block_rows, (b + 1) * block_rows) for b < full; the
    program b = full (present when t_out is not a multiple of block_rows) writes the tail rows."""
    head, b = pl.program_id(0), pl.program_id(1)

    @pl.when(b < full)
    def _():
        _rows(table_ref, out_ref, head, b * block_rows, block_rows, **shape)

    if tail:
        @pl.when(b == full)
        def _():
            for r0, n_r in tail:
                _rows(table_ref, out_ref, head, r0, n_r, **shape)


def position_bias(table: jax.Array, grid: tuple[int, int], dtype, *, pad_even: bool = True,
                  block_rows: int = 8, num_warps: int = 4, interpret: bool = False) -> jax.Array:
    """[n, T, T] bias in `dtype` from a [(2h-1)(2w-1)+3, n] table (T = 1 + h*w, plus one when
    `pad_even` and that is odd).  `block_rows`: rows a program, a power of two (the last
    program of a head writes the T % block_rows rows left).  No gradient:
    `models.beit.relative_position_bias` wraps it."""
    require("position_bias")
    h, w = (int(g) for g in grid)
    n_rows, n = table.shape
    if n_rows != (2 * h - 1) * (2 * w - 1) + NUM_EXTRA:
        raise ValueError(f"position_bias: table of {n_rows} rows for grid {(h, w)}, which "
                         f"needs {(2 * h - 1) * (2 * w - 1) + NUM_EXTRA}")
    t = 1 + h * w
    t_out = padded_tokens((h, w), pad_even)
    block_rows = int(block_rows)
    if block_rows < 1 or block_rows & (block_rows - 1):
        raise ValueError(f"position_bias: block_rows must be a power of two, got {block_rows}")
    full, tail = _row_plan(t_out, block_rows)
    flat = table.astype(jnp.float32).T.reshape(-1)  # [n * rows], head-major
    kernel = functools.partial(_kernel, block_rows=block_rows, full=full, tail=tuple(tail),
                               h=h, w=w, t=t, t_out=t_out, n_rows=n_rows)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((n, t_out, t_out), jnp.dtype(dtype)),
        grid=(n, full + (1 if tail else 0)),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="position_bias",
    )(flat)
