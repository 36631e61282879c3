"""SAM's ViT image encoder (mirrors segment_anything/modeling/image_encoder.py): patch embedding,
absolute position embedding, pre-norm blocks with windowed (14x14, zero-padded) or global
attention and decomposed relative positions, and the 1x1 + 3x3 conv neck with channel LayerNorms.

Legend: b batch, h w token grid, c channels, n heads, d head dim, k key positions along one axis.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sarformer_jax.models.layers import (attention, bilinear_matrix, gelu, narrow_v_supported,
                                         resolve_attention)
from sarformer_jax.sam.common import MLPBlock, layer_norm


@functools.lru_cache(maxsize=64)
def _rel_pos_index(q_size: int, k_size: int) -> np.ndarray:
    """[q, k] row of the (resized) table for each query/key pair, as upstream's `get_rel_pos`
    computes it (float coordinates truncated to integers)."""
    q = np.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
    k = np.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
    return ((q - k) + (k_size - 1) * max(q_size / k_size, 1.0)).astype(np.int64)


def get_rel_pos(q_size: int, k_size: int, rel_pos: jax.Array) -> jax.Array:
    """Relative-position embeddings [q, k, d] gathered from `rel_pos` [L, d]; the table is
    resized with 1-D linear interpolation (align_corners=False) when L != 2*max(q, k) - 1."""
    length = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != length:
        m = jnp.asarray(bilinear_matrix(rel_pos.shape[0], length), rel_pos.dtype)
        rel_pos = jnp.einsum("ol,ld->od", m, rel_pos, precision=jax.lax.Precision.HIGHEST)
    return rel_pos[_rel_pos_index(q_size, k_size)]


def window_partition(x: jax.Array, window: int, fill: jax.Array | None = None
                     ) -> tuple[jax.Array, tuple[int, int]]:
    """[b, h, w, c] -> [b * nh * nw, window, window, c] after padding h, w up to multiples of
    `window` with zeros, or with the vector `fill` [c]; returns the padded size too."""
    b, h, w, c = x.shape
    ph, pw = (-h) % window, (-w) % window
    if ph or pw:
        x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
        if fill is not None:
            inside = (np.arange(h + ph)[:, None] < h) & (np.arange(w + pw)[None, :] < w)
            x = jnp.where(inside[None, :, :, None], x, fill.astype(x.dtype))
    hp, wp = h + ph, w + pw
    x = x.reshape(b, hp // window, window, wp // window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window, window, c), (hp, wp)


def window_unpartition(x: jax.Array, window: int, padded: tuple[int, int], hw: tuple[int, int]) -> jax.Array:
    """Inverse of `window_partition`, dropping the padding."""
    hp, wp = padded
    h, w = hw
    b = x.shape[0] // ((hp // window) * (wp // window))
    x = x.reshape(b, hp // window, wp // window, window, window, -1).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, hp, wp, -1)[:, :h, :w, :]


class Attention(nnx.Module):
    """Multi-head self-attention over a 2-D token grid with decomposed relative positions."""

    def __init__(self, dim: int, *, num_heads: int, qkv_bias: bool = True, use_rel_pos: bool = True,
                 input_size: tuple[int, int], rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32,
                 implementation: str | None = None):
        self.num_heads = num_heads
        self.implementation = implementation
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv = nnx.Linear(dim, 3 * dim, use_bias=qkv_bias, **kw)
        self.proj = nnx.Linear(dim, dim, **kw)
        self.use_rel_pos = use_rel_pos
        self.dtype = dtype
        if use_rel_pos:
            self.rel_pos_h = nnx.Param(jnp.zeros((2 * input_size[0] - 1, head_dim), param_dtype))
            self.rel_pos_w = nnx.Param(jnp.zeros((2 * input_size[1] - 1, head_dim), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj(self.attend(self.qkv(x)))

    def attend(self, qkv: jax.Array) -> jax.Array:
        """The attention between the projections: qkv [b, h, w, 3c] -> [b, h, w, c] (before
        `proj`)."""
        b, h, w, c3 = qkv.shape
        c, n = c3 // 3, self.num_heads
        qkv = qkv.reshape(b, h, w, 3, n, c // n)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]  # [b, h, w, n, d]
        impl = resolve_attention(self.implementation, q.dtype)
        if impl == "cudnn" and self.implementation in (None, "auto") and narrow_v_supported():
            try:  # SAM run 8: 5-9 % faster encoders on an H200
                return self._fused(q, k, v, "cudnn_narrow_v").reshape(b, h, w, c)
            except NotImplementedError:  # raised while tracing: this cuDNN lacks it
                pass
        if impl in ("cudnn", "cudnn_narrow_v"):
            return self._fused(q, k, v, impl).reshape(b, h, w, c)
        logits = jnp.einsum("bhwnd,bxynd->bnhwxy", q * self.scale, k)
        if self.use_rel_pos:
            rh = get_rel_pos(h, h, self.rel_pos_h[...]).astype(q.dtype)  # [h, x, d]
            rw = get_rel_pos(w, w, self.rel_pos_w[...]).astype(q.dtype)  # [w, y, d]
            rel_h = jnp.einsum("bhwnd,hxd->bnhwx", q, rh)
            rel_w = jnp.einsum("bhwnd,wyd->bnhwy", q, rw)
            logits = logits + rel_h[..., :, None] + rel_w[..., None, :]
        logits = logits.reshape(b, n, h, w, h * w)
        attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bnhwk,bknd->bhwnd", attn, v.reshape(b, h * w, n, c // n))
        return out.reshape(b, h, w, c)

    def _fused(self, q: jax.Array, k: jax.Array, v: jax.Array, implementation: str = "cudnn"):
        """The same attention as one fused (flash) attention call: the decomposed relative
        positions become extra channels.  With rel_h[q, x] = q . Rh[row(q), x] and
        rel_w[q, y] = q . Rw[col(q), y], the logit of key (x, y) is
        [scale q, rel_h[q], rel_w[q]] . [k, onehot(x), onehot(y)], so queries carry
        d + h + w channels and keys their one-hot row and column.  Returns [b, h, w, n, d]."""
        b, h, w, n, d = q.shape
        parts_q, parts_k = [q * jnp.asarray(self.scale, q.dtype)], [k]
        if self.use_rel_pos:
            rh = get_rel_pos(h, h, self.rel_pos_h[...]).astype(q.dtype)  # [h, x, d]
            rw = get_rel_pos(w, w, self.rel_pos_w[...]).astype(q.dtype)  # [w, y, d]
            parts_q += [jnp.einsum("bhwnd,hxd->bhwnx", q, rh), jnp.einsum("bhwnd,wyd->bhwny", q, rw)]
            eye_h = jnp.broadcast_to(jnp.eye(h, dtype=k.dtype)[None, :, None, None, :], (b, h, w, n, h))
            eye_w = jnp.broadcast_to(jnp.eye(w, dtype=k.dtype)[None, None, :, None, :], (b, h, w, n, w))
            parts_k += [eye_h, eye_w]
        qa = jnp.concatenate(parts_q, -1).reshape(b, h * w, n, -1)
        ka = jnp.concatenate(parts_k, -1).reshape(b, h * w, n, -1)
        out = attention(qa, ka, v.reshape(b, h * w, n, d), scale=1.0, implementation=implementation)
        return out.reshape(b, h, w, n, d)


class Block(nnx.Module):
    """Pre-norm transformer block; `window_size` 0 means global attention."""

    def __init__(self, dim: int, *, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 use_rel_pos: bool = True, window_size: int = 0, input_size: tuple[int, int],
                 rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32,
                 attention_implementation: str | None = None):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = layer_norm(dim, 1e-6, **kw)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, use_rel_pos=use_rel_pos,
                              input_size=input_size if window_size == 0 else (window_size, window_size),
                              implementation=attention_implementation, **kw)
        self.norm2 = layer_norm(dim, 1e-6, **kw)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), act=gelu, **kw)
        self.window_size = window_size

    def __call__(self, x: jax.Array) -> jax.Array:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            # Upstream pads the normalised tokens with zeros, partitions, then projects q, k, v
            # (and applies `proj`) per window.  The projections are per token, so they run here
            # on the unpadded grid (~20 % fewer rows at 64 -> 70), the padding of q, k, v being
            # what a zero token projects to -- the qkv bias -- and `proj` after the unpartition.
            hw = x.shape[1:3]
            qkv = self.attn.qkv(x)
            fill = self.attn.qkv.bias[...] if self.attn.qkv.bias is not None else None
            qkv, padded = window_partition(qkv, self.window_size, fill)
            x = self.attn.proj(window_unpartition(self.attn.attend(qkv), self.window_size, padded, hw))
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nnx.Module):
    """Non-overlapping patch projection; input NHWC, output [b, h/p, w/p, c]."""

    def __init__(self, *, patch_size: int, in_chans: int, embed_dim: int, rngs: nnx.Rngs, dtype=None,
                 param_dtype=jnp.float32):
        self.proj = nnx.Conv(in_chans, embed_dim, (patch_size, patch_size), strides=patch_size,
                             padding="VALID", dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj(x)


class ImageEncoderViT(nnx.Module):
    """ViT-B/L/H image encoder: [b, 1024, 1024, 3] normalised image -> [b, 64, 64, out_chans].

    Args:
      img_size, patch_size: input side and patch side (token grid = img_size // patch_size).
      embed_dim, depth, num_heads, mlp_ratio: transformer sizes.
      out_chans: neck width (256).
      window_size: window side of the non-global blocks (14).
      global_attn_indexes: blocks with global attention.
      attention_implementation: None / "auto" (cuDNN fused attention on a GPU in bf16 / fp16,
        with the relative positions as extra channels; `cudnn_narrow_v` where supported),
        "xla" (explicit softmax), "cudnn",
        "cudnn_narrow_v" (cuDNN with v at its own head dim instead of padded to q's widened one;
        Hopper, forward only).
    """

    def __init__(self, *, img_size: int = 1024, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 out_chans: int = 256, qkv_bias: bool = True, use_rel_pos: bool = True,
                 window_size: int = 14, global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
                 rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32,
                 attention_implementation: str | None = None):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.img_size = img_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, **kw)
        self.pos_embed = nnx.Param(jnp.zeros((1, grid, grid, embed_dim), param_dtype))
        self.blocks = nnx.List([
            Block(embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                  use_rel_pos=use_rel_pos, window_size=0 if i in global_attn_indexes else window_size,
                  input_size=(grid, grid), attention_implementation=attention_implementation, **kw)
            for i in range(depth)
        ])
        self.neck = nnx.List([
            nnx.Conv(embed_dim, out_chans, (1, 1), use_bias=False, **kw),
            layer_norm(out_chans, 1e-6, **kw),
            nnx.Conv(out_chans, out_chans, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, **kw),
            layer_norm(out_chans, 1e-6, **kw),
        ])

    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        inter = {}
        x = self.patch_embed(x)
        x = x + self.pos_embed[...].astype(x.dtype)
        inter["patch_embed"] = x
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            inter[f"blocks.{i}"] = x
        for layer in self.neck:
            x = layer(x)
        inter["neck"] = x
        return x, inter
