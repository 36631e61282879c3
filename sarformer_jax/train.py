"""`sarformer train --config CFG --workdir DIR`: the sharded training loop.

One jit-compiled step over a `Mesh` (data parallel over every device, optional FSDP parameter and
optimiser-state sharding): guidance proposals -> forward (compute dtype from `train.compute_dtype`,
fp32 params) -> Hungarian-matched losses with deep supervision (+ auxiliary CE) -> AdamW update.
BatchNorm statistics are computed over the global batch (the step is one SPMD program over the
sharded batch, which is what SyncBN does).  A non-finite loss or gradient never reaches the
params: the step is skipped on the device and counted; with `train.nan_policy="stop"` the run
stops naming the step and the last good checkpoint.

Checkpoints (orbax, asynchronous) hold params, batch statistics, optimiser state, step, PRNG key
and the data iterator's state, so a killed run resumes bit-identically.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sarformer_jax import checkpoint as ckpt_lib
from sarformer_jax import sharding as shard_lib
from sarformer_jax.config import Config, load_config
from sarformer_jax.convert.common import CheckpointError
from sarformer_jax.data.pipeline import device_inputs
from sarformer_jax.data.sources import DataError
from sarformer_jax.guidance import (init_stale_embedding, load_guidance_sam, make_proposal_fn,
                                    guidance_refusal, uses_sam)
from sarformer_jax.losses import loss_fn as segmentation_loss
from sarformer_jax.losses import resolve_point_select
from sarformer_jax.models.beit import set_attention_per_batch_shard
from sarformer_jax.models.layers import init_rngs
from sarformer_jax.models.sarformer import build_model
from sarformer_jax.optim import FlatTransformation, build_optimizer, use_flat_optimizer

_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
                "TPU_WORKER_HOSTNAMES")


def initialize_distributed() -> bool:
    """Multi-host: `jax.distributed.initialize` when the environment names a cluster (SLURM,
    Open MPI, TPU pods) or a coordinator (`JAX_COORDINATOR_ADDRESS`, with `JAX_NUM_PROCESSES`
    and `JAX_PROCESS_ID`); a CPU-only run's cross-process collectives go through gloo.  Returns
    whether it initialised.  Call before anything touches a jax device."""
    if not any(v in os.environ for v in _CLUSTER_ENV):
        return False
    kwargs = {}
    for env, key in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        if env in os.environ:
            try:
                kwargs[key] = int(os.environ[env])
            except ValueError:
                raise ValueError(f"{env} must be an integer, got {os.environ[env]!r}") from None
    # the CPU backend's cross-process collectives (the accelerators' go through NCCL)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    return True


class NonFiniteLossError(RuntimeError):
    pass


class ConfigMismatchError(ValueError):
    pass


# ----------------------------------------------------------------------------------------------
# Train state


def train_state(params, stats, opt_state, step, key) -> dict[str, Any]:
    """The checkpointed pytree.  `key` is raw uint32 key data (portable across checkpoints)."""
    return {
        "params": params,
        "batch_stats": stats,
        "opt_state": opt_state,
        "step": step,
        "key": key,
        "bad_steps": jnp.zeros((), jnp.int32),
        "first_bad_step": jnp.full((), -1, jnp.int32),
    }


@dataclasses.dataclass
class Trainer:
    """Holds the static parts (graph definition, optimiser, jitted functions) of a run."""

    cfg: Config
    mesh: jax.sharding.Mesh
    graphdef: Any
    rest: Any  # non-param, non-batch-stat state (RNG streams), re-seeded every step
    tx: Any
    schedule: Any
    proposal_fn: Any
    state_shardings: Any
    train_step: Any = None  # jitted (state, batch, guide) -> (state, metrics)
    guide: dict = dataclasses.field(default_factory=dict)  # SAM state for online guidance
    sam_graphdef: Any = None
    flat_params: bool = False  # `train.flat_params`: state["params"] = the optimiser's groups

    def params_tree(self, params):
        """The parameter tree of `state["params"]` (unflattened under `train.flat_params`)."""
        return self.tx.groups.unflatten(params) if self.flat_params else params

    def checkpoint_state(self, state: dict) -> dict:
        """`state` as checkpoints hold it: the parameters as a tree, whatever the layout in
        memory, so that a checkpoint restores with `train.flat_params` on or off."""
        if not self.flat_params:
            return state
        return dict(state, params=_unflatten_jit(self.tx.groups)(state["params"]))

    def checkpoint_abstract(self, state: dict) -> dict:
        """ShapeDtypeStructs (with shardings) of `checkpoint_state(state)`, for restores."""
        abstract = ckpt_lib.abstract_like(state)
        if self.flat_params:  # the tree of the flat vectors' leaves, replicated as they are
            sharding = shard_lib.replicated(self.mesh)
            tree = jax.eval_shape(self.tx.groups.unflatten, state["params"])
            abstract["params"] = jax.tree_util.tree_map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
        return abstract

    def from_checkpoint_state(self, state: dict) -> dict:
        if not self.flat_params:
            return state
        return dict(state, params=_flatten_jit(self.tx.groups)(state["params"]))

    def step(self, state, batch):
        """One training step with this trainer's guidance inputs."""
        if (uses_sam(self.cfg) and self.cfg.guidance.seed_compat
                and self.guide.get("stale_embedding") is None):  # the first step only
            images = device_inputs(batch, self.cfg.data.mean, self.cfg.data.std)["image"]
            self.guide = init_stale_embedding(self.cfg, self.sam_graphdef, self.guide, images,
                                              shard_lib.replicated(self.mesh))
        return self.train_step(state, batch, self.guide)


