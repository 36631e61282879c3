"""The GPU's bf16x6 float32 products (`layers.f32_dot_precision("bf16x6")`) against float64
numpy at the SARFormer-B step's shapes (marker gpu): the matching costs' product, the auxiliary
logits' upscale and its gradient.
Run on the device: `JAX_PLATFORMS=cuda python3 -m pytest -q -m gpu tests/test_f32_dot_gpu.py`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sarformer_jax.models.layers import bilinear_matrix, f32_dot_precision, resize_axis_by_matrix

pytestmark = pytest.mark.gpu


def _rel(got, want):
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


def test_matching_product_is_float32_accurate():
    rng = np.random.default_rng(0)
    lhs = rng.normal(size=(20, 12544, 200)).astype(np.float32) * 3.0  # [-l; sigmoid(l)], points first
    tgt = rng.random((20, 12544, 150)).astype(np.float32)
    fn = jax.jit(lambda a, b: jax.lax.dot_general(a, b, (((1,), (1,)), ((0,), (0,))),
                                                  precision=f32_dot_precision("bf16x6")))
    got = fn(lhs, tgt)
    want = np.einsum("bpq,bpk->bqk", lhs.astype(np.float64), tgt.astype(np.float64))
    assert _rel(got, want) <= 1e-6


def test_upscale_and_its_gradient_are_float32_accurate(monkeypatch):
    monkeypatch.setenv("SARFORMER_F32_DOT", "bf16x6")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 40, 40, 150)).astype(np.float32) * 4.0
    g = rng.normal(size=(2, 640, 40, 150)).astype(np.float32)
    m = bilinear_matrix(40, 640).astype(np.float64)
    out, vjp = jax.vjp(lambda x: resize_axis_by_matrix(x, 1, 640), jnp.asarray(x))
    assert _rel(out, np.einsum("oi,bihk->bohk", m, x.astype(np.float64))) <= 1e-6
    (dx,) = vjp(jnp.asarray(g))
    assert _rel(dx, np.einsum("oi,bohk->bihk", m, g.astype(np.float64))) <= 1e-6
