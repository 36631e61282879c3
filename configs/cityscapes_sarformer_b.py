"""SARFormer-B on Cityscapes (19 classes), crop 512x1024, scale (2048, 1024), 80k iterations.

No Cityscapes SARFormer config exists in the original (ARCHITECTURE §6.2); this follows mmseg's
`_base_/datasets/cityscapes.py`.  `:crop=896` selects upstream ViT-Adapter's 896 crop / stride 512.
  sarformer train --config configs/cityscapes_sarformer_b.py --workdir runs/cs_b \
      --set data.root=/data/cityscapes
"""

from sarformer_jax.config import Config
from sarformer_jax.configs import ade20k_sarformer_b, common


def get_config(arg: str | None = None) -> Config:
    args = common.parse_arg(arg, crop="512x1024")
    cfg = ade20k_sarformer_b.get_config(None)
    cfg.name = "cityscapes_sarformer_b"
    crop = (896, 896) if str(args.crop) == "896" else (512, 1024)
    cfg.model.image_size = crop
    cfg.model.head.num_classes = 19
    cfg.model.aux_head.num_classes = 19
    cfg.data = common.ade20k_data("data/cityscapes")
    cfg.data.update(dataset="cityscapes", num_classes=19, reduce_zero_label=False,
                    crop_size=crop, scale=(2048, 1024))
    cfg.train.num_steps = 80_000
    cfg.train.batch_size = 8
    stride = (512, 512) if crop == (896, 896) else (341, 682)
    cfg.eval = common.eval_cfg(crop=crop, stride=stride, scale=(2048, 1024))
    return cfg
