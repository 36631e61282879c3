"""Online SAM guidance inside the jitted train / eval steps (`guidance.source="online"`), the
original's SAM-input quirks (`seed_compat`) and the detector-box merge (`boxes`).

A tiny random-weight SAM (1 encoder block, 256 input) keeps this fast; thresholds 0 keep every
candidate so the generator really returns masks with random weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from micro import micro_config

from sarformer_jax.guidance import (boxes_inside, denormalize, load_guidance_sam,
                                    make_proposal_fn, merge_box_masks, sam_masks, amg_settings)
from sarformer_jax.models.layers import init_rngs
from sarformer_jax.models.mask2former import prepare_proposals
from sarformer_jax.sam.automatic_mask_generator import generate_masks
from sarformer_jax.sam.build import SamConfig, build_sam_from_config

ONLINE = {"guidance.source": "online", "guidance.sam.points_per_side": 4,
          "guidance.sam.points_per_batch": 8, "guidance.sam.pred_iou_thresh": 0.0,
          "guidance.sam.stability_score_thresh": 0.0, "guidance.sam.max_masks": 12,
          "guidance.sam.dtype": "float32", "guidance.sam.image_size": 256,
          "guidance.sam.box_nms_thresh": 1.0}


def tiny_sam():
    return build_sam_from_config(SamConfig(32, 1, 2, (0,), image_size=256), rngs=init_rngs(0))


def _images(cfg, n=2, seed=0):
    rng = np.random.default_rng(seed)
    u8 = rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
    u8[:, 16:40, 20:50] = (200, 30, 30)  # an object SAM can separate
    x = (u8.astype(np.float32) - np.asarray(cfg.data.mean, np.float32)) / np.asarray(cfg.data.std, np.float32)
    return u8, jnp.asarray(x)


def test_online_proposals_are_the_generators_masks_prepared(tmp_path):
    cfg = micro_config(root=tmp_path, **ONLINE)
    sam = tiny_sam()
    graphdef, state = load_guidance_sam(cfg, sam)
    fn = make_proposal_fn(cfg, graphdef)
    u8, x = _images(cfg)
    assert np.array_equal(np.asarray(denormalize(x, cfg.data.mean, cfg.data.std)), u8)
    key = jax.random.key(5)
    got = jax.jit(lambda b, k, g: fn(b, k, False, g))({"image": x}, key, {"sam": state})
    out = generate_masks(sam, u8, points_per_side=4, points_per_batch=8, pred_iou_thresh=0.0,
                         stability_score_thresh=0.0, box_nms_thresh=1.0, max_masks=12)
    assert int(out["valid"].sum()) >= 4  # the generator really produced masks
    want = prepare_proposals(key, out["masks"], out["valid"], 8, noise_placeholders=True)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert got.shape == (2, 8, 64, 64)


def test_guidance_postprocess_and_upscale_keys_select_the_implementations(tmp_path):
    from flax import nnx

    for post in ("taps", "matmul", "auto"):
        cfg = micro_config(root=tmp_path, **ONLINE, **{"guidance.sam.postprocess": post})
        graphdef, state = load_guidance_sam(cfg, tiny_sam())
        assert nnx.merge(graphdef, state).postprocess_implementation == post
    assert nnx.merge(graphdef, state).resolved_postprocess() == "taps"  # "auto" on the CPU
    cfg = micro_config(root=tmp_path, **ONLINE, **{"guidance.sam.postprocess": "bicubic"})
    with pytest.raises(ValueError, match=r"guidance.sam.postprocess.*'bicubic'"):
        load_guidance_sam(cfg, tiny_sam())
    graphdef, state = load_guidance_sam(micro_config(root=tmp_path, **ONLINE), tiny_sam())
    assert nnx.merge(graphdef, state).mask_decoder.transformer.attention_implementation == "auto"
    decoder = nnx.merge(graphdef, state).mask_decoder
    assert decoder.upscale_implementation == "auto"
    assert decoder.resolved_upscale(jnp.bfloat16, 4096) == "blocks"  # "auto" on the CPU
    assert decoder.upscale_fuse_norm is False
    cfg = micro_config(root=tmp_path, **ONLINE, **{"guidance.sam.upscale": "blocks",
                                                   "guidance.sam.decoder_attention": "absorbed",
                                                   "guidance.sam.upscale_fuse_norm": True})
    graphdef, state = load_guidance_sam(cfg, tiny_sam())
    decoder = nnx.merge(graphdef, state).mask_decoder
    assert decoder.upscale_implementation == "blocks"
    assert decoder.upscale_fuse_norm is True
    assert decoder.transformer.attention_implementation == "absorbed"
    cfg = micro_config(root=tmp_path, **ONLINE, **{"guidance.sam.upscale_fuse_norm": "yes"})
    with pytest.raises(ValueError, match=r"guidance.sam.upscale_fuse_norm must be True or False, got 'yes'"):
        load_guidance_sam(cfg, tiny_sam())
    cfg = micro_config(root=tmp_path, **ONLINE, **{"guidance.sam.upscale": "bicubic"})
    with pytest.raises(ValueError, match=r"guidance.sam.upscale.*'bicubic'"):
        load_guidance_sam(cfg, tiny_sam())
    cfg = micro_config(root=tmp_path, **ONLINE, **{"guidance.sam.decoder_attention": "flash"})
    with pytest.raises(ValueError, match=r"guidance.sam.decoder_attention.*'flash'"):
        load_guidance_sam(cfg, tiny_sam())


@pytest.mark.parametrize("seed_compat", [False, True])
def test_online_training_and_evaluation_end_to_end(data_root, tmp_path, monkeypatch, seed_compat):
    from sarformer_jax.evaluate import evaluate_state
    from sarformer_jax.train import train

    cfg = micro_config(root=data_root, **ONLINE, **{"train.num_steps": 2, "train.eval_every": 2,
                                                    "train.ckpt_every": 2,
                                                    "guidance.seed_compat": seed_compat,
                                                    # square windows (seed_compat's transpose)
                                                    "eval.mode": "slide" if seed_compat else "whole"})
    sam = tiny_sam()
    from sarformer_jax import train as train_mod

    real = train_mod.create_trainer
    monkeypatch.setattr(train_mod, "create_trainer", lambda c, **k: real(c, sam=sam, **k))
    out = train(cfg, tmp_path / "w", progress=False, devices=jax.devices()[:1])
    trainer, state = out["trainer"], out["state"]
    assert out["step"] == 2 and all(np.isfinite(v) for _, v in out["curve"])
    # SAM is an input of the step, not a trained parameter
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state["params"])]
    assert not any("image_encoder" in n or "mask_decoder" in n for n in names)
    assert "sam" in trainer.guide
    # seed_compat: the first image's embedding and its masks, decoded once, beside SAM's params
    assert ("stale_auto" in trainer.guide) == seed_compat
    if seed_compat:
        assert trainer.guide["stale_auto"]["masks"].sharding.is_equivalent_to(
            trainer.guide["stale_embedding"].sharding, 4)
        assert trainer.guide["stale_auto"]["masks"].sharding.is_fully_replicated
    # evaluation runs SAM per window, deterministically, and matches the loop's evaluation
    (_, miou), = out["evals"]
    again = evaluate_state(cfg, trainer, state, progress=False)
    assert again["mIoU"] == pytest.approx(miou, abs=1e-12)


def test_seed_compat_stale_embedding_makes_proposals_image_independent(tmp_path):
    cfg = micro_config(root=tmp_path, **ONLINE, **{"guidance.seed_compat": True})
    sam = tiny_sam()
    _, x = _images(cfg, n=3)
    s = amg_settings(cfg)
    # no stale embedding yet: each image gets its own (transposed, double-normalised) embedding
    fresh, _ = jax.jit(lambda b: sam_masks(sam, b, cfg, s))({"image": x})
    assert not np.array_equal(np.asarray(fresh[0]), np.asarray(fresh[1]))
    # the stale embedding of the first image is reused: every image gets the same masks, which
    # are the first image's
    from sarformer_jax.guidance import faithful_embedding

    stale = faithful_embedding(sam, x[:1])
    masks, valid = jax.jit(lambda b, e: sam_masks(sam, b, cfg, s, e))({"image": x[1:]}, stale)
    for i in range(2):
        np.testing.assert_array_equal(np.asarray(masks[i]), np.asarray(fresh[0]))
    with pytest.raises(ValueError, match="square"):
        sam_masks(sam, {"image": x[:, :, :32]}, cfg, s)


@pytest.mark.parametrize("source", ["online", "boxes"])
def test_seed_compat_reuses_the_stale_embeddings_masks(tmp_path, source):
    """With the stale embedding fixed, the point grid decodes to the same masks for every image
    of a size, so `init_stale_embedding` decodes them once ("stale_auto") and the step reuses
    them: the same proposals as decoding in the step, no mask decoder in the step's program, and
    images of another size still decoded."""
    from sarformer_jax.guidance import init_stale_embedding

    cfg = micro_config(root=tmp_path, **dict(ONLINE, **{"guidance.seed_compat": True,
                                                        "guidance.source": source}))
    graphdef, state = load_guidance_sam(cfg, tiny_sam())
    fn = make_proposal_fn(cfg, graphdef)
    f = jax.jit(lambda b, k, g: fn(b, k, False, g))
    _, x = _images(cfg, n=3)
    guide = init_stale_embedding(cfg, graphdef, {"sam": state}, x[:1])
    auto = guide["stale_auto"]
    assert auto["masks"].shape == (1, 12, 64, 64) and int(auto["valid"].sum()) >= 4
    decoded = {k: v for k, v in guide.items() if k != "stale_auto"}
    batch = {"image": x[1:]}
    if source == "boxes":
        batch["boxes"] = jnp.asarray([[[4.0, 4.0, 40.0, 30.0], [np.nan] * 4]] * 2)
    key = jax.random.key(3)
    want = np.asarray(f(batch, key, decoded))
    got = np.asarray(f(batch, key, guide))
    np.testing.assert_array_equal(got, want)
    assert want.any() and not want.all()
    text = lambda g: f.lower(batch, key, g).as_text(debug_info=True)
    assert "sam_mask_decoder" in text(decoded)
    assert text(guide).count("sam_mask_decoder") < text(decoded).count("sam_mask_decoder")
    # the reused masks are what the step uses: other masks give other proposals
    flipped = dict(guide, stale_auto=dict(auto, masks=~auto["masks"]))
    assert not np.array_equal(np.asarray(f(batch, key, flipped)), want)
    # a batch of another size is decoded from the embedding (the masks are for 64 x 64)
    small = dict(batch, image=x[1:, :48, :48])
    np.testing.assert_array_equal(np.asarray(f(small, key, guide)),
                                  np.asarray(f(small, key, decoded)))
    assert "sam_mask_decoder" in f.lower(small, key, guide).as_text(debug_info=True)


def test_detector_boxes_drop_contained_sam_masks_and_come_first():
    det = jnp.asarray([[10.0, 10.0, 30.0, 30.0], [0.0, 0.0, 0.0, 0.0]])
    det_valid = jnp.asarray([True, False])
    sam_boxes = jnp.asarray([[12.0, 8.0, 33.0, 31.0],  # inside within 5 px
                             [12.0, 2.0, 20.0, 20.0],  # 8 px above the box: kept
                             [0.0, 0.0, 1.0, 1.0]])  # inside only the invalid box: kept
    np.testing.assert_array_equal(np.asarray(boxes_inside(sam_boxes, det, det_valid)),
                                  [True, False, False])
    h = w = 4
    out = {"masks": jnp.stack([jnp.full((3, h, w), v) for v in (True,)])[:, :] & jnp.asarray(
               [True, True, False])[None, :, None, None],
           "valid": jnp.asarray([[True, True, False]]),
           "boxes": sam_boxes[None], "det_boxes": det[None], "box_valid": det_valid[None],
           "box_masks": jnp.zeros((1, 2, h, w), bool).at[0, 0, 0, 0].set(True)}
    masks, valid = merge_box_masks(out)
    # box mask first, then the SAM mask that is not inside the box; the rest invalid
    np.testing.assert_array_equal(np.asarray(valid[0]), [True, True, False, False, False])
    assert bool(masks[0, 0, 0, 0]) and int(masks[0, 0].sum()) == 1
    assert bool(masks[0, 1].all())


def test_generator_stages_are_named_for_the_profiler():
    """The profile summary (benchmarks.profile.SCOPES) attributes kernels to the generator's
    stages through these scopes in the compiled program's metadata."""
    from flax import nnx

    from sarformer_jax.benchmarks.profile import SCOPES, hlo_op_names
    from sarformer_jax.sam.automatic_mask_generator import AmgSettings, _generate

    graphdef, state = nnx.split(tiny_sam())
    s = AmgSettings(points_per_side=4, points_per_batch=8, max_masks=6)
    hlo = _generate.lower(graphdef, state, jnp.zeros((1, 64, 64, 3), jnp.uint8), None, s,
                          False).compile().as_text()
    names = " ".join(hlo_op_names(hlo).values())
    for scope in ("sam_encoder", "sam_mask_decoder", "sam_postprocess", "sam_nms"):
        assert scope in SCOPES and scope in names, scope