@functools.lru_cache(maxsize=8)
def _unflatten_jit(groups):
    return jax.jit(groups.unflatten)


@functools.lru_cache(maxsize=8)
def _flatten_jit(groups):
    return jax.jit(groups.flatten)


def use_flat_params(cfg_train, tx, platform: str) -> bool:
    """`train.flat_params`: the train state holds the parameters as the flat optimiser's group
    vectors; the step unflattens them (slices that XLA fuses into their readers) and updates each
    group in one element-wise pass instead of one kernel per parameter leaf.  "auto": on for
    GPU devices whenever the optimiser is flat (train run 41, H200: 57.6 -> 51.9 ms blocking,
    51.6 -> 50.0 ms pipelined, same memory; run 42, H100: 62.4 -> 57.6 and 56.6 -> 55.6 ms),
    off elsewhere (not timed on CPUs or TPUs).
    Checkpoints hold the parameter tree either way, so runs resume across the two layouts."""
    flag = cfg_train.get("flat_params", "auto")
    if flag == "auto":
        return isinstance(tx, FlatTransformation) and platform == "gpu"
    if not isinstance(flag, bool):
        raise ValueError(f"train.flat_params must be auto, True or False, got {flag!r}")
    if flag and not isinstance(tx, FlatTransformation):
        raise ValueError("train.flat_params needs the flat optimiser (train.flat_optimizer, "
                         "which 'auto' turns off when parameters are split over fsdp)")
    return flag


def abstract_fingerprint(cfg: Config) -> dict[str, list[int]]:
    """`shape_fingerprint` of the params `cfg` builds, without allocating them."""
    abstract = nnx.eval_shape(lambda: build_model(cfg, rngs=init_rngs(0)))
    return shape_fingerprint(nnx.split(abstract, nnx.Param, ...)[1])


def shape_fingerprint(params) -> dict[str, list[int]]:
    flat = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = ".".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
        flat[name] = list(leaf.shape)
    return flat


_TRAINERS: dict[tuple, tuple[Trainer, Any]] = {}
_HOST_ONLY_TRAIN_KEYS = ("nan_policy", "ckpt_every", "eval_every", "log_every",
                         "keep_checkpoints", "keep_best", "profile", "profile_window",
                         "freeze_gc", "init_from")


