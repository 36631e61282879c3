"""Mask2Former losses as SARFormer trains them (mmdet 3.x `Mask2FormerHead.loss_by_feat`),
ARCHITECTURE.md §5: Hungarian matching on point-sampled costs, class cross-entropy with a
down-weighted "no object" class, importance-sampled mask BCE and dice, deep supervision over
every prediction, and the auxiliary FCN head's cross-entropy.

Everything is jittable with fixed shapes: the ground truth of an image is one slot per class
(`K` slots, valid where the class is present; the semantic map is point-sampled directly, so the
[K, H, W] masks are never built), matching runs on the device (`sarformer_jax.matcher`), and the
matched pairs live in `M = min(Q, K)` slots with a validity flag.  Random point coordinates are
drawn by `draw_points` from a key and can be injected, which is how the tests compare against an
implementation with its own random generator.

Legend: b batch, q queries, k classes, m matched slots, p points, h w spatial.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sarformer_jax.config import env_switch
from sarformer_jax.matcher import hungarian_assign
from sarformer_jax.models.layers import f32_dot_precision, resize_bilinear
from sarformer_jax.sharding import batch_partitioned, on_batch_shards, per_batch_shard

IGNORE_INDEX = 255
HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------
# point sampling (torch `point_sample` = grid_sample(bilinear, align_corners=False, zeros))


def _corners(points: jax.Array, h: int, w: int):
    """Four bilinear corners of [..., 2] (x, y) points in [0, 1]: flat indices [4, ...] into an
    [h, w] map and weights [4, ...] (zero for corners outside the map)."""
    x = points[..., 0] * w - 0.5
    y = points[..., 1] * h - 0.5
    x0, y0 = jnp.floor(x), jnp.floor(y)
    fx, fy = x - x0, y - y0
    idx, wts = [], []
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            xi, yi = x0 + dx, y0 + dy
            inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
            flat = jnp.clip(yi, 0, h - 1).astype(jnp.int32) * w + jnp.clip(xi, 0, w - 1).astype(jnp.int32)
            idx.append(flat)
            wts.append(jnp.where(inside, wx * wy, 0.0))
    return jnp.stack(idx), jnp.stack(wts)


def point_sample(maps: jax.Array, points: jax.Array) -> jax.Array:
    """Bilinear samples of maps [N, h, w] at points [N, P, 2] or shared points [P, 2] ((x, y) in
    [0, 1]); zero outside.  Returns [N, P] float32."""
    if points.ndim == 2:
        return point_sample_shared(maps, points).T
    n, h, w = maps.shape
    idx, wts = _corners(points.astype(jnp.float32), h, w)
    flat = maps.reshape(n, h * w).astype(jnp.float32)
    vals = jax.vmap(lambda f, i: f[i], in_axes=(0, 1), out_axes=1)(flat, idx)  # [4, N, P]
    return jnp.sum(vals * wts, axis=0)


def point_sample_shared(maps: jax.Array, points: jax.Array) -> jax.Array:
    """`point_sample` of maps [N, h, w] at points [P, 2] shared by all maps, points first:
    returns [P, N] float32.  The maps are read pixel-major ([h*w, N]), so that a corner's N
    values are one contiguous row (gathered from [N, h*w] the values of neighbouring outputs
    lay h*w apart: the matching's 100 x 12544 samples per image and layer ran at ~300 GB/s),
    and the result is written in the same order (written as [N, P] it was a transposing
    kernel: 0.46 ms of the H100 step at 455 GB/s, train run 34)."""
    n, h, w = maps.shape
    idx, wts = _corners(points.astype(jnp.float32), h, w)  # [4, P]
    rows = maps.reshape(n, h * w).T
    vals = rows[idx].astype(jnp.float32)  # [4, P, N]
    return jnp.einsum("cpn,cp->pn", vals, wts, precision=HIGHEST)


def sample_gt_shared(gt: jax.Array, points: jax.Array, num_classes: int,
                     points_first: bool = False) -> jax.Array:
    """Point samples of every class mask `(gt == k)` of one semantic map [H, W] at shared points
    [P, 2].  Returns [K, P] float32 ([P, K] with `points_first`; ignored pixels count as
    background everywhere)."""
    return sample_gt_classes_shared(gt, points, jnp.arange(num_classes), points_first)


def sample_gt_classes_shared(gt: jax.Array, points: jax.Array, classes: jax.Array,
                             points_first: bool = False) -> jax.Array:
    """`sample_gt_shared` for the class masks `(gt == classes[j])` of the classes [C] given:
    [C, P] float32 ([P, C] with `points_first`)."""
    h, w = gt.shape
    idx, wts = _corners(points.astype(jnp.float32), h, w)
    labels = gt.reshape(-1)[idx]  # [4, P]
    hit = labels[..., None] == classes  # [4, P, C]
    # each corner's weight put in its label's column: one elementwise pass that writes [P, K]
    # (as a product with the one-hot [4, P, K] it is a matrix product contracting only 4)
    out = jnp.sum(jnp.where(hit, wts[..., None], 0.0), axis=0)  # [P, K]
    return out if points_first else out.T


def sample_gt_slots(gt: jax.Array, points: jax.Array, classes: jax.Array) -> jax.Array:
    """Samples of `(gt == classes[m])` at points [M, P, 2]; returns [M, P] float32."""
    h, w = gt.shape
    idx, wts = _corners(points.astype(jnp.float32), h, w)  # [4, M, P]
    labels = gt.reshape(-1)[idx]
    return jnp.sum(jnp.where(labels == classes[None, :, None], wts, 0.0), axis=0)


# ----------------------------------------------------------------------------------------------
# random points


def num_importance_points(cfg_loss: Any) -> int:
    return int(cfg_loss.importance_sample_ratio * cfg_loss.num_points)


def draw_layer_points(key: jax.Array, layer, batch: int, cfg_loss: Any) -> dict:
    """Random points of prediction `layer` (a Python or traced int): `match` [B, P, 2], uniform
    points shared by all queries and classes of an image, and `slot_keys` [B], one PRNG key per
    image, from which `slot_points` draws each matched slot's own points.

    Instead of keys, `candidates` [B, M, P*oversample, 2] and `extra` [B, M, P - P*importance, 2]
    may be given (injected points, as the tests do)."""
    k1, k2 = jax.random.split(jax.random.fold_in(key, layer))
    return {"match": jax.random.uniform(k1, (batch, cfg_loss.num_points, 2)),
            "slot_keys": jax.random.split(k2, batch)}


def draw_points(key: jax.Array, batch: int, num_layers: int, cfg_loss: Any) -> list[dict]:
    """`draw_layer_points` for layers 0 .. num_layers - 1."""
    return [draw_layer_points(key, layer, batch, cfg_loss) for layer in range(num_layers)]


def slot_points(pts: dict, slots: jax.Array, cfg_loss: Any) -> tuple[jax.Array, jax.Array]:
    """One image's importance-sampling pool [S, P*oversample, 2] and fresh uniform points
    [S, P - P*importance, 2] for its slots `slots` [S].  Slot s draws from `fold_in(key, s)`,
    so its points do not depend on which other slots are drawn: the loss program capped to the
    matched slots draws only those and gets the same points as the all-slots one."""
    if "candidates" in pts:
        return pts["candidates"][slots], pts["extra"][slots]
    key = pts["slot_keys"]
    p = cfg_loss.num_points
    n_cand = int(p * cfg_loss.oversample_ratio)
    n_extra = p - num_importance_points(cfg_loss)

    def one(s):
        kc, ke = jax.random.split(jax.random.fold_in(key, s))
        return jax.random.uniform(kc, (n_cand, 2)), jax.random.uniform(ke, (n_extra, 2))

    return jax.vmap(one)(slots)


# ----------------------------------------------------------------------------------------------
# per-image matching and losses


def gt_present(gt: jax.Array, num_classes: int) -> jax.Array:
    """[B, H, W] int semantic maps -> [B, K] bool, class k present (255 and >= K ignored).

    A reduction over pixels of `label == k`, not a scatter of every pixel into K slots: on the GPU
    that scatter (409,600 writes per 640² image onto 150 addresses) took 0.65 ms a step."""
    b = gt.shape[0]
    lab = gt.reshape(b, -1).astype(jnp.int32)
    return jnp.any(lab[:, :, None] == jnp.arange(num_classes, dtype=jnp.int32), axis=1)


def match_gather_once() -> bool:
    """`SARFORMER_MATCH_GATHER_ONCE` (default 0 until timed on the GPU): `match_costs` writes its
    product's left operand once, behind an optimisation barrier, and takes the sums over the
    points from it, instead of leaving XLA to fuse the point samples' gathers into both.  The
    arithmetic is the same either way (tests/test_losses.py)."""
    return env_switch("SARFORMER_MATCH_GATHER_ONCE", False)


def match_costs(cls: jax.Array, point_logits: jax.Array, point_targets: jax.Array, cfg_loss: Any,
                *, points_first: bool = False, classes: jax.Array | None = None) -> jax.Array:
    """Matching cost [Q, K] of one image: class `-softmax[label]`, pairwise point BCE and dice
    (eps 1, sigmoid inputs), weighted 2 / 5 / 5.  `point_logits` [Q, P] and `point_targets`
    [K, P], or [P, Q] and [P, K] with `points_first`.

    The pairwise BCE sum_p softplus(-l) t + softplus(l) (1 - t) is computed as
    sum_p (-l) t + sum_p softplus(l), by softplus(-l) - softplus(l) = -l, so the BCE and the dice
    numerator share one float32 product: [-l; sigmoid(l)] [2Q, P] times the targets (three
    full-precision products before; the loss's float32 GEMMs, mostly these, took ~1.1 ms of the
    H100 step's kernels in train run 34).

    `classes` [K']: the targets are those classes' masks (`sample_gt_classes_shared`), and the
    class cost takes their columns of the softmax (default: classes 0 .. K-1)."""
    probs = jax.nn.softmax(cls.astype(jnp.float32), axis=-1)
    if points_first:
        n_p, q = point_logits.shape
        k = point_targets.shape[1]
        p_axis = 0
    else:
        q, n_p = point_logits.shape
        k = point_targets.shape[0]
        p_axis = 1
    probs = probs[:, :k] if classes is None else probs[:, classes]
    l = point_logits.astype(jnp.float32)
    lhs = jnp.concatenate([-l, jax.nn.sigmoid(l)], axis=1 - p_axis)  # [P, 2Q] or [2Q, P]
    if match_gather_once():
        # written once and read by the product and the sums below: left to fuse, the point
        # samples' gathers ran in both the fusion writing `lhs` and the one summing over the
        # points (docs/benchmarks.md, train run 50)
        lhs = jax.lax.optimization_barrier(lhs)
    neg_l, sig = jnp.split(lhs, 2, axis=1 - p_axis)  # -l exactly, so softplus(-neg_l) is of l
    neg_sum = jnp.sum(jax.nn.softplus(-neg_l), axis=p_axis)  # [Q]: sum_p BCE(l, 0)
    t_axis = 0 if points_first else 1
    prod = jax.lax.dot_general(lhs, point_targets, (((p_axis,), (t_axis,)), ((), ())),
                               precision=f32_dot_precision())  # [2Q, K]
    ce = (prod[:q] + neg_sum[:, None]) / n_p
    num = 2.0 * prod[q:]
    den = sig.sum(p_axis)[:, None] + point_targets.sum(t_axis)[None, :]
    dice = 1.0 - (num + 1.0) / (den + 1.0)
    return cfg_loss.class_weight * -probs + cfg_loss.mask_weight * ce + cfg_loss.dice_weight * dice


def _image_cost(cls, mask, gt, pts_match, cfg_loss, num_classes, classes=None):
    """Matching cost [Q, K] of one image and layer (no gradient); [Q, C] for the classes [C]
    given."""
    logits_m = point_sample_shared(jax.lax.stop_gradient(mask), pts_match)  # [P, Q]
    if classes is None:
        targets_m = sample_gt_shared(gt, pts_match, num_classes, points_first=True)  # [P, K]
    else:
        targets_m = sample_gt_classes_shared(gt, pts_match, classes, points_first=True)  # [P, C]
    return match_costs(jax.lax.stop_gradient(cls), logits_m, targets_m, cfg_loss,
                       points_first=True, classes=classes)


def _image_match(cost, present):
    with jax.named_scope("hungarian"):
        return hungarian_assign(cost, None, present)


def _solve_local(cost, present):
    """The solver vmapped over every leading axis of cost [B, ..., Q, K] (one loop for all)."""
    fn = _image_match
    for _ in range(cost.ndim - 2):
        fn = jax.vmap(fn)
    return fn(cost, present)


@functools.lru_cache(maxsize=None)
def _solver_per_batch_shard(ndim: int):
    """`_solve_local` run on each device's batch shard.  Left to the partitioner, a vmapped
    `while_loop` over a sharded batch decides each iteration over the whole batch: one
    all-reduce of the loop predicate per iteration (on 2 GPUs, small NCCL all-reduces and host
    round trips in every matcher loop)."""
    lead = [f"l{i}" for i in range(ndim - 3)]  # the axes between batch and [Q, K]
    axes = lambda *last: " ".join(["b", *lead, *last])  # noqa: E731
    rule = f"{axes('q', 'k')}, {axes('k')} -> {axes('q')}, {axes('k')}"
    return batch_partitioned(_solve_local, 2, rule, (*lead, "q", "k"))


def _match_all(cost, present):
    """Assignments of a batch of cost matrices [..., B, Q, K] with present [B, K] or
    [..., B, K] (broadcast over the leading axes): the device solver, vmapped over them (one
    loop for all), each device solving its own batch shard."""
    present = jnp.broadcast_to(present, cost.shape[:-2] + cost.shape[-1:])
    if cost.ndim == 2:
        return _solve_local(cost, present)
    # batch axis first for the partitioning, then back
    cost_b, present_b = jnp.moveaxis(cost, -3, 0), jnp.moveaxis(present, -2, 0)
    col4row, row4col = per_batch_shard(_solver_per_batch_shard(cost.ndim), 2, cost_b, present_b)
    return jnp.moveaxis(col4row, 0, -2), jnp.moveaxis(row4col, 0, -2)


def match_classes_cap(cfg_loss: Any, num_classes: int) -> int | None:
    """`model.loss.match_classes` as a cap below K, or None (match on all K classes)."""
    cap = cfg_loss.get("match_classes", None)
    if cap is None:
        return None
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise ValueError(f"model.loss.match_classes must be a positive int or None, got {cap!r}")
    return cap if cap < num_classes else None


def present_first(present: jax.Array, cap: int) -> tuple[jax.Array, jax.Array]:
    """present [..., K] -> (classes [..., cap] int32, valid [..., cap]): an image's present
    classes in class order, then absent ones (distinct, so an assignment maps back one to
    one)."""
    order = jnp.argsort(jnp.logical_not(present), axis=-1, stable=True)[..., :cap]
    return order.astype(jnp.int32), jnp.take_along_axis(present, order, axis=-1)


def _assignment_to_classes(col4row, row4col, classes, num_classes):
    """An assignment among the columns `classes` [B, C] (col4row [..., B, Q] in 0 .. C-1,
    row4col [..., B, C]) as one among all K classes (col4row in 0 .. K-1, row4col [..., B, K])."""
    cls_b = jnp.broadcast_to(classes, row4col.shape)
    col4row = jnp.where(col4row >= 0,
                        jnp.take_along_axis(cls_b, jnp.maximum(col4row, 0), axis=-1), -1)
    c = classes.shape[-1]
    full = jax.vmap(lambda r, k: jnp.full((num_classes,), -1, r.dtype).at[k].set(r))(
        row4col.reshape(-1, c), cls_b.reshape(-1, c))
    return col4row.astype(row4col.dtype), full.reshape(row4col.shape[:-1] + (num_classes,))


def match_predictions(cls, mask, gt, present, pts_match, cfg_loss, num_classes, layered):
    """Costs and assignments of B images (`layered`: of L stacked predictions, cls
    [L, B, Q, K+1], mask [L, B, Q, h, w], points [L, B, P, 2]) with their classes: col4row
    [(L,) B, Q], row4col [(L,) B, K].

    With `model.loss.match_classes` = C below K and no image having more than C classes, the
    costs are computed for each image's present classes only (C columns instead of K: the
    float32 product and the target samples C / K of the work; the solver gets the same
    problem, its absent classes were invalid columns anyway) and the assignment is mapped back
    to class indices; otherwise on all K classes."""

    def costs(classes):  # classes [B, C] or None (all K)
        f = jax.vmap(lambda c, m, g, p, k: _image_cost(c, m, g, p, cfg_loss, num_classes, k),
                     in_axes=(0, 0, 0, 0, None if classes is None else 0))
        if layered:
            f = jax.vmap(f, in_axes=(0, 0, None, 0, None))
        return f(cls, mask, gt, pts_match, classes)

    def full():
        return _match_all(costs(None), present[None] if layered else present)

    cap = match_classes_cap(cfg_loss, num_classes)
    if cap is None:
        return full()

    def compact():
        classes, valid = present_first(present, cap)
        col4row, row4col = _match_all(costs(classes), valid[None] if layered else valid)
        return _assignment_to_classes(col4row, row4col, classes, num_classes)

    fits = jnp.max(jnp.sum(present.astype(jnp.int32), axis=-1)) <= cap
    return jax.lax.cond(fits, compact, full)


POINT_SELECT_METHODS = ("auto", "top_k", "sort", "pallas", "pallas_interpret")


def resolve_point_select(method: str, num_devices: int) -> str:
    """`model.loss.point_select` for the train step: "auto" is "pallas" where the Pallas GPU
    kernels run (H100, SARFormer-B step: the selection 1.89 -> 0.77 ms, the step 62.3 -> 60.7 ms
    pipelined; docs/benchmarks.md, train run 33), else "sort" when the batch is split over
    devices and "top_k" on one.  Any other value is kept."""
    if method != "auto":
        return method
    from sarformer_jax.kernels.triton_backend import gpu_kernels

    if gpu_kernels():
        return "pallas"
    return "sort" if num_devices > 1 else "top_k"


def smallest_k(x: jax.Array, k: int, method: str) -> jax.Array:
    """Indices of the k smallest entries along the last axis, ties to the lower index.
    `method`:
    - "top_k" (`lax.top_k`: a partial sort, ~5x faster on the CPU), smallest first;
    - "sort" (a stable argsort: the same indices; XLA partitions it over a sharded batch, where
      it gathered every image's candidates onto every device for top_k), smallest first;
    - "pallas" (`kernels.select_pallas`, a GPU kernel: a radix search for the k-th smallest
      value and one partition pass instead of a full sort) or "pallas_interpret" (the same in
      the Pallas interpreter): the same set of indices, in index order.
    The loss only sums over the chosen points, so the order changes nothing but the rounding
    of those sums.  The train step resolves "auto" (`model.loss.point_select`) with
    `resolve_point_select`."""
    if method in ("top_k", "auto"):
        return jax.lax.top_k(-x, k)[1]
    if method == "sort":
        return jnp.argsort(x, axis=-1, stable=True)[..., :k]
    if method in ("pallas", "pallas_interpret"):
        from sarformer_jax.kernels.select_pallas import smallest_k_pallas

        return smallest_k_pallas(x, k, interpret=method == "pallas_interpret")
    raise ValueError(f"model.loss.point_select must be one of {POINT_SELECT_METHODS}, got "
                     f"{method!r}")


def _slots(col4row, row4col, num_classes):
    """Matched slots of one image: (query [M], class [M], valid [M]).  M = min(Q, K): with no more
    queries than classes the slots are the queries, otherwise the classes."""
    q = col4row.shape[-1]
    if q <= num_classes:
        slot_query, slot_class = jnp.arange(q), col4row
    else:
        slot_query, slot_class = row4col, jnp.arange(num_classes)
    return slot_query, slot_class, (slot_query >= 0) & (slot_class >= 0)


def matched_counts(col4row, row4col, num_classes):
    """Matched pairs per image for assignments [..., Q] / [..., K]: [...] int32."""
    assigned = col4row if col4row.shape[-1] <= num_classes else row4col
    return jnp.sum((assigned >= 0).astype(jnp.int32), axis=-1)


def _image_losses(cls, mask, gt, pts, col4row, row4col, cfg_loss, num_classes, cap=None):
    """Loss terms of one image and layer given its matching.  Returns (per-query CE [Q],
    per-query class weight [Q], mask BCE sum, dice sum, number of matched pairs).

    cap: None, or process only the first `cap` matched slots (in slot order) in the
    point-sampled mask losses -- exact when the image has at most `cap` matched pairs, which
    the caller checks (`mask_losses_over_slots`); each slot keeps its own random points."""
    # class loss: matched queries take their class, the others "no object" (index K)
    target = jnp.where(col4row >= 0, col4row, num_classes)
    logp = jax.nn.log_softmax(cls.astype(jnp.float32), axis=-1)
    ce = -jnp.take_along_axis(logp, target[:, None], axis=-1)[:, 0]
    wt = jnp.where(col4row >= 0, 1.0, cfg_loss.no_object_weight)
    slot_query, slot_class, slot_valid = _slots(col4row, row4col, num_classes)
    sel = jnp.arange(slot_valid.shape[0])
    if cap is not None:
        # the matched slots first, in slot order (a stable sort of the validity flags)
        sel = jnp.argsort(jnp.logical_not(slot_valid), stable=True)[:cap]
        slot_query, slot_class, slot_valid = slot_query[sel], slot_class[sel], slot_valid[sel]
    cand, extra = slot_points(pts, sel, cfg_loss)
    maps = mask[jnp.maximum(slot_query, 0)]  # [M, h, w]
    # importance sampling: most uncertain (-|logit|) candidates, then fresh uniform points
    cand_logits = point_sample(jax.lax.stop_gradient(maps), cand)
    k = num_importance_points(cfg_loss)
    top = smallest_k(jnp.abs(cand_logits), k, cfg_loss.get("point_select", "auto"))
    chosen = jnp.take_along_axis(cand, top[..., None], axis=1)
    coords = jax.lax.stop_gradient(jnp.concatenate([chosen, extra], axis=1))  # [M, P, 2]
    logits = point_sample(maps, coords)
    targets = sample_gt_slots(gt, coords, jnp.where(slot_valid, slot_class, -1))
    bce = jnp.mean(jax.nn.softplus(logits) - logits * targets, axis=-1)
    sig = jax.nn.sigmoid(logits)
    dice = 1.0 - (2.0 * jnp.sum(sig * targets, -1) + 1.0) / (jnp.sum(sig, -1) + jnp.sum(targets, -1) + 1.0)
    mask_sum = jnp.sum(jnp.where(slot_valid, bce, 0.0))
    dice_sum = jnp.sum(jnp.where(slot_valid, dice, 0.0))
    return ce, wt, mask_sum, dice_sum, jnp.sum(slot_valid.astype(jnp.float32))


def compact_cap(cfg_loss: Any, q: int, num_classes: int) -> int | None:
    """`model.loss.compact_slots` as a cap below M = min(Q, K), or None (nothing to gain)."""
    cap = cfg_loss.get("compact_slots", None)
    if cap is None:
        return None
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise ValueError(f"model.loss.compact_slots must be a positive int or None, got {cap!r}")
    return cap if cap < min(q, num_classes) else None


def mask_losses_over_slots(run, col4row, row4col, cfg_loss, num_classes):
    """`run(cap)` computes the loss terms with the mask losses on at most `cap` matched slots per
    image (None = all M slots).  With `model.loss.compact_slots` set below M, the capped program
    runs when no image (of any layer) has more matched pairs than the cap, and the full one
    otherwise: the same losses either way, less work in the common case (an ADE20K crop has a
    handful of the 150 classes, and M = 100 slots).  Under `on_batch_shards` each device
    decides for its own images."""
    cap = compact_cap(cfg_loss, col4row.shape[-1], num_classes)
    if cap is None:
        return run(None)
    fits = jnp.max(matched_counts(col4row, row4col, num_classes)) <= cap
    return jax.lax.cond(fits, lambda: run(cap), lambda: run(None))


def _reduce_terms(ce, wt, mask_sum, dice_sum, n_matched, cfg_loss):
    n_m = jnp.maximum(jnp.sum(n_matched), 1.0)
    return {"loss_cls": cfg_loss.class_weight * jnp.sum(ce * wt) / jnp.sum(wt),
            "loss_mask": cfg_loss.mask_weight * jnp.sum(mask_sum) / n_m,
            "loss_dice": cfg_loss.dice_weight * jnp.sum(dice_sum) / n_m}


def layer_loss(cls: jax.Array, mask: jax.Array, gt: jax.Array, present: jax.Array, pts: dict,
               cfg_loss: Any, num_classes: int, batch_mesh=None
               ) -> tuple[dict[str, jax.Array], jax.Array]:
    """Loss of one prediction over the batch.

    Args:
      cls [B, Q, K+1]; mask [B, Q, h, w] logits; gt [B, H, W]; present [B, K];
      pts: one entry of `draw_points`.
      batch_mesh: (mesh, batch axes) when the batch is split over devices: the per-image mask
        losses then run on each device's images (`on_batch_shards`).
    Returns ({"loss_cls", "loss_mask", "loss_dice"}, assignment query -> class [B, Q], -1 = none).

    `N_m` (matched pairs over the whole batch, at least 1) normalises mask and dice; the class
    loss is the weighted mean over all queries of the batch.  Under data parallelism the arrays
    are global, so both normalisers are global-batch ones (mmdet averages per-GPU class losses
    instead; identical for one image per device only when the weight sums agree)."""
    col4row, row4col = match_predictions(cls, mask, gt, present, pts["match"], cfg_loss,
                                         num_classes, layered=False)

    def image_terms(cls, mask, gt, pts, col4row, row4col):
        def run(cap):
            return jax.vmap(lambda c, m, g, p, a, b: _image_losses(
                c, m, g, p, a, b, cfg_loss, num_classes, cap))(cls, mask, gt, pts, col4row, row4col)

        return mask_losses_over_slots(run, col4row, row4col, cfg_loss, num_classes)

    terms = on_batch_shards(image_terms, batch_mesh, (0,) * 6, 0)(
        cls, mask, gt, pts, col4row, row4col)
    return _reduce_terms(*terms, cfg_loss), col4row


def deep_supervision_losses(cls: jax.Array, mask: jax.Array, gt: jax.Array, present: jax.Array,
                            pts: dict, cfg_loss: Any, num_classes: int, batch_mesh=None
                            ) -> dict[str, jax.Array]:
    """`layer_loss` of L stacked predictions (cls [L, B, Q, K+1], mask [L, B, Q, h, w], points
    with a leading L axis) at once: the L x B matching problems run as one batched Hungarian
    solve (one device loop for all of them, instead of one per layer), the loss terms vmapped
    over layers.  Returns {"loss_cls", ...} with [L] values."""
    col4row, row4col = match_predictions(cls, mask, gt, present, pts["match"], cfg_loss,
                                         num_classes, layered=True)  # [L, B, Q], [L, B, K]

    def image_terms(cls, mask, gt, pts, col4row, row4col):
        def run(cap):
            def layer(c, m, p, a, b):
                return jax.vmap(lambda c1, m1, g1, p1, a1, b1: _image_losses(
                    c1, m1, g1, p1, a1, b1, cfg_loss, num_classes, cap))(c, m, gt, p, a, b)

            return jax.vmap(layer)(cls, mask, pts, col4row, row4col)

        return mask_losses_over_slots(run, col4row, row4col, cfg_loss, num_classes)

    terms = on_batch_shards(image_terms, batch_mesh, (1, 1, 0, 1, 1, 1), 1)(
        cls, mask, gt, pts, col4row, row4col)  # per-image terms, [L, B, ...]
    return jax.vmap(lambda *t: _reduce_terms(*t, cfg_loss))(*terms)


def aux_ce_loss(aux_logits: jax.Array, gt: jax.Array, upscale: str = "matrix") -> jax.Array:
    """FCN auxiliary loss (unweighted): logits [B, h, w, K] resized bilinearly to the label size,
    pixel CE with 255 ignored, averaged over *all* pixels (mmseg `avg_non_ignore=False`).
    `upscale`: how `resize_bilinear` does a whole-factor upscale (`model.loss.aux_resize`)."""
    from sarformer_jax.models.layers import RESIZE_UPSCALE_METHODS

    if upscale not in RESIZE_UPSCALE_METHODS:
        raise ValueError(f"model.loss.aux_resize must be one of {RESIZE_UPSCALE_METHODS}, "
                         f"got {upscale!r}")
    logits = resize_bilinear(aux_logits.astype(jnp.float32), gt.shape[1:3], upscale=upscale)
    k = logits.shape[-1]
    valid = (gt != IGNORE_INDEX) & (gt >= 0) & (gt < k)
    return pixel_cross_entropy(logits, jnp.where(valid, gt, -1).astype(jnp.int32))


@jax.custom_vjp
def pixel_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean over all pixels of -log softmax(logits)[label], 0 where the label is negative
    (ignored pixels count in the mean, as mmseg's `avg_non_ignore=False`).  logits [..., K]
    float32, labels [...] int32.

    The gradient is written in one elementwise pass, (softmax - onehot) x valid / n, from the
    logits and the saved log-sum-exp.  Differentiated by jax, log_softmax and
    `take_along_axis` made the step write log-probabilities, a zero tensor and a scatter of the
    label entries, and read them back (SARFormer-B at 640²: [2, 640, 640, 150] float32, 0.49 GB
    each; that CE's kernels took ~1.2 ms of the H100 step in train run 34, of which the
    log-sum-exp's one read of the logits remains)."""
    return _pixel_ce_fwd(logits, labels)[0]


def _pixel_ce_fwd(logits, labels):
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
    loss = jnp.mean(jnp.where(labels >= 0, lse - picked, 0.0))
    return loss, (logits, labels, lse)


def _pixel_ce_bwd(res, ct):
    logits, labels, lse = res
    scale = jnp.where(labels >= 0, ct / labels.size, 0.0).astype(logits.dtype)[..., None]
    onehot = labels[..., None] == jnp.arange(logits.shape[-1], dtype=labels.dtype)
    g = (jnp.exp(logits - lse[..., None]) - onehot.astype(logits.dtype)) * scale
    return g, np.zeros(labels.shape, jax.dtypes.float0)


pixel_cross_entropy.defvjp(_pixel_ce_fwd, _pixel_ce_bwd)


def loss_fn(predictions: Sequence[dict[str, jax.Array]], gt_semantic: jax.Array,
            aux_logits: jax.Array | None, *, key: jax.Array, cfg_loss: Any, num_classes: int,
            points: Sequence[dict] | None = None, batch_mesh=None
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total SARFormer loss (§5.3): deep supervision over every prediction with equal weights,
    plus `aux_weight` x the auxiliary CE.

    Args:
      predictions: the head's list of {"cls": [B,Q,K+1], "mask": [B,Q,h,w]}, d0 first.
      gt_semantic: [B, H, W] int labels, 255 ignored.
      aux_logits: [B, h', w', K] or None.
      key: PRNG key for the point sampling (ignored when `points` is given).
      points: optional injected points (`draw_points` layout), one dict per prediction.
      batch_mesh: (mesh, batch axes) of a batch split over devices, or None (see `layer_loss`).
    Returns:
      (total, parts) with parts `loss_cls/mask/dice` (last prediction), `d{i}.loss_*` (the
      others, d0 = before the first decoder layer) and `aux.loss_ce` (already weighted).
    """
    b, q = predictions[0]["cls"].shape[:2]
    gt = gt_semantic.astype(jnp.int32)
    if gt.ndim != 3 or gt.shape[0] != b:
        raise ValueError(f"loss_fn: gt_semantic must be [B={b}, H, W], got {tuple(gt_semantic.shape)}")
    if predictions[0]["cls"].shape[-1] != num_classes + 1:
        raise ValueError(f"loss_fn: cls has {predictions[0]['cls'].shape[-1]} outputs, expected "
                         f"num_classes + 1 = {num_classes + 1}")
    present = gt_present(gt, num_classes)
    n = len(predictions)
    names = [("" if i == n - 1 else f"d{i}.") for i in range(n)]
    parts: dict[str, jax.Array] = {}
    same = all(p["cls"].shape == predictions[0]["cls"].shape
               and p["mask"].shape == predictions[0]["mask"].shape for p in predictions)
    if same and n > 1:
        # one traced layer loss for all layers (the deep-supervision losses are identical
        # programs: unrolling them made the train step ~n times larger), and one batched
        # Hungarian solve for all n x B matchings
        cls = jnp.stack([p["cls"] for p in predictions])
        mask = jnp.stack([p["mask"] for p in predictions])
        if points is not None:
            pts = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *points)
        else:
            pts = jax.vmap(lambda i: draw_layer_points(key, i, b, cfg_loss))(jnp.arange(n))
        terms = deep_supervision_losses(cls, mask, gt, present, pts, cfg_loss, num_classes,
                                        batch_mesh)
        for i, prefix in enumerate(names):
            parts.update({prefix + k: v[i] for k, v in terms.items()})
    else:
        if points is None:
            points = draw_points(key, b, n, cfg_loss)
        for prefix, pred, pts in zip(names, predictions, points):
            terms, _ = layer_loss(pred["cls"], pred["mask"], gt, present, pts, cfg_loss, num_classes,
                                  batch_mesh)
            parts.update({prefix + k: v for k, v in terms.items()})
    if aux_logits is not None:
        parts["aux.loss_ce"] = cfg_loss.aux_weight * aux_ce_loss(
            aux_logits, gt, cfg_loss.get("aux_resize", "matrix"))
    total = sum(parts.values())
    return total, parts
