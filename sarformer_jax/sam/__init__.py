"""Segment Anything in JAX/Flax, file for file with segment-anything: modules, predictor, the
automatic mask generator (host API and a jitted batched device entry point), transforms."""

from sarformer_jax.sam.build import (
    SamConfig,
    build_sam,
    build_sam_vit_b,
    build_sam_vit_h,
    build_sam_vit_l,
    load_sam,
    sam_model_registry,
)
from sarformer_jax.sam.image_encoder import ImageEncoderViT
from sarformer_jax.sam.mask_decoder import MaskDecoder
from sarformer_jax.sam.predictor import SamPredictor
from sarformer_jax.sam.prompt_encoder import PromptEncoder
from sarformer_jax.sam.sam import Sam
from sarformer_jax.sam.transformer import TwoWayTransformer

__all__ = [
    "ImageEncoderViT", "MaskDecoder", "PromptEncoder", "Sam", "SamConfig", "SamPredictor",
    "TwoWayTransformer", "build_sam", "build_sam_vit_b", "build_sam_vit_h", "build_sam_vit_l",
    "load_sam", "sam_model_registry",
]
