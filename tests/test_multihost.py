"""Multi-host training on the CPU: two processes of 2 devices each, joined through
`initialize_distributed` (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, gloo
collectives), as `sarformer train` joins a cluster.  One step on a mesh spanning both processes,
each feeding half of the global batch, equals the one-device step; slide evaluation with each
process's images on its own devices gives the totals of every process evaluating every image;
the training loop saves, stops and resumes on both processes (tests/multihost_worker.py)."""

import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from micro import micro_config

from sarformer_jax.data.pipeline import build_train_loader
from sarformer_jax.train import create_trainer, device_batch

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_step_equals_one_device_and_loop_resumes(data_root, tmp_path):
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                   os.environ.get("XLA_FLAGS", ""))
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_PROCESSES="2",
               XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count=2".strip(),
               JAX_COORDINATOR_ADDRESS=f"localhost:{_free_port()}")
    procs = [subprocess.Popen([sys.executable, WORKER, str(data_root), str(tmp_path)],
                              env=dict(env, JAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=900)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i}:\n{out[-4000:]}"
        assert f"process {i}: steps 2 then 3" in out, out[-2000:]
        assert f"process {i}: eval mIoU parallel" in out, out[-2000:]
        # the first process logs and writes the run's files; the other stays quiet
        assert ("resumed from" in out) == (i == 0) and ("step      3  loss" in out) == (i == 0)
    assert len(list((tmp_path / "run" / "tb").iterdir())) == 2  # one event file per invocation

    cfg = micro_config(root=data_root, **{"train.eps": 1.0})  # eps: see test_train.py
    batch = next(build_train_loader(cfg, seed=0))
    trainer, state = create_trainer(cfg, devices=jax.devices()[:1])
    state, metrics = trainer.train_step(state, device_batch(batch, trainer.mesh), trainer.guide)
    got = np.load(tmp_path / "step.npz")
    assert np.isfinite(float(metrics["loss"]))
    assert float(got["loss"]) == pytest.approx(float(metrics["loss"]), rel=1e-6)
    want = [np.asarray(x) for x in jax.tree_util.tree_leaves(state["params"])]
    assert len(got.files) - 1 == len(want)
    for i, w in enumerate(want):
        np.testing.assert_allclose(got[f"arr_{i}"], w, rtol=1e-6, atol=1e-6)


def test_initialize_distributed_reads_the_environment(monkeypatch):
    from sarformer_jax import train as train_lib

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    for v in train_lib._CLUSTER_ENV:
        monkeypatch.delenv(v, raising=False)
    assert not train_lib.initialize_distributed() and not calls  # no cluster: one process
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES must be an integer, got 'two'"):
        train_lib.initialize_distributed()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    before = jax.config.jax_cpu_collectives_implementation
    try:
        assert train_lib.initialize_distributed()
        assert jax.config.jax_cpu_collectives_implementation == "gloo"
    finally:
        jax.config.update("jax_cpu_collectives_implementation", before)
    assert calls == [dict(num_processes=4, process_id=3)]
