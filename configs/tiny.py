"""The embedded default: synthetic ADE20K-layout data and a tiny SARFormer of the same
architecture (BEiT + ViT-Adapter + MSDeformAttn pixel decoder + masked-attention decoder with
proposal-initialised queries) that trains on a CPU in minutes.

  sarformer data synth --out data/synthetic
  sarformer train --config configs/tiny.py --workdir runs/tiny

Proposals come from the `cached` path: the synthetic generator writes per-object masks in the
proposal-cache format, standing in for SAM's automatic masks (no SAM weights are needed).
"""

from sarformer_jax.config import Config
from sarformer_jax.configs import ade20k_sarformer_b, common


def get_config(arg: str | None = None) -> Config:
    args = common.parse_arg(arg)
    cfg = ade20k_sarformer_b.get_config(None)
    cfg.name = "tiny"
    cfg.model.image_size = (128, 128)
    cfg.model.backbone.update(
        embed_dim=96,
        depth=4,
        num_heads=3,
        drop_path_rate=0.0,
        init_values=0.1,
        interaction_indexes=((0, 0), (1, 1), (2, 2), (3, 3)),
        deform_num_heads=3,
        conv_inplane=16,
        rel_pos_grid=(8, 8),
        msda_init="deformable_detr",
    )
    cfg.model.head = common.mask2former_head(64, pd_heads=4, pd_ffn=128, dec_heads=4, dec_ffn=128,
                                             num_feats=32, num_classes=8)
    cfg.model.head.num_queries = 20
    cfg.model.head.pixel_decoder.num_layers = 2
    cfg.model.head.pixel_decoder.gn_groups = 16
    cfg.model.head.decoder.num_layers = 3
    cfg.model.aux_head = common.aux_head(True, 96, num_classes=8)
    cfg.model.aux_head.channels = 32
    cfg.model.loss.num_points = 1024
    cfg.guidance = common.guidance("cached")
    cfg.guidance.cache_dir = ""  # empty: <data.root>/proposals, written with the synthetic set
    cfg.data = common.ade20k_data("data/synthetic")
    cfg.data.update(dataset="synthetic", num_classes=8, crop_size=(128, 128), scale=(512, 128),
                    num_workers=0)
    cfg.train = common.train(batch_size=8, num_steps=400)
    cfg.train.update(lr=1e-3, weight_decay=0.01, grad_clip_norm=1.0, warmup_steps=20,
                     compute_dtype="float32", log_every=25, eval_every=200, ckpt_every=200)
    cfg.eval = common.eval_cfg(crop=(128, 128), stride=(96, 96), scale=(512, 128))
    cfg.eval.mode = "whole"
    cfg.data_gen = Config(num_train=400, num_val=50, image_size=(160, 192), seed=0)
    if args.get("runlocal"):
        cfg.train.num_steps = 20
    return cfg