def freeze_heap() -> int:
    """Collects once, then moves every object alive now into Python's permanent generation
    (`gc.freeze`), where the cyclic garbage collector no longer walks it.  Returns the number of
    objects frozen.

    A training process holds hundreds of thousands of long-lived objects (jax, flax, the model
    graph, compiled programs).  Without this, the collector's occasional full collection walks
    them all: 0.2-0.4 s of host time, during which no step is dispatched, so the GPUs ran dry
    (train scaling run 13: one such pause in every slow window).  Objects frozen here are still
    freed by reference counting; only cyclic garbage among them would stay until exit."""
    import gc

    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def _compiled_part(cfg: Config) -> dict:
    """The config without the keys that only the host loop reads (they do not change the
    compiled step), so trainers can be shared across runs that differ only there."""
    d = cfg.to_dict()
    d["train"] = {k: v for k, v in d["train"].items() if k not in _HOST_ONLY_TRAIN_KEYS}
    d.pop("eval", None)
    d.pop("data_gen", None)
    return d


def resolve_attention_per_batch_shard(cfg: Config, mesh) -> bool:
    """`model.backbone.attention_per_batch_shard`: "auto" is on when the batch is split over
    more than one device (then each device reduces its relative-position-bias gradient to the
    table before the devices sum it, instead of summing dense [heads, tokens, tokens] ones)."""
    flag = cfg.model.backbone.get("attention_per_batch_shard", "auto")
    if flag == "auto":
        return mesh.size > 1  # the batch is split over every device of the mesh
    if not isinstance(flag, bool):
        raise ValueError("model.backbone.attention_per_batch_shard must be True, False or "
                         f"'auto', got {flag!r}")
    return flag


def load_initial_weights(model, path: str | pathlib.Path) -> str:
    """Fills `model` (a `Segmentor`, in place) from a converted .npz (`train.init_from`):

    - `sarformer convert beit` (format "beit_adapter"): the whole backbone, BEiT from the file
      and the adapter as the converter initialised it;
    - `sarformer convert beit --beit-only` (format "beit"): the backbone's BEiT part; the
      adapter, the head and the rest keep the model's own initialisation;
    - `sarformer convert sarformer` (format "sarformer_mmseg"): every parameter and BatchNorm
      statistic of the model.

    Entries missing (but for the "beit" case), not in the model or of other shapes are refused
    all at once before anything is written (`CheckpointError` naming the file).  Returns what
    was filled, for the log."""
    from sarformer_jax.convert.common import load_params, update_module
    from sarformer_jax.convert.mmseg import FORMAT as WHOLE_MODEL

    path = str(path)
    flat, meta = load_params(path)
    fmt = meta.get("format")
    if fmt == "beit_adapter":
        update_module(model.backbone, flat, source=f"{path} (model.backbone)")
        return "the backbone (BEiT and adapter)"
    if fmt == "beit":
        update_module(model.backbone, flat, source=f"{path} (model.backbone)", partial=True)
        return "the backbone's BEiT layers (the adapter keeps its initialisation)"
    if fmt == WHOLE_MODEL:
        made_for = meta.get("config")
        hint = f" (converted for config {made_for})" if made_for else ""
        update_module(model, flat, source=path + hint)
        return "every parameter and BatchNorm statistic"
    raise CheckpointError(
        f"{path}: train.init_from takes an .npz written by `sarformer convert beit` or `sarformer "
        f"convert sarformer`; this file's format is {fmt!r}")


