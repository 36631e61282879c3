"""Public multi-scale deformable attention op: argument checks and implementation dispatch."""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from sarformer_jax.kernels.msda_reference import ms_deform_attn_reference

IMPLEMENTATIONS = ("xla",)


def _normalize_shapes(spatial_shapes) -> tuple[tuple[int, int], ...]:
    arr = np.asarray(spatial_shapes)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"value_spatial_shapes must be (L, 2) (h, w) pairs, got shape {arr.shape}")
    return tuple((int(h), int(w)) for h, w in arr)


def check_shapes(value, spatial_shapes, sampling_locations, attention_weights) -> None:
    """Raises ValueError naming the shapes when the arguments do not fit together."""
    if value.ndim != 4:
        raise ValueError(f"value must be [B, S, H, D], got shape {tuple(value.shape)}")
    if sampling_locations.ndim != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            "sampling_locations must be [B, Lq, H, L, P, 2], got shape "
            f"{tuple(sampling_locations.shape)}"
        )
    if attention_weights.ndim != 5:
        raise ValueError(
            f"attention_weights must be [B, Lq, H, L, P], got shape {tuple(attention_weights.shape)}"
        )
    b, s, n, _ = value.shape
    total = sum(h * w for h, w in spatial_shapes)
    if total != s:
        raise ValueError(
            f"value has S={s} tokens but value_spatial_shapes {list(spatial_shapes)} "
            f"sum to {total}"
        )
    lb, lq, ln, ll, lp, _ = sampling_locations.shape
    if (lb, ln, ll) != (b, n, len(spatial_shapes)):
        raise ValueError(
            f"sampling_locations {tuple(sampling_locations.shape)} does not match value "
            f"{tuple(value.shape)} (B, H) and {len(spatial_shapes)} levels"
        )
    if tuple(attention_weights.shape) != (lb, lq, ln, ll, lp):
        raise ValueError(
            f"attention_weights {tuple(attention_weights.shape)} must equal "
            f"sampling_locations[:-1] {tuple(sampling_locations.shape[:-1])}"
        )


def default_implementation() -> str:
    return "xla"


def ms_deform_attn(
    value: jax.Array,
    value_spatial_shapes: Sequence[tuple[int, int]] | np.ndarray,
    sampling_locations: jax.Array,
    attention_weights: jax.Array,
    *,
    implementation: str | None = None,
) -> jax.Array:
    """Multi-scale deformable attention with Deformable-DETR semantics.

    Args:
      value: [B, S, H, D].
      value_spatial_shapes: static (h, w) per level (tuple or numpy array).
      sampling_locations: [B, Lq, H, L, P, 2] as (x, y) in [0, 1] per level.
      attention_weights: [B, Lq, H, L, P].
      implementation: "xla" (pure-JAX reference); None picks the platform default.

    Returns:
      [B, Lq, H * D].
    """
    shapes = _normalize_shapes(value_spatial_shapes)
    check_shapes(value, shapes, sampling_locations, attention_weights)
    impl = implementation or default_implementation()
    if impl == "xla":
        return ms_deform_attn_reference(value, shapes, sampling_locations, attention_weights)
    raise ValueError(f"unknown implementation {impl!r}; choose one of {IMPLEMENTATIONS}")
