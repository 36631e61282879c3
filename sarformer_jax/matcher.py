"""Exact linear sum assignment (Hungarian matching) that runs inside `jit` on the device.

The algorithm is the shortest-augmenting-path method (Jonker-Volgenant family, Crouse 2016) that
`scipy.optimize.linear_sum_assignment` implements: rows are added one at a time; each addition
runs a Dijkstra-like search over reduced costs `c[i, j] - u[i] - v[j]` for the cheapest path to
an unassigned column, updates the dual variables and flips the path.  Column choice follows
scipy's order (columns scanned in its `remaining` order, ties broken towards an unassigned
column), so results equal scipy's, ties included, as long as the arithmetic is exact (scipy
uses float64; we use the input dtype, float32 by default).

Fixed shapes: a cost matrix [R, C] with optional row / column validity masks is padded to a
square n = max(R, C); the side with fewer valid entries plays the role of rows (scipy's
transposition of tall matrices), and invalid rows and columns never take part.  Loops are
`lax.while_loop`s whose trip counts depend on the valid counts, so `vmap` over a batch costs
the largest problem in the batch, not n.

On a GPU the same algorithm runs by default as one Pallas program per problem, with the loops
inside the kernel (`kernels/hungarian_pallas.py`): the while loops here cost a loop condition
and a kernel launch per iteration there.

Non-finite valid entries (NaN, +inf) are treated as a very large finite cost (1e30), -inf as
-1e30: such pairs are matched only when nothing else is possible (scipy raises instead).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sarformer_jax.kernels.triton_backend import gpu_kernels

_BIG = 1e30


def _lsap_rows(cost: jax.Array, row_valid: jax.Array, col_valid: jax.Array):
    """Square [n, n] problem with #valid rows <= #valid cols.  Returns (col4row, row4col),
    -1 where unassigned."""
    n = cost.shape[0]
    ar = jnp.arange(n)
    inf = jnp.asarray(jnp.inf, cost.dtype)
    rows = jnp.nonzero(row_valid, size=n, fill_value=0)[0]
    n_rows = jnp.sum(row_valid.astype(jnp.int32))
    n_cols = jnp.sum(col_valid.astype(jnp.int32))
    # scipy fills `remaining` with the columns in reverse order; invalid columns go last and are
    # never reached because only the first n_cols entries are scanned.
    remaining0 = jnp.argsort(jnp.where(col_valid, -ar, n + ar)).astype(jnp.int32)

    def augment_row(k, state):
        u, v, col4row, row4col = state
        cur = rows[k]
        # under vmap the body also runs for problems that are already solved: make it a no-op
        active = k < n_rows

        def search_cond(s):
            return s["sink"] < 0

        def search_body(s):
            i = s["i"]
            sr = s["sr"].at[i].set(True)
            r = s["min_val"] + cost[i] - u[i] - v
            open_col = ~s["sc"] & col_valid
            upd = open_col & (r < s["spc"])
            path = jnp.where(upd, i, s["path"])
            spc = jnp.where(upd, r, s["spc"])
            rem = s["remaining"]
            pos_ok = ar < s["num_rem"]
            vals = jnp.where(pos_ok, spc[rem], inf)
            lowest = jnp.min(vals)
            ties = pos_ok & (vals == lowest)
            free = ties & (row4col[rem] == -1)
            # scipy's scan keeps the first position reaching the minimum, unless a later tied
            # column is unassigned (then the last such one)
            first_tie = jnp.argmax(ties)
            last_free = n - 1 - jnp.argmax(free[::-1])
            idx = jnp.where(jnp.any(free), last_free, first_tie)
            j = rem[idx]
            sink = jnp.where((row4col[j] == -1) | (lowest == inf), j, -1)
            nr = s["num_rem"] - 1
            rem = rem.at[idx].set(rem[nr])
            return dict(i=jnp.where(sink < 0, row4col[j], i), min_val=lowest, sink=sink, spc=spc,
                        path=path, sr=sr, sc=s["sc"].at[j].set(True), remaining=rem, num_rem=nr)

        s0 = dict(i=cur, min_val=jnp.zeros((), cost.dtype), sink=jnp.where(active, -1, 0).astype(jnp.int32),
                  spc=jnp.full((n,), inf), path=jnp.full((n,), -1, jnp.int32),
                  sr=jnp.zeros((n,), bool), sc=jnp.zeros((n,), bool), remaining=remaining0,
                  num_rem=n_cols)
        s = jax.lax.while_loop(search_cond, search_body, s0)
        min_val, spc, sr, sc = s["min_val"], s["spc"], s["sr"], s["sc"]
        # dual update
        u_new = u.at[cur].add(min_val)
        other = sr & (ar != cur)
        u = jnp.where(active, u_new + jnp.where(other, min_val - spc[jnp.maximum(col4row, 0)], 0), u)
        v = jnp.where(active, v - jnp.where(sc, min_val - spc, 0), v)

        # flip the alternating path from the sink back to `cur`
        def flip_cond(t):
            return ~t[3]

        def flip_body(t):
            j, col4row, row4col, _ = t
            i = s["path"][j]
            ok = i >= 0  # false only for an infeasible problem (no finite path)
            row4col = jnp.where(ok, row4col.at[j].set(i), row4col)
            nxt = col4row[jnp.maximum(i, 0)]
            col4row = jnp.where(ok, col4row.at[jnp.maximum(i, 0)].set(j), col4row)
            return nxt, col4row, row4col, (i == cur) | (i < 0)

        _, col4row, row4col, _ = jax.lax.while_loop(
            flip_cond, flip_body, (s["sink"], col4row, row4col, ~active))
        return u, v, col4row, row4col

    def outer_cond(t):
        return t[0] < n_rows

    def outer_body(t):
        k, state = t
        return k + 1, augment_row(k, state)

    init = (jnp.zeros((n,), cost.dtype), jnp.zeros((n,), cost.dtype),
            jnp.full((n,), -1, jnp.int32), jnp.full((n,), -1, jnp.int32))
    _, (_, _, col4row, row4col) = jax.lax.while_loop(outer_cond, outer_body, (jnp.asarray(0), init))
    return col4row, row4col


IMPLEMENTATIONS = ("xla", "pallas", "pallas_interpret")


def default_implementation() -> str:
    """"pallas" when the default backend is a GPU (and this jax has Pallas' Triton backend),
    "xla" elsewhere."""
    return "pallas" if gpu_kernels() else "xla"


def _solve_rows(cost, row_valid, col_valid, implementation):
    if implementation == "xla" or cost.dtype != jnp.float32:
        # the kernel computes in float32 only; other dtypes keep their own arithmetic in XLA
        return _lsap_rows(cost, row_valid, col_valid)
    from sarformer_jax.kernels.hungarian_pallas import lsap_rows_pallas

    return lsap_rows_pallas(cost, row_valid, col_valid, interpret=implementation == "pallas_interpret")


def hungarian_assign(cost: jax.Array, row_valid: jax.Array | None = None,
                     col_valid: jax.Array | None = None, *,
                     implementation: str | None = None) -> tuple[jax.Array, jax.Array]:
    """Minimum-cost assignment of one [R, C] cost matrix restricted to valid rows / columns.

    Returns (col4row [R], row4col [C]) int32: the partner of each row / column, -1 when
    unmatched (invalid, or on the larger side).  min(#valid rows, #valid cols) pairs are
    formed.  Jittable, vmappable, differentiable inputs are not needed (use stop_gradient).

    `implementation`: "xla" (nested `lax.while_loop`s, the CPU default), "pallas" (one Triton
    program per problem with the loops inside, `kernels/hungarian_pallas.py`, the GPU default;
    float32 costs, others fall back to "xla") or "pallas_interpret" (the kernel in the Pallas
    interpreter, for CPU tests).  All three give the same assignment."""
    implementation = implementation or default_implementation()
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"hungarian_assign: unknown implementation {implementation!r}; choose one of {IMPLEMENTATIONS}")
    if cost.ndim != 2:
        raise ValueError(f"hungarian_assign: cost must be [R, C], got shape {tuple(cost.shape)}")
    nr, nc = cost.shape
    cost = jnp.asarray(cost)
    if not jnp.issubdtype(cost.dtype, jnp.floating):
        cost = cost.astype(jnp.float32)
    rv = jnp.ones((nr,), bool) if row_valid is None else jnp.asarray(row_valid, bool)
    cv = jnp.ones((nc,), bool) if col_valid is None else jnp.asarray(col_valid, bool)
    n = max(nr, nc)
    c = jnp.nan_to_num(cost, nan=_BIG, posinf=_BIG, neginf=-_BIG)
    c = jnp.pad(c, ((0, n - nr), (0, n - nc)), constant_values=jnp.inf)
    rv = jnp.pad(rv, (0, n - nr))
    cv = jnp.pad(cv, (0, n - nc))
    c = jnp.where(rv[:, None] & cv[None, :], c, jnp.inf)
    # scipy transposes tall problems so that rows are the smaller side
    transpose = jnp.sum(rv.astype(jnp.int32)) > jnp.sum(cv.astype(jnp.int32))
    ct = jnp.where(transpose, c.T, c)
    a, b = _solve_rows(jax.lax.stop_gradient(ct), jnp.where(transpose, cv, rv), jnp.where(transpose, rv, cv),
                       implementation)
    col4row = jnp.where(transpose, b, a)[:nr]
    row4col = jnp.where(transpose, a, b)[:nc]
    return col4row, row4col


def hungarian_match(cost: jax.Array, *, implementation: str | None = None) -> tuple[jax.Array, jax.Array]:
    """`scipy.optimize.linear_sum_assignment(cost)` for a dense [R, C] matrix, on the device.

    Returns (row_ind, col_ind), each of static length min(R, C), row_ind ascending.  For a batch
    use `jax.vmap(hungarian_match)`.  `implementation` as in `hungarian_assign`."""
    nr, nc = cost.shape
    col4row, _ = hungarian_assign(cost, implementation=implementation)
    if nr <= nc:
        return jnp.arange(nr, dtype=jnp.int32), col4row
    row_ind = jnp.nonzero(col4row >= 0, size=nc, fill_value=0)[0].astype(jnp.int32)
    return row_ind, col4row[row_ind]
