"""Blocks shared by the SAM modules (mirrors segment_anything/modeling/common.py): the two-layer
MLP, channel LayerNorm for NHWC maps, a parameter-free GELU that can sit inside an `nnx.List`,
buffers, and a gather-based bilinear resize for large mask stacks.

Legend: b batch, h w spatial, c channels.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sarformer_jax.models.layers import gelu


class Buffer(nnx.Variable):
    """A non-trainable tensor that lives in the checkpoint (e.g. the random Fourier matrix)."""


class GELU(nnx.Module):
    """Exact (erf) GELU as a module, so `nnx.List` indices match torch `nn.Sequential` ones."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return gelu(x)


class ReLU(nnx.Module):
    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(x)


def layer_norm(dim: int, eps: float, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32) -> nnx.LayerNorm:
    """LayerNorm over the last axis with the two-pass variance PyTorch uses.

    For NHWC maps this is also SAM's `LayerNorm2d` (normalising over channels)."""
    return nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)


class MLPBlock(nnx.Module):
    """lin2(act(lin1(x))): the transformer feed-forward block."""

    def __init__(self, embedding_dim: int, mlp_dim: int, *, act: Callable[[jax.Array], jax.Array],
                 rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.lin1 = nnx.Linear(embedding_dim, mlp_dim, **kw)
        self.lin2 = nnx.Linear(mlp_dim, embedding_dim, **kw)
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.lin2(self.act(self.lin1(x)))


@functools.lru_cache(maxsize=64)
def _bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two source indices and the weight of the second one per output index, for PyTorch
    bilinear with align_corners=False (source clamped below at 0, upper neighbour at in-1).

    The source coordinate is computed in float32 as PyTorch's CPU/GPU kernels do for float
    inputs: for non-integer scales its rounding moves the weights by up to ~1e-4."""
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    src = scale * (np.arange(out_size, dtype=f32) + f32(0.5)) - f32(0.5)
    src = np.maximum(src, f32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
    lam = np.clip(src - i0.astype(f32), f32(0.0), f32(1.0)).astype(f32)
    i1 = np.minimum(i0 + 1, in_size - 1)
    return i0, i1, lam


def resize_bilinear_gather(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Resizes the last two axes of `x` [..., h, w] like PyTorch bilinear (align_corners=False,
    no antialias) with two gathers and lerps per axis.

    Each output costs a few flops instead of a matrix row, which matters for thousands of
    256->1024 mask upsamplings in the automatic mask generator."""
    out_h, out_w = size
    in_h, in_w = x.shape[-2:]
    if in_h != out_h:
        i0, i1, lam = _bilinear_taps(in_h, out_h)
        lam = jnp.asarray(lam, x.dtype)[:, None]
        x = jnp.take(x, i0, axis=-2) * (1 - lam) + jnp.take(x, i1, axis=-2) * lam
    if in_w != out_w:
        i0, i1, lam = _bilinear_taps(in_w, out_w)
        lam = jnp.asarray(lam, x.dtype)
        x = jnp.take(x, i0, axis=-1) * (1 - lam) + jnp.take(x, i1, axis=-1) * lam
    return x


@functools.lru_cache(maxsize=64)
def postprocess_matrix(low: int, img_size: int, crop: int, out: int) -> np.ndarray:
    """[out, low] float32: SAM's mask post-processing along one axis as one linear map --
    bilinear low -> img_size, keep the first `crop` rows (the unpadded input), bilinear
    crop -> out (both PyTorch align_corners=False, no antialias; composed in float64)."""

    def interp(n_in, n_out):
        i0, i1, lam = _bilinear_taps(n_in, n_out)
        m = np.zeros((n_out, n_in), np.float64)
        rows = np.arange(n_out)
        np.add.at(m, (rows, i0), 1.0 - lam.astype(np.float64))
        np.add.at(m, (rows, i1), lam.astype(np.float64))
        return m

    up = interp(low, img_size)[:crop]
    return (interp(crop, out) @ up).astype(np.float32)


def postprocess_taps(low: int, img_size: int, crop: int, out: int) -> tuple[np.ndarray, np.ndarray]:
    """`postprocess_matrix` as per-output taps: (indices [out, k] int32, weights [out, k]
    float32), the k <= 4 nonzero entries of each row (padded with weight 0).  The same weights,
    so the same sums up to their order, without multiplying the zeros of a dense matrix."""
    m = postprocess_matrix(low, img_size, crop, out)
    nz = m != 0
    k = max(int(nz.sum(axis=1).max()), 1)
    idx = np.zeros((out, k), np.int32)
    w = np.zeros((out, k), np.float32)
    for o in range(out):
        cols = np.flatnonzero(nz[o])
        idx[o, : len(cols)] = cols
        w[o, : len(cols)] = m[o, cols]
    return idx, w

