"""The flat optimiser's update with and without the barrier between the new moments and the
parameters (`SARFORMER_OPT_ONE_PASS`, train run 49) on the GPU (marker gpu), at a size where
XLA's GPU fusion decides how the two are written: the state must be the same bit for bit, and
the parameters the same to the last bit or two (a fused kernel may contract a multiply-add).
Run on the device: `JAX_PLATFORMS=cuda python3 -m pytest -q -m gpu tests/test_optim_gpu.py`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sarformer_jax.config import load_config
from sarformer_jax.optim import build_optimizer

pytestmark = pytest.mark.gpu


def _ulps(a: np.ndarray, b: np.ndarray) -> int:
    """The largest distance in float32 units in the last place between a and b (same signs)."""
    ia = a.astype(np.float32).view(np.int32).astype(np.int64)
    ib = b.astype(np.float32).view(np.int32).astype(np.int64)
    return int(np.abs(ia - ib).max())


def test_one_pass_equals_barrier_on_the_gpu(monkeypatch):
    cfg = load_config("ade20k_sarformer_b", ["train.lr=0.001", "train.num_steps=100",
                                             "train.layer_decay=0.9"]).train
    rng = np.random.default_rng(0)
    shapes = {"backbone": {"layers": {str(i): {"mlp": {"kernel": (768, 3072)}, "ln": {"scale": (768,)}}
                                      for i in range(3)}},
              "decode_head": {"cls_embed": {"kernel": (256, 151)}}}
    params = jax.tree_util.tree_map(lambda sh: jnp.asarray(rng.normal(size=sh), jnp.float32),
                                    shapes, is_leaf=lambda x: isinstance(x, tuple))
    tx, _ = build_optimizer(cfg, params, num_layers=3, flat=True)
    grads = [tx.groups.flatten(jax.tree_util.tree_map(
        lambda x: jnp.asarray(rng.normal(size=x.shape) * 1e-2, jnp.float32), params))
        for _ in range(4)]
    assert max(g.size for g in grads[0]) >= 2_000_000  # large enough for the GPU's own fusion

    def run(flag):
        monkeypatch.setenv("SARFORMER_OPT_ONE_PASS", flag)
        # a new function each run, so that no trace is shared: the flag is read when tracing
        step = jax.jit(lambda g, s, p, ok: tx.guarded_step_flat(g, s, p, ok),
                       donate_argnums=(1, 2))
        p, st = tx.groups.flatten(params), tx.init(params)
        for g in grads:
            p, st = step(g, st, p, jnp.bool_(True))
        return [np.asarray(x) for x in p], [np.asarray(x) for x in jax.tree_util.tree_leaves(st)]

    p1, st1 = run("1")
    p0, st0 = run("0")
    for a, b in zip(st1, st0):
        np.testing.assert_array_equal(a, b)
    worst = max(_ulps(a, b) for a, b in zip(p1, p0))
    assert worst <= 2, f"parameters differ by up to {worst} ulps between the two settings"
    assert any(np.any(a != np.asarray(b)) for a, b in zip(p1, tx.groups.flatten(params)))
