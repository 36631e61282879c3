"""The deep-supervision loss is one layer loss scanned over the stacked predictions: it must
equal the sum of per-layer `layer_loss` calls on the points `draw_points` gives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sarformer_jax.config import load_config
from sarformer_jax.losses import draw_points, gt_present, layer_loss, loss_fn


def test_scanned_deep_supervision_equals_unrolled_layers():
    cfg = load_config("tiny", ["model.loss.num_points=64"]).model.loss
    k, q, b, n = 5, 7, 2, 4
    rng = np.random.default_rng(0)
    preds = [{"cls": jnp.asarray(rng.normal(size=(b, q, k + 1)), jnp.float32),
              "mask": jnp.asarray(rng.normal(size=(b, q, 12, 10)), jnp.float32)} for _ in range(n)]
    gt = rng.integers(0, k, (b, 24, 20)).astype(np.int32)
    gt[1, :5] = 255
    gt = jnp.asarray(gt)
    key = jax.random.key(3)
    total, parts = jax.jit(lambda p, g: loss_fn(p, g, None, key=key, cfg_loss=cfg, num_classes=k))(preds, gt)
    pts = draw_points(key, b, min(q, k), n, cfg)
    present = gt_present(gt, k)
    expected = 0.0
    for i in range(n):
        terms, _ = layer_loss(preds[i]["cls"], preds[i]["mask"], gt, present, pts[i], cfg, k)
        prefix = "" if i == n - 1 else f"d{i}."
        for name, v in terms.items():
            np.testing.assert_allclose(parts[prefix + name], v, rtol=2e-6, err_msg=prefix + name)
            expected += float(v)
    np.testing.assert_allclose(float(total), expected, rtol=2e-6)
    assert len(parts) == 3 * n


def test_smallest_k_methods_agree_with_ties():
    """top_k and the stable sort pick the same indices in the same order, ties included (the
    train step switches between them by mesh size)."""
    from sarformer_jax.losses import smallest_k

    x = np.abs(np.random.default_rng(0).normal(size=(3, 4, 300))).astype(np.float32)
    x[..., 5] = x[..., 9]
    x[..., 17] = x[..., 2]
    x[0, 0, :50] = 0.0  # a long run of ties
    a = np.asarray(smallest_k(jnp.asarray(x), 100, "top_k"))
    b = np.asarray(smallest_k(jnp.asarray(x), 100, "sort"))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[0, 0, :50], np.arange(50))
    with pytest.raises(ValueError, match="point_select"):
        smallest_k(jnp.asarray(x), 3, "heap")