def create_trainer(cfg: Config, *, devices=None, sam=None,
                   init_from: str | None = None) -> tuple[Trainer, dict]:
    """Builds the model on the mesh (params born sharded) and the optimiser; returns the trainer
    and a freshly initialised train state, its weights from `init_from` (default
    `cfg.train.init_from`; "" = the seeded initialisation only) when given, see
    `load_initial_weights`.  Trainers (and their compiled functions) are reused within a
    process for an identical config and device set.

    With online guidance (`guidance.source` online / boxes) SAM comes from
    `guidance.sam.checkpoint`, or is `sam` (an nnx SAM, e.g. random weights for benchmarks)."""
    if init_from is None:
        init_from = str(cfg.train.get("init_from", "") or "")
    cache_key = (json.dumps(_compiled_part(cfg), sort_keys=True, default=list),
                 tuple(d.id for d in (devices if devices is not None else jax.devices())),
                 id(sam) if sam is not None else None)
    if cache_key in _TRAINERS:
        trainer, init = _TRAINERS[cache_key]
        return trainer, init(init_from)
    mesh = shard_lib.make_mesh(cfg.train.mesh, devices)
    seed = int(cfg.train.seed)
    per_shard_attention = resolve_attention_per_batch_shard(cfg, mesh)

    def make():
        model = build_model(cfg, rngs=init_rngs(seed, seed + 1))
        if per_shard_attention:
            set_attention_per_batch_shard(model, mesh, shard_lib.BATCH_AXES)
        return model

    abstract = nnx.eval_shape(make)
    graphdef, abs_params, abs_stats, abs_rest = nnx.split(abstract, nnx.Param, nnx.BatchStat, ...)
    num_layers = int(cfg.model.backbone.depth)
    tx, schedule = build_optimizer(cfg.train, abs_params, num_layers=num_layers,
                                   flat=use_flat_optimizer(cfg.train, mesh.shape["fsdp"]))
    abs_opt = jax.eval_shape(tx.init, abs_params)
    flat_params = use_flat_params(cfg.train, tx, mesh.devices.flat[0].platform)
    held = tx.groups.flatten if flat_params else (lambda p: p)  # the state's parameter layout
    abs_state = jax.eval_shape(
        lambda: train_state(held(abs_params), abs_stats, abs_opt, jnp.zeros((), jnp.int32),
                            jnp.zeros((2,), jnp.uint32)))
    shardings = shard_lib.tree_shardings(
        mesh, abs_state, int(cfg.train.mesh.get("fsdp_min_size", shard_lib.MIN_FSDP_SIZE)))

    host = shard_lib.host_device()

    def init(init_from: str):
        """The seeded build, on the host's CPU (op by op), then placed on the mesh.  A jitted
        build would be one XLA program with an initialiser per parameter: its compile took
        minutes (SARFormer-B 157 s on a GPU host; SARFormer-L did not finish in 480 s), where
        the eager build takes seconds.  Built on the host, the initial parameters are the same
        whatever the accelerator or the mesh."""
        with jax.default_device(host):
            model = make()
            if init_from:
                what = load_initial_weights(model, init_from)
                _say(f"initialised {what} from {init_from}")
            _, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
            state = train_state(held(params), stats, tx.init(params), jnp.zeros((), jnp.int32),
                                jax.random.key_data(jax.random.key(seed + 2)))
        return (shard_lib.put_on_mesh(state, shardings),
                shard_lib.put_on_mesh(rest, shard_lib.replicated(mesh)))

    state, rest = init(init_from)

    sam_graphdef, guide = None, {}
    if uses_sam(cfg):
        sam_graphdef, sam_state = load_guidance_sam(cfg, sam)
        guide = {"sam": shard_lib.put_on_mesh(sam_state, shard_lib.replicated(mesh))}
    trainer = Trainer(cfg=cfg, mesh=mesh, graphdef=graphdef, rest=rest, tx=tx,
                      schedule=schedule, proposal_fn=make_proposal_fn(cfg, sam_graphdef),
                      state_shardings=shardings, guide=guide, sam_graphdef=sam_graphdef,
                      flat_params=flat_params)
    trainer.train_step = make_train_step(trainer)
    _TRAINERS[cache_key] = (trainer, lambda path: init(path)[0])
    return trainer, state


def _tree_where(pred, a, b):
    return jax.tree_util.tree_map(lambda x, y: jnp.where(pred, x, y), a, b)


