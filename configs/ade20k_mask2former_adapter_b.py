"""Mask2Former + ViT-Adapter-B baseline (the 56.51 row), ADE20K 640, 160k iterations.

Same backbone, head and optimiser as SARFormer-B; learned query features, no SAM proposals
(ARCHITECTURE §6.3: treat the baseline number as reference only).  Run:
  sarformer train --config configs/ade20k_mask2former_adapter_b.py --workdir runs/m2f_b
Variant `:repo640` follows the original repository's `Beit+mask2former_adapter_640.py` instead
(§6.3): the adapter's MSDeformAttn with its defaults, 6 heads and deform_ratio 1.0 (value width
768), for checkpoints trained with that file.
"""

from sarformer_jax.config import Config
from sarformer_jax.configs import ade20k_sarformer_b, common


def get_config(arg: str | None = None) -> Config:
    args = common.parse_arg(arg, repo640=False)
    cfg = ade20k_sarformer_b.get_config(None)
    cfg.name = "ade20k_mask2former_adapter_b"
    cfg.model.name = "mask2former"
    cfg.model.head.query_init = "learned"
    cfg.model.head.second_pixel_decoder_pass = False
    cfg.guidance.source = "none"
    if args.repo640:
        cfg.model.backbone.deform_num_heads = 6
        cfg.model.backbone.deform_ratio = 1.0
    return cfg
