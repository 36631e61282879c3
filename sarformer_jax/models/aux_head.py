"""Auxiliary FCN head of SARFormer-B (`AdapterFCNHead`, missing from the original repository;
inferred as mmseg's `FCNHead` with `num_convs=1`, `concat_input=False`), ARCHITECTURE.md §5.4.
Training only: Conv3x3 (no bias) + BN + ReLU, Dropout2d(0.1), Conv1x1 to K classes.  State-dict
names under `auxiliary_head.`: `convs.0.conv`, `convs.0.bn`, `conv_seg` (CHECKPOINTS.md §4.5).

Legend: b batch, h w spatial, c channels, k classes.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class ConvBNReLU(nnx.Module):
    """mmcv ConvModule with BN: `conv` (no bias) + `bn` + ReLU.  BN statistics are cross-replica
    when `axis_name` names the data-parallel mesh axis (SyncBN, §8 #22)."""

    def __init__(self, in_ch: int, out_ch: int, *, axis_name: str | None = None, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.conv = nnx.Conv(in_ch, out_ch, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                             dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # torch momentum 0.1 == flax decay 0.9
        self.bn = nnx.BatchNorm(out_ch, momentum=0.9, epsilon=1e-5, axis_name=axis_name,
                                use_fast_variance=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x), use_running_average=not train))


class AdapterFCNHead(nnx.Module):
    """Args: cfg_aux with the fields of `configs.common.aux_head()` (in_index, in_channels,
    channels, num_convs, dropout, num_classes)."""

    def __init__(self, cfg_aux: Any, *, axis_name: str | None = None, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        chans = [cfg_aux.in_channels] + [cfg_aux.channels] * cfg_aux.num_convs
        self.convs = nnx.List([ConvBNReLU(chans[i], chans[i + 1], axis_name=axis_name, **kw)
                               for i in range(cfg_aux.num_convs)])
        # Dropout2d: one draw per (image, channel), shared over space
        self.dropout = nnx.Dropout(cfg_aux.dropout, broadcast_dims=(1, 2), rngs=rngs)
        self.conv_seg = nnx.Conv(chans[-1], cfg_aux.num_classes, (1, 1), use_bias=True,
                                 kernel_init=nnx.initializers.normal(0.01), **kw)
        self.in_index = cfg_aux.in_index

    def __call__(self, feats: Sequence[jax.Array] | jax.Array, *, train: bool = False
                 ) -> tuple[jax.Array, dict]:
        """feats: the 4 backbone maps (NHWC, finest first; `in_index` picks one) or one map.
        Returns (logits [B, h, w, K] at the input map's resolution, {"features": pre-dropout})."""
        x = feats[self.in_index] if isinstance(feats, (list, tuple)) else feats
        for conv in self.convs:
            x = conv(x, train=train)
        out = self.conv_seg(self.dropout(x, deterministic=not train))
        return out, {"features": x}