def make_grad_fn(trainer: Trainer):
    """`grad_fn(params, stats, batch, key, guide) -> ((loss, (parts, new_stats)), grads)` of one
    (micro-)batch: proposals, forward, losses, backward."""
    cfg = trainer.cfg
    graphdef = trainer.graphdef
    num_classes = int(cfg.model.head.num_classes)
    invert = bool(cfg.guidance.invert_first_mask)
    rest = trainer.rest
    cfg_loss = cfg.model.loss.copy()
    cfg_loss.point_select = resolve_point_select(cfg_loss.get("point_select", "auto"),
                                                 trainer.mesh.size)
    # the per-image mask losses on each device's images when the batch is split
    batch_mesh = (trainer.mesh, shard_lib.BATCH_AXES) if trainer.mesh.size > 1 else None

    def micro_loss(params, stats, batch, key, guide):
        batch = device_inputs(batch, cfg.data.mean, cfg.data.std)  # the loader's uint8 image
        k_prop, k_drop, k_loss = jax.random.split(key, 3)
        # fresh Variables at this trace level (BatchNorm updates its statistics in place)
        stats, rest_ = jax.tree_util.tree_map(lambda x: x, (stats, rest))
        model = nnx.merge(graphdef, params, stats, rest_)
        nnx.reseed(model, dropout=k_drop)
        proposals = None
        if trainer.proposal_fn is not None:
            with jax.named_scope("guidance"):
                proposals = jax.lax.stop_gradient(trainer.proposal_fn(batch, k_prop, False, guide))
        preds, aux_logits, _ = model(batch["image"], proposals, train=True,
                                     invert_first_mask=invert)
        with jax.named_scope("loss"):
            total, parts = segmentation_loss(preds, batch["label"], aux_logits, key=k_loss,
                                             cfg_loss=cfg_loss, num_classes=num_classes,
                                             batch_mesh=batch_mesh)
        new_stats = nnx.state(model, nnx.BatchStat)
        return total, (parts, new_stats)

    if trainer.flat_params:  # gradients with respect to the flat group vectors
        groups = trainer.tx.groups

        def flat_loss(flats, *args):
            return micro_loss(groups.unflatten_diff(flats), *args)

        return jax.value_and_grad(flat_loss, has_aux=True)
    return jax.value_and_grad(micro_loss, has_aux=True)


def split_micro_batches(batch: dict, accum: int) -> dict:
    """[B, ...] -> [accum, B / accum, ...] with micro-batch i = rows i, i + accum, ... so that
    every micro-batch is spread over all devices of a batch-sharded array (no data movement)."""
    def split(x):
        if x.shape[0] % accum:
            raise ValueError(f"train.grad_accum={accum} does not divide the batch {x.shape[0]}")
        return jnp.swapaxes(x.reshape((x.shape[0] // accum, accum) + x.shape[1:]), 0, 1)

    return jax.tree_util.tree_map(split, batch)


def make_train_step(trainer: Trainer):
    cfg = trainer.cfg
    tx = trainer.tx
    accum = int(cfg.train.get("grad_accum", 1))
    grad_fn = make_grad_fn(trainer)

    def step(state, batch, guide):
        key = jax.random.wrap_key_data(state["key"])
        key, step_key = jax.random.split(key)
        params, stats = state["params"], state["batch_stats"]
        if accum == 1:
            (loss, (parts, new_stats)), grads = grad_fn(params, stats, batch, step_key, guide)
        else:
            micro = split_micro_batches(batch, accum)

            def body(carry, xs):
                g_acc, l_acc, p_acc, st = carry
                mb, k = xs
                (l, (p, st)), g = grad_fn(params, st, mb, k, guide)
                g_acc = jax.tree_util.tree_map(jnp.add, g_acc, g)
                p_acc = jax.tree_util.tree_map(jnp.add, p_acc, p)
                return (g_acc, l_acc + l, p_acc, st), None

            zeros_g = jax.tree_util.tree_map(jnp.zeros_like, params)
            (_, (p0, _)), _ = jax.eval_shape(grad_fn, params, stats,
                                             jax.tree_util.tree_map(lambda x: x[0], micro),
                                             step_key, guide)
            zeros_p = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), p0)
            keys = jax.random.split(step_key, accum)
            (grads, loss, parts, new_stats), _ = jax.lax.scan(
                body, (zeros_g, jnp.zeros((), jnp.float32), zeros_p, stats), (micro, keys))
            grads = jax.tree_util.tree_map(lambda g: g / accum, grads)
            loss = loss / accum
            parts = jax.tree_util.tree_map(lambda p: p / accum, parts)
        new_state = dict(state)
        if isinstance(tx, FlatTransformation):  # norm, update and guard on the flat vectors
            with jax.named_scope("optimizer"):
                flat_g = tuple(grads) if trainer.flat_params else tx.groups.flatten(grads)
                grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
                                         for g in flat_g))
                finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
                # the guarded new state, and each parameter from its slices of the new moments
                # (`guarded_step`: no copy of the old moments, no flat copy of the parameters)
                update = tx.guarded_step_flat if trainer.flat_params else tx.guarded_step
                new_state["params"], new_opt = update(flat_g, state["opt_state"], params, finite)
        else:
            grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
                                     for g in jax.tree_util.tree_leaves(grads)))
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            with jax.named_scope("optimizer"):
                updates, new_opt = tx.update(grads, state["opt_state"], params)
            new_params = jax.tree_util.tree_map(lambda p, u: (p + u).astype(p.dtype), params,
                                                updates)
            new_state["params"] = _tree_where(finite, new_params, params)
            new_opt = _tree_where(finite, new_opt, state["opt_state"])
        new_state["opt_state"] = new_opt
        new_state["batch_stats"] = _tree_where(finite, new_stats, stats)
        new_state["step"] = state["step"] + 1
        new_state["key"] = jax.random.key_data(key)
        new_state["bad_steps"] = state["bad_steps"] + (~finite).astype(jnp.int32)
        new_state["first_bad_step"] = jnp.where(
            (~finite) & (state["first_bad_step"] < 0), state["step"], state["first_bad_step"])
        metrics = dict(parts)
        metrics.update(loss=loss, grad_norm=grad_norm, lr=trainer.schedule(state["step"]),
                       finite=finite)
        return new_state, metrics

    batch_sh = shard_lib.batch_sharding(trainer.mesh)
    return jax.jit(step, in_shardings=(trainer.state_shardings, batch_sh,
                                       shard_lib.replicated(trainer.mesh)),
                   out_shardings=(trainer.state_shardings, shard_lib.replicated(trainer.mesh)),
                   donate_argnums=(0,))


