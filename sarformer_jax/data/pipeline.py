"""Input pipelines: the grain training loader, the evaluation dataset, and host -> device batches.

Training (ARCHITECTURE §6.2): record indices of this process's shard are shuffled afresh every
epoch (seeded) and cut into local batches; local batch j is built whole by one grain worker
process (`data.num_workers`; 0 = this process, on demand): each of its records is read, decoded
and transformed by `transforms.train_transform` with a generator derived from (seed, j, slot),
and proposals are reduced to Q slots.  Batch j depends on the seed and j only, so the stream does
not depend on the number of workers, and `get_state()` / `start_state` resume it exactly.

What travels to the device is small: the image as uint8 with its size before padding (the step
normalises it: `device_inputs`), the label as uint8 when the classes and ignore index fit, the
proposals bit-packed.  A batch is built in the worker and handed over in shared memory, so the
main process does not stack records, and each worker runs OpenCV on one thread (16 workers with
16 OpenCV threads each held a 16-core host to ~60 images/s; docs/benchmarks.md).

Bad records raise a `DataError` naming the file, or with `data.on_error = "skip"` are replaced by
the next readable record of the dataset (logged and counted per worker process).  grain and
tensorflow_datasets are imported lazily.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pathlib
from typing import Any, Iterator

import numpy as np

from sarformer_jax.data import transforms as T
from sarformer_jax.data.sources import DataError

log = logging.getLogger(__name__)

_STATE_VERSION = 2  # 2: whole batches per grain element


# ------------------------------------------------------------------ sources from the config
def proposal_cache_dir(cfg) -> str | None:
    """The proposal cache of a `guidance.source="cached"` config (None for other sources):
    `guidance.cache_dir`, or, when that is empty and the dataset is the synthetic one,
    `<data.root>/proposals`, where the synthetic generator writes its proposals (so that
    `--set data.root=DIR` alone moves the tiny config's data and proposals together)."""
    guidance = cfg.get("guidance")
    if guidance is None or guidance.get("source") != "cached":
        return None
    if guidance.get("cache_dir"):
        return str(guidance.cache_dir)
    if str(cfg.data.get("dataset", "")) == "synthetic":
        return str(pathlib.Path(cfg.data.root) / "proposals")
    raise ValueError("guidance.source='cached' needs guidance.cache_dir=CACHE (written by "
                     "`sarformer amg --dataset ROOT --out CACHE --sam-checkpoint SAM.npz`)")


def _boxes_dir(cfg, split: str) -> str | None:
    guidance = cfg.get("guidance")
    if guidance is None or guidance.get("source") != "boxes":
        return None
    if not guidance.get("boxes_dir"):
        raise ValueError("guidance.source='boxes' needs guidance.boxes_dir (one <stem>.json per "
                         "image: a list of [x1, y1, x2, y2, ...] detector boxes in pixels)")
    return str(pathlib.Path(guidance.boxes_dir) / split)


def read_boxes(path: str) -> np.ndarray:
    """Detector boxes of one image from `path` (JSON list of rows [x1, y1, x2, y2, ...]; extra
    columns such as confidence and class are ignored) -> float32 [m, 4]."""
    try:
        with open(path) as f:
            rows = json.load(f)
    except FileNotFoundError:
        raise DataError(f"no detector boxes for this image: {path}") from None
    except (OSError, ValueError) as e:
        raise DataError(f"unreadable detector boxes file {path}: {e}") from None
    try:
        arr = np.asarray([r[:4] for r in rows], np.float32).reshape(-1, 4)
    except (TypeError, ValueError):
        raise DataError(f"detector boxes must be a list of [x1, y1, x2, y2, ...] rows: {path}") from None
    if not np.isfinite(arr).all():
        raise DataError(f"non-finite detector box coordinates: {path}")
    return arr


def _ensure_synthetic(cfg) -> None:
    """The synthetic set is the default dataset: write it on first use if its root is absent."""
    root = pathlib.Path(cfg.data.root)
    if (root / "images").is_dir():
        return
    from sarformer_jax.data import synthetic

    gen = cfg.get("data_gen") or {}
    log.warning("synthetic dataset missing at %s: generating it", root)
    synthetic.generate(root, num_train=gen.get("num_train", 400), num_val=gen.get("num_val", 50),
                       image_size=tuple(gen.get("image_size", (160, 192))),
                       num_classes=cfg.data.num_classes, seed=gen.get("seed", 0))


def build_source(cfg, split: str = "training"):
    """The record source named by `cfg.data.dataset` for `split` ("training" / "validation")."""
    data = cfg.data
    dataset = str(data.dataset)
    proposals = proposal_cache_dir(cfg)
    on_error = data.get("on_error", "raise")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"data.on_error must be 'raise' or 'skip', got {on_error!r}")
    if dataset in ("ade20k", "synthetic"):
        from sarformer_jax.data.ade20k import ade20k_source

        if dataset == "synthetic":
            _ensure_synthetic(cfg)
        return ade20k_source(data.root, split, num_classes=data.num_classes,
                             reduce_zero_label=data.reduce_zero_label, proposals_dir=proposals,
                             on_error=on_error)
    if dataset == "cityscapes":
        from sarformer_jax.data.cityscapes import cityscapes_source

        return cityscapes_source(data.root, split, num_classes=data.num_classes,
                                 proposals_dir=proposals, on_error=on_error)
    if dataset.startswith("tfds:"):
        from sarformer_jax.data.tfds_source import tfds_source

        return tfds_source(dataset[len("tfds:"):], split, data_dir=data.root or None,
                           num_classes=data.num_classes, proposals_dir=proposals)
    raise ValueError(f"unknown data.dataset {dataset!r}: 'ade20k' | 'cityscapes' | 'synthetic' | "
                     f"'tfds:scene_parse150' | 'tfds:cityscapes'")


