"""`sarformer eval`: mIoU of a checkpoint on a validation split (whole / slide / multi-scale+flip).

Per image: resize to the eval scale keeping the ratio (§6.2), run the model on windows (slide,
§1.3) or on the whole image padded to a multiple of 32, average, resize the class scores back to
the original size, argmax, and accumulate intersection/union totals (mmseg IoUMetric).

The model runs on fixed-size window batches inside one jitted function (compiled once per
window shape); cached proposals travel as extra image channels so the slide and flip geometry
applies to them exactly as to the image; detector boxes (`guidance.source="boxes"`) travel the
same way, as one raster channel per box, and each window reads its boxes back from them.
Evaluation is deterministic by default: each image's
proposal slots come from a fixed key (`guidance.deterministic_eval`).

Slide evaluation without TTA runs the windows of consecutive images in batches split over the
mesh's devices (`parallel_predictions`, `eval.parallel`); otherwise one image's windows go at a
time, and a call's windows are copied to every device of the mesh.  Either way an image's labels
go to the host only once the next image's work is queued, so host and device work overlap.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys
from typing import Any

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from sarformer_jax import inference
from sarformer_jax.config import Config, load_config
from sarformer_jax.guidance import init_stale_embedding, guidance_refusal, uses_sam
from sarformer_jax.metrics import IoUAccumulator, format_table, to_json
from sarformer_jax.models.mask2former import prepare_proposals, semantic_inference
from sarformer_jax.sharding import replicated

PAD_MULTIPLE = 32


def make_window_fn(cfg: Config, trainer, *, with_proposals: bool):
    """`(params, stats, windows [N, h, w, 3 (+Q)], key) -> scores [N, h, w, K]`, jitted.

    Cached proposals arrive as the extra channels; with online guidance SAM runs on each window
    inside the same jit (its params are `trainer.guide`)."""
    from flax import nnx

    graphdef, rest = trainer.graphdef, trainer.rest
    q = int(cfg.model.head.num_queries)
    noise = bool(cfg.guidance.noise_placeholders)
    invert = bool(cfg.guidance.invert_first_mask)
    deterministic = bool(cfg.guidance.get("deterministic_eval", True))

    online = uses_sam(cfg)
    with_boxes = online and cfg.guidance.source == "boxes"

    @jax.jit
    def fn(params, stats, windows, key, guide):
        model = nnx.merge(graphdef, params, stats, rest)
        image = windows[..., :3]
        proposals = None
        if online:
            batch = {"image": image}
            if with_boxes:  # box rasters -> the boxes in this window's frame
                batch["boxes"] = boxes_from_channels(windows[..., 3:])
            proposals = trainer.proposal_fn(batch, key, deterministic, guide)
        elif with_proposals:
            props = jnp.moveaxis(windows[..., 3:3 + q], -1, 1) >= 0.5  # [N, Q, h, w]
            valid = jnp.any(props, axis=(2, 3))  # a slot with no pixel in this window is empty
            proposals = prepare_proposals(key, props, valid, q, noise_placeholders=noise,
                                          deterministic=deterministic)
        preds, _, _ = model(image, proposals, train=False, invert_first_mask=invert)
        last = preds[-1]
        return semantic_inference(last["cls"], last["mask"], image.shape[1:3])

    def call(params, stats, windows, key):
        if online and cfg.guidance.seed_compat:  # §8 #1: the first window's embedding, kept
            trainer.guide = init_stale_embedding(cfg, trainer.sam_graphdef, trainer.guide,
                                                 windows[..., :3], replicated(trainer.mesh))
        return fn(params, stats, windows, key, trainer.guide)

    return call


def cached_window_fn(cfg: Config, trainer, *, with_proposals: bool):
    """`make_window_fn`, built (and compiled) once per trainer and guidance setting."""
    cache = trainer.__dict__.setdefault("_window_fns", {})
    key = (with_proposals, int(cfg.model.head.num_queries), bool(cfg.guidance.noise_placeholders),
           bool(cfg.guidance.invert_first_mask), bool(cfg.guidance.get("deterministic_eval", True)))
    if key not in cache:
        cache[key] = make_window_fn(cfg, trainer, with_proposals=with_proposals)
    return cache[key]


def box_channels(boxes: np.ndarray, size: tuple[int, int], orig: tuple[int, int],
                 max_boxes: int) -> np.ndarray:
    """Detector boxes (float [m, 4] xyxy in the original image's pixels) -> float32 [h, w, M]
    rasters at the eval size (h, w): channel j is 1 on the pixels whose centre lies inside box j
    scaled to that size (the first M boxes; missing slots are empty).

    The boxes travel as image channels so that every geometric step of inference (window crops,
    multi-scale resize, flip, padding) applies to them as to the image; `boxes_from_channels`
    reads each window's boxes back as the bounding boxes of its rasters (to the pixel)."""
    h, w = size
    h0, w0 = orig
    out = np.zeros((h, w, max_boxes), np.float32)
    b = np.asarray(boxes, np.float64).reshape(-1, 4)[:max_boxes]
    cy, cx = np.arange(h) + 0.5, np.arange(w) + 0.5
    for j, (x1, y1, x2, y2) in enumerate(b):
        ys = (cy > y1 * h / h0) & (cy < y2 * h / h0)
        xs = (cx > x1 * w / w0) & (cx < x2 * w / w0)
        out[..., j] = ys[:, None] & xs[None, :]
    return out


def boxes_from_channels(channels: jax.Array) -> jax.Array:
    """[N, h, w, M] box rasters (any float, thresholded at 0.5) -> [N, M, 4] float32 xyxy
    boxes (pixel edges: x2 = last column + 1), NaN rows for slots with no pixel in the window."""
    on = channels >= 0.5
    rows, cols = jnp.any(on, axis=2), jnp.any(on, axis=1)  # [N, h, M], [N, w, M]
    h, w = channels.shape[1], channels.shape[2]

    def span(mask, n):  # first index, last index + 1 along axis 1
        first = jnp.argmax(mask, axis=1)
        last = n - jnp.argmax(mask[:, ::-1], axis=1)
        return first.astype(jnp.float32), last.astype(jnp.float32)

    y1, y2 = span(rows, h)
    x1, x2 = span(cols, w)
    boxes = jnp.stack([x1, y1, x2, y2], axis=-1)
    valid = jnp.any(rows, axis=1)
    return jnp.where(valid[..., None], boxes, jnp.nan)


def _proposal_channels(record: dict, size: tuple[int, int], q: int) -> np.ndarray:
    """Cached proposals (bool [N, H0, W0]) -> uint8 [h, w, Q] channels at the eval size
    (nearest), the first Q by score; missing slots are empty."""
    h, w = size
    out = np.zeros((h, w, q), np.uint8)
    masks = record.get("proposals")
    if masks is None or len(masks) == 0:
        return out
    scores = record.get("proposal_scores")
    order = np.argsort(-np.asarray(scores)) if scores is not None else np.arange(len(masks))
    for slot, i in enumerate(order[:q]):
        out[..., slot] = cv2.resize(masks[i].astype(np.uint8), (w, h),
                                    interpolation=cv2.INTER_NEAREST)
    return out


def proposal_channels_on_device(record: dict, size: tuple[int, int], q: int) -> jax.Array:
    """`_proposal_channels` computed on the device: the first Q masks by score travel
    bit-packed at their stored size and are resized there (OpenCV INTER_NEAREST indices), which
    moves ~8x (h*w / H0*W0) fewer bytes than the resized uint8 channels.  Returns float32
    [h, w, Q]."""
    from sarformer_jax.data.transforms import nearest_index

    h, w = size
    masks = record.get("proposals")
    if masks is None or len(masks) == 0:
        return jnp.zeros((h, w, q), jnp.float32)
    scores = record.get("proposal_scores")
    order = np.argsort(-np.asarray(scores)) if scores is not None else np.arange(len(masks))
    chosen = np.asarray(masks)[order[:q]].astype(bool)
    n, h0, w0 = chosen.shape
    packed = jnp.asarray(np.packbits(chosen, axis=-1))
    return _resize_packed(packed, jnp.asarray(nearest_index(h0, h)),
                          jnp.asarray(nearest_index(w0, w)), w0, q)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _resize_packed(packed, ys, xs, width, q):
    m = jnp.unpackbits(packed, axis=-1, count=width)[:, ys][:, :, xs]  # [n, h, w]
    m = jnp.moveaxis(m, 0, -1).astype(jnp.float32)
    return jnp.pad(m, ((0, 0), (0, 0), (0, q - m.shape[-1])))


def predict_scores(cfg: Config, window_fn, params, stats, record: dict, index: int, *,
                   mode: str, aug_test: bool, with_proposals: bool,
                   labels: bool = False, to_host: bool = True) -> np.ndarray | jax.Array:
    """Class scores [H0, W0, K] float32 for one record (original size), or with `labels` their
    argmax [H0, W0] int32 taken on the device (a K-times smaller transfer to the host).
    `to_host=False` returns the device array without waiting for it."""
    from sarformer_jax.data.pipeline import eval_preprocess

    image = record["image"]
    h0, w0 = image.shape[:2]
    x = jnp.asarray(eval_preprocess(image, cfg))  # [h, w, 3] normalised, at the eval scale
    if with_proposals:  # resized on the device from the bit-packed masks
        props = proposal_channels_on_device(record, x.shape[:2], int(cfg.model.head.num_queries))
        x = jnp.concatenate([x, props.astype(x.dtype)], -1)
    if uses_sam(cfg) and cfg.guidance.source == "boxes":
        if "boxes" not in record:
            raise ValueError(f"{record.get('name', index)}: guidance.source='boxes' needs the "
                             "image's detector boxes (guidance.boxes_dir/<split>/<stem>.json)")
        boxes = box_channels(record["boxes"], x.shape[:2], (h0, w0), int(cfg.guidance.max_boxes))
        x = jnp.concatenate([x, jnp.asarray(boxes, x.dtype)], -1)
    key = inference.eval_key(int(cfg.train.seed), index)
    k = int(cfg.model.head.num_classes)
    ev = cfg.eval

    def prob_fn(windows):
        return window_fn(params, stats, windows, key)

    def whole_fn(img):  # pad to a multiple of 32 (bottom / right, mean colour = 0), crop back
        hh, ww = img.shape[1:3]
        ph, pw = -hh % PAD_MULTIPLE, -ww % PAD_MULTIPLE
        padded = jnp.pad(img, ((0, 0), (0, ph), (0, pw), (0, 0)))
        return prob_fn(padded)[:, :hh, :ww]

    fn = prob_fn if mode == "slide" else whole_fn
    batch = x[None]
    if aug_test:
        scores = inference.aug_inference(fn, batch, k, scale=None, scales=tuple(ev.scales),
                                         flip=bool(ev.flip), mode=mode, crop=tuple(ev.crop_size),
                                         stride=tuple(ev.stride), out_size=(h0, w0),
                                         window_batch=int(ev.batch_size))
    else:
        scores = inference.aug_inference(fn, batch, k, scale=None, scales=(1.0,), flip=False,
                                         mode=mode, crop=tuple(ev.crop_size),
                                         stride=tuple(ev.stride), out_size=(h0, w0),
                                         window_batch=int(ev.batch_size))
    out = jnp.argmax(scores[0], axis=-1).astype(jnp.int32) if labels else scores[0]
    return np.asarray(out) if to_host else out


def parallel_refusal(cfg: Config, trainer, mode: str, aug_test: bool) -> str | None:
    """None when `parallel_predictions` applies (`eval.parallel`, default "auto"), else why not.

    The parallel path runs the windows of consecutive images together, split over every device
    of the mesh (with several processes, each process's own images on its own devices), instead
    of one image's windows at a time with each call's windows copied to every device (and every
    process evaluating every image); and it takes an image's result to the host only after the
    next image's work is queued.  On one device with `eval.batch_size` 1 it runs the per-image
    path's programs.  It needs slide mode without multi-scale / flip (every window has the
    crop's size) and a window computation that does not depend on the image's key:
    deterministic evaluation, or no proposals at all.  Detector boxes and the original's stale
    SAM embedding (`seed_compat`) keep the per-image path.  `eval.parallel=True` makes any of
    these an error; False always takes the per-image path."""
    flag = cfg.eval.get("parallel", "auto")
    if flag not in ("auto", True, False):
        raise ValueError(f"eval.parallel must be auto, True or False, got {flag!r}")
    if flag is False:
        return "eval.parallel=False"
    reason = None
    if mode != "slide":
        reason = f"mode {mode!r} (needs 'slide')"
    elif aug_test:
        reason = "multi-scale / flip test (aug_test)"
    elif cfg.guidance.source == "boxes" and uses_sam(cfg):
        reason = "guidance.source='boxes'"
    elif uses_sam(cfg) and cfg.guidance.seed_compat:
        reason = "guidance.seed_compat (the stale embedding of the first window)"
    elif (uses_sam(cfg) or cfg.model.head.query_init == "sam_pooling") and not bool(
            cfg.guidance.get("deterministic_eval", True)):
        reason = "guidance.deterministic_eval=False (each image's own key)"
    if reason and flag is True:
        raise ValueError(f"eval.parallel=True, but the parallel evaluation cannot run here: {reason}")
    return reason


def parallel_predictions(cfg: Config, window_fn, params, stats, records, mesh, *,
                         with_proposals: bool, labels: bool = True):
    """Yields (label [H0, W0], prediction) per record, in order: the argmax class map (int32),
    or with `labels=False` the class scores [H0, W0, K] float32.  The same per-image results as
    `predict_scores` in slide mode without TTA, computed differently: the windows of consecutive
    images are queued and run `per_call` at a time (`eval.batch_size` rounded up to a multiple
    of the mesh's devices), split over the devices (`sharding.batch_sharding`); a call short of
    windows is padded with zero windows.  Each image's outputs are then merged, resized and
    reduced on this process's first device of the mesh.

    Several processes: each passes its own records (`evaluate_state` deals them round robin)
    and fills the rows of each call that its own devices hold; before every call the processes
    agree (one small all-gather) whether any of them has windows left, so that all run the same
    number of calls.  See `parallel_refusal` for when this path applies."""
    import collections

    from sarformer_jax.data.pipeline import eval_preprocess
    from sarformer_jax.models.layers import resize_bilinear
    from sarformer_jax.sharding import batch_sharding

    ev = cfg.eval
    n_dev = mesh.size
    per_call = -(-max(int(ev.batch_size), n_dev) // n_dev) * n_dev
    sharding = batch_sharding(mesh)
    first = mesh.local_devices[0]
    key = inference.eval_key(int(cfg.train.seed), 0)  # unused: see parallel_refusal
    q = int(cfg.model.head.num_queries)
    queued, outs = [], []  # windows not run yet; outputs not merged yet (device arrays)
    images = collections.deque()  # (label, layout, original size, windows) in order
    records = iter(records)
    exhausted = False
    local_rows = mine_rows = None  # this process's row ranges of a call, and how many

    def call(chunk, global_shape):
        """Places this process's `chunk` (its rows of the call, in row order) and runs the
        window function; returns this process's rows of the output, on `first`."""
        pieces = [jax.device_put(chunk[lo:lo + (b - a)], d) for d, (a, b), lo in local_rows]
        windows = jax.make_array_from_single_device_arrays(global_shape, sharding, pieces)
        out = window_fn(params, stats, windows, key)
        shards = sorted(out.addressable_shards, key=lambda sh: sh.index[0].start or 0)
        parts = [jax.device_put(sh.data, first) for sh in shards]
        return jnp.concatenate(parts) if len(parts) > 1 else parts[0]

    ready = collections.deque()  # (label, device result) of finished images, not yet yielded

    def finished(lag: int = 1):
        """Merges the images whose windows have all run, then yields all but the last `lag`
        of them: an image's result goes to the host (which waits for it) only once the next
        image's work is queued on the device, so host preparation and device work overlap."""
        nonlocal outs
        done = sum(o.shape[0] for o in outs)
        while images and images[0][3] <= done:
            label, layout, size, n = images.popleft()
            allo = jnp.concatenate(outs) if len(outs) > 1 else outs[0]
            mine, rest = allo[:n], allo[n:]
            outs = [rest] if rest.shape[0] else []
            done -= n
            scores = resize_bilinear(inference.slide_join(mine, layout), size)[0]
            ready.append((label, jnp.argmax(scores, axis=-1).astype(jnp.int32) if labels else scores))
        while len(ready) > lag:
            label, result = ready.popleft()
            yield label, np.asarray(result)

    while True:
        waiting = sum(w.shape[0] for w in queued)
        need = per_call if mine_rows is None else mine_rows
        while waiting < need and not exhausted:
            record = next(records, None)
            if record is None:
                exhausted = True
                break
            image = record["image"]
            with jax.default_device(first):
                x = jnp.asarray(eval_preprocess(image, cfg))  # [h, w, 3], at the eval scale
                if with_proposals:
                    props = proposal_channels_on_device(record, x.shape[:2], q)
                    x = jnp.concatenate([x, props.astype(x.dtype)], -1)
                crops, layout = inference.slide_split(x[None].astype(jnp.float32),
                                                      tuple(ev.crop_size), tuple(ev.stride))
            queued.append(crops)
            images.append((record["label"], layout, image.shape[:2], crops.shape[0]))
            waiting += crops.shape[0]
        if local_rows is None:
            if not queued:  # nothing to learn the window shape from (no record here)
                shape = None
            else:
                shape = (per_call,) + tuple(queued[0].shape[1:])
            shape = _agree_on_shape(shape)
            if shape is None:
                return
            global_shape = shape
            local_rows, mine_rows = _local_rows(sharding, global_shape)
            need = mine_rows
            continue  # fill up to this process's share before the first call
        if _any_process(waiting > 0) is False:
            break
        allw = (jnp.concatenate(queued) if len(queued) > 1 else queued[0]) if queued else None
        with jax.default_device(first):
            if allw is None:
                allw = jnp.zeros((0,) + global_shape[1:], jnp.float32)
            chunk, rest = allw[:mine_rows], allw[mine_rows:]
            real = chunk.shape[0]
            if real < mine_rows:
                chunk = jnp.pad(chunk, ((0, mine_rows - real), (0, 0), (0, 0), (0, 0)))
        outs.append(call(chunk, global_shape)[:real])
        queued = [rest] if rest.shape[0] else []
        yield from finished()
    yield from finished(lag=0)


def _local_rows(sharding, global_shape):
    """([(device, (first row, end row), row in this process's chunk)], rows this process holds)
    of a batch-sharded [N, ...] call, in row order."""
    index_map = sharding.addressable_devices_indices_map(global_shape)
    spans = sorted(((idx[0].start or 0, idx[0].stop if idx[0].stop is not None else global_shape[0]), d)
                   for d, idx in index_map.items())
    rows, lo = [], 0
    for (a, b), d in spans:
        rows.append((d, (a, b), lo))
        lo += b - a
    return rows, lo


def _any_process(flag: bool) -> bool:
    """True when `flag` holds in any process (an all-gather when there are several)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.int32(bool(flag)))).any())


def _agree_on_shape(shape):
    """The window batch shape every process will use: this process's, or, when it has no
    record, another's (all processes' shapes are the same: crop size and channels come from
    the config).  None when no process has any window."""
    if jax.process_count() == 1:
        return shape
    from jax.experimental import multihost_utils

    mine = np.asarray(shape if shape is not None else (0, 0, 0, 0), np.int32)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, 4)
    have = [tuple(int(v) for v in s) for s in every if s[0] > 0]
    if not have:
        return None
    if len(set(have)) > 1:
        raise ValueError(f"parallel evaluation: the processes' window batches differ: {sorted(set(have))}")
    return have[0]


def sum_over_processes(totals: np.ndarray) -> np.ndarray:
    """int64 array summed over the processes (exact: sent as three 21-bit int32 limbs, since
    jax without x64 would cast int64 to int32)."""
    if jax.process_count() == 1:
        return totals
    from jax.experimental import multihost_utils

    t = np.asarray(totals, np.int64)
    if (t < 0).any() or (t >= 2 ** 62).any():
        raise ValueError("sum_over_processes: totals must lie in [0, 2**62)")
    mask = (1 << 21) - 1
    limbs = np.stack([(t >> 42) & mask, (t >> 21) & mask, t & mask]).astype(np.int32)
    every = np.asarray(multihost_utils.process_allgather(limbs)).astype(np.int64)
    every = every.reshape((jax.process_count(),) + limbs.shape).sum(0)
    return (every[0] << 42) + (every[1] << 21) + every[2]


def evaluate_state(cfg: Config, trainer, state: dict, *, progress: bool = True,
                   mode: str | None = None, aug_test: bool | None = None,
                   split: str = "validation", dataset=None) -> dict[str, Any]:
    """mIoU etc. of `state` on `split` (see module doc).  Returns `metrics.compute()` results
    plus `num_images` and `skipped`."""
    from sarformer_jax.data.pipeline import build_eval_dataset

    mode = mode or cfg.eval.mode
    aug_test = cfg.eval.aug_test if aug_test is None else aug_test
    dataset = dataset if dataset is not None else build_eval_dataset(cfg, split)
    with_proposals = (cfg.model.head.query_init == "sam_pooling"
                      and cfg.guidance.source == "cached")
    window_fn = cached_window_fn(cfg, trainer, with_proposals=with_proposals)
    params, stats = state["params"], state["batch_stats"]
    if hasattr(trainer, "params_tree"):  # a train state with its parameters held flat
        params = trainer.params_tree(params)
    acc = IoUAccumulator(int(cfg.model.head.num_classes), ignore_index=int(cfg.data.ignore_index))
    from tqdm.auto import tqdm

    n = 0
    procs, me = jax.process_count(), jax.process_index()
    parallel = parallel_refusal(cfg, trainer, mode, aug_test) is None
    if parallel and procs > 1:  # each process its own images, round robin
        mine = range(me, len(dataset), procs)
        records = (dataset.iter_indices(mine) if hasattr(dataset, "iter_indices")
                   else (dataset[i] for i in mine))
        records = tqdm(records, desc="eval", unit="img", total=len(mine),
                       disable=not progress or me != 0)
    else:
        records = tqdm(dataset, desc="eval", unit="img", disable=not progress)
    if parallel:
        for label, pred in parallel_predictions(cfg, window_fn, params, stats, records,
                                                trainer.mesh, with_proposals=with_proposals):
            acc.update(pred, label)
            n += 1
    else:
        pending = None  # the previous image's labels, still on the device
        for i, record in enumerate(records):
            pred = predict_scores(cfg, window_fn, params, stats, record, i, mode=mode,
                                  aug_test=aug_test, with_proposals=with_proposals, labels=True,
                                  to_host=False)
            if pending is not None:  # fetched once this image's work is queued
                acc.update(np.asarray(pending[0]), pending[1])
            pending = (pred, record["label"])
            n += 1
        if pending is not None:
            acc.update(np.asarray(pending[0]), pending[1])
    skipped = int(getattr(dataset, "skipped", 0))
    if parallel and procs > 1:  # every process counted its own images
        acc.totals = sum_over_processes(acc.totals)
        n, skipped = (int(v) for v in sum_over_processes(np.asarray([n, skipped], np.int64)))
    results = acc.compute()
    results["num_images"] = n
    results["skipped"] = skipped
    return results


def load_for_eval(cfg: Config, checkpoint: str | pathlib.Path):
    """(trainer, state, step) from a workdir (best checkpoint if any, else the latest), from
    a `checkpoints/<step>` / `best/<step>` directory, or from a converted .npz of the whole
    model (`sarformer convert sarformer`: the original's released weights; step None).  A
    checkpoint of another architecture is refused naming the mismatched parameters."""
    from sarformer_jax import checkpoint as ckpt_lib
    from sarformer_jax.train import _check_resume_shapes, abstract_fingerprint, create_trainer

    path = pathlib.Path(checkpoint)
    if path.suffix == ".npz":
        from sarformer_jax.convert.common import CheckpointError, load_params
        from sarformer_jax.convert.mmseg import FORMAT as WHOLE_MODEL

        fmt = load_params(path, meta_only=True)[1].get("format")
        if fmt != WHOLE_MODEL:
            raise CheckpointError(f"{path}: evaluation needs the whole model (`sarformer convert "
                                  f"sarformer`), this file's format is {fmt!r}")
        trainer, state = create_trainer(cfg, init_from=str(path))
        return trainer, state, None
    step = None
    best = False
    if path.name.isdigit() and path.parent.name in ("checkpoints", "best"):
        step, best, workdir = int(path.name), path.parent.name == "best", path.parent.parent
    else:
        workdir = path
        best = (path / "best").is_dir() and any((path / "best").iterdir())
    if not (workdir / "checkpoints").is_dir() and not (workdir / "best").is_dir():
        raise FileNotFoundError(f"{checkpoint}: no checkpoints/ or best/ directory")
    ck = ckpt_lib.Checkpointer(workdir, async_save=False)
    try:
        extra, step = ck.restore_extra(step, best=best)
        _check_resume_shapes(extra.get("shapes", {}), abstract_fingerprint(cfg))
        trainer, state = create_trainer(cfg)
        state, _, step = ck.restore(ckpt_lib.abstract_like(state), step, best=best)
    finally:
        ck.close()
    return trainer, state, step


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny", help="config file or name")
    parser.add_argument("--checkpoint", required=True, help="workdir or checkpoint directory")
    parser.add_argument("--data-root", default=None, help="overrides data.root")
    parser.add_argument("--mode", choices=("whole", "slide"), default=None)
    parser.add_argument("--aug-test", action="store_true", help="multi-scale + flip")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--out", default=None, help="folder for results.md / results.json "
                        "(default: the checkpoint's workdir)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")


def run(args: argparse.Namespace) -> int:
    overrides = list(args.set)
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    cfg = load_config(args.config, overrides)
    refusal = guidance_refusal(cfg, "eval")
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    from sarformer_jax.convert.common import CheckpointError
    from sarformer_jax.data.sources import DataError
    from sarformer_jax.predict import class_names_and_palette
    from sarformer_jax.train import ConfigMismatchError

    try:
        trainer, state, step = load_for_eval(cfg, args.checkpoint)
    except (ConfigMismatchError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        results = evaluate_state(cfg, trainer, state, mode=args.mode, aug_test=args.aug_test,
                                 split=args.split)
    except DataError as e:  # a bad image or label: one line, no results written
        print(f"error: {e}", file=sys.stderr)
        return 1
    names, _ = class_names_and_palette(cfg)
    table = format_table(results, names)
    print(table)
    out = pathlib.Path(args.out) if args.out else pathlib.Path(args.checkpoint)
    if out.suffix == ".npz":  # converted weights: the results go beside the file
        out = out.parent
    elif out.name.isdigit():
        out = out.parent.parent
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(
        to_json(results, names, step=step, config=cfg.name, mode=args.mode or cfg.eval.mode,
                aug_test=bool(args.aug_test)))
    print(f"mIoU {100 * results['mIoU']:.2f} on {results['num_images']} images "
          f"({'converted weights' if step is None else f'checkpoint step {step}'}); wrote "
          f"{out / 'results.md'} and results.json")
    return 0
