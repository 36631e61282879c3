"""MSDeformAttn layer (Deformable-DETR / ViT-Adapter `ops/modules/ms_deform_attn.py`, mmcv
`MultiScaleDeformableAttention` core), ARCHITECTURE.md §3.1.

The layer computes value/offset/weight projections and calls `sarformer_jax.kernels.ms_deform_attn`.
It returns `output_proj(...)` only: residuals, query position embeddings and norms belong to the
caller (injector/extractor add their own residual; the pixel decoder adds `pos` to the query).

Legend: b batch, q queries, s value tokens, n heads, l levels, p points, c channels.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sarformer_jax.kernels import ms_deform_attn
from sarformer_jax.models.layers import Linear, trunc_normal_02


def _grid_bias(n_heads: int, n_levels: int, n_points: int) -> np.ndarray:
    """Deformable-DETR's sampling-offset bias: per head a unit direction at angle 2*pi*h/H,
    scaled so its largest component is 1, times (p + 1) for point p."""
    theta = np.arange(n_heads, dtype=np.float64) * (2.0 * math.pi / n_heads)
    grid = np.stack([np.cos(theta), np.sin(theta)], -1)  # [n, 2]
    grid = grid / np.abs(grid).max(-1, keepdims=True)
    grid = np.tile(grid[:, None, None, :], (1, n_levels, n_points, 1))  # [n, l, p, 2]
    grid = grid * np.arange(1, n_points + 1, dtype=np.float64)[None, None, :, None]
    return grid.reshape(-1).astype(np.float32)


class MSDeformAttn(nnx.Module):
    """Multi-scale deformable attention with learned offsets and weights.

    Args:
      d_model: query / value-input width.
      n_levels, n_heads, n_points: as in Deformable-DETR.
      ratio: value width = ratio * d_model (ViT-Adapter uses 0.5; mmcv 1.0).
      init: "deformable_detr" (zero offset weights + polar-grid bias, zero attention weights,
        xavier value/output projections) or "trunc_normal" (every Linear trunc-normal(0.02),
        zero bias: what the original effectively trained from, ARCHITECTURE §2.9 / §8 #13).
      implementation: forwarded to `ms_deform_attn` (None = platform default).
    """

    def __init__(
        self,
        d_model: int,
        n_levels: int,
        n_heads: int,
        n_points: int,
        *,
        ratio: float = 1.0,
        init: str = "deformable_detr",
        implementation: str | None = None,
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        value_dim = int(d_model * ratio)
        if value_dim % n_heads:
            raise ValueError(f"value width {value_dim} (d_model={d_model} * ratio={ratio}) "
                             f"is not divisible by n_heads={n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.value_dim = value_dim
        self.implementation = implementation
        zeros = nnx.initializers.zeros_init()
        if init == "deformable_detr":
            bias = _grid_bias(n_heads, n_levels, n_points)
            off_kw = dict(kernel_init=zeros, bias_init=lambda *_: jnp.asarray(bias, param_dtype))
            att_kw = dict(kernel_init=zeros, bias_init=zeros)
            proj_kw = dict(kernel_init=nnx.initializers.xavier_uniform(), bias_init=zeros)
        elif init == "trunc_normal":
            off_kw = att_kw = proj_kw = dict(kernel_init=trunc_normal_02, bias_init=zeros)
        else:
            raise ValueError(f"unknown MSDeformAttn init {init!r}")
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.sampling_offsets = Linear(d_model, n_heads * n_levels * n_points * 2, **off_kw, **common)
        self.attention_weights = Linear(d_model, n_heads * n_levels * n_points, **att_kw, **common)
        self.value_proj = Linear(d_model, value_dim, **proj_kw, **common)
        self.output_proj = Linear(value_dim, d_model, **proj_kw, **common)

    def __call__(
        self,
        query: jax.Array,
        reference_points: jax.Array,
        value_input: jax.Array,
        spatial_shapes: Sequence[tuple[int, int]],
    ) -> jax.Array:
        """
        Args:
          query: [B, Lq, d_model].
          reference_points: [B or 1, Lq, L or 1, 2], (x, y) in [0, 1].
          value_input: [B, S, d_model], levels flattened row-major in `spatial_shapes` order.
          spatial_shapes: static ((h, w), ...).
        Returns:
          [B, Lq, d_model].
        """
        b, q, _ = query.shape
        n, l, p = self.n_heads, self.n_levels, self.n_points
        if len(spatial_shapes) != l:
            raise ValueError(f"MSDeformAttn built for {l} levels got spatial_shapes {spatial_shapes}")
        value = self.value_proj(value_input).reshape(b, value_input.shape[1], n, self.value_dim // n)
        offsets = self.sampling_offsets(query).astype(jnp.float32).reshape(b, q, n, l, p, 2)
        logits = self.attention_weights(query).astype(jnp.float32).reshape(b, q, n, l * p)
        weights = jax.nn.softmax(logits, axis=-1).reshape(b, q, n, l, p)
        # offsets are in units of level-l pixels: normalise by (w_l, h_l)
        norm = jnp.asarray([[w, h] for h, w in spatial_shapes], jnp.float32)  # [l, 2] (x, y)
        ref = reference_points.astype(jnp.float32)[:, :, None, :, None, :]  # [b, q, 1, l|1, 1, 2]
        loc = ref + offsets / norm[None, None, None, :, None, :]
        loc = jnp.broadcast_to(loc, (b, q, n, l, p, 2))
        out = ms_deform_attn(value, tuple(spatial_shapes), loc, weights.astype(value.dtype),
                             implementation=self.implementation)
        return self.output_proj(out)
