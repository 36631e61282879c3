"""Checkpoints of arrays replicated over several devices: written from one replica, with no
per-device programs compiled for the save, and read back equal."""

from __future__ import annotations

import logging

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from sarformer_jax import checkpoint as ckpt_lib


def test_replicated_arrays_are_saved_without_compiling_per_device_slices(tmp_path, caplog):
    mesh = jax.make_mesh((8,), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    split = NamedSharding(mesh, PartitionSpec("data"))
    rng = np.random.default_rng(0)
    host = {"w": rng.normal(size=(48, 40)).astype(np.float32),
            "b": rng.normal(size=(40,)).astype(np.float32),
            "x": rng.normal(size=(16, 3)).astype(np.float32)}
    state = {"w": jax.device_put(host["w"], replicated), "b": jax.device_put(host["b"], replicated),
             "x": jax.device_put(host["x"], split)}
    state["w"] = jax.jit(lambda a: a * 1.0, out_shardings=replicated)(state["w"])
    ck = ckpt_lib.Checkpointer(tmp_path / "w", keep=2)
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING, logger="jax"):
            ck.save(1, state, {"step": 1})
            ck.wait()
    finally:
        jax.config.update("jax_log_compiles", False)
    # orbax's replica-parallel save slices every replicated array on every device, one compiled
    # `slice` per shape and device (280 of them for the test model on 8 devices)
    slices = [r.getMessage()[:120] for r in caplog.records if "jit(slice)" in r.getMessage()]
    assert not slices, slices
    restored, extra, _ = ck.restore(ckpt_lib.abstract_like(state), 1)
    ck.close()
    assert extra["step"] == 1
    for k in host:
        np.testing.assert_array_equal(np.asarray(restored[k]), host[k])
        assert restored[k].sharding == state[k].sharding
