"""Gradient accumulation (its own file so pytest-xdist's per-file scheduling puts it on
another worker than tests/test_train.py)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from micro import micro_config

from sarformer_jax.train import create_trainer, device_batch


def _first_batch(cfg):
    from sarformer_jax.data.pipeline import build_train_loader

    return next(build_train_loader(cfg, seed=0))


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(tree))]


def test_gradient_accumulation_averages_micro_batch_gradients(data_root):
    """grad_accum=2: the update is the optimiser applied to the mean of the two micro-batches'
    gradients (micro-batch i = rows i, i+2, ...), with BatchNorm statistics carried through."""
    import jax.numpy as jnp

    from sarformer_jax.train import make_grad_fn, split_micro_batches

    cfg = micro_config(root=data_root, **{"train.grad_accum": 2, "train.eps": 1.0})
    batch = _first_batch(cfg)
    devices = jax.devices()[:1]
    trainer, state = create_trainer(cfg, devices=devices)
    gb = device_batch(batch, trainer.mesh)
    new_state, metrics = trainer.step(jax.tree_util.tree_map(jnp.copy, state), gb)
    # the same by hand, from the trainer's own per-micro-batch gradient function
    grad_fn = jax.jit(make_grad_fn(trainer))
    key = jax.random.wrap_key_data(state["key"])
    _, step_key = jax.random.split(key)
    keys = jax.random.split(step_key, 2)
    micro = split_micro_batches(gb, 2)
    np.testing.assert_array_equal(np.asarray(micro["label"][1]), batch["label"][1::2])
    stats, grads, losses = state["batch_stats"], [], []
    for i in range(2):
        (loss, (_, stats)), g = grad_fn(state["params"], stats,
                                        jax.tree_util.tree_map(lambda x: x[i], micro), keys[i], {})
        grads.append(g)
        losses.append(float(loss))
    mean = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, *grads)
    updates, _ = trainer.tx.update(mean, state["opt_state"], state["params"])
    expected = jax.tree_util.tree_map(lambda p, u: p + u, state["params"], updates)
    assert float(metrics["loss"]) == pytest.approx(np.mean(losses), rel=1e-6)
    assert losses[0] != losses[1]
    for a, b in zip(_leaves(new_state["params"]), _leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(_leaves(new_state["batch_stats"]), _leaves(stats)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
