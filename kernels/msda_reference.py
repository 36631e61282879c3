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
    # One packed gather for every (level, corner) of every point keeps the graph small (one
    # gather forward, one scatter-add backward per call).  The value is gathered in float32 so
    # that its gradient is accumulated in float32 too (a bf16 scatter-add is slow and lossy).
    v = value.astype(jnp.float32).transpose(0, 2, 1, 3)  # [b, n, s, d]
    loc_all = sampling_locations.astype(jnp.float32).transpose(0, 2, 1, 3, 4, 5)  # [b,n,q,l,p,2]
    att_all = attention_weights.astype(jnp.float32).transpose(0, 2, 1, 3, 4)  # [b, n, q, l, p]
    indices, coefs = [], []
    start = 0
    for lvl, (h, w) in enumerate(spatial_shapes):
        h, w = int(h), int(w)
        x = loc_all[:, :, :, lvl, :, 0] * w - 0.5  # [b, n, q, p]
        y = loc_all[:, :, :, lvl, :, 1] * h - 0.5
        att = att_all[:, :, :, lvl]
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
                flat = jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)
                indices.append(start + flat.astype(jnp.int32))
                coefs.append(jnp.where(valid, wx * wy * att, 0.0))
        start += h * w
    idx = jnp.stack(indices, axis=-1).reshape(b, n, -1)  # [b, n, q * p * 4l]
    coef = jnp.stack(coefs, axis=-1).reshape(b, n, q, -1)  # [b, n, q, p * 4l]
    corners = jnp.take_along_axis(v, idx[..., None], axis=2).reshape(b, n, q, -1, d)
    out = jnp.einsum("bnqk,bnqkd->bnqd", coef, corners, precision=jax.lax.Precision.HIGHEST)
    return out.transpose(0, 2, 1, 3).reshape(b, q, n * d).astype(value.dtype)
