"""`AmgSettings.skip_low_iou` compiled for the GPU (marker gpu): the generator in bfloat16 with
the GPU's own implementations ("auto": the Pallas post-processing and upscaling kernels, cuDNN
attention where it applies), with and without the skipping, at a threshold that about half
the prompts pass.  The skipped prompts' candidates fail the IoU threshold whatever their masks,
so the kept slots, their scores and their masks must be the same; the passing prompts' logits
are made by groups of 16 instead of whole chunks, so they may differ by a rounding in bf16.
Run on the device:
`JAX_PLATFORMS=cuda python3 -m pytest -q -m gpu tests/test_sam_skip_low_iou_gpu.py`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.gpu


def test_skip_low_iou_on_gpu_keeps_the_same_masks():
    from flax import nnx

    from sarformer_jax.models.layers import init_rngs
    from sarformer_jax.sam import amg
    from sarformer_jax.sam import automatic_mask_generator as gen
    from sarformer_jax.sam.build import SamConfig, build_sam_from_config
    from sarformer_jax.sam.transforms import get_preprocess_shape, resize_uint8

    # a small encoder; the prompt encoder and mask decoder are SAM's own sizes (64² tokens)
    sam = build_sam_from_config(SamConfig(64, 2, 2, (1,)), rngs=init_rngs(3), dtype=jnp.bfloat16)
    sam.postprocess_implementation = "auto"  # the Pallas kernel on a GPU (the upscaling and the
    # decoder's attention are "auto" by default)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(20, 20, 3), dtype=np.uint8)
    images = np.stack([np.kron(base, np.ones((32, 32, 1), np.uint8)),
                       np.kron(np.roll(base, 7, axis=0), np.ones((32, 32, 1), np.uint8))])
    images = jnp.asarray(images)  # [2, 640, 640, 3], blocky so that masks follow edges
    pps, ppb = 32, 64
    graphdef, state = nnx.split(sam)
    size = get_preprocess_shape(640, 640, sam.img_size)
    embed = jax.jit(lambda st, x: nnx.merge(graphdef, st).embed_image(resize_uint8(x, size)))
    emb = embed(state, images)
    probe = gen.AmgSettings(pps, ppb, 0.5)
    grid = amg.build_point_grid(pps)
    cand = jax.jit(lambda st, e: gen._candidates(nnx.merge(graphdef, st), images, grid, probe, emb=e))
    iou = np.asarray(cand(state, emb)["iou"], np.float32)
    best = iou.reshape(2, -1, 3)[:, :pps * pps].max(-1)
    thr = float(np.median(best))
    assert 0.2 < np.mean(best > thr) < 0.8

    # no NMS: random weights' masks overlap
    kw = dict(points_per_side=pps, points_per_batch=ppb, pred_iou_thresh=thr,
              stability_score_thresh=0.0, box_nms_thresh=1.0, max_masks=128)
    full = {k: np.asarray(v) for k, v in gen.mask_generator(sam, **kw)(images).items()}
    gated = gen.mask_generator(sam, skip_low_iou=True, **kw)(images)
    gated = {k: np.asarray(v) for k, v in gated.items()}
    assert full["valid"].sum() >= 20, full["valid"].sum(1)
    np.testing.assert_array_equal(gated["valid"], full["valid"])
    np.testing.assert_array_equal(gated["scores"], full["scores"])
    np.testing.assert_array_equal(gated["points"], full["points"])
    v = full["valid"]
    cover = full["masks"][v].mean((1, 2))
    assert (cover > 0.001).sum() >= 10 and (cover < 0.999).sum() >= 10, cover  # masks with edges
    agree = np.mean(gated["masks"][v] == full["masks"][v])
    assert agree >= 0.999, agree  # thresholded bf16 logits: a rounding may flip a pixel
    np.testing.assert_allclose(gated["boxes"][v], full["boxes"][v], atol=2.0)