def model_from_state(trainer_or_cfg, state: dict, graphdef=None, rest=None):
    """An nnx model holding the params and batch statistics of `state` (for evaluation)."""
    params = state["params"]
    if isinstance(trainer_or_cfg, Trainer):
        graphdef, rest = trainer_or_cfg.graphdef, trainer_or_cfg.rest
        params = trainer_or_cfg.params_tree(params)
    return nnx.merge(graphdef, params, state["batch_stats"], rest)


# ----------------------------------------------------------------------------------------------
# Batches


def device_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """Process-local numpy batch -> global jax.Arrays sharded over the batch axes."""
    sh = shard_lib.batch_sharding(mesh)
    out = {}
    for k, v in batch.items():
        if not isinstance(v, np.ndarray) or v.dtype == object:
            continue
        out[k] = jax.make_array_from_process_local_data(sh, v)
    return out


# ----------------------------------------------------------------------------------------------
# The loop


def _check_resume_shapes(saved: dict, current: dict) -> None:
    diffs = []
    for name, shape in current.items():
        if name not in saved:
            diffs.append(f"{name}: new in this config {tuple(shape)}")
        elif list(saved[name]) != list(shape):
            diffs.append(f"{name}: checkpoint {tuple(saved[name])} vs config {tuple(shape)}")
    for name in saved:
        if name not in current:
            diffs.append(f"{name}: in the checkpoint, not in this config")
    if diffs:
        raise ConfigMismatchError(
            f"cannot resume: the config's shapes differ from the checkpoint's ({len(diffs)}): "
            + "; ".join(diffs[:12]))


class _StepTracer:
    """`train.profile`: traces steps [skip, skip + count) of this invocation with jax.profiler
    into the directory (the step before the window and the last traced one are waited for, so
    the trace holds whole steps)."""

    def __init__(self, directory, window):
        self.directory = str(directory or "")
        skip, count = (int(v) for v in window)
        if skip < 0 or count < 1:
            raise ValueError(f"train.profile_window must be (steps to skip >= 0, steps to trace "
                             f">= 1), got {tuple(window)}")
        self.start, self.end = skip, skip + count
        self.active = False

    def before_step(self, done_here: int, state) -> None:
        if not self.directory:
            return
        if done_here == self.start and not self.active:
            jax.block_until_ready(state)
            jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
            self.active = True
        elif done_here == self.end and self.active:
            self.stop(state)

    def stop(self, state) -> None:
        if self.active:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.active = False
            print(f"profile of steps {self.start + 1}-{self.end} of this run written to "
                  f"{self.directory}", flush=True)


