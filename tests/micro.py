"""A SARFormer of the real architecture, small enough for CPU tests, and its synthetic data."""

from sarformer_jax.config import load_config


# the architecture's sizes (any model config), and the evaluation's windows
MICRO_MODEL = [
    "model.image_size=(64, 64)", "model.backbone.embed_dim=32", "model.backbone.num_heads=2",
    "model.backbone.deform_num_heads=2", "model.backbone.conv_inplane=8",
    "model.backbone.rel_pos_grid=(4, 4)", "model.head.feat_channels=32",
    "model.head.num_queries=8", "model.head.pixel_decoder.num_heads=2",
    "model.head.pixel_decoder.ffn_dim=64", "model.head.pixel_decoder.num_feats=16",
    "model.head.pixel_decoder.gn_groups=8", "model.head.pixel_decoder.num_layers=1",
    "model.head.decoder.num_layers=2", "model.head.decoder.num_heads=2",
    "model.head.decoder.ffn_dim=64", "model.head.decoder.num_feats=16",
    "model.aux_head.in_channels=32", "model.aux_head.channels=16",
    "model.loss.num_points=256",
]
MICRO_EVAL = ["eval.crop_size=(64, 64)", "eval.stride=(48, 48)", "eval.scale=(256, 64)"]


def micro_config(tmp_path_factory=None, root=None, **extra):
    """A SARFormer of the real architecture, small enough for CPU tests."""
    sets = MICRO_MODEL + [
        "data.crop_size=(64, 64)", "data.scale=(256, 64)",
        f"data.root={root}", f"guidance.cache_dir={root}/proposals",
        "data_gen.num_train=16", "data_gen.num_val=2", "data_gen.image_size=(64, 80)",
        "train.batch_size=8", "train.num_steps=6", "train.ckpt_every=3", "train.eval_every=1000",
        "train.log_every=1",
    ] + MICRO_EVAL
    sets += [f"{k}={v}" for k, v in extra.items()]
    return load_config("tiny", sets)