# ------------------------------------------------------------------ the per-record work
class TrainRecord:
    """Reads record `index` of `source` and applies the training transforms (picklable)."""

    def __init__(self, source, cfg, split: str = "training", *, normalize_image: bool = True,
                 compact_label: bool = False):
        data = cfg.data
        self.source = source
        self.boxes_dir = _boxes_dir(cfg, split)
        max_boxes = int(cfg.guidance.get("max_boxes", 0)) if self.boxes_dir else 0
        self.kwargs = dict(
            crop_size=tuple(data.crop_size), scale=tuple(data.scale),
            ratio_range=tuple(data.ratio_range), cat_max_ratio=float(data.cat_max_ratio),
            flip_prob=float(data.flip_prob), photometric=bool(data.photometric),
            mean=tuple(data.mean), std=tuple(data.std), ignore_index=int(data.ignore_index),
            max_boxes=max_boxes, normalize_image=normalize_image,
            label_dtype=label_dtype(cfg) if compact_label else np.int32)
        self.num_queries = int(cfg.model.head.num_queries) if proposal_cache_dir(cfg) else None
        self.skip = data.get("on_error", "raise") == "skip"
        self.max_consecutive_skips = min(len(source), 1000)
        self.skipped = 0
        self.consecutive = 0

    def __call__(self, index: int, rng: np.random.Generator) -> dict | None:
        try:
            record = self.source[int(index)]
            if self.boxes_dir is not None:
                if "stem" not in record:
                    raise ValueError("guidance.source='boxes' needs a file-based dataset "
                                     "(ade20k / cityscapes / synthetic)")
                record["boxes"] = read_boxes(os.path.join(self.boxes_dir, record["stem"] + ".json"))
        except DataError as e:
            if not self.skip:
                raise
            self.skipped += 1
            self.consecutive += 1
            log.warning("data.on_error=skip: skipped %s (%d skipped in this process)", e,
                        self.skipped)
            if self.consecutive >= self.max_consecutive_skips:
                raise DataError(f"{self.consecutive} records in a row failed; last: {e}") from None
            return None
        self.consecutive = 0
        out = T.train_transform(record, rng, **self.kwargs)
        if self.num_queries is not None:
            masks, n = T.select_proposals(out.pop("proposals"), self.num_queries, rng)
            # Bit-packed all the way to the device (unpacked there by `guidance.cached_masks`):
            # Q=100 masks of a 640 crop are 41 MB as uint8, 5 MB packed -- unpacking on the host
            # made the main process the loader's bottleneck (31 img/s with 16 workers).
            out["proposals_packed"] = np.packbits(masks, axis=-1)
            out["num_proposals"] = np.int32(n)
        return out


# ------------------------------------------------------------------ the training loader
class TrainLoader:
    """Iterator of local batches (dicts of numpy arrays) with an exact-resume state."""

    def __init__(self, dataset, local_batch_size: int, start_state=None):
        self._dataset = dataset
        self._iterator = iter(dataset)
        self.local_batch_size = local_batch_size
        if start_state is not None:
            self.set_state(start_state)

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        return next(self._iterator)

    def close(self) -> None:
        """Stops the read-ahead (threads, worker processes); idempotent.  A loader that is
        dropped without it keeps building its buffered batches until it is collected."""
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "TrainLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def get_state(self) -> bytes:
        """JSON bytes; pass to `build_train_loader(..., start_state=...)` to resume."""
        return json.dumps({"version": _STATE_VERSION, "grain": self._iterator.get_state()},
                          default=_json_default).encode()

    def set_state(self, state: bytes | str | dict) -> None:
        if isinstance(state, (bytes, str)):
            state = json.loads(state)
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"data iterator state version {state.get('version')} != "
                             f"{_STATE_VERSION}")
        self._iterator.set_state(state["grain"])