def train(cfg: Config, workdir: str | pathlib.Path, *, stop_after: int | None = None,
          progress: bool = True, devices=None) -> dict[str, Any]:
    """Trains (or resumes) in `workdir`.  `stop_after` ends the loop after that many steps of
    this invocation (used to simulate a killed run).  Returns a summary dict."""
    from sarformer_jax.data.pipeline import build_train_loader
    from sarformer_jax.evaluate import evaluate_state

    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    fingerprint = abstract_fingerprint(cfg)
    checkpointer = ckpt_lib.Checkpointer(workdir, keep=int(cfg.train.keep_checkpoints))
    start_state = None
    latest = checkpointer.latest_step()
    if latest is not None:  # refuse a checkpoint of other shapes before building anything
        extra, _ = checkpointer.restore_extra(latest)
        _check_resume_shapes(extra.get("shapes", {}), fingerprint)
    # a resumed run takes its weights from its checkpoint, not from train.init_from again
    trainer, state = create_trainer(cfg, devices=devices,
                                    init_from="" if latest is not None else None)
    if latest is not None:
        state, extra, _ = checkpointer.restore(trainer.checkpoint_abstract(state), latest)
        state = trainer.from_checkpoint_state(state)
        start_state = extra.get("data_state")
        _say(f"resumed from {workdir / 'checkpoints' / str(latest)}")
    if jax.process_index() == 0:  # multi-host: the first process writes the run's files
        (workdir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1, default=list))

    num_steps = int(cfg.train.num_steps)
    step = int(jax.device_get(state["step"]))
    loader = build_train_loader(cfg, seed=int(cfg.data.seed), process_index=jax.process_index(),
                                process_count=jax.process_count(), start_state=start_state)
    writer = _summary_writer(workdir) if jax.process_index() == 0 else None
    log_every = int(cfg.train.log_every)
    curve: list[tuple[int, float]] = []
    evals: list[tuple[int, float]] = []
    best = -1.0
    last_good = latest
    done_here = 0
    pbar = _progress(total=num_steps, initial=step, enabled=progress and jax.process_index() == 0)
    t0, imgs = time.perf_counter(), 0
    tracer = _StepTracer(cfg.train.get("profile", ""), cfg.train.get("profile_window", (10, 5)))
    try:
        while step < num_steps and (stop_after is None or done_here < stop_after):
            tracer.before_step(done_here, state)
            batch = device_batch(next(loader), trainer.mesh)
            state, metrics = trainer.step(state, batch)
            step += 1
            done_here += 1
            if done_here == 1 and cfg.train.get("freeze_gc", True):
                freeze_heap()  # after the first step: the compiled step is alive now
            imgs += int(cfg.train.batch_size)
            boundary = (step % int(cfg.train.ckpt_every) == 0 or step == num_steps
                        or (stop_after is not None and done_here == stop_after))
            if step % log_every == 0 or boundary or step == num_steps:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                bad = int(jax.device_get(state["bad_steps"]))
                if bad and cfg.train.nan_policy == "stop":
                    first = int(jax.device_get(state["first_bad_step"]))
                    where = (workdir / "checkpoints" / str(last_good)) if last_good else "none yet"
                    raise NonFiniteLossError(
                        f"non-finite loss or gradient at step {first}; the update was not "
                        f"applied; last good checkpoint: {where}")
                dt = time.perf_counter() - t0
                m["img_per_s"] = imgs / max(dt, 1e-9)
                m["skipped_steps"] = bad
                t0, imgs = time.perf_counter(), 0
                curve.append((step, m["loss"]))
                _write_scalars(writer, step, m)
                pbar.set_postfix(loss=f"{m['loss']:.3f}", lr=f"{m['lr']:.2e}")
                if not progress:
                    _say(f"step {step:6d}  loss {m['loss']:.4f}  lr {m['lr']:.2e}")
            pbar.update(1)
            if boundary:
                data_state = loader.get_state()
                if isinstance(data_state, bytes):
                    data_state = data_state.decode()
                # Multi-host: the first process's copy is saved and every process resumes from
                # it.  It holds only the position (grain's next_index), the same in every
                # process; each applies it to its own shard of the records.
                extra = {"data_state": data_state, "shapes": fingerprint, "step": step}
                checkpointer.save(step, trainer.checkpoint_state(state), extra)
                last_good = step
            if step % int(cfg.train.eval_every) == 0 or step == num_steps:
                results = evaluate_state(cfg, trainer, state, progress=False)
                miou = float(results["mIoU"])
                evals.append((step, miou))
                _write_scalars(writer, step, {"val/mIoU": miou, "val/mAcc": results["mAcc"],
                                              "val/aAcc": results["aAcc"]})
                _say(f"step {step}: mIoU {100 * miou:.2f}")
                if cfg.train.get("freeze_gc", True):
                    freeze_heap()  # and the evaluation's programs
                if cfg.train.keep_best and miou > best:
                    best = miou
                    checkpointer.save_best(step, trainer.checkpoint_state(state),
                                           {"shapes": fingerprint, "step": step, "mIoU": miou},
                                           miou)
    except DataError as e:
        # One line for the CLI, with where the run stands: the checkpoints already written stay
        # (the `finally` below waits for a save in flight); a bad record with data.on_error=raise
        # stops the run, data.on_error=skip would have logged it and gone on.
        where = (workdir / "checkpoints" / str(last_good)) if last_good else "none yet"
        raise DataError(f"{e} (the run stopped after step {step}; last good checkpoint: "
                        f"{where}; data.on_error=skip skips bad records)") from e
    finally:
        tracer.stop(state)
        pbar.close()
        checkpointer.wait()
        checkpointer.close()
        if writer is not None:
            writer.close()
        if hasattr(loader, "close"):
            loader.close()
    return {"step": step, "curve": curve, "evals": evals, "state": state, "trainer": trainer,
            "best_mIoU": best}


