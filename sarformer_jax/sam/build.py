"""SAM sizes and builders (mirrors segment_anything/build_sam.py): `SamConfig` presets for vit_b,
vit_l and vit_h, `build_sam`, a `sam_model_registry` dict, and `load_sam` for params written by
`sarformer convert sam`.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable

import jax.numpy as jnp
from flax import nnx
from sarformer_jax.models.layers import init_rngs

from sarformer_jax.sam.image_encoder import ImageEncoderViT
from sarformer_jax.sam.mask_decoder import MaskDecoder
from sarformer_jax.sam.prompt_encoder import PromptEncoder
from sarformer_jax.sam.sam import Sam


@dataclasses.dataclass(frozen=True)
class SamConfig:
    """Encoder sizes of one SAM variant; the prompt encoder and decoder are shared by all."""

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_embed_dim: int = 256

    @classmethod
    def vit_b(cls) -> SamConfig:
        return cls(768, 12, 12, (2, 5, 8, 11))

    @classmethod
    def vit_l(cls) -> SamConfig:
        return cls(1024, 24, 16, (5, 11, 17, 23))

    @classmethod
    def vit_h(cls) -> SamConfig:
        return cls(1280, 32, 16, (7, 15, 23, 31))

    @classmethod
    def preset(cls, model_type: str) -> SamConfig:
        presets = {"vit_b": cls.vit_b, "vit_l": cls.vit_l, "vit_h": cls.vit_h, "default": cls.vit_h}
        if model_type not in presets:
            raise ValueError(f"unknown SAM model_type {model_type!r}; expected one of {sorted(presets)}")
        return presets[model_type]()

    def with_depth(self, depth: int | None, global_attn_indexes=None) -> SamConfig:
        """Reduced-depth copy (tests): by default keeps the global blocks that still exist, or
        makes the last block global."""
        if depth is None and global_attn_indexes is None:
            return self
        depth = self.encoder_depth if depth is None else depth
        if global_attn_indexes is None:
            global_attn_indexes = tuple(i for i in self.encoder_global_attn_indexes if i < depth) or (depth - 1,)
        return dataclasses.replace(self, encoder_depth=depth, encoder_global_attn_indexes=tuple(global_attn_indexes))


def build_sam_from_config(cfg: SamConfig, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32,
                          attention_implementation: str | None = None) -> Sam:
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    grid = cfg.image_size // cfg.patch_size
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.encoder_embed_dim,
            depth=cfg.encoder_depth, num_heads=cfg.encoder_num_heads, mlp_ratio=4.0,
            out_chans=cfg.prompt_embed_dim, qkv_bias=True, use_rel_pos=True, window_size=cfg.window_size,
            global_attn_indexes=cfg.encoder_global_attn_indexes,
            attention_implementation=attention_implementation, **kw),
        prompt_encoder=PromptEncoder(embed_dim=cfg.prompt_embed_dim, image_embedding_size=(grid, grid),
                                     input_image_size=(cfg.image_size, cfg.image_size), mask_in_chans=16, **kw),
        mask_decoder=MaskDecoder(transformer_dim=cfg.prompt_embed_dim, num_multimask_outputs=3,
                                 iou_head_depth=3, iou_head_hidden_dim=256, transformer_depth=2,
                                 transformer_heads=8, transformer_mlp_dim=2048, **kw),
    )


def build_sam(model_type: str = "vit_b", *, rngs: nnx.Rngs | None = None, dtype=None,
              param_dtype=jnp.float32, encoder_depth: int | None = None,
              global_attn_indexes: tuple[int, ...] | None = None, checkpoint: str | None = None,
              attention_implementation: str | None = None) -> Sam:
    """Builds SAM `model_type` (vit_b / vit_l / vit_h) with random weights, or loads `checkpoint`
    (an .npz from `sarformer convert sam`, or an official .pth converted on the fly).

    `encoder_depth` / `global_attn_indexes` override the encoder depth (for tests);
    `attention_implementation` is the image encoder's (see `ImageEncoderViT`)."""
    cfg = SamConfig.preset(model_type).with_depth(encoder_depth, global_attn_indexes)
    if checkpoint is None:
        return build_sam_from_config(cfg, rngs=rngs or init_rngs(0), dtype=dtype,
                                     param_dtype=param_dtype,
                                     attention_implementation=attention_implementation)
    flat = _read_params(checkpoint, model_type, cfg)
    return _filled(cfg, flat, str(checkpoint), dtype=dtype, param_dtype=param_dtype,
                   attention_implementation=attention_implementation)


def _filled(cfg: SamConfig, flat: dict, source: str, **kw) -> Sam:
    """SAM built from `cfg` with every variable taken from `flat`: built abstractly, so no random
    initialisation runs first (~12 s of it for vit_b on a 2-core CPU; more for vit_l / vit_h);
    `update_module` checks that `flat` holds exactly the model's variables."""
    from sarformer_jax.convert.common import update_module

    sam = nnx.eval_shape(lambda: build_sam_from_config(cfg, rngs=init_rngs(0), **kw))
    update_module(sam, flat, source=source)
    return sam


def _read_params(path, model_type: str, cfg: SamConfig) -> dict:
    from sarformer_jax.convert import sam as convert_sam
    from sarformer_jax.convert.common import CheckpointError, load_params

    if str(path).endswith(".npz"):
        flat, meta = load_params(path)
        if meta.get("model_type", model_type) != model_type:
            raise CheckpointError(f"{path}: holds SAM {meta['model_type']}, expected {model_type}")
        return flat
    return convert_sam.convert(path, cfg=cfg)[0]


def load_sam(path: str | pathlib.Path, *, dtype=None, attention_implementation: str | None = None) -> Sam:
    """Builds SAM from an .npz written by `sarformer convert sam` (sizes from its metadata)."""
    from sarformer_jax.convert.common import CheckpointError, load_params

    flat, meta = load_params(path)
    if "model_type" not in meta:
        raise CheckpointError(f"{path}: no SAM metadata (was it written by `sarformer convert sam`?)")
    cfg = SamConfig.preset(meta["model_type"]).with_depth(meta.get("encoder_depth"),
                                                          meta.get("global_attn_indexes"))
    return _filled(cfg, flat, str(path), dtype=dtype,
                   attention_implementation=attention_implementation)


def _builder(model_type: str) -> Callable[..., Sam]:
    def build(checkpoint: str | None = None, **kwargs) -> Sam:
        return build_sam(model_type, checkpoint=checkpoint, **kwargs)

    build.__name__ = f"build_sam_{model_type}"
    return build


build_sam_vit_b = _builder("vit_b")
build_sam_vit_l = _builder("vit_l")
build_sam_vit_h = _builder("vit_h")
sam_model_registry: dict[str, Callable[..., Sam]] = {
    "default": build_sam_vit_h,
    "vit_h": build_sam_vit_h,
    "vit_l": build_sam_vit_l,
    "vit_b": build_sam_vit_b,
}