def test_fused_image_token_kernel_in_sharded_online_guidance(tmp_path):
    """The online proposals with the mask decoder's image-token update as the Pallas kernel
    (interpreted here) under a jit whose images are sharded over 8 devices, on the train step's
    kind of mesh (automatic axes): the same proposals as the XLA path, and the kernel adds no
    all-gather (it runs on each device's images)."""
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    cfg = micro_config(root=tmp_path, **ONLINE)
    mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
    _, x = _images(cfg, n=8)
    x = jax.device_put(x, NamedSharding(mesh, P("data")))
    key = jax.random.key(2)
    outs = {}
    for impl in ("absorbed", "absorbed_pallas_interpret"):
        graphdef, state = load_guidance_sam(cfg, tiny_sam())
        sam = nnx.merge(graphdef, state)
        sam.mask_decoder.transformer.attention_implementation = impl
        graphdef, state = nnx.split(sam)
        fn = make_proposal_fn(cfg, graphdef)
        f = jax.jit(lambda b, k, g: fn(b, k, False, g))
        args = ({"image": x}, key, {"sam": state})
        outs[impl] = (np.asarray(f(*args)), f.lower(*args).compile().as_text().count("all-gather"))
    (want, gathers), (got, gathers_kernel) = outs["absorbed"], outs["absorbed_pallas_interpret"]
    assert got.shape == (8, 8, 64, 64)
    assert np.mean(got == want) >= 0.999  # thresholded masks: a rounding may flip a pixel
    assert gathers_kernel == gathers


