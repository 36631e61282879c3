"""The deep-supervision loss is one layer loss scanned over the stacked predictions: it must
equal the sum of per-layer `layer_loss` calls on the points `draw_points` gives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sarformer_jax.config import load_config
from sarformer_jax.losses import draw_points, gt_present, layer_loss, loss_fn


def test_scanned_deep_supervision_equals_unrolled_layers():
    cfg = load_config("tiny", ["model.loss.num_points=64"]).model.loss
    k, q, b, n = 5, 7, 2, 4
    rng = np.random.default_rng(0)
    preds = [{"cls": jnp.asarray(rng.normal(size=(b, q, k + 1)), jnp.float32),
              "mask": jnp.asarray(rng.normal(size=(b, q, 12, 10)), jnp.float32)} for _ in range(n)]
    gt = rng.integers(0, k, (b, 24, 20)).astype(np.int32)
    gt[1, :5] = 255
    gt = jnp.asarray(gt)
    key = jax.random.key(3)
    total, parts = jax.jit(lambda p, g: loss_fn(p, g, None, key=key, cfg_loss=cfg, num_classes=k))(preds, gt)
    pts = draw_points(key, b, n, cfg)
    present = gt_present(gt, k)
    expected = 0.0
    for i in range(n):
        terms, _ = layer_loss(preds[i]["cls"], preds[i]["mask"], gt, present, pts[i], cfg, k)
        prefix = "" if i == n - 1 else f"d{i}."
        for name, v in terms.items():
            np.testing.assert_allclose(parts[prefix + name], v, rtol=2e-6, err_msg=prefix + name)
            expected += float(v)
    np.testing.assert_allclose(float(total), expected, rtol=2e-6)
    assert len(parts) == 3 * n


def test_smallest_k_methods_agree_with_ties():
    """top_k and the stable sort pick the same indices in the same order, ties included (the
    train step switches between them by mesh size)."""
    from sarformer_jax.losses import smallest_k

    x = np.abs(np.random.default_rng(0).normal(size=(3, 4, 300))).astype(np.float32)
    x[..., 5] = x[..., 9]
    x[..., 17] = x[..., 2]
    x[0, 0, :50] = 0.0  # a long run of ties
    a = np.asarray(smallest_k(jnp.asarray(x), 100, "top_k"))
    b = np.asarray(smallest_k(jnp.asarray(x), 100, "sort"))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[0, 0, :50], np.arange(50))
    with pytest.raises(ValueError, match="point_select"):
        smallest_k(jnp.asarray(x), 3, "heap")


def _labels_with(rng, b, classes_per_image, h=24, w=20):
    """[b, h, w] maps, image i striped with exactly the classes in classes_per_image[i]."""
    gt = np.zeros((b, h, w), np.int32)
    for i, cl in enumerate(classes_per_image):
        gt[i] = np.asarray(cl)[np.arange(h * w).reshape(h, w) // 7 % len(cl)]
    gt[0, :3] = 255
    return jnp.asarray(gt)


def _compact_case(q, k, present, b=2, n=2):
    rng = np.random.default_rng(1)
    preds = [{"cls": jnp.asarray(rng.normal(size=(b, q, k + 1)), jnp.float32),
              "mask": jnp.asarray(rng.normal(size=(b, q, 12, 10)), jnp.float32)} for _ in range(n)]
    cfgs = [load_config("tiny", ["model.loss.num_points=64", f"model.loss.compact_slots={c}"]).model.loss
            for c in (4, None)]
    return preds, _labels_with(rng, b, present), cfgs


def _assignment(present, b, q, k):
    """A valid assignment (not the Hungarian one): class present[i][j] to query j."""
    col4row = np.full((b, q), -1, np.int32)
    row4col = np.full((b, k), -1, np.int32)
    for i in range(b):
        for j, c in enumerate(present[i]):
            col4row[i, j], row4col[i, c] = c, j
    return jnp.asarray(col4row), jnp.asarray(row4col)


@pytest.mark.parametrize("q,k,present", [
    (10, 12, [[1, 4, 7], [0, 11]]),  # q <= k: the slots are the queries
    (9, 6, [[1, 4, 5], [0]]),  # q > k: the slots are the classes
])
def test_capped_mask_losses_equal_all_slots(q, k, present):
    """The capped program on its own (no switch) when every image fits the cap: the same loss
    terms as all M slots, each slot keeping its own random points."""
    from sarformer_jax.losses import _image_losses, matched_counts

    preds, gt, (capped, _) = _compact_case(q, k, present, n=1)
    col4row, row4col = _assignment(present, 2, q, k)
    np.testing.assert_array_equal(matched_counts(col4row, row4col, k), [len(p) for p in present])
    pts = draw_points(jax.random.key(5), 2, 1, capped)[0]
    for i in range(2):
        one = lambda cap: jax.jit(lambda c, m: _image_losses(  # noqa: E731
            c, m, gt[i], jax.tree_util.tree_map(lambda x: x[i], pts), col4row[i], row4col[i],
            capped, k, cap))(preds[0]["cls"][i], preds[0]["mask"][i])
        for got, want in zip(one(4), one(None)):
            np.testing.assert_allclose(got, want, rtol=1e-6)


def test_compact_slots_gives_the_same_losses_and_gradients():
    """`model.loss.compact_slots` only changes how much work the mask losses do: the train
    step's loss and its gradients equal the all-slots program when the cap fits (capped
    program), and so do the values when an image has more matched pairs than the cap (full
    program), in the stacked and the single-layer path."""
    from sarformer_jax.losses import mask_losses_over_slots

    q, k, key = 10, 12, jax.random.key(5)
    preds, gt, (capped, full) = _compact_case(q, k, [[1, 4, 7], [0, 11]])
    assert load_config("tiny", []).model.loss.compact_slots == 32

    def total(cfg, p, g):
        f = lambda p: loss_fn(p, g, None, key=key, cfg_loss=cfg, num_classes=k)  # noqa: E731
        return jax.jit(jax.value_and_grad(f, has_aux=True))(p)

    (t_c, parts_c), g_c = total(capped, preds, gt)
    (t_f, parts_f), g_f = total(full, preds, gt)
    np.testing.assert_allclose(float(t_c), float(t_f), rtol=1e-6)
    for name in parts_f:
        np.testing.assert_allclose(parts_c[name], parts_f[name], rtol=1e-6, atol=1e-7, err_msg=name)
    for a, want in zip(jax.tree_util.tree_leaves(g_c), jax.tree_util.tree_leaves(g_f)):
        np.testing.assert_allclose(a, want, rtol=1e-5, atol=1e-7)
    # image 1 with 6 > 4 classes: the switch takes the full program
    many = _labels_with(np.random.default_rng(2), 2, [[1, 4, 7], [0, 2, 3, 5, 6, 9]])
    present = gt_present(many, k)
    pts = draw_points(key, 2, 1, capped)[0]
    one_layer = lambda cfg: jax.jit(lambda c, m: layer_loss(c, m, many, present, pts, cfg, k))(  # noqa: E731
        preds[0]["cls"], preds[0]["mask"])
    (t1, a1), (t2, a2) = one_layer(capped), one_layer(full)
    np.testing.assert_array_equal(a1, a2)
    for name in t2:
        np.testing.assert_allclose(t1[name], t2[name], rtol=1e-6, err_msg=name)
    # the switch's choice: capped iff every image fits
    col4row, row4col = _assignment([[1, 4, 7], [0, 2, 3, 5, 6, 9]], 2, q, k)
    picked = mask_losses_over_slots(lambda cap: jnp.int32(-1 if cap is None else cap),
                                    col4row, row4col, capped, k)
    assert int(picked) == -1
    col4row, row4col = _assignment([[1, 4, 7], [0, 11]], 2, q, k)
    picked = mask_losses_over_slots(lambda cap: jnp.int32(-1 if cap is None else cap),
                                    col4row, row4col, capped, k)
    assert int(picked) == 4


def test_compact_slots_must_be_a_positive_int():
    from sarformer_jax.losses import compact_cap

    for bad in (0, -3, 2.5, True, "8"):
        cfg = load_config("tiny", []).model.loss
        cfg.compact_slots = bad
        with pytest.raises(ValueError, match="compact_slots"):
            compact_cap(cfg, 100, 150)
    cfg.compact_slots = 32
    assert compact_cap(cfg, 100, 150) == 32
    assert compact_cap(cfg, 20, 8) is None  # M = 8: nothing to cap


@pytest.mark.parametrize("stacked,select,match", [(True, "auto", None), (False, "auto", None),
                                                  (True, "pallas_interpret", None),
                                                  (True, "auto", 7)],
                         ids=["deep_supervision", "per_layer", "select_kernel", "match_classes"])
def test_mask_losses_on_batch_shards_equal_one_program(stacked, select, match):
    """With the batch split over 8 devices, the per-image mask losses run on each device's
    images (`batch_mesh`, a shard_map): the same loss and gradients as one unsharded program,
    although each device then picks the capped or the full mask-loss program for its own
    images (here some images have more matched pairs than the cap of 4, some fewer).  Also
    with the point-selection kernel (in the interpreter) inside each device's program, and with
    the sharded program matching on each image's present classes only (`match_classes`: every
    image here has at most 7) against the one program on all K."""
    from jax.sharding import NamedSharding, PartitionSpec

    from sarformer_jax.sharding import BATCH_AXES, make_mesh

    q, k, b, key = 10, 12, 8, jax.random.key(7)
    classes = [[1, 4, 7], [0, 2, 3, 5, 6, 9], [11], [2, 3], [0, 1, 2, 3, 4], [5, 8],
               [1, 2, 3, 4, 5, 6, 7], [10, 11]]
    rng = np.random.default_rng(3)
    gt = _labels_with(rng, b, classes)
    n = 2 if stacked else 1
    shape = (b, q, 12, 10)
    preds = [{"cls": jnp.asarray(rng.normal(size=(b, q, k + 1)), jnp.float32),
              "mask": jnp.asarray(rng.normal(size=shape), jnp.float32)} for _ in range(n)]
    if not stacked:  # a second prediction of another size: the per-layer path
        preds.append({"cls": jnp.asarray(rng.normal(size=(b, q, k + 1)), jnp.float32),
                      "mask": jnp.asarray(rng.normal(size=(b, q, 6, 5)), jnp.float32)})
    sets = ["model.loss.num_points=64", "model.loss.compact_slots=4",
            f"model.loss.point_select={select}"]
    cfg = cfg_one = load_config("tiny", sets).model.loss
    if match is not None:
        cfg = load_config("tiny", sets + [f"model.loss.match_classes={match}"]).model.loss
    mesh = make_mesh({"fsdp": 2}, jax.devices())  # 4 (data) x 2 (fsdp): the batch split 8 ways

    def total(p, g, batch_mesh, cfg=cfg):
        f = lambda p: loss_fn(p, g, None, key=key, cfg_loss=cfg, num_classes=k,  # noqa: E731
                              batch_mesh=batch_mesh)
        return jax.value_and_grad(f, has_aux=True)(p)

    want = jax.jit(lambda p, g: total(p, g, None, cfg_one))(preds, gt)
    split = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    sharded = jax.tree_util.tree_map(lambda x: jax.device_put(x, split), (preds, gt))
    fn = jax.jit(lambda p, g: total(p, g, (mesh, BATCH_AXES)))
    lowered = fn.lower(*sharded).as_text()
    assert "manual_computation" in lowered or "SPMDFullToShardShape" in lowered  # a shard_map
    (t, parts), grads = fn(*sharded)
    (t0, parts0), grads0 = want
    np.testing.assert_allclose(float(t), float(t0), rtol=1e-6)
    for name in parts0:
        np.testing.assert_allclose(parts[name], parts0[name], rtol=1e-6, atol=1e-7, err_msg=name)
    for a, w in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads0)):
        assert a.sharding.spec[0] == BATCH_AXES
        np.testing.assert_allclose(a, w, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [np.uint8, np.int32])
def test_gt_present_is_the_set_of_labels(dtype):
    """Class k present iff some pixel has label k; 255, labels >= K and negative ones ignored."""
    rng = np.random.default_rng(5)
    k = 150
    gt = rng.choice([0, 3, 77, 149, 150, 200, 255], size=(3, 17, 23)).astype(dtype)
    gt[1] = 255
    gt[2, 0, 0] = 5
    if dtype == np.int32:
        gt[0, 0, 0] = -1
    got = np.asarray(gt_present(jnp.asarray(gt), k))
    for b in range(3):
        labels = {int(v) for v in np.unique(gt[b]) if 0 <= int(v) < k}
        assert set(np.flatnonzero(got[b])) == labels, b


def test_slot_points_depend_only_on_the_slot():
    """Each slot's importance-sampling pool and fresh points come from its own key: drawing
    slots [7, 2] gives slot 7 and slot 2 the rows that drawing all slots gives them, different
    slots and images get different points, and the points are uniform in [0, 1)."""
    from sarformer_jax.losses import slot_points

    cfg = load_config("tiny", []).model.loss
    pts = draw_points(jax.random.key(11), 2, 1, cfg)[0]
    one = jax.tree_util.tree_map(lambda x: x[1], pts)
    cand_all, extra_all = jax.jit(lambda p: slot_points(p, jnp.arange(10), cfg))(one)
    cand, extra = jax.jit(lambda p: slot_points(p, jnp.asarray([7, 2]), cfg))(one)
    n_cand = int(cfg.num_points * cfg.oversample_ratio)
    assert cand_all.shape == (10, n_cand, 2)
    assert extra_all.shape == (10, cfg.num_points - int(cfg.importance_sample_ratio * cfg.num_points), 2)
    np.testing.assert_array_equal(cand, cand_all[np.array([7, 2])])
    np.testing.assert_array_equal(extra, extra_all[np.array([7, 2])])
    assert not np.array_equal(cand_all[0], cand_all[1])
    other = jax.tree_util.tree_map(lambda x: x[0], pts)
    assert not np.array_equal(slot_points(other, jnp.arange(1), cfg)[0], cand_all[:1])
    c = np.asarray(cand_all)
    assert c.min() >= 0.0 and c.max() < 1.0 and abs(c.mean() - 0.5) < 0.02


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_point_sample_against_torch_grid_sample(shared, dtype):
    """`point_sample` is torch's `point_sample`: grid_sample(bilinear, align_corners=False, zeros
    outside), for points shared by all maps (the matching) and per map (the mask losses),
    including points outside [0, 1] and on the borders."""
    torch = pytest.importorskip("torch")
    from sarformer_jax.losses import point_sample

    rng = np.random.default_rng(4)
    maps = jnp.asarray(rng.normal(size=(5, 12, 9)), dtype)
    pts = rng.uniform(-0.1, 1.1, size=(40, 2) if shared else (5, 40, 2)).astype(np.float32)
    pts[:4] = [[0.0, 0.0], [1.0, 1.0], [0.5, 0.0], [0.0, 0.5]] if shared else pts[:4]
    got = jax.jit(point_sample)(maps, jnp.asarray(pts))
    m = torch.from_numpy(np.array(maps.astype(jnp.float32)))[:, None]
    grid = torch.from_numpy(np.broadcast_to(pts, (5, 40, 2)).copy())[:, :, None] * 2 - 1
    want = torch.nn.functional.grid_sample(m, grid, mode="bilinear", padding_mode="zeros",
                                           align_corners=False)[:, 0, :, 0].numpy()
    assert got.shape == (5, 40) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_match_gather_once_gives_the_same_costs(monkeypatch):
    """`SARFORMER_MATCH_GATHER_ONCE=1` (the matching product's left operand written once behind
    a barrier, the sums over the points taken from it) gives the same matching costs as the
    default, bit for bit, for every layer and image, and the same deep-supervision loss; the
    flag reaches the program."""
    from sarformer_jax.losses import _image_cost

    cfg = load_config("tiny", ["model.loss.num_points=96"]).model.loss
    k, q, b, n = 6, 9, 2, 3
    rng = np.random.default_rng(5)
    cls = jnp.asarray(rng.normal(size=(n, b, q, k + 1)), jnp.float32)
    mask = jnp.asarray(3 * rng.normal(size=(n, b, q, 14, 11)), jnp.bfloat16)
    gt = rng.integers(0, k, (b, 28, 22)).astype(np.int32)
    gt[0, :6] = 255
    gt = jnp.asarray(gt)
    pts = jnp.asarray(rng.random((n, b, 96, 2)) * 1.1 - 0.05, jnp.float32)  # some outside
    preds = [{"cls": cls[i], "mask": mask[i]} for i in range(n)]
    key = jax.random.key(7)

    def run(flag):
        monkeypatch.setenv("SARFORMER_MATCH_GATHER_ONCE", flag)
        # new functions each run: the flag is read when tracing
        costs = jax.jit(jax.vmap(jax.vmap(
            lambda c, m, g, p: _image_cost(c, m, g, p, cfg, k), in_axes=(0, 0, 0, 0)),
            in_axes=(0, 0, None, 0)))
        loss = jax.jit(lambda p, g: loss_fn(p, g, None, key=key, cfg_loss=cfg, num_classes=k))
        return (costs(cls, mask, gt, pts), loss(preds, gt),
                costs.lower(cls, mask, gt, pts).as_text())

    once, loss1, text1 = run("1")
    fused, loss0, text0 = run("0")
    assert "optimization_barrier" in text1 and "optimization_barrier" not in text0
    assert once.shape == (n, b, q, k) and np.isfinite(np.asarray(once)).all()
    np.testing.assert_array_equal(np.asarray(once), np.asarray(fused))
    np.testing.assert_array_equal(np.asarray(loss1[0]), np.asarray(loss0[0]))
    for name in loss0[1]:
        np.testing.assert_array_equal(np.asarray(loss1[1][name]), np.asarray(loss0[1][name]))
    monkeypatch.setenv("SARFORMER_MATCH_GATHER_ONCE", "yes")
    with pytest.raises(ValueError, match="SARFORMER_MATCH_GATHER_ONCE must be 0 or 1"):
        run("yes")


@pytest.mark.parametrize("layered", [True, False])
def test_matching_on_present_classes_equals_all_classes(layered):
    """`model.loss.match_classes` = C: the costs of each image's present classes only (C
    columns) give the same assignment, in class indices, as the costs of all K classes, and the
    same losses; an image with more than C classes sends the batch to the K-column program
    (the same numbers, bit for bit); the compact program's product has C columns."""
    from sarformer_jax.losses import match_predictions

    k, q, b, n, cap = 9, 7, 2, 3, 4
    base = load_config("tiny", ["model.loss.num_points=80"]).model.loss
    compact_cfg = load_config("tiny", ["model.loss.num_points=80",
                                       f"model.loss.match_classes={cap}"]).model.loss
    rng = np.random.default_rng(11)
    cls = jnp.asarray(rng.normal(size=(n, b, q, k + 1)), jnp.float32)
    mask = jnp.asarray(2 * rng.normal(size=(n, b, q, 12, 10)), jnp.float32)
    pts = jnp.asarray(rng.random((n, b, 80, 2)), jnp.float32)
    few = np.stack([rng.choice([1, 4, 8], (24, 20)), rng.choice([0, 2, 5, 8], (24, 20))])
    few[1, :4] = 255
    many = few.copy()
    many[0, :8] = rng.integers(0, k, (8, 20))  # image 0 gets more than `cap` classes
    if not layered:
        cls, mask, pts = cls[0], mask[0], pts[0]

    for gt_np, compact_taken in ((few, True), (many, False)):
        gt = jnp.asarray(gt_np.astype(np.int32))
        present = gt_present(gt, k)
        assert (int(jnp.max(jnp.sum(present, -1))) <= cap) == compact_taken

        def run(cfg):
            fn = jax.jit(lambda c, m, g, pr, p: match_predictions(c, m, g, pr, p, cfg, k, layered))
            return fn(cls, mask, gt, present, pts), fn.lower(cls, mask, gt, present, pts).as_text()

        (c4r_all, r4c_all), _ = run(base)
        (c4r, r4c), text = run(compact_cfg)
        np.testing.assert_array_equal(np.asarray(c4r), np.asarray(c4r_all))
        np.testing.assert_array_equal(np.asarray(r4c), np.asarray(r4c_all))
        pairs = int(jnp.sum(jnp.minimum(jnp.sum(present, -1), q)))
        assert r4c.shape[-1] == k and int(jnp.sum(c4r >= 0)) == pairs * (n if layered else 1)
        # both branches are in the program; the compact one's product has `cap` columns
        assert "stablehlo.case" in text or "stablehlo.if" in text
        assert f"{2 * q}x{cap}xf32" in text and f"{2 * q}x{k}xf32" in text

    # the whole loss through the stacked layers (classes present <= cap: the compact branch)
    gt = jnp.asarray(few.astype(np.int32))
    preds = [{"cls": cls[i], "mask": mask[i]} for i in range(n)] if layered else \
        [{"cls": cls, "mask": mask}]
    key = jax.random.key(4)
    tot0, parts0 = loss_fn(preds, gt, None, key=key, cfg_loss=base, num_classes=k)
    tot1, parts1 = loss_fn(preds, gt, None, key=key, cfg_loss=compact_cfg, num_classes=k)
    for name in parts0:
        np.testing.assert_allclose(np.asarray(parts1[name]), np.asarray(parts0[name]), rtol=1e-6,
                                   err_msg=name)


def test_match_classes_must_be_a_positive_int():
    from sarformer_jax.losses import match_classes_cap

    for bad in (0, -2, 2.5, True, "8"):
        cfg = load_config("tiny", []).model.loss
        cfg.match_classes = bad
        with pytest.raises(ValueError, match="model.loss.match_classes must be a positive int"):
            match_classes_cap(cfg, 150)
    cfg.match_classes = 150
    assert match_classes_cap(cfg, 150) is None  # nothing to gain
    cfg.match_classes = 32
    assert match_classes_cap(cfg, 150) == 32
