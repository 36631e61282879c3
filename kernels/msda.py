"""Public multi-scale deformable attention op: argument checks, implementation dispatch and the
custom_vjp that ties the Pallas forward and backward kernels together.

Implementations: "xla" (msda_reference, differentiated by autodiff; the CPU default), "pallas"
(the Triton-backend kernels of msda_pallas; the GPU default), "pallas_interpret" (the same kernels
run by the Pallas interpreter: CPU tests).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sarformer_jax.kernels.msda_pallas import BlockSizes, msda_pallas_bwd, msda_pallas_fwd
from sarformer_jax.kernels.msda_reference import ms_deform_attn_reference
from sarformer_jax.kernels.triton_backend import gpu_kernels

IMPLEMENTATIONS = ("xla", "pallas", "pallas_interpret")


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
    """"pallas" when the default backend is a GPU (and this jax has Pallas' Triton backend),
    "xla" elsewhere."""
    return "pallas" if gpu_kernels() else "xla"


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _msda_pallas(value, loc, att, shapes, block_sizes, interpret):
    b, q = loc.shape[:2]
    out = msda_pallas_fwd(value, shapes, loc, att, block_sizes=block_sizes, interpret=interpret)
    return out.reshape(b, q, -1)


def _msda_pallas_fwd_rule(value, loc, att, shapes, block_sizes, interpret):
    return _msda_pallas(value, loc, att, shapes, block_sizes, interpret), (value, loc, att)


def _msda_pallas_bwd_rule(shapes, block_sizes, interpret, res, g):
    value, loc, att = res
    b, q, n, _, _, _ = loc.shape
    g = g.reshape(b, q, n, value.shape[-1])
    gv, gloc, gatt = msda_pallas_bwd(value, shapes, loc, att, g, block_sizes=block_sizes,
                                     interpret=interpret)
    return gv.astype(value.dtype), gloc.astype(loc.dtype), gatt.astype(att.dtype)


_msda_pallas.defvjp(_msda_pallas_fwd_rule, _msda_pallas_bwd_rule)


def ms_deform_attn(
    value: jax.Array,
    value_spatial_shapes: Sequence[tuple[int, int]] | np.ndarray,
    sampling_locations: jax.Array,
    attention_weights: jax.Array,
    *,
    implementation: str | None = None,
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """Multi-scale deformable attention with Deformable-DETR semantics.

    Args:
      value: [B, S, H, D].
      value_spatial_shapes: static (h, w) per level (tuple or numpy array).
      sampling_locations: [B, Lq, H, L, P, 2] as (x, y) in [0, 1] per level.
      attention_weights: [B, Lq, H, L, P].
      implementation: "xla" (pure-JAX reference), "pallas" (GPU kernels) or "pallas_interpret"
        (the kernels in the Pallas interpreter); None picks "pallas" on GPU, "xla" elsewhere.
      block_sizes: Pallas tiling; None = `BlockSizes.get_default` (one heuristic).

    Returns:
      [B, Lq, H * D] in value's dtype, accumulated in float32.  Differentiable in value,
      sampling_locations and attention_weights (custom_vjp for the Pallas kernels); works under
      jit, vmap and a batch-sharded jit (the kernel runs per batch shard).
    """
    shapes = _normalize_shapes(value_spatial_shapes)
    check_shapes(value, shapes, sampling_locations, attention_weights)
    impl = implementation or default_implementation()
    if impl == "xla":
        return ms_deform_attn_reference(value, shapes, sampling_locations, attention_weights)
    if impl in ("pallas", "pallas_interpret"):
        if value.shape[-1] not in (16, 32, 64, 128):
            raise ValueError(f"the Pallas kernel needs head dim D in (16, 32, 64, 128); value has "
                             f"shape {tuple(value.shape)}")
        return _msda_pallas(value, jnp.asarray(sampling_locations),
                            jnp.asarray(attention_weights), shapes, block_sizes,
                            impl == "pallas_interpret")
    raise ValueError(f"unknown implementation {impl!r}; choose one of {IMPLEMENTATIONS}")
