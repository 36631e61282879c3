"""SARFormer-B (BEiT-B ViT-Adapter + Mask2Former + SAM guidance), ADE20K 640, 160k iterations.

Published: 56.82 mIoU (single-scale slide).  Run:
  sarformer train --config configs/ade20k_sarformer_b.py --workdir runs/sarformer_b \
      --set data.root=/data/ADEChallengeData2016
Variants (`configs/ade20k_sarformer_b.py:faithful`): `faithful` reproduces the released
checkpoints' quirks (§8: inverted first mask, SAM double normalisation / transpose / stale
embedding).
"""

from sarformer_jax.config import Config
from sarformer_jax.configs import common


def get_config(arg: str | None = None) -> Config:
    args = common.parse_arg(arg, faithful=False)
    cfg = Config(
        name="ade20k_sarformer_b",
        model=Config(
            name="sarformer",
            image_size=(640, 640),
            backbone=common.beit_adapter_b(),
            head=common.mask2former_head(256, pd_heads=8, pd_ffn=1024, dec_heads=8, dec_ffn=2048,
                                         num_feats=128),
            aux_head=common.aux_head(True, 768),
            loss=common.loss(),
            msda_implementation=None,  # None: pallas on GPU, xla on CPU
        ),
        guidance=common.guidance("online"),
        data=common.ade20k_data(),
        train=common.train(batch_size=4, num_steps=160_000),
        eval=common.eval_cfg(),
        init=Config(beit_checkpoint="", sam_checkpoint=""),
    )
    if args.faithful:
        cfg.guidance.invert_first_mask = True
        cfg.guidance.seed_compat = True
        cfg.guidance.deterministic_eval = False
    return cfg
