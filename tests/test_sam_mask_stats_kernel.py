"""SAM's mask post-processing as one Pallas kernel (kernels/sam_mask_stats.py) on the CPU, in the
Pallas interpreter: the resized logits against PyTorch's `F.interpolate` pipeline (upstream's
`Sam.postprocess_masks`), the thresholded masks, stability counts and boxes against the same
PyTorch logits (pixels within rounding of a threshold may go either way), the generator with
post-processing "pallas_interpret" against segment-anything's, the kernel per batch shard
under a sharded jit, its Triton lowering, and its errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import RTOL, rel_err
from sam_oracle import natural_image, sam_pair  # noqa: F401
from sarformer_jax.kernels.sam_mask_stats import postprocess_stats

torch = pytest.importorskip("torch")

# (low-res side, encoder side, resized input (h, w), original (H, W)): square, landscape and
# portrait images; the small ones keep the interpreter quick
GEOMETRIES = [(16, 64, (64, 43), (50, 33)), (16, 64, (48, 64), (30, 40)), (32, 128, (128, 128), (80, 80)),
              (256, 1024, (1024, 683), (120, 80))]


def _torch_logits(low, img, inp, out):
    import torch.nn.functional as F

    t = F.interpolate(torch.from_numpy(low), (img, img), mode="bilinear", align_corners=False)
    return F.interpolate(t[..., : inp[0], : inp[1]], out, mode="bilinear", align_corners=False).numpy()


def _low(rng, lead, side):
    return (rng.normal(size=lead + (side, side)) * 4).astype(np.float32)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"{g[2]}->{g[3]}")
def test_logits_match_torch(geometry):
    side, img, inp, out = geometry
    low = _low(np.random.default_rng(side + out[0]), (2, 3), side)
    got = postprocess_stats(jnp.asarray(low), img_size=img, input_size=inp, original_size=out, mode="logits",
                            interpret=True)
    assert got.shape == (2, 3) + out
    assert rel_err(np.asarray(got), _torch_logits(low, img, inp, out)) <= RTOL["float32"]


def test_bfloat16_logits_are_read_as_float32():
    side, img, inp, out = GEOMETRIES[0]
    low = jnp.asarray(_low(np.random.default_rng(1), (1, 3), side), jnp.bfloat16)
    got = postprocess_stats(low, img_size=img, input_size=inp, original_size=out, mode="logits", interpret=True)
    want = _torch_logits(np.array(low.astype(jnp.float32)), img, inp, out)
    assert got.dtype == jnp.float32 and rel_err(np.asarray(got), want) <= RTOL["float32"]


@pytest.mark.parametrize("geometry", GEOMETRIES[:3], ids=lambda g: f"{g[2]}->{g[3]}")
def test_masks_counts_and_boxes_match_torch(geometry):
    side, img, inp, out = geometry
    low = _low(np.random.default_rng(7), (4, 3), side)
    low[0, 0] = -5.0  # an empty mask: zero box, zero counts
    want = _torch_logits(low, img, inp, out)
    kw = dict(img_size=img, input_size=inp, original_size=out, interpret=True)
    high_t, low_t, mask_t = 1.5, -0.5, 0.25
    st = {k: np.asarray(v) for k, v in postprocess_stats(jnp.asarray(low), mode="stats",
                                                           thresholds=(high_t, low_t, mask_t), **kw).items()}
    masks = np.asarray(postprocess_stats(jnp.asarray(low), mode="mask", thresholds=(high_t, low_t, mask_t), **kw))
    near = lambda t: np.abs(want - t) <= 1e-5 * np.abs(want).max()  # rounding may put these either side
    for name, t in (("high", high_t), ("low", low_t)):
        diff = np.abs(st[name] - (want > t).sum((-2, -1)))
        assert (diff <= near(t).sum((-2, -1))).all(), name
    on, unsure = want > mask_t, near(mask_t)
    assert masks.shape == want.shape and masks.dtype == bool
    assert not (masks != on)[~unsure].any()
    sure_rows = ~unsure.any(-1)
    assert np.array_equal(st["rows"][sure_rows], on.any(-1)[sure_rows])
    sure_cols = ~unsure.any(-2)
    assert np.array_equal(st["cols"][sure_cols], on.any(-2)[sure_cols])
    assert st["high"][0, 0] == st["low"][0, 0] == 0 and not st["rows"][0, 0].any()
    assert (st["low"] >= st["high"]).all() and st["low"].max() > 0


def test_sam_methods_agree_with_the_taps_path():
    """`Sam.mask_stats` / `threshold_masks` with "pallas_interpret" against "taps"."""
    from sarformer_jax.sam.build import build_sam

    sam = build_sam("vit_b", encoder_depth=1, global_attn_indexes=(0,))
    low = jnp.asarray(_low(np.random.default_rng(3), (2, 3), 256))
    args = (low, (1024, 683), (120, 80))
    sam.postprocess_implementation = "taps"
    want_stab, want_box = sam.mask_stats(*args, offset=1.0)
    want_mask = sam.threshold_masks(*args)
    logits = np.asarray(sam.postprocess_masks(*args))
    sam.postprocess_implementation = "pallas_interpret"
    stab, box = sam.mask_stats(*args, offset=1.0)
    mask = sam.threshold_masks(*args)
    np.testing.assert_allclose(np.asarray(stab), np.asarray(want_stab), atol=2e-3)
    unsure = np.abs(logits) <= 1e-5 * np.abs(logits).max()
    assert not (np.asarray(mask) != np.asarray(want_mask))[~unsure].any()
    assert np.abs(np.asarray(box) - np.asarray(want_box)).max() <= (1 if unsure.any() else 0)
    assert rel_err(np.asarray(sam.postprocess_masks(*args)), logits) <= RTOL["float32"]


def test_generator_with_the_kernel_matches_upstream(sam_pair):
    pytest.importorskip("segment_anything")
    from flax import nnx
    from test_sam_amg import LOOSE, _assert_same_records, _run_upstream

    from sarformer_jax.sam.automatic_mask_generator import SamAutomaticMaskGenerator

    tsam, jsam, _ = sam_pair
    jsam = nnx.clone(jsam)  # the session's model keeps its post-processing
    jsam.postprocess_implementation = "pallas_interpret"
    image = natural_image()
    kw = dict(LOOSE, box_nms_thresh=1.0)  # NMS off: every thresholded candidate is compared
    ours = SamAutomaticMaskGenerator(jsam, **kw).generate(image)
    assert len(ours) >= 10
    _assert_same_records(ours, _run_upstream(tsam, image, **kw))


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_kernel_runs_per_batch_shard_without_gathering(axis_type):
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    assert len(jax.devices()) >= 8  # conftest's fake CPU devices
    mesh = jax.make_mesh((8,), ("data",), axis_types=(getattr(AxisType, axis_type),))
    low = jnp.asarray(_low(np.random.default_rng(5), (8, 3), 16))
    kw = dict(img_size=64, input_size=(64, 43), original_size=(50, 33), interpret=True)
    x = jax.device_put(low, NamedSharding(mesh, P("data")))
    for mode in ("stats", "mask"):
        want = postprocess_stats(low, mode=mode, **kw)
        f = jax.jit(lambda a: postprocess_stats(a, mode=mode, **kw))
        got = f(x)
        assert all(np.array_equal(np.asarray(a), np.asarray(b))
                   for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
        assert "all-gather" not in f.lower(x).compile().as_text()


@pytest.mark.parametrize("mode", ["stats", "mask", "logits"])
def test_kernel_lowers_to_triton_for_a_gpu(mode):
    low = jax.ShapeDtypeStruct((128, 3, 256, 256), jnp.bfloat16)
    f = jax.jit(lambda x: postprocess_stats(x, img_size=1024, input_size=(1024, 1024), original_size=(640, 640),
                                            mode=mode))
    assert "__gpu$xla.gpu.triton" in f.trace(low).lower(lowering_platforms=("cuda",)).as_text()


def test_auto_is_the_kernel_on_a_gpu_and_taps_elsewhere(monkeypatch):
    from sarformer_jax.sam.build import build_sam

    sam = build_sam("vit_b", encoder_depth=1, global_attn_indexes=(0,))
    low = jnp.asarray(_low(np.random.default_rng(3), (1, 3), 16))
    args = (low, (64, 43), (50, 33))
    sam.postprocess_implementation = "taps"
    want = np.asarray(sam.postprocess_masks(*args))
    sam.postprocess_implementation = "auto"
    assert sam.resolved_postprocess() == "taps"
    np.testing.assert_array_equal(np.asarray(sam.postprocess_masks(*args)), want)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert sam.resolved_postprocess() == "pallas"


def test_height_blocks_pad_the_span_to_a_power_of_two():
    from sarformer_jax.kernels.sam_mask_stats import height_blocks
    from sarformer_jax.sam.common import postprocess_matrix

    first, local = height_blocks(256, 1024, 1024, 640, 32)  # 32 rows of 640 read 15 low-res rows
    assert local.shape == (20, 32, 16) and first.max() + 16 <= 256
    m = postprocess_matrix(256, 1024, 1024, 640)
    dense = np.zeros((640, 256), np.float32)
    for b in range(20):
        dense[b * 32:(b + 1) * 32, first[b]:first[b] + 16] = local[b]
    np.testing.assert_array_equal(dense, m)  # every weight kept, in place
    with pytest.raises(ValueError, match="32 output rows of 50 read 16 of the 8 low-res rows"):
        height_blocks(8, 64, 64, 50, 32)


def test_errors():
    from sarformer_jax.sam.build import build_sam

    kw = dict(img_size=64, input_size=(64, 64), original_size=(32, 32), interpret=True)
    with pytest.raises(ValueError, match="mode must be one of"):
        postprocess_stats(jnp.zeros((1, 16, 16)), mode="bits", **kw)
    with pytest.raises(ValueError, match=r"low-res logits \(16, 16\) float32"):
        postprocess_stats(jnp.zeros((16, 16)), **kw)
    with pytest.raises(ValueError, match=r"\(1, 16, 16\) int32"):
        postprocess_stats(jnp.zeros((1, 16, 16), jnp.int32), **kw)
    sam = build_sam("vit_b", encoder_depth=1, global_attn_indexes=(0,))
    sam.postprocess_implementation = "pallas"  # a GPU kernel; this is the CPU
    with pytest.raises(ValueError, match="'pallas' is a GPU kernel.*pallas_interpret"):
        sam.threshold_masks(jnp.zeros((1, 256, 256)), (1024, 1024), (64, 64))
