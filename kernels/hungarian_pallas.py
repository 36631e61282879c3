"""Pallas (Triton backend) kernel for the exact linear sum assignment of `sarformer_jax.matcher`.

The XLA solver (`matcher._lsap_rows`) runs three nested `lax.while_loop`s: one per row added,
one per column scanned in the shortest-path search, one per column of the path flipped.  On a GPU
every iteration is at least one kernel launch plus a loop condition (a conditional CUDA-graph
node inside command buffers, a host round trip without them): a SARFormer-B train step spent
3.5 ms per step in the gaps between them (train run 13) for ~0.1 ms of arithmetic.  Here one
program instance solves one problem with all three loops inside the kernel: nothing leaves the
chip but the rows of the cost matrix it reads.

Same algorithm, same float32 operations in the same order, so the same assignment as the XLA
solver and as scipy, ties included:
- vectors of length N (a power of two >= n, padding never valid) live in registers; a value at
  a dynamic index is read as a masked max / sum and written as a `where` over an iota;
- scipy's `remaining` list (position -> column) becomes its inverse, each column's position
  (BIG once scanned): the first tied position is an argmin over positions, the last free one an
  argmax, and removing position p moves the column at the last position into p, as scipy does;
- the dual update of the scanned rows needs `spc[col4row[r]]`, a gather; it is the `lowest`
  value at the moment row r's column was scanned (`spc` of a scanned column never changes), so
  the search records it per row as it goes.

Inputs are the square problem of `_lsap_rows` (#valid rows <= #valid columns), padded to N in
`lsap_rows_pallas`.  Under `vmap` (the loss solves L x B problems at once) the batching rule of
`pallas_call` adds grid axes: one program per problem, each with its own trip counts.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sarformer_jax.kernels.triton_backend import plgpu, require

_BIG_POS = 1 << 30  # the position of a scanned (removed) or invalid column


def _i(k: int) -> jax.Array:
    return jnp.int32(k)


def _kernel(cost_ref, rows_ref, rv_ref, pos_ref, col4row_ref, row4col_ref, *, size: int):
    ar = jax.lax.broadcasted_iota(jnp.int32, (size,), 0)
    inf = jnp.float32(jnp.inf)
    rows = rows_ref[...]
    pos0 = pos_ref[...]
    col_valid = pos0 < _BIG_POS
    n_rows = jnp.sum(rv_ref[...])
    n_cols = jnp.sum(col_valid.astype(jnp.int32))

    def get_i(vec, idx):  # vec[idx] of an int32 vector
        return jnp.sum(jnp.where(ar == idx, vec, 0))

    def get_f(vec, idx):  # vec[idx] of a float32 vector (exact, sign of zero kept)
        return jnp.max(jnp.where(ar == idx, vec, -inf))

    def augment_row(k, u, v, col4row, row4col):
        cur = get_i(rows, k)

        def search_cond(s):
            return s[2] < 0

        def search_body(s):
            i, min_val, sink, spc, path, sr, sc, pos, num_rem, dval = s
            sr = jnp.where(ar == i, 1, sr)
            crow = cost_ref[pl.ds(i, 1), :][0]
            r = min_val + crow - get_f(u, i) - v
            upd = (sc == 0) & col_valid & (r < spc)
            path = jnp.where(upd, i, path)
            spc = jnp.where(upd, r, spc)
            in_rem = pos < num_rem
            vals = jnp.where(in_rem, spc, inf)
            lowest = jnp.min(vals)
            ties = in_rem & (vals == lowest)
            free = ties & (row4col == -1)
            any_free = jnp.max(free.astype(jnp.int32)) > 0
            # scipy keeps the first position reaching the minimum, unless a later tied column is
            # unassigned (then the last such one)
            j_free = jnp.argmax(jnp.where(free, pos, -1)).astype(jnp.int32)
            j_tie = jnp.argmin(jnp.where(ties, pos, _BIG_POS)).astype(jnp.int32)
            j = jnp.where(any_free, j_free, j_tie)
            row_j = get_i(row4col, j)
            sink = jnp.where((row_j == -1) | (lowest == inf), j, -1)
            nr = num_rem - 1
            pos_j = get_i(pos, j)
            last = jnp.argmax((pos == nr).astype(jnp.int32)).astype(jnp.int32)
            pos = jnp.where(ar == last, pos_j, pos)
            pos = jnp.where(ar == j, _BIG_POS, pos)
            sc = jnp.where(ar == j, 1, sc)
            going_on = sink < 0
            dval = jnp.where((ar == row_j) & going_on, lowest, dval)
            i = jnp.where(going_on, row_j, i)
            return i, lowest, sink, spc, path, sr, sc, pos, nr, dval

        zeros_i = jnp.zeros((size,), jnp.int32)
        s0 = (cur, jnp.float32(0), _i(-1), jnp.full((size,), inf), jnp.full((size,), -1, jnp.int32),
              zeros_i, zeros_i, pos0, n_cols, jnp.zeros((size,), jnp.float32))
        s = jax.lax.while_loop(search_cond, search_body, s0)
        _, min_val, sink, spc, path, sr, sc, _, _, dval = s
        # dual update, as `_lsap_rows`: u[cur] += min_val; u[r] += min_val - spc[col4row[r]]
        # for the other scanned rows; v[c] -= min_val - spc[c] for the scanned columns
        u_new = jnp.where(ar == cur, u + min_val, u)
        other = (sr == 1) & (ar != cur)
        u = u_new + jnp.where(other, min_val - dval, 0)
        v = v - jnp.where(sc == 1, min_val - spc, 0)

        def flip_cond(t):
            return t[3] == 0

        def flip_body(t):
            j, col4row, row4col, _ = t
            i = get_i(path, j)
            row4col = jnp.where(ar == j, i, row4col)
            nxt = get_i(col4row, i)
            col4row = jnp.where(ar == i, j, col4row)
            return nxt, col4row, row4col, ((i == cur) | (i < 0)).astype(jnp.int32)

        _, col4row, row4col, _ = jax.lax.while_loop(flip_cond, flip_body, (sink, col4row, row4col, _i(0)))
        return u, v, col4row, row4col

    def outer_cond(t):
        return t[0] < n_rows

    def outer_body(t):
        k, u, v, col4row, row4col = t
        return (k + 1, *augment_row(k, u, v, col4row, row4col))

    minus = jnp.full((size,), -1, jnp.int32)
    zeros_f = jnp.zeros((size,), jnp.float32)
    _, _, _, col4row, row4col = jax.lax.while_loop(outer_cond, outer_body, (_i(0), zeros_f, zeros_f, minus, minus))
    col4row_ref[...] = col4row
    row4col_ref[...] = row4col


def padded_size(n: int) -> int:
    """The kernel's vector length: the next power of two >= n (at least 16)."""
    return max(16, 1 << (max(n, 1) - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("interpret", "num_warps"))
def lsap_rows_pallas(cost: jax.Array, row_valid: jax.Array, col_valid: jax.Array, *,
                     interpret: bool = False, num_warps: int = 1) -> tuple[jax.Array, jax.Array]:
    """`matcher._lsap_rows` as one Pallas program: a square float32 [n, n] problem with
    #valid rows <= #valid columns (invalid entries may hold anything).  Returns (col4row,
    row4col) int32 [n], -1 where unassigned."""
    require("hungarian (lsap_rows_pallas)")
    n = cost.shape[0]
    if cost.ndim != 2 or cost.shape != (n, n) or row_valid.shape != (n,) or col_valid.shape != (n,):
        raise ValueError(f"lsap_rows_pallas: cost {cost.shape}, row_valid {row_valid.shape}, "
                         f"col_valid {col_valid.shape} are not [n, n], [n], [n]")
    size = padded_size(n)
    rv = jnp.pad(row_valid.astype(bool), (0, size - n))
    cv = jnp.pad(col_valid.astype(bool), (0, size - n))
    c = jnp.pad(cost.astype(jnp.float32), ((0, size - n), (0, size - n)), constant_values=jnp.inf)
    rows = jnp.nonzero(rv, size=size, fill_value=0)[0].astype(jnp.int32)
    # scipy scans `remaining`, filled with the columns in reverse order: the position of each
    # valid column, counted from the last one (invalid columns never take part)
    ar_s = jnp.arange(size)
    remaining = jnp.argsort(jnp.where(cv, -ar_s, size + ar_s))
    pos = jnp.zeros((size,), jnp.int32).at[remaining].set(ar_s.astype(jnp.int32))
    pos = jnp.where(cv, pos, _BIG_POS)
    vec = pl.BlockSpec((size,), lambda: (0,))
    col4row, row4col = pl.pallas_call(
        functools.partial(_kernel, size=size),
        out_shape=(jax.ShapeDtypeStruct((size,), jnp.int32),) * 2,
        in_specs=[pl.BlockSpec((size, size), lambda: (0, 0)), vec, vec, vec],
        out_specs=(vec, vec),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="hungarian",
    )(c, rows, rv.astype(jnp.int32), pos)
    return col4row[:n], row4col[:n]
