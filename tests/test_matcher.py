"""On-device Hungarian matching vs `scipy.optimize.linear_sum_assignment`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from sarformer_jax.matcher import hungarian_assign, hungarian_match

match_jit = jax.jit(hungarian_match)
assign_jit = jax.jit(hungarian_assign)


def _check_same(cost: np.ndarray):
    r_ref, c_ref = linear_sum_assignment(cost)
    r, c = (np.asarray(x) for x in match_jit(jnp.asarray(cost)))
    np.testing.assert_array_equal(r, r_ref)
    np.testing.assert_array_equal(c, c_ref)


@pytest.mark.parametrize("shape", [(1, 1), (20, 20), (12, 7), (7, 12), (30, 150)])
def test_random_costs_equal_scipy(shape, rng):
    for _ in range(3):
        _check_same(rng.normal(size=shape).astype(np.float32))


@pytest.mark.parametrize("shape", [(6, 6), (10, 4), (4, 10)])
def test_ties_equal_scipy(shape, rng):
    # small integer costs: many ties, exact in float32 as in scipy's float64
    for _ in range(20):
        _check_same(rng.integers(0, 3, size=shape).astype(np.float32))
    _check_same(np.zeros(shape, np.float32))


def test_batched_vmap(rng):
    cost = rng.normal(size=(6, 9, 5)).astype(np.float32)
    rows, cols = jax.jit(jax.vmap(hungarian_match))(jnp.asarray(cost))
    for b in range(cost.shape[0]):
        r_ref, c_ref = linear_sum_assignment(cost[b])
        np.testing.assert_array_equal(np.asarray(rows[b]), r_ref)
        np.testing.assert_array_equal(np.asarray(cols[b]), c_ref)


def _scipy_assign(cost, row_valid, col_valid):
    rv, cv = np.nonzero(row_valid)[0], np.nonzero(col_valid)[0]
    col4row = -np.ones(cost.shape[0], int)
    row4col = -np.ones(cost.shape[1], int)
    if len(rv) and len(cv):
        r, c = linear_sum_assignment(cost[np.ix_(rv, cv)])
        col4row[rv[r]] = cv[c]
        row4col[cv[c]] = rv[r]
    return col4row, row4col


@pytest.mark.parametrize("n_gt", [0, 1, 5, 12, 30])
def test_valid_masks_like_the_loss(n_gt, rng):
    """Q=12 queries (rows) x G_max=30 class slots (columns), n_gt valid slots at random places;
    zero ground truth and more ground truth than queries included."""
    q, g = 12, 30
    cost = rng.normal(size=(4, q, g)).astype(np.float32)
    col_valid = np.zeros((4, g), bool)
    for b in range(4):
        col_valid[b, rng.choice(g, size=n_gt, replace=False)] = True
    row_valid = np.ones((4, q), bool)
    col4row, row4col = jax.jit(jax.vmap(hungarian_assign))(jnp.asarray(cost), jnp.asarray(row_valid),
                                                           jnp.asarray(col_valid))
    for b in range(4):
        ref_c, ref_r = _scipy_assign(cost[b], row_valid[b], col_valid[b])
        np.testing.assert_array_equal(np.asarray(col4row[b]), ref_c)
        np.testing.assert_array_equal(np.asarray(row4col[b]), ref_r)
        assert (np.asarray(col4row[b]) >= 0).sum() == min(q, n_gt)


def test_invalid_entries_never_matched_and_nan_safe(rng):
    cost = rng.normal(size=(8, 8)).astype(np.float32)
    cost[2, 3] = np.nan
    cost[:, 5] = -100.0  # attractive but invalid column
    col_valid = np.ones(8, bool)
    col_valid[5] = False
    col4row, row4col = assign_jit(jnp.asarray(cost), None, jnp.asarray(col_valid))
    col4row = np.asarray(col4row)
    assert 5 not in col4row and np.asarray(row4col)[5] == -1
    assert col4row[2] != 3
    ref = cost.copy()
    ref[2, 3] = 1e30
    ref_c, _ = _scipy_assign(ref, np.ones(8, bool), col_valid)
    np.testing.assert_array_equal(col4row, ref_c)


def test_optimal_cost_on_ties_random_large(rng):
    # larger tie-heavy problems: assignment equal to scipy's
    for shape in [(40, 40), (25, 60)]:
        _check_same(rng.integers(0, 5, size=shape).astype(np.float32))


def test_vmap_with_different_sizes_per_problem(rng):
    """A batch mixing 0, few and many valid columns (the loop body also runs for finished
    problems under vmap)."""
    q, g = 10, 16
    counts = [0, 3, 16, 10, 1, 12]
    cost = rng.normal(size=(len(counts), q, g)).astype(np.float32)
    col_valid = np.zeros((len(counts), g), bool)
    for b, n in enumerate(counts):
        col_valid[b, rng.choice(g, size=n, replace=False)] = True
    row_valid = np.ones((len(counts), q), bool)
    row_valid[3, 7:] = False
    col4row, row4col = jax.jit(jax.vmap(hungarian_assign))(jnp.asarray(cost), jnp.asarray(row_valid),
                                                           jnp.asarray(col_valid))
    for b in range(len(counts)):
        ref_c, ref_r = _scipy_assign(cost[b], row_valid[b], col_valid[b])
        np.testing.assert_array_equal(np.asarray(col4row[b]), ref_c)
        np.testing.assert_array_equal(np.asarray(row4col[b]), ref_r)
