"""Mask2Former's MSDeformAttn pixel decoder (mmdet 3.x `MSDeformAttnPixelDecoder`), with the
sine positional encoding it shares with the transformer decoder.  ARCHITECTURE.md §3.2.

Attribute names mirror the mmdet state dict under `decode_head.pixel_decoder.`
(`input_convs.{i}.conv/gn`, `encoder.layers.{j}.self_attn/ffn/norms`, `level_encoding`,
`lateral_convs.0`, `output_convs.0`, `mask_feature`), so the converter is a table.

Legend: b batch, h w spatial, c channels, s flattened tokens, l levels.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sarformer_jax.models.layers import resize_bilinear, stacked_layers
from sarformer_jax.models.ms_deform_attn import MSDeformAttn


@functools.lru_cache(maxsize=64)
def _sine_table(h: int, w: int, num_feats: int, temperature: float, normalize: bool,
                scale: float) -> np.ndarray:
    """[h, w, 2 * num_feats] sine encoding of an unpadded map (numpy, float64 -> float32)."""
    y = np.arange(1, h + 1, dtype=np.float64)[:, None].repeat(w, 1)
    x = np.arange(1, w + 1, dtype=np.float64)[None, :].repeat(h, 0)
    if normalize:
        eps = 1e-6
        y = y / (h + eps) * scale
        x = x / (w + eps) * scale
    k = np.arange(num_feats, dtype=np.float64)
    dim_t = temperature ** (2.0 * np.floor(k / 2.0) / num_feats)
    out = []
    for v in (y, x):  # channels: pos_y then pos_x
        p = v[..., None] / dim_t  # [h, w, f]
        # interleave sin (even k) and cos (odd k)
        p = np.stack([np.sin(p[..., 0::2]), np.cos(p[..., 1::2])], axis=-1).reshape(h, w, num_feats)
        out.append(p)
    return np.concatenate(out, -1).astype(np.float32)


class SinePositionalEncoding:
    """DETR sine encoding for a map without padding (mmdet `SinePositionalEncoding`,
    `offset=0`).  Parameter-free; computed once per (h, w) as a constant.

    Output channels: `concat(pos_y, pos_x)`, each `[sin(v/t0), cos(v/t1), sin(v/t2), ...]` with
    `t_k = temperature^(2 floor(k/2) / num_feats)` and `v` the 1-based row/column index,
    optionally normalised to `v / (v_last + 1e-6) * 2 pi`."""

    def __init__(self, num_feats: int, *, temperature: float = 10000.0, normalize: bool = True,
                 scale: float = 2 * math.pi):
        self.num_feats, self.temperature = num_feats, float(temperature)
        self.normalize, self.scale = normalize, float(scale)

    def __call__(self, h: int, w: int, dtype=jnp.float32) -> jax.Array:
        """Returns [h, w, 2 * num_feats]."""
        table = _sine_table(int(h), int(w), self.num_feats, self.temperature, self.normalize,
                            self.scale)
        return jnp.asarray(table, dtype)


class ReLU(nnx.Module):
    """Parameter-free placeholder that keeps torch Sequential indices (`mask_embed.{0,2,4}`)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(x)


