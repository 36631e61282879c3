"""The assembled SAM model (mirrors segment_anything/modeling/sam.py): image encoder, prompt encoder
and mask decoder, with SAM's pre-processing (normalise, pad to 1024) and post-processing (upscale
the low-res logits, crop the padding, resize to the original image).

Legend: b batch, h w spatial, c channels, m masks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sarformer_jax.sam.common import resize_bilinear_gather
from sarformer_jax.sam.image_encoder import ImageEncoderViT
from sarformer_jax.sam.mask_decoder import MaskDecoder
from sarformer_jax.sam.prompt_encoder import PromptEncoder

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


class Sam(nnx.Module):
    """Segment Anything: `image_encoder`, `prompt_encoder`, `mask_decoder` (state-dict names)."""

    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __init__(self, image_encoder: ImageEncoderViT, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder):
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder

    @property
    def img_size(self) -> int:
        return self.image_encoder.img_size

    def preprocess(self, x: jax.Array) -> jax.Array:
        """[b, h, w, 3] RGB in 0..255 (h, w <= img_size) -> normalised, zero-padded at the
        bottom/right to [b, img_size, img_size, 3]."""
        x = (x.astype(jnp.float32) - jnp.asarray(PIXEL_MEAN, jnp.float32)) / jnp.asarray(PIXEL_STD, jnp.float32)
        s = self.img_size
        return jnp.pad(x, ((0, 0), (0, s - x.shape[1]), (0, s - x.shape[2]), (0, 0)))

    def postprocess_masks(self, masks: jax.Array, input_size: tuple[int, int],
                          original_size: tuple[int, int]) -> jax.Array:
        """Low-res logits [..., 256, 256] -> [..., H, W] at the original image size: bilinear to
        img_size, crop to the resized (unpadded) input, bilinear to the original size."""
        s = self.img_size
        masks = resize_bilinear_gather(masks, (s, s))
        masks = masks[..., : input_size[0], : input_size[1]]
        return resize_bilinear_gather(masks, tuple(original_size))

    def embed_image(self, x: jax.Array) -> jax.Array:
        """Resized uint8/float RGB [b, h, w, 3] with max(h, w) = img_size -> [b, 64, 64, 256]."""
        return self.image_encoder(self.preprocess(x))[0]

    def decode(self, image_embeddings: jax.Array, points: tuple[jax.Array, jax.Array] | None = None,
               boxes: jax.Array | None = None, mask_input: jax.Array | None = None,
               multimask_output: bool = True) -> tuple[jax.Array, jax.Array]:
        """Prompts in the img_size frame -> (low-res logits [b, m, 256, 256], IoU [b, m])."""
        sparse, dense = self.prompt_encoder(points, boxes, mask_input)
        return self.mask_decoder(image_embeddings, self.prompt_encoder.get_dense_pe(), sparse, dense,
                                 multimask_output)
