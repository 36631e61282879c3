"""Orbax checkpoints: asynchronous periodic saves (keep the last K), a separate best-by-mIoU
checkpoint, and exact restore of params, optimiser state, step, PRNG state and the data
iterator's state.

Layout of a workdir:
  checkpoints/<step>/{state, extra}   periodic, the last `keep` kept
  best/<step>/{state, extra}          the best evaluation so far (by mIoU)
  config.json                         the resolved config of the run

`state` is the train-state pytree (StandardSave); `extra` is JSON: data-iterator state, metrics
and the config's shape fingerprint.  Orbax writes into a temporary directory and renames it when
complete, so a failed save (disk full, permissions) leaves earlier checkpoints intact.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointSaveError(RuntimeError):
    pass


_ARRAY_HANDLER_SET = False


def _save_replicated_arrays_from_one_replica() -> None:
    """Orbax's default on anything but an explicit `JAX_PLATFORMS=cuda|gpu` is "replica
    parallel" saving: each device writes a slice of a replicated array, and every slice is an
    eager `lax.slice` compiled for its own device.  On the first save of a process that is one
    compile per array shape and device (280 compiles, 19-25 s, for the test model on 8 CPU
    devices; on GPUs each costs more), all for arrays that are small next to what an ocdbt
    write of one replica costs.  Orbax itself turns it off when it knows it is on GPUs; this
    turns it off everywhere but TPUs, once per process (orbax's handler registry is global)."""
    global _ARRAY_HANDLER_SET
    if _ARRAY_HANDLER_SET:
        return
    _ARRAY_HANDLER_SET = True
    if jax.default_backend() == "tpu":
        return
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


class Checkpointer:
    def __init__(self, workdir: str | pathlib.Path, *, keep: int = 3, async_save: bool = True):
        _save_replicated_arrays_from_one_replica()
        self.workdir = pathlib.Path(workdir).absolute()
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                            enable_async_checkpointing=async_save)
        self.periodic = ocp.CheckpointManager(self.workdir / "checkpoints", options=opts)
        best_opts = ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, best_fn=lambda m: m["mIoU"], best_mode="max",
            keep_checkpoints_without_metrics=False, enable_async_checkpointing=async_save)
        self.best = ocp.CheckpointManager(self.workdir / "best", options=best_opts)

    def latest_step(self) -> int | None:
        return self.periodic.latest_step()

    def _save(self, manager, step: int, state: Any, extra: dict, metrics: dict | None) -> None:
        try:
            manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       extra=ocp.args.JsonSave(extra)),
                         metrics=metrics, force=True)
        except Exception as e:  # orbax raises various OSErrors / ValueErrors
            prev = self.latest_step()
            kept = (f"the previous checkpoint ({prev}) is intact" if prev is not None
                    else "no earlier checkpoint exists")
            raise CheckpointSaveError(
                f"saving checkpoint {step} in {manager.directory} failed: {e}; {kept}") from e

    def save(self, step: int, state: Any, extra: dict) -> None:
        self._save(self.periodic, step, state, extra, None)

    def save_best(self, step: int, state: Any, extra: dict, miou: float) -> None:
        self._save(self.best, step, state, extra, {"mIoU": float(miou)})

    def wait(self) -> None:
        for manager in (self.periodic, self.best):
            try:
                manager.wait_until_finished()
            except Exception as e:
                raise CheckpointSaveError(
                    f"asynchronous checkpoint save in {manager.directory} failed: {e}") from e

    def restore(self, abstract_state: Any, step: int | None = None, *, best: bool = False
                ) -> tuple[Any, dict, int]:
        manager = self.best if best else self.periodic
        step = manager.best_step() if best else (step if step is not None else manager.latest_step())
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {manager.directory}")
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), extra=ocp.args.JsonRestore()))
        return restored["state"], dict(restored["extra"]), step

    def restore_extra(self, step: int | None = None, *, best: bool = False) -> tuple[dict, int]:
        manager = self.best if best else self.periodic
        step = manager.best_step() if best else (step if step is not None else manager.latest_step())
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {manager.directory}")
        restored = manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))
        return dict(restored["extra"]), step

    def close(self) -> None:
        self.periodic.close()
        self.best.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs carrying each leaf's sharding, for sharded restores."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
