"""One process of the multi-host test (tests/test_multihost.py), started by it with
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID and 2 CPU devices.

argv: data_root out_dir.  Through `initialize_distributed`, as `sarformer train` does:
0. `put_on_mesh` of host values (a typed key, an array, a scalar) onto the 4-device mesh;
1. one train step of the global first batch (each process feeds its half of the rows) on a
   2 (data) x 2 (fsdp) mesh that spans both processes; process 0 writes the parameters;
2. slide evaluation with each process's images on its own devices equals every process
   evaluating every image;
3. the training loop: 2 steps with a checkpoint, stopped, then resumed to 3."""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from sarformer_jax.train import initialize_distributed  # noqa: E402

assert initialize_distributed()

import jax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from micro import micro_config  # noqa: E402

from sarformer_jax.data.pipeline import build_train_loader  # noqa: E402
from sarformer_jax.train import create_trainer, device_batch, train  # noqa: E402

root, out = sys.argv[1], sys.argv[2]
pid, n = jax.process_index(), jax.process_count()
assert n == 2 and jax.device_count() == 4 and jax.local_device_count() == 2

cfg = micro_config(root=root, **{"train.eps": 1.0, "train.mesh.fsdp": 2,
                                 "train.mesh.fsdp_min_size": 512})
batch = next(build_train_loader(cfg, seed=0))  # the whole global batch, the same in each process
rows = len(batch["image"]) // n
local = {k: v[pid * rows:(pid + 1) * rows] for k, v in batch.items()
         if isinstance(v, np.ndarray) and v.dtype != object}
trainer, state = create_trainer(cfg)
assert len(trainer.mesh.devices.flat) == 4

# host values of every kind onto the mesh that spans both processes: typed keys, numpy, scalars
from sarformer_jax import sharding as shard_lib  # noqa: E402

rep = shard_lib.replicated(trainer.mesh)
placed = shard_lib.put_on_mesh({"key": jax.random.key(7), "x": np.arange(8.0), "s": 3.0},
                               {"key": rep, "x": shard_lib.batch_sharding(trainer.mesh), "s": rep})
assert not placed["x"].is_fully_addressable and len(placed["x"].sharding.device_set) == 4
gathered = multihost_utils.process_allgather(placed["x"], tiled=True)
assert np.array_equal(np.asarray(gathered), np.arange(8.0)), gathered
key_bits = multihost_utils.process_allgather(jax.random.key_data(placed["key"]), tiled=True)
assert np.array_equal(np.asarray(key_bits), np.asarray(jax.random.key_data(jax.random.key(7))))
assert float(multihost_utils.process_allgather(placed["s"], tiled=True).reshape(-1)[0]) == 3.0
state, metrics = trainer.train_step(state, device_batch(local, trainer.mesh), trainer.guide)
params = [np.asarray(multihost_utils.process_allgather(x, tiled=True))
          for x in jax.tree_util.tree_leaves(state["params"])]
loss = float(np.asarray(multihost_utils.process_allgather(metrics["loss"], tiled=True))
             .reshape(-1)[0])
if pid == 0:
    np.savez(os.path.join(out, "step.npz"), loss=loss, *params)

# slide evaluation: each process its own images on its own devices (parallel path), against
# every process evaluating every image one at a time; totals summed exactly over processes
from sarformer_jax.evaluate import evaluate_state, parallel_refusal, sum_over_processes  # noqa: E402

big = np.asarray([[2 ** 40 + pid, 7], [3, 2 ** 61 - 1 + pid]], np.int64)
assert np.array_equal(sum_over_processes(big), [[2 ** 41 + 1, 14], [6, 2 ** 62 - 1]])
ev_cfg = micro_config(root=root, **{"eval.mode": "slide", "eval.batch_size": 2})
ev_trainer, ev_state = create_trainer(ev_cfg)
assert parallel_refusal(ev_cfg, ev_trainer, "slide", False) is None
par = evaluate_state(ev_cfg, ev_trainer, ev_state, progress=False)
seq_cfg = ev_cfg.copy()
seq_cfg.eval.parallel = False
seq = evaluate_state(seq_cfg, ev_trainer, ev_state, progress=False)
assert par["num_images"] == seq["num_images"] == 2, (par["num_images"], seq["num_images"])
for k in ("area_intersect", "area_union", "area_pred", "area_label"):
    assert np.array_equal(par[k], seq[k]), (k, par[k], seq[k])
print(f"process {pid}: eval mIoU parallel {par['mIoU']:.6f} per-image {seq['mIoU']:.6f}", flush=True)

loop = micro_config(root=root, **{"train.num_steps": 3, "train.ckpt_every": 2})
first = train(loop, os.path.join(out, "run"), progress=False, stop_after=2)
again = train(loop, os.path.join(out, "run"), progress=False)
print(f"process {pid}: steps {first['step']} then {again['step']}", flush=True)