def _json_default(x):
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, bytes):
        return x.decode()
    raise TypeError(f"data iterator state holds a {type(x).__name__}")


def label_dtype(cfg):
    """uint8 when every class id and the ignore index fit in it, else int32."""
    fits = int(cfg.model.head.num_classes) <= 255 and 0 <= int(cfg.data.ignore_index) <= 255
    return np.uint8 if fits else np.int32


class TrainBatch:
    """grain random_map: record positions [B] of one local batch -> the batch, built here.

    Slot i uses a generator seeded from the batch's generator, so the batch is a function of
    (seed, batch index) alone.  A record that `TrainRecord` skips (`data.on_error=skip`) is
    replaced by the next index of the dataset that reads; `TrainRecord` stops the run after too
    many failures in a row."""

    def __init__(self, record: TrainRecord, num_records: int, single_threaded: bool = False):
        self.record = record
        self.num_records = num_records
        # In a worker process OpenCV must not start its own thread pool: N workers x N
        # threads on N cores oversubscribe the machine.
        self.single_threaded = single_threaded
        self._threads_set = False

    def __call__(self, indices: np.ndarray, rng: np.random.Generator) -> dict:
        if self.single_threaded and not self._threads_set:
            import cv2

            cv2.setNumThreads(1)
            self._threads_set = True
        seeds = rng.integers(0, 2**63 - 1, size=len(indices))
        out: dict[str, np.ndarray] = {}
        for slot, (index, seed) in enumerate(zip(indices, seeds)):
            index = int(index)
            while True:
                rec = self.record(index, np.random.default_rng(int(seed)))
                if rec is not None:
                    break
                index = (index + 1) % self.num_records
            for k, v in rec.items():
                v = np.asarray(v)
                if k not in out:
                    out[k] = np.empty((len(indices),) + v.shape, v.dtype)
                out[k][slot] = v
        return out


def device_inputs(batch: dict, mean, std) -> dict:
    """On the device, inside the step: the loader's compact batch -> what the model takes.

    uint8 `image` [B, h, w, 3] with `image_hw` [B, 2] -> float32 (x - mean) / std, 0 where
    padded (as `transforms.train_transform` computes on the host); a uint8 `label` -> int32.
    Batches that already hold a float image pass through (benchmarks, tests, callers' own)."""
    import jax.numpy as jnp

    batch = dict(batch)
    image = batch["image"]
    hw = batch.pop("image_hw", None)
    if image.dtype == jnp.uint8:
        mean = jnp.asarray(mean, jnp.float32)
        inv_std = 1.0 / jnp.asarray(std, jnp.float32)
        x = (image.astype(jnp.float32) - mean) * inv_std
        if hw is not None:
            _, h, w, _ = image.shape
            inside = ((jnp.arange(h)[None, :, None] < hw[:, 0, None, None])
                      & (jnp.arange(w)[None, None, :] < hw[:, 1, None, None]))
            x = jnp.where(inside[..., None], x, 0.0)
        batch["image"] = x
    if "label" in batch and batch["label"].dtype != jnp.int32:
        batch["label"] = batch["label"].astype(jnp.int32)
    return batch


def unpack_proposals(record: dict, width: int) -> dict:
    """Host-side inverse of the loader's bit packing: `proposals_packed` [..., Q, h, ceil(w/8)]
    -> `proposals` uint8 [..., Q, h, w] (for inspection; the train step unpacks on the
    device)."""
    if "proposals_packed" in record:
        record = dict(record)
        record["proposals"] = np.unpackbits(record.pop("proposals_packed"), axis=-1, count=width)
    return record


def train_indices(num_records: int, seed: int, process_index: int = 0, process_count: int = 1):
    """grain MapDataset of record indices for this process: records i with
    i % process_count == process_index, reshuffled every epoch, repeated forever."""
    import grain

    shard = grain.MapDataset.range(num_records)[process_index::process_count]
    if len(shard) == 0:
        raise DataError(f"process {process_index} of {process_count} gets no training records "
                        f"(only {num_records})")
    return shard.seed(seed).shuffle().repeat(None)


