"""`layers.f32_dot_precision`: the float32 products that must keep float32 accuracy (matching
costs, mask pooling, float32 resizes) take the precision it picks, by environment and backend.
The accuracy of the GPU's bf16x6 products is checked on the device (tests/test_f32_dot_gpu.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sarformer_jax.configs import common
from sarformer_jax.losses import match_costs
from sarformer_jax.models.layers import f32_dot_precision, resize_axis_by_matrix
from sarformer_jax.models.mask2former import mask_average_pool


def test_method_by_environment_and_backend(monkeypatch):
    monkeypatch.delenv("SARFORMER_F32_DOT", raising=False)
    assert jax.default_backend() == "cpu"
    assert f32_dot_precision() == jax.lax.Precision.HIGHEST  # "auto" off the GPU
    assert f32_dot_precision("bf16x6") == jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X6
    monkeypatch.setenv("SARFORMER_F32_DOT", "bf16x3")
    assert f32_dot_precision() == jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X3
    assert f32_dot_precision("highest") == jax.lax.Precision.HIGHEST
    monkeypatch.setenv("SARFORMER_F32_DOT", "tf32")
    with pytest.raises(ValueError, match="'tf32' is not one of"):
        f32_dot_precision()


def _programs():
    rng = np.random.default_rng(0)
    cls = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
    logits = jnp.asarray(rng.normal(size=(40, 6)), jnp.float32)
    targets = jnp.asarray(rng.random((40, 4)), jnp.float32)
    props = jnp.asarray(rng.random((1, 6, 16, 16)), jnp.float32)
    feats = jnp.asarray(rng.normal(size=(1, 8, 8, 3)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(2, 5, 3)), jnp.float32)
    return [
        (jax.jit(lambda c, l, t: match_costs(c, l, t, common.loss(), points_first=True)),
         (cls, logits, targets)),
        (jax.jit(lambda p, f: mask_average_pool(p, f)), (props, feats)),  # a new function: jit caches by it
        (jax.jit(lambda x: resize_axis_by_matrix(x, 1, 15)), (x,)),
        (jax.jit(jax.grad(lambda x: jnp.sum(resize_axis_by_matrix(x, 1, 15) ** 2))), (x,)),
    ]


@pytest.mark.parametrize("i", range(4))
def test_products_take_the_chosen_algorithm(monkeypatch, i):
    """With SARFORMER_F32_DOT=bf16x6 the program's products carry the bf16x6 algorithm (the
    backward's too); by default on the CPU they are HIGHEST products, and the values agree."""
    monkeypatch.setenv("SARFORMER_F32_DOT", "bf16x6")
    fn, args = _programs()[i]
    text = fn.lower(*args).as_text()
    assert "lhs_precision_type = bf16" in text and "num_primitive_operations = 6" in text, text[:2000]
    got = fn(*args)
    monkeypatch.delenv("SARFORMER_F32_DOT")
    fn, args = _programs()[i]
    text = fn.lower(*args).as_text()
    assert "num_primitive_operations" not in text and "HIGHEST" in text
    np.testing.assert_allclose(np.asarray(got), np.asarray(fn(*args)), rtol=1e-6, atol=1e-6)
