"""Mask2Former + ViT-Adapter-B baseline (the 56.51 row), ADE20K 640, 160k iterations.

Same backbone, head and optimiser as SARFormer-B; learned query features, no SAM proposals
(ARCHITECTURE §6.3: treat the baseline number as reference only).  Run:
  sarformer train --config configs/ade20k_mask2former_adapter_b.py --workdir runs/m2f_b
"""

from sarformer_jax.config import Config
from sarformer_jax.configs import ade20k_sarformer_b


def get_config(arg: str | None = None) -> Config:
    cfg = ade20k_sarformer_b.get_config(arg)
    cfg.name = "ade20k_mask2former_adapter_b"
    cfg.model.name = "mask2former"
    cfg.model.head.query_init = "learned"
    cfg.model.head.second_pixel_decoder_pass = False
    cfg.guidance.source = "none"
    return cfg
