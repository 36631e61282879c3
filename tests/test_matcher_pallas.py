"""The Pallas matcher kernel (`kernels/hungarian_pallas.py`) in the Pallas interpreter against
`scipy.optimize.linear_sum_assignment`, and its lowering to Triton (checked on the CPU by
exporting for CUDA).  The compiled kernel on the GPU: tests/test_matcher_gpu.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from scipy.optimize import linear_sum_assignment
from test_matcher import _scipy_assign

from sarformer_jax.kernels.hungarian_pallas import lsap_rows_pallas, padded_size
from sarformer_jax.matcher import hungarian_assign, hungarian_match


def _mixed_batch(rng, b, q, g):
    """b problems [q, g]: random and tie-heavy integer costs, 0 .. g valid columns (more and
    fewer than the q rows, so both orientations of the solver run), some invalid rows."""
    cost = np.where(np.arange(b)[:, None, None] % 2 == 0,
                    rng.normal(size=(b, q, g)), rng.integers(0, 3, size=(b, q, g))).astype(np.float32)
    counts = np.linspace(0, g, b).astype(int)
    col_valid = np.zeros((b, g), bool)
    for i, n in enumerate(counts):
        col_valid[i, rng.choice(g, size=n, replace=False)] = True
    row_valid = np.ones((b, q), bool)
    row_valid[1::3, q // 2:] = False
    return cost, row_valid, col_valid


def test_interpreted_kernel_equals_scipy_on_a_mixed_batch(rng):
    cost, row_valid, col_valid = _mixed_batch(rng, 12, 12, 30)
    solve = jax.jit(jax.vmap(lambda c, r, k: hungarian_assign(c, r, k, implementation="pallas_interpret")))
    col4row, row4col = (np.asarray(x) for x in solve(cost, row_valid, col_valid))
    for b in range(cost.shape[0]):
        ref_c, ref_r = _scipy_assign(cost[b], row_valid[b], col_valid[b])
        np.testing.assert_array_equal(col4row[b], ref_c, err_msg=f"problem {b}")
        np.testing.assert_array_equal(row4col[b], ref_r, err_msg=f"problem {b}")


@pytest.mark.parametrize("shape", [(1, 1), (7, 12), (12, 7), (17, 17)])
def test_interpreted_dense_match_equals_scipy(shape, rng):
    batch = np.stack([rng.normal(size=shape), rng.integers(0, 3, size=shape), np.zeros(shape)]).astype(np.float32)
    rows, cols = jax.jit(jax.vmap(lambda c: hungarian_match(c, implementation="pallas_interpret")))(batch)
    for b in range(batch.shape[0]):
        r_ref, c_ref = linear_sum_assignment(batch[b])
        np.testing.assert_array_equal(np.asarray(rows[b]), r_ref)
        np.testing.assert_array_equal(np.asarray(cols[b]), c_ref)


def test_interpreted_kernel_nan_and_invalid_columns(rng):
    cost = rng.normal(size=(8, 8)).astype(np.float32)
    cost[2, 3] = np.nan
    cost[:, 5] = -100.0  # attractive but invalid
    col_valid = np.ones(8, bool)
    col_valid[5] = False
    col4row, row4col = hungarian_assign(jnp.asarray(cost), None, jnp.asarray(col_valid),
                                        implementation="pallas_interpret")
    ref = cost.copy()
    ref[2, 3] = 1e30
    ref_c, ref_r = _scipy_assign(ref, np.ones(8, bool), col_valid)
    np.testing.assert_array_equal(np.asarray(col4row), ref_c)
    np.testing.assert_array_equal(np.asarray(row4col), ref_r)


def test_kernel_lowers_to_one_triton_call_per_batch():
    """Every primitive the kernel uses has a Triton lowering rule: export the loss's vmapped
    problem (20 x [100, 150]) for CUDA on this CPU host and find one Triton custom call with a
    grid of 20 programs."""
    solve = jax.jit(jax.vmap(lambda c, k: hungarian_assign(c, None, k, implementation="pallas")))
    args = (jax.ShapeDtypeStruct((20, 100, 150), jnp.float32), jax.ShapeDtypeStruct((20, 150), bool))
    exported = export.export(solve, platforms=["cuda"], disabled_checks=[
        export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
    text = exported.mlir_module()
    assert text.count("@__gpu$xla.gpu.triton") == 1
    assert "grid_x = 20" in text and 'name = "hungarian"' in text
    assert "stablehlo.while" not in text  # the loops are inside the kernel


def test_validation():
    with pytest.raises(ValueError, match="unknown implementation 'cuda'"):
        hungarian_assign(jnp.zeros((3, 4)), implementation="cuda")
    with pytest.raises(ValueError, match=r"cost \(3, 4\)"):
        lsap_rows_pallas(jnp.zeros((3, 4)), jnp.ones(3, bool), jnp.ones(3, bool))
    assert [padded_size(n) for n in (1, 16, 17, 150, 256)] == [16, 16, 32, 256, 256]
