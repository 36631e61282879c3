"""The assembled segmentors: SARFormer (BEiT ViT-Adapter + Mask2Former head initialised from
mask proposals) and the Mask2Former ViT-Adapter baseline (learned queries, no proposals).

ARCHITECTURE.md §1-§5.  The proposals are an *input* ([B, Q, H, W] in {0, 1}, already brought to
Q slots by `mask2former.prepare_proposals`); where they come from (SAM online, a cache, boxes) is
the caller's business (`sarformer_jax.guidance`).

Legend: b batch, h w spatial, c channels, q queries, k classes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sarformer_jax.models.mask2former import Mask2FormerHead
from sarformer_jax.models.vit_adapter import BEiTAdapter

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class Segmentor(nnx.Module):
    """Backbone + Mask2Former head (+ auxiliary FCN head for training)."""

    def __init__(self, cfg_model, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.name = cfg_model.name
        if self.name not in ("sarformer", "mask2former"):
            raise ValueError(f"model.name must be 'sarformer' or 'mask2former', got {self.name!r}")
        impl = cfg_model.get("msda_implementation")
        bb = cfg_model.backbone
        self.backbone = BEiTAdapter(bb, tuple(cfg_model.image_size), dtype=dtype,
                                    param_dtype=param_dtype, msda_implementation=impl,
                                    attention_implementation=bb.get("attention", "auto"), rngs=rngs)
        head_cfg = cfg_model.head
        self.uses_proposals = head_cfg.query_init == "sam_pooling"
        self.decode_head = Mask2FormerHead(head_cfg, [bb.embed_dim] * 4, num_classes=head_cfg.num_classes,
                                           dtype=dtype, param_dtype=param_dtype,
                                           msda_implementation=impl, rngs=rngs)
        aux = cfg_model.get("aux_head")
        if aux is not None and aux.enabled:
            from sarformer_jax.models.aux_head import AdapterFCNHead

            self.auxiliary_head = AdapterFCNHead(aux, dtype=dtype, param_dtype=param_dtype,
                                                 rngs=rngs)
        else:
            self.auxiliary_head = None

    def __call__(self, images: jax.Array, proposals: jax.Array | None = None, *,
                 train: bool = False, invert_first_mask: bool = False
                 ) -> tuple[list[dict], jax.Array | None, dict[str, Any]]:
        """
        Args:
          images: [B, H, W, 3] normalised RGB (H, W divisible by 32).
          proposals: [B, Q, H, W] float in [0, 1] (SARFormer) or None (baseline).
        Returns:
          (predictions: 10 dicts {"cls": [B, Q, K+1], "mask": [B, Q, H/4, W/4]} from d0 to the
          last layer, auxiliary logits [B, H/16, W/16, K] or None, intermediates).
        """
        if self.uses_proposals and proposals is None:
            raise ValueError("SARFormer needs proposals [B, Q, H, W] (guidance.source != 'none')")
        with jax.named_scope("backbone"):  # scopes name the kernels in profiles
            feats_norm, feats_raw, inter = self.backbone(images, train=train)
        with jax.named_scope("decode_head"):
            preds, head_inter = self.decode_head(
                feats_norm, feats_raw if self.uses_proposals else None,
                proposals if self.uses_proposals else None,
                invert_first_mask=invert_first_mask, train=train)
        inter = dict(inter, **{f"head.{k}": v for k, v in head_inter.items()})
        aux_logits = None
        if self.auxiliary_head is not None and train:
            with jax.named_scope("auxiliary_head"):
                aux_logits, _ = self.auxiliary_head(list(feats_norm), train=train)
        return preds, aux_logits, inter


def build_model(cfg, *, rngs: nnx.Rngs, dtype: str | None = None) -> Segmentor:
    """Builds the segmentor of `cfg.model` with the compute dtype of `cfg.train`."""
    name = dtype or cfg.train.get("compute_dtype", "float32")
    return Segmentor(cfg.model, dtype=DTYPES[name], param_dtype=jnp.float32, rngs=rngs)