def _say(line: str) -> None:
    """A log line, from the first process only (multi-host: the others would repeat it)."""
    if jax.process_index() == 0:
        print(line, flush=True)


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step",
                dynamic_ncols=True)


def _summary_writer(workdir: pathlib.Path):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:  # pragma: no cover - tensorboardX is a base dependency
        return None
    return SummaryWriter(str(workdir / "tb"))


def _write_scalars(writer, step: int, scalars: dict[str, float]) -> None:
    if writer is None:
        return
    for k, v in scalars.items():
        name = k if "/" in k else f"train/{k}"
        writer.add_scalar(name, float(v), step)
    writer.flush()


def print_curve(curve: list[tuple[int, float]], evals: list[tuple[int, float]]) -> None:
    if curve:
        print("learning curve (step: loss):")
        print("  " + "  ".join(f"{s}: {v:.3f}" for s, v in curve))
    if evals:
        print("validation (step: mIoU):")
        print("  " + "  ".join(f"{s}: {100 * v:.2f}" for s, v in evals))


# ----------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny", help="config file or name (default: tiny)")
    parser.add_argument("--workdir", required=True, help="checkpoints, logs and outputs")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, repeatable (e.g. train.batch_size=4)")
    parser.add_argument("--no-progress", action="store_true", help="plain log lines, no bar")
    parser.add_argument("--demo-image", action="store_true",
                        help="after training, write a prediction overlay of one validation image")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    refusal = guidance_refusal(cfg, "train")
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    initialize_distributed()
    try:
        out = train(cfg, args.workdir, progress=not args.no_progress)
    except (NonFiniteLossError, ConfigMismatchError, ckpt_lib.CheckpointSaveError, DataError,
            CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if jax.process_index() == 0:
        print_curve(out["curve"], out["evals"])
        if out["evals"]:
            print(f"final mIoU: {100 * out['evals'][-1][1]:.2f}")
    if args.demo_image:
        from sarformer_jax.predict import predict_dataset_examples

        paths = predict_dataset_examples(cfg, out["trainer"], out["state"],
                                         pathlib.Path(args.workdir) / "predictions", count=1)
        for p in paths:
            print(f"prediction overlay: {p}")
    return 0
