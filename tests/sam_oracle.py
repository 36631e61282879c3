"""Shared by the SAM tests: a reduced-depth segment-anything model with random (non-trivial)
weights, saved as a real .pth and converted through `sarformer_jax.convert.sam`."""

from __future__ import annotations

import functools

import numpy as np
import pytest

DEPTH, GLOBAL = 2, (1,)  # one windowed block, one global block


def torch_sam(depth: int = DEPTH, global_attn_indexes=GLOBAL, embed_dim: int = 768, num_heads: int = 12, seed: int = 0):
    import torch
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    torch.manual_seed(seed)
    sam = Sam(
        image_encoder=ImageEncoderViT(depth=depth, embed_dim=embed_dim, img_size=1024, mlp_ratio=4,
                                      norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
                                      num_heads=num_heads, patch_size=16, qkv_bias=True, use_rel_pos=True,
                                      global_attn_indexes=tuple(global_attn_indexes), window_size=14,
                                      out_chans=256),
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(64, 64),
                                     input_image_size=(1024, 1024), mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                                 transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256),
    ).eval()
    with torch.no_grad():
        for name, p in sam.named_parameters():
            # Zero / one initialised tensors would hide layout bugs: give them random values.
            if "rel_pos" in name or "pos_embed" in name:
                p.normal_(0.0, 0.2)
            elif name.endswith("weight") and ("norm" in name or "neck.1" in name or "neck.3" in name
                                                or "downscaling.1" in name or "downscaling.4" in name
                                                or "upscaling.1" in name):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
        # Trained SAM has confident logits (|x| >> 1) and IoU scores in [0, 1]; scale the random
        # heads so that stability scores and IoU thresholds keep a useful share of the masks.
        for mlp in sam.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[2].weight.mul_(20.0)
            mlp.layers[2].bias.mul_(20.0)
        sam.mask_decoder.iou_prediction_head.layers[2].weight.mul_(4.0)
    return sam


def save_and_convert(tsam, path, depth: int = DEPTH, global_attn_indexes=GLOBAL):
    """Saves `tsam`'s state dict as a real .pth and loads it as users do: `build_sam` with the
    checkpoint (converted on the fly, the model built abstractly and filled, no random init)."""
    import torch

    from sarformer_jax.sam.build import build_sam

    torch.save(tsam.state_dict(), path)
    return build_sam("vit_b", checkpoint=str(path), encoder_depth=depth,
                     global_attn_indexes=global_attn_indexes)


def natural_image() -> np.ndarray:
    """A non-square natural uint8 RGB image (scikit-image's coffee, 400 x 600)."""
    from skimage import data

    return data.coffee()


@pytest.fixture(scope="session")
def sam_pair(tmp_path_factory):
    """(torch SAM, converted JAX SAM, .pth path): reduced-depth vit_b shared by the SAM tests."""
    path = tmp_path_factory.mktemp("sam") / "sam_vit_b_small.pth"
    tsam = torch_sam()
    return tsam, save_and_convert(tsam, path), path