class ConvModule(nnx.Module):
    """mmcv ConvModule: `conv` (+ `gn`) (+ ReLU)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, *, use_bias: bool, gn_groups: int,
                 act: bool, eps: float = 1e-5, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        pad = kernel_size // 2
        self.conv = nnx.Conv(in_ch, out_ch, (kernel_size, kernel_size), padding=((pad, pad), (pad, pad)),
                             use_bias=use_bias, kernel_init=nnx.initializers.xavier_uniform(),
                             dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gn = nnx.GroupNorm(out_ch, num_groups=gn_groups, epsilon=eps, use_fast_variance=False,
                                dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.gn(self.conv(x))
        return jax.nn.relu(x) if self.act else x


class FFN(nnx.Module):
    """mmcv FFN (2 layers, ReLU, identity residual added by the caller): `layers.0.0`, `layers.1`."""

    def __init__(self, dim: int, hidden: int, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([nnx.List([nnx.Linear(dim, hidden, **kw)]), nnx.Linear(hidden, dim, **kw)])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.layers[1](jax.nn.relu(self.layers[0][0](x)))


class DeformableEncoderLayer(nnx.Module):
    """Post-norm encoder layer: `q = LN0(q + MSDA(q + pos, value=q)); q = LN1(q + FFN(q))`."""

    def __init__(self, dim: int, num_heads: int, n_levels: int, n_points: int, ffn_dim: int, *,
                 eps: float = 1e-5, msda_implementation: str | None = None, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = MSDeformAttn(dim, n_levels, num_heads, n_points, ratio=1.0,
                                      implementation=msda_implementation, **kw)
        self.ffn = FFN(dim, ffn_dim, **kw)
        self.norms = nnx.List([nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, **kw)
                               for _ in range(2)])

    def __call__(self, q: jax.Array, pos: jax.Array, ref: jax.Array,
                 shapes: Sequence[tuple[int, int]]) -> jax.Array:
        q = self.norms[0](q + self.self_attn(q + pos, ref, q, shapes))
        return self.norms[1](q + self.ffn(q))


class DeformableEncoder(nnx.Module):
    """`num_layers` encoder layers; with `scan` they run as one `lax.scan` over their parameters
    stacked on the fly (XLA compiles one layer; the parameter tree keeps one entry per layer)."""

    def __init__(self, num_layers: int, *, scan: bool = False, **layer_kw):
        self.layers = nnx.List([DeformableEncoderLayer(**layer_kw) for _ in range(num_layers)])
        self.scan = scan

    def __call__(self, q, pos, ref, shapes):
        shapes = tuple(tuple(int(v) for v in hw) for hw in shapes)
        if not self.scan or len(self.layers) < 2:
            for layer in self.layers:
                q = layer(q, pos, ref, shapes)
            return q
        graphdef, params, rest = stacked_layers(list(self.layers))

        def body(x, p):
            return nnx.merge(graphdef, p, rest)(x, pos, ref, shapes), None

        q, _ = jax.lax.scan(body, q, params)
        return q


def encoder_reference_points(shapes: Sequence[tuple[int, int]]) -> np.ndarray:
    """[1, S, 1, 2] pixel centres `((j + 0.5) / w, (i + 0.5) / h)` of every level, row-major;
    valid ratios are 1 (no padding), so the point is the same for all levels."""
    refs = []
    for h, w in shapes:
        yy, xx = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
        refs.append(np.stack([xx.reshape(-1), yy.reshape(-1)], -1))
    return np.concatenate(refs, 0)[None, :, None, :].astype(np.float32)


class MSDeformAttnPixelDecoder(nnx.Module):
    """mmdet `MSDeformAttnPixelDecoder` (§3.2).

    Args:
      in_channels: channels of the 4 input levels, finest first ([1/4, 1/8, 1/16, 1/32]).
      feat_channels: D.  num_layers / num_heads / n_points / ffn_dim: encoder.
      num_encoder_levels: coarsest levels that go through the deformable encoder (3).
      num_feats: sine features per axis (D / 2).  gn_groups: GroupNorm groups.
    """

    def __init__(self, in_channels: Sequence[int], *, feat_channels: int = 256, num_layers: int = 6,
                 num_heads: int = 8, n_points: int = 4, ffn_dim: int = 1024, num_encoder_levels: int = 3,
                 num_feats: int = 128, gn_groups: int = 32, norm_eps: float = 1e-5,
                 msda_implementation: str | None = None, scan_layers: bool = False, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        in_channels = list(in_channels)
        if 2 * num_feats != feat_channels:
            raise ValueError(f"pixel decoder: 2 * num_feats ({num_feats}) must equal feat_channels "
                             f"({feat_channels})")
        self.num_inputs = len(in_channels)
        self.num_encoder_levels = num_encoder_levels
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d = feat_channels
        # input_convs[i] serves the i-th coarsest level (0 = 1/32)
        self.input_convs = nnx.List([
            ConvModule(in_channels[self.num_inputs - 1 - i], d, 1, use_bias=True, gn_groups=gn_groups,
                       act=False, eps=norm_eps, **kw)
            for i in range(num_encoder_levels)])
        self.encoder = DeformableEncoder(num_layers, dim=d, num_heads=num_heads, n_levels=num_encoder_levels,
                                         n_points=n_points, ffn_dim=ffn_dim, eps=norm_eps,
                                         msda_implementation=msda_implementation,
                                         scan=scan_layers, **kw)
        self.postional_encoding = SinePositionalEncoding(num_feats, normalize=True)
        self.level_encoding = nnx.Embed(num_encoder_levels, d, embedding_init=nnx.initializers.normal(1.0),
                                        **kw)
        n_fpn = self.num_inputs - num_encoder_levels
        # lateral_convs[k] / output_convs[k]: the k-th remaining level going finer (0 = 1/8 -> 1/4 here)
        self.lateral_convs = nnx.List([
            ConvModule(in_channels[n_fpn - 1 - k], d, 1, use_bias=False, gn_groups=gn_groups, act=False,
                       eps=norm_eps, **kw) for k in range(n_fpn)])
        self.output_convs = nnx.List([
            ConvModule(d, d, 3, use_bias=False, gn_groups=gn_groups, act=True, eps=norm_eps, **kw)
            for _ in range(n_fpn)])
        self.mask_feature = nnx.Conv(d, d, (1, 1), use_bias=True, **kw)
        self.dtype = dtype

    def __call__(self, feats: Sequence[jax.Array]) -> tuple[tuple[jax.Array, list[jax.Array]], dict]:
        """
        Args:
          feats: 4 NHWC maps, finest first.
        Returns:
          ((mask_features [B, H/4, W/4, D], memories [m32, m16, m8] NHWC, coarse to fine),
           intermediates {"encoder_in", "encoder_out", "fpn"}).
        """
        if len(feats) != self.num_inputs:
            raise ValueError(f"pixel decoder expects {self.num_inputs} feature maps, got {len(feats)}")
        b = feats[0].shape[0]
        tokens, pos, shapes = [], [], []
        for i in range(self.num_encoder_levels):
            x = self.input_convs[i](feats[self.num_inputs - 1 - i])
            h, w, d = x.shape[1:]
            shapes.append((h, w))
            tokens.append(x.reshape(b, h * w, d))
            p = self.postional_encoding(h, w, x.dtype).reshape(1, h * w, d)
            pos.append(p + self.level_encoding.embedding[i].astype(x.dtype)[None, None])
        q = jnp.concatenate(tokens, 1)
        pos = jnp.concatenate(pos, 1)
        ref = jnp.asarray(encoder_reference_points(shapes))
        memory = self.encoder(q, pos, ref, shapes)
        outs, start = [], 0
        for h, w in shapes:
            outs.append(memory[:, start:start + h * w].reshape(b, h, w, -1))
            start += h * w
        n_fpn = self.num_inputs - self.num_encoder_levels
        y = outs[-1]
        fpn = []
        for k in range(n_fpn):
            x = feats[n_fpn - 1 - k]
            lat = self.lateral_convs[k](x)
            y = lat + resize_bilinear(y, lat.shape[1:3]).astype(lat.dtype)
            y = self.output_convs[k](y)
            fpn.append(y)
        mask_features = self.mask_feature(y)
        memories = outs[: self.num_encoder_levels]
        inter = {"encoder_in": q, "encoder_out": memory, "fpn": fpn}
        return (mask_features, memories), inter