def test_skip_low_iou_gives_the_same_proposals_on_sharded_images(tmp_path):
    """`guidance.sam.skip_low_iou` (upscale only the prompts with a mask over the IoU threshold):
    the online proposals equal the full path's in a jit whose 4 images are split over 4
    devices, and the gated program gathers nothing more across devices than the full one (each
    image's prompts are sorted and gathered on its own device).  The threshold is the median of
    the prompts' best IoU, so about half of them are skipped."""
    import re

    from jax.sharding import NamedSharding, PartitionSpec

    from sarformer_jax.sam.automatic_mask_generator import _candidates

    sets = dict(ONLINE)
    probe_cfg = micro_config(root=tmp_path, **sets)
    sam = tiny_sam()
    u8, x = _images(probe_cfg, n=4)
    s0 = amg_settings(probe_cfg)
    iou = np.asarray(jax.jit(lambda u: _candidates(sam, u, s0.points(), s0)["iou"])(jnp.asarray(u8)))
    thr = float(np.median(iou.reshape(4, -1, 3).max(-1)))
    sets["guidance.sam.pred_iou_thresh"] = thr
    plain = micro_config(root=tmp_path, **dict(sets, **{"guidance.sam.skip_low_iou": False}))
    gated = micro_config(root=tmp_path, **dict(sets, **{"guidance.sam.skip_low_iou": True}))
    assert amg_settings(gated).skip_low_iou and not amg_settings(plain).skip_low_iou
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]), ("data",))
    xs = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    out, gathers, loops = [], [], []
    for cfg in (plain, gated):
        s = amg_settings(cfg)
        f = jax.jit(lambda im, cfg=cfg, s=s: sam_masks(sam, {"image": im}, cfg, s))
        out.append([np.asarray(v) for v in f(xs)])
        text = f.lower(xs).compile().as_text()
        gathers.append(len(re.findall(r"\ball-gather(-start)?\(", text)))
        loops.append(len(re.findall(r"\bwhile\(", text)))
    (m0, v0), (m1, v1) = out
    assert v0.any() and not v0.all()
    np.testing.assert_array_equal(v1, v0)
    np.testing.assert_array_equal(m1, m0)
    assert gathers[1] <= gathers[0], gathers
    assert loops[1] > loops[0], loops  # the gated program has its group loop
