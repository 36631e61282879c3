"""The k-smallest selection kernel (kernels/select_pallas.py) compiled for the GPU (marker gpu)
at the loss's shape (640 rows of 37632 candidates, k = 9408) and a ragged one, every position of
the partition checked (the output starts from -1) against numpy's stable partition; values from
bf16 logits give long runs of ties.  Run on the device:
`JAX_PLATFORMS=cuda python3 -m pytest -q -m gpu tests/test_select_gpu.py`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sarformer_jax.kernels.select_pallas import smallest_k_pallas
from test_select_pallas import _partition, _values

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("chunk,radix_bits,warps", [(512, 3, 4), (1024, 2, 4), (256, 4, 8),
                                                    (2048, 1, 4)])
@pytest.mark.parametrize("rows,n,k,ties", [(640, 37632, 9408, False), (37, 1001, 333, True)])
def test_kernel_on_gpu_matches_numpy(rows, n, k, ties, chunk, radix_bits, warps):
    rng = np.random.default_rng(n)
    x = np.abs(_values(rng, (rows, n)) * 3)
    if ties:  # |logits| rounded to bf16: a few hundred distinct values a row
        x = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
    xj = jnp.asarray(x)
    full = np.asarray(smallest_k_pallas(xj, k, chunk=chunk, radix_bits=radix_bits,
                                        num_warps=warps, poison=True))
    np.testing.assert_array_equal(full, _partition(x, k))
    got = np.asarray(smallest_k_pallas(xj, k, chunk=chunk, radix_bits=radix_bits, num_warps=warps))
    np.testing.assert_array_equal(got, np.sort(np.asarray(jax.lax.top_k(-xj, k)[1]), axis=-1))
