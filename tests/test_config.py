"""Configs load by path and by name, overrides apply, unknown keys fail with nearby keys, and
the real configs carry the spec's hyperparameters (ARCHITECTURE.md)."""

import pathlib

import pytest

from sarformer_jax.config import ConfigError, apply_overrides, load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
NAMES = ["tiny", "ade20k_sarformer_b", "ade20k_sarformer_l", "ade20k_mask2former_adapter_b",
         "cityscapes_sarformer_b"]


@pytest.mark.parametrize("name", NAMES)
def test_load_by_name_and_path(name):
    a = load_config(name)
    b = load_config(str(ROOT / "configs" / f"{name}.py"))
    assert a.to_dict() == b.to_dict()


def test_overrides_and_types():
    cfg = load_config("ade20k_sarformer_b", ["train.batch_size=16", "train.lr=1",
                                             "data.root=/data/ade", "data.crop_size=[512,512]",
                                             "guidance.invert_first_mask=True"])
    assert cfg.train.batch_size == 16
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.data.root == "/data/ade"
    assert cfg.data.crop_size == (512, 512)
    assert cfg.guidance.invert_first_mask is True


def test_unknown_key_lists_nearby():
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config("tiny", ["train.batchsize=3"])
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config("tiny", ["nosuchgroup.x=1"])
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides(load_config("tiny"), ["train.batch_size"])


def test_sarformer_b_matches_spec():
    cfg = load_config("ade20k_sarformer_b")
    bb = cfg.model.backbone
    assert (bb.embed_dim, bb.depth, bb.num_heads, bb.patch_size) == (768, 12, 12, 16)
    assert bb.interaction_indexes == ((0, 2), (3, 5), (6, 8), (9, 11))
    assert (bb.drop_path_rate, bb.init_values, bb.deform_num_heads, bb.n_points,
            bb.deform_ratio) == (0.1, 0.1, 12, 4, 0.5)
    assert (bb.conv_inplane, bb.cffn_ratio, bb.layer_norm_eps) == (64, 0.25, 1e-6)
    head = cfg.model.head
    assert (head.feat_channels, head.num_queries, head.num_classes) == (256, 100, 150)
    assert (head.pixel_decoder.num_layers, head.pixel_decoder.num_heads,
            head.pixel_decoder.ffn_dim, head.pixel_decoder.num_feats) == (6, 8, 1024, 128)
    assert (head.decoder.num_layers, head.decoder.num_heads, head.decoder.ffn_dim) == (9, 8, 2048)
    loss = cfg.model.loss
    assert (loss.class_weight, loss.mask_weight, loss.dice_weight, loss.no_object_weight) == (
        2.0, 5.0, 5.0, 0.1)
    assert (loss.num_points, loss.oversample_ratio, loss.importance_sample_ratio,
            loss.aux_weight) == (12544, 3.0, 0.75, 0.4)
    assert cfg.model.aux_head.enabled and cfg.model.aux_head.channels == 256
    tr = cfg.train
    assert (tr.lr, tr.weight_decay, tr.b1, tr.b2, tr.eps, tr.grad_clip_norm) == (
        2e-5, 0.05, 0.9, 0.999, 1e-8, 0.01)
    assert (tr.schedule, tr.power, tr.warmup_steps, tr.num_steps) == ("poly", 0.9, 0, 160_000)
    assert (tr.eval_every, tr.ckpt_every) == (5000, 40_000)
    d = cfg.data
    assert (d.crop_size, d.scale, d.ratio_range, d.cat_max_ratio) == (
        (640, 640), (2560, 640), (0.5, 2.0), 0.75)
    assert d.mean == (123.675, 116.28, 103.53) and d.std == (58.395, 57.12, 57.375)
    assert cfg.eval.mode == "slide" and cfg.eval.stride == (426, 426)
    sam = cfg.guidance.sam
    assert (sam.model_type, sam.points_per_side, sam.points_per_batch, sam.pred_iou_thresh,
            sam.stability_score_thresh, sam.box_nms_thresh) == ("vit_b", 32, 64, 0.88, 0.95, 0.7)


def test_sarformer_l_and_baseline():
    cfg = load_config("ade20k_sarformer_l")
    bb = cfg.model.backbone
    assert (bb.embed_dim, bb.depth, bb.num_heads, bb.drop_path_rate, bb.init_values) == (
        1024, 24, 16, 0.2, 1e-6)
    assert bb.interaction_indexes == ((0, 5), (6, 11), (12, 17), (18, 23))
    head = cfg.model.head
    assert (head.feat_channels, head.pixel_decoder.num_heads, head.pixel_decoder.ffn_dim,
            head.pixel_decoder.num_feats, head.decoder.num_heads, head.decoder.ffn_dim) == (
        1024, 32, 4096, 512, 32, 4096)
    assert not cfg.model.aux_head.enabled
    assert cfg.guidance.sam.model_type == "vit_b"
    # measured on an H100 (train run 30): the pixel decoder unrolled on GPUs, the backbone scanned
    assert head.pixel_decoder.scan_layers == "auto" and bb.scan_layers is True
    base = load_config("ade20k_mask2former_adapter_b")
    assert base.model.name == "mask2former" and base.model.head.query_init == "learned"
    assert base.guidance.source == "none"
    faithful = load_config("ade20k_sarformer_b:faithful")
    assert faithful.guidance.invert_first_mask and faithful.guidance.seed_compat


def test_cityscapes_variants():
    cfg = load_config("cityscapes_sarformer_b")
    assert cfg.data.crop_size == (512, 1024) and cfg.data.scale == (2048, 1024)
    assert cfg.model.head.num_classes == 19 and not cfg.data.reduce_zero_label
    assert load_config("cityscapes_sarformer_b:crop=896").data.crop_size == (896, 896)


def test_baseline_repo640_variant_has_the_adapter_defaults():
    """§6.3: `Beit+mask2former_adapter_640.py` ran the adapter's MSDeformAttn with its defaults
    (6 heads, deform_ratio 1.0): the value projection keeps the full width and the offsets are
    sized for 6 heads; the default baseline shares SARFormer-B's backbone."""
    from sarformer_jax.convert.mmseg import expected_shapes

    shapes = {}
    for arg in ("", ":repo640"):
        params, _ = expected_shapes(load_config("ade20k_mask2former_adapter_b" + arg, ["model.image_size=(64, 64)"]))
        shapes[arg] = params
    key = next(k for k in shapes[""] if "interactions.0.injector.attn.value_proj" in k and k.endswith("kernel"))
    off = next(k for k in shapes[""] if "interactions.0.injector.attn.sampling_offsets" in k and k.endswith("kernel"))
    assert shapes[""][key] == (768, 384) and shapes[":repo640"][key] == (768, 768)
    assert shapes[""][off][-1] == 12 * 3 * 4 * 2 and shapes[":repo640"][off][-1] == 6 * 3 * 4 * 2
