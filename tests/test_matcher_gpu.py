"""The compiled Pallas matcher kernel on the GPU against scipy (marker gpu).

The loss's problems: L x B = 20 cost matrices [100 queries, 150 class slots] with 8-25 classes
present, random (no ties) and small integers (many ties).
Run on the device machine: `JAX_PLATFORMS=cuda python3 -m pytest -q -m gpu tests/test_matcher_gpu.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_matcher import _scipy_assign

from sarformer_jax.matcher import hungarian_assign

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("ties", [False, True])
def test_compiled_kernel_equals_scipy_on_the_loss_problems(ties):
    if jax.default_backend() != "gpu":
        pytest.skip("needs a CUDA GPU")
    rng = np.random.default_rng(7 + ties)
    n, q, g = 20, 100, 150
    cost = (rng.integers(0, 4, size=(n, q, g)) if ties else rng.normal(size=(n, q, g))).astype(np.float32)
    present = np.zeros((n, g), bool)
    for b in range(n):
        present[b, rng.choice(g, int(rng.integers(8, 26)), replace=False)] = True
    present[0] = False  # an image with no class
    present[1, :120] = True  # more classes than queries: the solver transposes
    solve = jax.jit(jax.vmap(lambda c, k: hungarian_assign(c, None, k, implementation="pallas")))
    col4row, row4col = jax.device_get(solve(jnp.asarray(cost), jnp.asarray(present)))
    for b in range(n):
        ref_c, ref_r = _scipy_assign(cost[b], np.ones(q, bool), present[b])
        np.testing.assert_array_equal(col4row[b], ref_c, err_msg=f"problem {b}")
        np.testing.assert_array_equal(row4col[b], ref_r, err_msg=f"problem {b}")
