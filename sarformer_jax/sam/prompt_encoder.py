"""SAM's prompt encoder (mirrors segment_anything/modeling/prompt_encoder.py): random Fourier
position encoding of points and box corners plus learned type embeddings (sparse prompts), and
a small conv stack for mask prompts (dense prompts).

Legend: b batch (prompts), p points, c channels, h w embedding grid.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sarformer_jax.sam.common import GELU, Buffer, layer_norm

HIGHEST = jax.lax.Precision.HIGHEST


class PositionEmbeddingRandom(nnx.Module):
    """Fourier features sin/cos(2 pi (2x - 1) G) with a fixed Gaussian G [2, c/2]; G is a buffer
    that checkpoints carry (`positional_encoding_gaussian_matrix`)."""

    def __init__(self, num_pos_feats: int = 64, scale: float | None = None, *, rngs: nnx.Rngs):
        scale = 1.0 if scale is None or scale <= 0.0 else scale
        self.positional_encoding_gaussian_matrix = Buffer(
            scale * jax.random.normal(rngs.params(), (2, num_pos_feats), jnp.float32))

    def _pe_encoding(self, coords: jax.Array) -> jax.Array:
        coords = 2 * coords - 1
        coords = jnp.einsum("...i,ic->...c", coords, self.positional_encoding_gaussian_matrix[...],
                            precision=HIGHEST)
        coords = 2 * np.pi * coords
        return jnp.concatenate([jnp.sin(coords), jnp.cos(coords)], axis=-1)

    def __call__(self, size: tuple[int, int]) -> jax.Array:
        """Dense encoding of pixel centres of an h x w grid: [h, w, c]."""
        h, w = size
        y = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
        x = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
        grid = jnp.stack(jnp.broadcast_arrays(x[None, :], y[:, None]), axis=-1)
        return self._pe_encoding(grid)

    def forward_with_coords(self, coords: jax.Array, image_size: tuple[int, int]) -> jax.Array:
        """coords [..., 2] as (x, y) pixels of an image of `image_size` (h, w) -> [..., c]."""
        coords = coords.astype(jnp.float32) / jnp.asarray([image_size[1], image_size[0]], jnp.float32)
        return self._pe_encoding(coords)


class PromptEncoder(nnx.Module):
    """Encodes points, boxes and masks for the mask decoder.

    Args:
      embed_dim: prompt embedding width (256).
      image_embedding_size: (h, w) of the image embedding (64, 64).
      input_image_size: (H, W) of the padded encoder input (1024, 1024).
      mask_in_chans: hidden width of the mask-prompt convs (16).
    """

    def __init__(self, *, embed_dim: int = 256, image_embedding_size: tuple[int, int] = (64, 64),
                 input_image_size: tuple[int, int] = (1024, 1024), mask_in_chans: int = 16,
                 rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embed_dim = embed_dim
        self.input_image_size = tuple(input_image_size)
        self.image_embedding_size = tuple(image_embedding_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2, rngs=rngs)
        # 0 negative point, 1 positive point, 2 box top-left, 3 box bottom-right.
        self.point_embeddings = nnx.List([nnx.Embed(1, embed_dim, param_dtype=param_dtype, rngs=rngs)
                                          for _ in range(4)])
        self.not_a_point_embed = nnx.Embed(1, embed_dim, param_dtype=param_dtype, rngs=rngs)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nnx.List([
            nnx.Conv(1, mask_in_chans // 4, (2, 2), strides=2, padding="VALID", **kw),
            layer_norm(mask_in_chans // 4, 1e-6, **kw),
            GELU(),
            nnx.Conv(mask_in_chans // 4, mask_in_chans, (2, 2), strides=2, padding="VALID", **kw),
            layer_norm(mask_in_chans, 1e-6, **kw),
            GELU(),
            nnx.Conv(mask_in_chans, embed_dim, (1, 1), **kw),
        ])
        self.no_mask_embed = nnx.Embed(1, embed_dim, param_dtype=param_dtype, rngs=rngs)

    def get_dense_pe(self) -> jax.Array:
        """Position encoding of the image embedding grid, [1, h, w, c]."""
        return self.pe_layer(self.image_embedding_size)[None]

    def _embed_points(self, points: jax.Array, labels: jax.Array, pad: bool) -> jax.Array:
        points = points.astype(jnp.float32) + 0.5  # pixel centres
        if pad:
            points = jnp.concatenate([points, jnp.zeros((points.shape[0], 1, 2), points.dtype)], axis=1)
            labels = jnp.concatenate([labels, -jnp.ones((labels.shape[0], 1), labels.dtype)], axis=1)
        emb = self.pe_layer.forward_with_coords(points, self.input_image_size)
        labels = labels[..., None]
        emb = jnp.where(labels == -1, self.not_a_point_embed.embedding[0], emb)
        emb = emb + jnp.where(labels == 0, self.point_embeddings[0].embedding[0], 0.0)
        emb = emb + jnp.where(labels == 1, self.point_embeddings[1].embedding[0], 0.0)
        return emb

    def _embed_boxes(self, boxes: jax.Array) -> jax.Array:
        corners = boxes.astype(jnp.float32).reshape(-1, 2, 2) + 0.5
        emb = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        corner_types = jnp.stack([self.point_embeddings[2].embedding[0], self.point_embeddings[3].embedding[0]])
        return emb + corner_types

    def _embed_masks(self, masks: jax.Array) -> jax.Array:
        x = masks
        for layer in self.mask_downscaling:
            x = layer(x)
        return x

    def __call__(self, points: tuple[jax.Array, jax.Array] | None, boxes: jax.Array | None,
                 masks: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """Args:
          points: (coords [b, p, 2] as (x, y) in the 1024 frame, labels [b, p] int: 1 positive,
            0 negative, -1 padding) or None.
          boxes: [b, 4] xyxy in the 1024 frame, or None.
          masks: [b, 256, 256, 1] mask logits, or None.
        Returns:
          sparse [b, t, c] and dense [b, h, w, c] embeddings; without mask prompts dense is
          [1, h, w, c], the same no-mask embedding for every prompt (upstream expands it to b),
          so that the mask decoder can share the image tokens among prompts."""
        if points is not None:
            bs = points[0].shape[0]
        elif boxes is not None:
            bs = boxes.shape[0]
        elif masks is not None:
            bs = masks.shape[0]
        else:
            bs = 1
        parts = []
        if points is not None:
            parts.append(self._embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            parts.append(self._embed_boxes(boxes))
        sparse = (jnp.concatenate(parts, axis=1) if parts
                  else jnp.zeros((bs, 0, self.embed_dim), jnp.float32))
        if masks is not None:
            dense = self._embed_masks(masks)
        else:
            h, w = self.image_embedding_size
            dense = jnp.broadcast_to(self.no_mask_embed.embedding[0], (1, h, w, self.embed_dim))
        return sparse, dense
