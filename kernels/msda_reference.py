"""Pure-JAX reference for multi-scale deformable attention (Deformable-DETR, Zhu et al. 2021).

Semantics follow the PyTorch `ms_deform_attn_core_pytorch` / CUDA `MSDeformAttnFunction`:
bilinear sampling with `grid_sample(align_corners=False, padding_mode="zeros")`, so a location
(x, y) in [0, 1] maps to pixel coordinates (x * w - 0.5, y * h - 0.5) and corners that fall
outside the map contribute zero.  Differentiable by autodiff; it is the `"xla"` implementation
and the oracle of the Pallas kernel.

Legend: b batch, s value tokens (sum of h*w), n heads, d head dim, q queries, l levels, p points.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def ms_deform_attn_reference(
    value: jax.Array,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: jax.Array,
    attention_weights: jax.Array,
) -> jax.Array:
    """Multi-scale deformable attention, plain jnp.

    Args:
      value: [B, S, H, D], levels flattened row-major and concatenated in order.
      spatial_shapes: static ((h, w), ...) per level, sum(h * w) == S.
      sampling_locations: [B, Lq, H, L, P, 2], (x, y) normalised to [0, 1] per level.
      attention_weights: [B, Lq, H, L, P].

    Returns:
      [B, Lq, H * D] in value's dtype; accumulation in float32.
    """
    b, _, n, d = value.shape
    _, q, _, _, p, _ = sampling_locations.shape
    out = jnp.zeros((b, n, q * p, d), jnp.float32)
    start = 0
    for lvl, (h, w) in enumerate(spatial_shapes):
        h, w = int(h), int(w)
        v = value[:, start : start + h * w].transpose(0, 2, 1, 3)  # [b, n, hw, d]
        start += h * w
        loc = sampling_locations[:, :, :, lvl].astype(jnp.float32)  # [b, q, n, p, 2]
        loc = loc.transpose(0, 2, 1, 3, 4).reshape(b, n, q * p, 2)
        att = attention_weights[:, :, :, lvl].astype(jnp.float32)  # [b, q, n, p]
        att = att.transpose(0, 2, 1, 3).reshape(b, n, q * p)
        x = loc[..., 0] * w - 0.5
        y = loc[..., 1] * h - 0.5
        x0 = jnp.floor(x)
        y0 = jnp.floor(y)
        fx = x - x0
        fy = y - y0
        for dy in (0, 1):
            wy = fy if dy else 1.0 - fy
            yi = y0 + dy
            for dx in (0, 1):
                wx = fx if dx else 1.0 - fx
                xi = x0 + dx
                valid = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
                idx = (jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)).astype(jnp.int32)
                corner = jnp.take_along_axis(v, idx[..., None], axis=2)  # [b, n, q*p, d]
                coef = jnp.where(valid, wx * wy * att, 0.0)
                out = out + coef[..., None] * corner.astype(jnp.float32)
    out = out.reshape(b, n, q, p, d).sum(axis=3)  # [b, n, q, d]
    return out.transpose(0, 2, 1, 3).reshape(b, q, n * d).astype(value.dtype)