def build_train_loader(cfg, *, seed: int, process_index: int = 0, process_count: int = 1,
                       start_state=None) -> TrainLoader:
    """The training input stream of this process.

    Batches: image uint8 [B, h, w, 3] (padded with 0) with image_hw int32 [B, 2] (its size
    before padding), label [B, h, w] (uint8 or int32: `label_dtype`; 255 ignore), and with
    cached guidance `proposals_packed` uint8 [B, Q, h, ceil(w/8)] (bits of the masks along w,
    `np.packbits` order; `unpack_proposals` restores them) and num_proposals int32 [B];
    B = cfg.train.batch_size // process_count, (h, w) = cfg.data.crop_size.  The train step
    turns them into the model's inputs with `device_inputs`."""
    import grain

    if cfg.train.batch_size % process_count:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} is not divisible by "
                         f"process_count={process_count}")
    local_batch = cfg.train.batch_size // process_count
    source = build_source(cfg, "training")
    workers = int(cfg.data.get("num_workers", 0))
    record = TrainRecord(source, cfg, normalize_image=False, compact_label=True)
    ds = (train_indices(len(source), seed, process_index, process_count)
          .batch(local_batch, drop_remainder=True)
          .random_map(TrainBatch(record, len(source), single_threaded=workers > 0))
          # In this process (no workers) a batch is built when asked for: read-ahead threads
          # would outlive an abandoned loader, and the step's asynchronous dispatch already
          # overlaps building the next batch with the device's work.
          .to_iter_dataset(grain.ReadOptions(num_threads=0 if workers == 0 else 1,
                                             prefetch_buffer_size=2)))
    if workers > 0:
        _absl_flags_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                         per_worker_buffer_size=2))
    return TrainLoader(ds, local_batch, start_state)


def _absl_flags_parsed() -> None:
    """grain's worker pool reads absl flags; outside an absl app they were never parsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


# ------------------------------------------------------------------ evaluation
class EvalDataset:
    """Validation records at their original size: image uint8 [H, W, 3], label int32 [H, W]
    (255 ignore), name, proposals / proposal_scores when guidance is cached, and detector boxes
    (float32 [m, 4] xyxy, pixels) when it is `boxes`.

    Indexing raises on a bad record; iteration follows `data.on_error` (skip logs and counts)."""

    def __init__(self, source, on_error: str = "raise", boxes_dir: str | None = None):
        self.source = source
        self.on_error = on_error
        self.boxes_dir = boxes_dir
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        record = dict(self.source[index])
        record["label"] = record["label"].astype(np.int32)
        if self.boxes_dir is not None:  # guidance.source="boxes": detector boxes, image frame
            if "stem" not in record:
                raise ValueError("guidance.source='boxes' needs a file-based dataset "
                                 "(ade20k / cityscapes / synthetic)")
            record["boxes"] = read_boxes(os.path.join(self.boxes_dir, record["stem"] + ".json"))
        return record

    def __iter__(self) -> Iterator[dict]:
        return self.iter_indices(range(len(self)))

    def iter_indices(self, indices) -> Iterator[dict]:
        """The records at `indices`, in order, with `data.on_error` as in iteration (a process's
        share of a split in multi-process evaluation)."""
        for i in indices:
            try:
                yield self[i]
            except DataError as e:
                if self.on_error != "skip":
                    raise
                self.skipped += 1
                log.warning("data.on_error=skip: skipped %s (%d skipped)", e, self.skipped)


def build_eval_dataset(cfg, split: str = "validation") -> EvalDataset:
    return EvalDataset(build_source(cfg, split), cfg.data.get("on_error", "raise"),
                       boxes_dir=_boxes_dir(cfg, split))


def eval_scale(cfg) -> tuple[int, int]:
    ev = cfg.get("eval")
    return tuple(ev.scale) if ev is not None and "scale" in ev else tuple(cfg.data.scale)


def eval_preprocess(image_uint8: np.ndarray, cfg) -> np.ndarray:
    """Resize(eval scale, keep ratio, bilinear) and normalise: float32 [h, w, 3]."""
    return T.eval_transform(image_uint8, scale=eval_scale(cfg), mean=cfg.data.mean,
                            std=cfg.data.std)


# ------------------------------------------------------------------ host -> device
def to_global_batch(batch_np: dict, mesh, pspec) -> dict:
    """Each process's local batch -> global jax.Arrays sharded as `pspec` over `mesh` (the
    leading axis is the batch; trailing axes not named in `pspec` are replicated)."""
    import jax
    from jax.sharding import NamedSharding

    sharding = NamedSharding(mesh, pspec)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch_np)


def describe(batch: dict) -> dict[str, Any]:
    """{key: (shape, dtype)} of a batch, for logs."""
    return {k: (tuple(v.shape), str(v.dtype)) for k, v in batch.items()}
