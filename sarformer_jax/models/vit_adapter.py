"""ViT-Adapter on BEiT (Chen et al. 2023) as SARFormer's `BEiT_adapter` builds it
(ARCHITECTURE.md §2.5-§2.9; upstream `adapter_modules.py` + `beit_dapter.py`).

Spatial Prior Module (conv stem at strides 4/8/16/32), Injector (patch tokens attend to the SPM
pyramid), Extractor (SPM tokens attend to the patch tokens, then a ConvFFN with one shared
depthwise conv over the three levels), four InteractionBlockWithCls stages around the BEiT
layers (two extra extractors in the last one) and the fusion into four maps at strides
4/8/16/32, batch-normalised (`feats_norm`) and raw (`feats_raw`).

Attribute names mirror the mmseg state dict under `backbone.` (CHECKPOINTS.md §4.3), e.g.
`spm.stem.{0,1,3,4,6,7}`, `interactions.{s}.extractor.ffn.dwconv.dwconv`, `up`, `norm_1..4`.

Choices: the learned cls token is re-fed at every stage (`carry_cls=False`, the original quirk,
§8 #5); MSDeformAttn starts from trunc-normal(0.02) like the original (`msda_init`, §8 #13).
BatchNorm uses batch statistics when `train=True` (under jit with a data-sharded batch these are
global statistics) and running statistics otherwise; momentum 0.1 in PyTorch = decay 0.9 here.
Inputs of any size divisible by 32 work (the original assumed 640x640: §8 #17); the relative
position bias for other grids is derived as `models/beit.py` explains.

Legend: b batch, h w spatial, c channels, q queries, l levels.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sarformer_jax.models.beit import BEiT, torch_bias_init, torch_conv_init
from sarformer_jax.models.layers import (DropPath, LayerNorm, Linear, StridedConvTranspose,
                                         broadcast_param, gelu, resize_bilinear, trunc_normal_02)
from sarformer_jax.models.ms_deform_attn import MSDeformAttn

LN_EPS = 1e-6
BN_KW = dict(momentum=0.9, epsilon=1e-5, use_fast_variance=False)


class ReLU(nnx.Module):
    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(x)


class MaxPool(nnx.Module):
    """3x3 stride-2 max pool with padding 1 (padded cells never win)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def _conv(cin: int, cout: int, k: int, stride: int, *, bias: bool, groups: int = 1, common: dict):
    pad = ((k // 2, k // 2), (k // 2, k // 2))  # explicit: 'SAME' differs for stride 2 (§5.1)
    fan_in = (cin // groups) * k * k
    return nnx.Conv(cin, cout, (k, k), strides=(stride, stride), padding=pad, use_bias=bias,
                    feature_group_count=groups, kernel_init=torch_conv_init,
                    bias_init=torch_bias_init(fan_in), **common)


def _run_seq(seq: nnx.List, x: jax.Array, train: bool) -> jax.Array:
    for m in seq:
        x = m(x, use_running_average=not train) if isinstance(m, nnx.BatchNorm) else m(x)
    return x


class SpatialPriorModule(nnx.Module):
    """Conv stem -> c1 [b, H/4, W/4, c] (spatial) and tokens c2, c3, c4 at strides 8/16/32."""

    def __init__(self, inplanes: int, embed_dim: int, *, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        p = inplanes

        def bn(ch):
            return nnx.BatchNorm(ch, **BN_KW, **common)

        self.stem = nnx.List([
            _conv(3, p, 3, 2, bias=False, common=common), bn(p), ReLU(),
            _conv(p, p, 3, 1, bias=False, common=common), bn(p), ReLU(),
            _conv(p, p, 3, 1, bias=False, common=common), bn(p), ReLU(),
            MaxPool(),
        ])
        self.conv2 = nnx.List([_conv(p, 2 * p, 3, 2, bias=False, common=common), bn(2 * p), ReLU()])
        self.conv3 = nnx.List([_conv(2 * p, 4 * p, 3, 2, bias=False, common=common), bn(4 * p), ReLU()])
        self.conv4 = nnx.List([_conv(4 * p, 4 * p, 3, 2, bias=False, common=common), bn(4 * p), ReLU()])
        self.fc1 = _conv(p, embed_dim, 1, 1, bias=True, common=common)
        self.fc2 = _conv(2 * p, embed_dim, 1, 1, bias=True, common=common)
        self.fc3 = _conv(4 * p, embed_dim, 1, 1, bias=True, common=common)
        self.fc4 = _conv(4 * p, embed_dim, 1, 1, bias=True, common=common)

    def __call__(self, x: jax.Array, *, train: bool = False) -> tuple[jax.Array, ...]:
        c1 = _run_seq(self.stem, x, train)
        c2 = _run_seq(self.conv2, c1, train)
        c3 = _run_seq(self.conv3, c2, train)
        c4 = _run_seq(self.conv4, c3, train)
        b = x.shape[0]
        flat = lambda y: y.reshape(b, -1, y.shape[-1])  # noqa: E731  row-major tokens
        return self.fc1(c1), flat(self.fc2(c2)), flat(self.fc3(c3)), flat(self.fc4(c4))


class Injector(nnx.Module):
    """x <- x + gamma * MSDA(LN(x), ref, LN(c)) over the 3 SPM levels."""

    def __init__(self, dim: int, *, num_heads: int, n_points: int, n_levels: int,
                 deform_ratio: float, init_values: float, msda_init: str,
                 msda_implementation: str | None, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.query_norm = LayerNorm(dim, epsilon=LN_EPS, **common)
        self.feat_norm = LayerNorm(dim, epsilon=LN_EPS, **common)
        self.attn = MSDeformAttn(dim, n_levels, num_heads, n_points, ratio=deform_ratio,
                                 init=msda_init, implementation=msda_implementation, **common)
        self.gamma = nnx.Param(jnp.full((dim,), init_values, param_dtype))

    def __call__(self, query, reference_points, feat, spatial_shapes):
        y = self.attn(self.query_norm(query), reference_points, self.feat_norm(feat), spatial_shapes)
        return query + broadcast_param(self.gamma[...], y.shape, y.dtype) * y


class DWConv(nnx.Module):
    """One depthwise 3x3 conv applied to each level's map of a multi-level token sequence."""

    def __init__(self, dim: int, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dwconv = _conv(dim, dim, 3, 1, bias=True, groups=dim, common=common)

    def __call__(self, x: jax.Array, level_shapes: Sequence[tuple[int, int]]) -> jax.Array:
        b, _, c = x.shape
        outs, start = [], 0
        for h, w in level_shapes:
            y = self.dwconv(x[:, start : start + h * w].reshape(b, h, w, c))
            outs.append(y.reshape(b, h * w, c))
            start += h * w
        return jnp.concatenate(outs, axis=1)


class ConvFFN(nnx.Module):
    """fc1 -> shared depthwise conv per level -> exact GELU -> fc2."""

    def __init__(self, dim: int, hidden: int, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Linear(dim, hidden, kernel_init=trunc_normal_02, **common)
        self.dwconv = DWConv(hidden, **common)
        self.fc2 = Linear(hidden, dim, kernel_init=trunc_normal_02, **common)

    def __call__(self, x: jax.Array, level_shapes: Sequence[tuple[int, int]]) -> jax.Array:
        return self.fc2(gelu(self.dwconv(self.fc1(x), level_shapes)))


class Extractor(nnx.Module):
    """c <- c + MSDA(LN(c), ref, LN(x)) over the patch grid; then c + DropPath(ConvFFN(LN(c)))."""

    def __init__(self, dim: int, *, num_heads: int, n_points: int, deform_ratio: float,
                 with_cffn: bool, cffn_ratio: float, drop_path: float, msda_init: str,
                 msda_implementation: str | None, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.query_norm = LayerNorm(dim, epsilon=LN_EPS, **common)
        self.feat_norm = LayerNorm(dim, epsilon=LN_EPS, **common)
        self.attn = MSDeformAttn(dim, 1, num_heads, n_points, ratio=deform_ratio, init=msda_init,
                                 implementation=msda_implementation, **common)
        self.with_cffn = with_cffn
        if with_cffn:
            self.ffn = ConvFFN(dim, int(dim * cffn_ratio), **common)
            self.ffn_norm = LayerNorm(dim, epsilon=LN_EPS, **common)
            self.drop_path = DropPath(drop_path, rngs=rngs)

    def __call__(self, query, reference_points, feat, spatial_shapes, level_shapes, *, train=False):
        query = query + self.attn(self.query_norm(query), reference_points, self.feat_norm(feat),
                                  spatial_shapes)
        if self.with_cffn:
            y = self.ffn(self.ffn_norm(query), level_shapes)
            query = query + self.drop_path(y, deterministic=not train)
        return query


class InteractionBlockWithCls(nnx.Module):
    """Injector -> BEiT layers on [cls, x] -> Extractor (+ extra extractors in the last stage)."""

    def __init__(self, dim: int, *, num_heads: int, n_points: int, deform_ratio: float,
                 init_values: float, with_cffn: bool, cffn_ratio: float, drop_path: float,
                 extra_extractor: bool, msda_init: str, msda_implementation: str | None,
                 dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        msda = dict(num_heads=num_heads, n_points=n_points, deform_ratio=deform_ratio,
                    msda_init=msda_init, msda_implementation=msda_implementation)
        ext = dict(with_cffn=with_cffn, cffn_ratio=cffn_ratio, drop_path=drop_path, **msda)
        self.injector = Injector(dim, n_levels=3, init_values=init_values, **msda, **common)
        self.extractor = Extractor(dim, **ext, **common)
        self.extra_extractors = (nnx.List([Extractor(dim, **ext, **common) for _ in range(2)])
                                 if extra_extractor else None)

    def __call__(self, x, c, cls, beit: BEiT, layer_range: tuple[int, int], grid, deform1,
                 deform2, level_shapes, *, train: bool = False):
        x = self.injector(x, deform1[0], c, deform1[1])
        t = beit.run_layers(jnp.concatenate([cls, x], axis=1), grid, *layer_range, train=train)
        cls, x = t[:, :1], t[:, 1:]
        c = self.extractor(c, deform2[0], x, deform2[1], level_shapes, train=train)
        if self.extra_extractors is not None:
            for extractor in self.extra_extractors:
                c = extractor(c, deform2[0], x, deform2[1], level_shapes, train=train)
        return x, c, cls


def _centres(h: int, w: int) -> np.ndarray:
    """[h*w, 2] pixel centres (x, y) normalised by (w, h), row-major."""
    y, x = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
    return np.stack([x.reshape(-1), y.reshape(-1)], -1).astype(np.float32)


def deform_inputs(height: int, width: int):
    """Reference points and value shapes of the injector (queries: the patch grid, values: the
    SPM levels 8/16/32) and of the extractor (queries: the SPM tokens, values: the patch grid),
    §2.6.  Returns ((ref1 [1, q, 1, 2], shapes1), (ref2 [1, q, 1, 2], shapes2))."""
    levels = [(height // s, width // s) for s in (8, 16, 32)]
    grid = (height // 16, width // 16)
    ref1 = _centres(*grid)[None, :, None]
    ref2 = np.concatenate([_centres(h, w) for h, w in levels])[None, :, None]
    return (jnp.asarray(ref1), tuple(levels)), (jnp.asarray(ref2), (grid,))


class BEiTAdapter(BEiT):
    """BEiT + ViT-Adapter backbone of SARFormer.

    Args:
      cfg: `configs.common.beit_adapter_b()` / `beit_adapter_l()` fields.
      image_size: int or (H, W); sets the relative-position table grid when `cfg.rel_pos_grid`
        is None.  Any input size divisible by 32 is accepted.
      msda_implementation: forwarded to `kernels.ms_deform_attn` (None = platform default).
      attention_implementation: None / "auto" (cuDNN fused attention on a GPU in bf16 / fp16, else XLA), "xla" or "cudnn".
    """

    def __init__(self, cfg: Any, image_size: Sequence[int] | int = 640, *, dtype=None,
                 param_dtype=jnp.float32, msda_implementation: str | None = None,
                 attention_implementation: str | None = None, rngs: nnx.Rngs):
        super().__init__(cfg, image_size, dtype=dtype, param_dtype=param_dtype,
                         attention_implementation=attention_implementation, rngs=rngs)
        c = self.embed_dim
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.interaction_indexes = tuple(tuple(int(i) for i in r) for r in cfg.interaction_indexes)
        if len(self.interaction_indexes) != 4:
            raise ValueError(f"interaction_indexes must have 4 stages (strides 4..32 use one each), "
                             f"got {self.interaction_indexes}")
        if self.interaction_indexes[-1][-1] != int(cfg.depth) - 1:
            raise ValueError(f"interaction_indexes {self.interaction_indexes} do not end at the last "
                             f"of {cfg.depth} layers")
        self.carry_cls = bool(cfg.get("carry_cls", False))
        self.add_vit_feature = bool(cfg.add_vit_feature)
        self.level_embed = nnx.Param(jax.random.normal(rngs.params(), (3, c), param_dtype))
        self.spm = SpatialPriorModule(int(cfg.conv_inplane), c, **common)
        n = len(self.interaction_indexes)
        self.interactions = nnx.List([
            InteractionBlockWithCls(
                c, num_heads=int(cfg.deform_num_heads), n_points=int(cfg.n_points),
                deform_ratio=float(cfg.deform_ratio), init_values=float(cfg.init_values),
                with_cffn=bool(cfg.with_cffn), cffn_ratio=float(cfg.cffn_ratio),
                drop_path=float(cfg.drop_path_rate), extra_extractor=(s == n - 1),
                msda_init=str(cfg.msda_init), msda_implementation=msda_implementation, **common)
            for s in range(n)
        ])
        # ConvTranspose2d(c, c, 2, stride 2); PyTorch's default init uses fan_in = c * 2 * 2
        self.up = StridedConvTranspose(c, c, 2, kernel_init=torch_conv_init,
                                       bias_init=torch_bias_init(4 * c), **common)
        self.norm_1 = nnx.BatchNorm(c, **BN_KW, **common)
        self.norm_2 = nnx.BatchNorm(c, **BN_KW, **common)
        self.norm_3 = nnx.BatchNorm(c, **BN_KW, **common)
        self.norm_4 = nnx.BatchNorm(c, **BN_KW, **common)

    def frozen_filter(self, frozen_stages: int):
        """nnx filter selecting the parameters of the first `frozen_stages` stages (stage 0 =
        patch_embed + cls_token, stage k = the BEiT layers of interaction k-1) for freezing in an
        optimizer (`wrt=nnx.All(nnx.Param, nnx.Not(model.frozen_filter(k)))`).  The original
        never freezes anything (§8 #12); this is for fine-tuning experiments."""
        prefixes = []
        if frozen_stages > 0:
            prefixes += [("patch_embed",), ("cls_token",)]
        for s in range(min(frozen_stages - 1, len(self.interaction_indexes))):
            a, b = self.interaction_indexes[s]
            prefixes += [("layers", i) for i in range(a, b + 1)]

        def pred(path, _value):
            return any(tuple(path[: len(p)]) == p for p in prefixes)

        return nnx.All(nnx.Param, pred)

    def __call__(self, x: jax.Array, *, train: bool = False):
        """x: [b, H, W, 3] normalised, H and W multiples of 32.

        Returns (feats_norm, feats_raw, intermediates): two lists of 4 maps [b, H/s, W/s, c] for
        s = 4, 8, 16, 32 (BatchNorm applied / not applied), and named stage outputs."""
        b, hgt, wid, _ = x.shape
        if hgt % 32 or wid % 32:
            raise ValueError(f"BEiTAdapter needs H and W divisible by 32, got {hgt}x{wid}")
        deform1, deform2 = deform_inputs(hgt, wid)
        level_shapes = deform1[1]  # SPM levels at strides 8, 16, 32
        inter: dict[str, jax.Array] = {}

        c1, c2, c3, c4 = self.spm(x, train=train)
        emb = self.level_embed[...]
        c2, c3, c4 = (f + broadcast_param(emb[i], f.shape, f.dtype) for i, f in enumerate((c2, c3, c4)))
        inter.update({"spm.c1": c1, "spm.c2": c2, "spm.c3": c3, "spm.c4": c4})
        c = jnp.concatenate([c2, c3, c4], axis=1)

        tokens, grid = self.embed(x)
        inter["patch_embed"] = tokens
        cls0 = jnp.broadcast_to(self.cls_token[...].astype(tokens.dtype), (b, 1, self.embed_dim))
        cls = cls0
        outs = []
        for s, (block, rng) in enumerate(zip(self.interactions, self.interaction_indexes)):
            tokens, c, cls_out = block(tokens, c, cls, self, rng, grid, deform1, deform2,
                                       level_shapes, train=train)
            cls = cls_out if self.carry_cls else cls0
            out = tokens.reshape(b, grid[0], grid[1], self.embed_dim)
            outs.append(out)
            inter.update({f"stage{s}.x": out, f"stage{s}.c": c, f"stage{s}.cls": cls_out})

        sizes = [h * w for h, w in level_shapes]
        c2 = c[:, : sizes[0]].reshape(b, *level_shapes[0], -1)
        c3 = c[:, sizes[0] : sizes[0] + sizes[1]].reshape(b, *level_shapes[1], -1)
        c4 = c[:, sizes[0] + sizes[1] :].reshape(b, *level_shapes[2], -1)
        c1 = self.up(c2) + c1
        if self.add_vit_feature:
            h4, w4 = c1.shape[1:3]
            c1 = c1 + resize_bilinear(outs[0], (h4, w4))
            c2 = c2 + resize_bilinear(outs[1], level_shapes[0])
            c3 = c3 + outs[2]
            c4 = c4 + resize_bilinear(outs[3], level_shapes[2])
        raw = [c1, c2, c3, c4]
        norms = (self.norm_1, self.norm_2, self.norm_3, self.norm_4)
        feats = [norm(f, use_running_average=not train) for norm, f in zip(norms, raw)]
        return feats, raw, inter
