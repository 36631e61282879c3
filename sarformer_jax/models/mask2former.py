"""Mask2Former head (mmdet 3.x `Mask2FormerHead`) with SARFormer's proposal guidance
(`SARFormer_Adapter`): pixel decoder, masked-attention transformer decoder, class / mask
prediction heads, and the query initialisation from SAM mask proposals.  ARCHITECTURE.md §4.

Attribute names mirror the state dict under `decode_head.` (CHECKPOINTS.md §4.4); torch's packed
`nn.MultiheadAttention.in_proj_weight` is split into `q_proj` / `k_proj` / `v_proj` here (the
converter, `sarformer_jax.convert.mmseg_head`, splits it).

Legend: b batch, q queries, s memory tokens, n heads, d head dim, c channels, h w spatial,
k classes.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sarformer_jax.models.beit import resolve_scan_layers
from sarformer_jax.models.layers import f32_dot_precision, resize_bilinear
from sarformer_jax.models.pixel_decoder import (FFN, MSDeformAttnPixelDecoder, ReLU,
                                                SinePositionalEncoding)

HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------
# Attention and decoder layers


class TorchMultiheadAttention(nnx.Module):
    """`torch.nn.MultiheadAttention` (batch first) with the packed in-projection split into
    q/k/v.  Boolean `mask` [B, Lq, S] (or [B, n, Lq, S]): True = may not attend."""

    def __init__(self, dim: int, num_heads: int, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                  kernel_init=nnx.initializers.xavier_uniform())
        self.q_proj = nnx.Linear(dim, dim, **kw)
        self.k_proj = nnx.Linear(dim, dim, **kw)
        self.v_proj = nnx.Linear(dim, dim, **kw)
        self.out_proj = nnx.Linear(dim, dim, **kw)
        self.num_heads = num_heads

    def __call__(self, query: jax.Array, key: jax.Array, value: jax.Array,
                 mask: jax.Array | None = None) -> jax.Array:
        b, lq, c = query.shape
        n = self.num_heads
        d = c // n
        q = self.q_proj(query).reshape(b, lq, n, d) * (d ** -0.5)
        k = self.k_proj(key).reshape(b, key.shape[1], n, d)
        v = self.v_proj(value).reshape(b, value.shape[1], n, d)
        logits = jnp.einsum("bqnd,bsnd->bnqs", q, k).astype(jnp.float32)
        if mask is not None:
            if mask.ndim == 3:
                mask = mask[:, None]
            logits = jnp.where(mask, -jnp.inf, logits)
        attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bnqs,bsnd->bqnd", attn, v).reshape(b, lq, c)
        return self.out_proj(out)


class MultiheadAttention(nnx.Module):
    """mmcv `MultiheadAttention`: `identity + attn(query + query_pos, key + key_pos, value)`."""

    def __init__(self, dim: int, num_heads: int, **kw):
        self.attn = TorchMultiheadAttention(dim, num_heads, **kw)

    def __call__(self, query, key, value, query_pos, key_pos, mask=None):
        return query + self.attn(query + query_pos, key + key_pos, value, mask)


class Mask2FormerDecoderLayer(nnx.Module):
    """Post-norm layer, cross-attention first: `q = LN0(q + xattn)`, `q = LN1(q + self-attn)`,
    `q = LN2(q + FFN(q))`."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, *, eps: float = 1e-5, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # declared in the state-dict order (self_attn before cross_attn); called cross first
        self.self_attn = MultiheadAttention(dim, num_heads, **kw)
        self.cross_attn = MultiheadAttention(dim, num_heads, **kw)
        self.ffn = FFN(dim, ffn_dim, **kw)
        self.norms = nnx.List([nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, **kw)
                               for _ in range(3)])

    def __call__(self, q, query_pos, memory, memory_pos, attn_mask):
        q = self.norms[0](self.cross_attn(q, memory, memory, query_pos, memory_pos, attn_mask))
        q = self.norms[1](self.self_attn(q, q, q, query_pos, query_pos))
        return self.norms[2](q + self.ffn(q))


class Mask2FormerTransformerDecoder(nnx.Module):
    def __init__(self, num_layers: int, dim: int, num_heads: int, ffn_dim: int, *, eps: float = 1e-5,
                 dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([Mask2FormerDecoderLayer(dim, num_heads, ffn_dim, eps=eps, **kw)
                                for _ in range(num_layers)])
        self.post_norm = nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, **kw)


def reset_full_rows(mask: jax.Array) -> jax.Array:
    """Rows (over the last axis) that are masked everywhere become unmasked (attend everywhere)."""
    return mask & ~jnp.all(mask, axis=-1, keepdims=True)


# ----------------------------------------------------------------------------------------------
# SARFormer guidance (§4.3 step 5, §4.4, §4.5)


def _fixed_key_like(key: jax.Array | None) -> jax.Array:
    if key is not None and not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.PRNGKey(0)
    return jax.random.key(0)


def _prepare_one(key, masks, valid, num_queries: int, noise_placeholders: bool):
    n_in, h, w = masks.shape
    k_sub, k_perm, k_noise, k_gauss = jax.random.split(key, 4)
    n = jnp.sum(valid.astype(jnp.int32))
    # uniform random subset when more than Q are valid: random priorities, valid ones first
    pri = jnp.where(valid, jax.random.uniform(k_sub, (n_in,)), -1.0)
    order = jnp.argsort(-pri)
    if n_in >= num_queries:
        take = order[:num_queries]
    else:
        take = jnp.concatenate([order, jnp.zeros((num_queries - n_in,), order.dtype)])
    real = jnp.arange(num_queries) < n
    if noise_placeholders:  # Bernoulli(0.5) per pixel, as `randn/6 + 0.5 > 0.5`
        fill = jax.random.bernoulli(k_noise, 0.5, (num_queries, h, w)).astype(jnp.float32)
    else:
        fill = jnp.zeros((num_queries, h, w), jnp.float32)
    out = jnp.where(real[:, None, None], masks[take].astype(jnp.float32), fill)
    # §8 #7: no proposal at all -> one continuous Gaussian map, clamped to [0, 1]
    gauss = jnp.clip(jax.random.normal(k_gauss, (h, w)) / 6.0 + 0.5, 0.0, 1.0)
    out = out.at[0].set(jnp.where(n == 0, gauss, out[0]))
    return out[jax.random.permutation(k_perm, num_queries)]


def prepare_proposals(key: jax.Array | None, masks: jax.Array, valid: jax.Array, num_queries: int, *,
                      noise_placeholders: bool = True, deterministic: bool = False) -> jax.Array:
    """Brings a variable number of mask proposals to exactly Q slots (§4.3 step 5).

    Per image: a uniformly random subset of Q when more than Q are valid; otherwise all valid
    masks plus `Q - n` placeholders (i.i.d. Bernoulli(0.5) pixels, or empty masks when
    `noise_placeholders=False`); a single clamped Gaussian map `N(0,1)/6 + 0.5` when there is
    none (§8 #7); then a random permutation of the Q slots.

    Args:
      key: PRNG key (typed or raw); split per image.  Ignored when `deterministic`.
      masks: [B, N, H, W] bool / uint8 / float proposals.
      valid: [B, N] bool.
      num_queries: Q.
      deterministic: every image uses the same fixed key, so an image's slots depend only on
        its own proposals (evaluation mode, §8 #6).
    Returns:
      [B, Q, H, W] float32 in [0, 1].
    """
    if masks.ndim != 4 or valid.shape != masks.shape[:2]:
        raise ValueError(f"prepare_proposals: masks must be [B, N, H, W] and valid [B, N], got "
                         f"{tuple(masks.shape)} and {tuple(valid.shape)}")
    b = masks.shape[0]
    if deterministic:
        keys = jnp.stack([_fixed_key_like(key)] * b)
    else:
        if key is None:
            raise ValueError("prepare_proposals: a PRNG key is required unless deterministic=True")
        keys = jax.random.split(key, b)
    fn = lambda k, m, v: _prepare_one(k, m, v.astype(bool), num_queries, noise_placeholders)
    return jax.vmap(fn)(keys, masks, valid)


def first_layer_attn_mask(proposals: jax.Array, size: tuple[int, int], *, invert: bool) -> jax.Array:
    """Layer-0 cross-attention mask from the proposals (§4.4): bilinear to `size`, True (= may
    not attend) where the proposal is below 0.5; `invert` flips it (the released weights were
    trained inverted, §8 #4).  Returns [B, Q, h*w] bool, before the all-masked-row reset."""
    s = resize_bilinear(proposals.astype(jnp.float32), size, axes=(2, 3))
    blocked = s < 0.5
    if invert:
        blocked = ~blocked
    return jax.lax.stop_gradient(blocked.reshape(*blocked.shape[:2], -1))


def mask_average_pool(proposals: jax.Array, features: jax.Array) -> jax.Array:
    """Masked average pooling (§4.5): `sum_s w[q,s] F[s] / sum_s w[q,s]` with the proposals
    bilinearly resized to the feature map; an empty mask gives a zero vector.  Float32 at
    float32 accuracy (`f32_dot_precision`; the original uses float64, §8 #9).

    Args: proposals [B, Q, H, W]; features [B, h, w, C].  Returns [B, Q, C] in features' dtype."""
    h, w = features.shape[1:3]
    wts = jax.lax.stop_gradient(resize_bilinear(proposals.astype(jnp.float32), (h, w), axes=(2, 3)))
    num = jnp.einsum("bqhw,bhwc->bqc", wts, features.astype(jnp.float32),
                     precision=f32_dot_precision())
    den = jnp.sum(wts, axis=(2, 3))
    den = jnp.where(den == 0, 1.0, den)
    return (num / den[..., None]).astype(features.dtype)


# ----------------------------------------------------------------------------------------------
# The head


class Mask2FormerHead(nnx.Module):
    """Mask2Former head; `cfg_head.query_init` selects the SARFormer guidance ("sam_pooling":
    pooled query features, proposal-driven layer-0 mask) or the Mask2Former baseline ("learned":
    `query_feat` embedding, layer-0 mask from prediction 0).

    Args:
      cfg_head: fields of `configs.common.mask2former_head()`.
      in_channels: channels of the 4 backbone levels (finest first).
      num_classes: K (the class head has K + 1 outputs, the last one "no object").
    """

    def __init__(self, cfg_head: Any, in_channels: Sequence[int], *, num_classes: int, dtype=None,
                 param_dtype=jnp.float32, msda_implementation: str | None = None, rngs: nnx.Rngs):
        d = cfg_head.feat_channels
        pd, dec = cfg_head.pixel_decoder, cfg_head.decoder
        if cfg_head.query_init not in ("sam_pooling", "learned"):
            raise ValueError(f"head.query_init must be 'sam_pooling' or 'learned', got {cfg_head.query_init!r}")
        if cfg_head.num_transformer_feat_level != 3 or pd.n_levels != 3:
            raise ValueError("head: only 3 transformer feature levels are supported")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.pixel_decoder = MSDeformAttnPixelDecoder(
            in_channels, feat_channels=d, num_layers=pd.num_layers, num_heads=pd.num_heads,
            n_points=pd.n_points, ffn_dim=pd.ffn_dim, num_encoder_levels=pd.n_levels,
            num_feats=pd.num_feats, gn_groups=pd.gn_groups, norm_eps=pd.norm_eps,
            msda_implementation=msda_implementation,
            scan_layers=resolve_scan_layers(pd.get("scan_layers", False)), **kw)
        self.transformer_decoder = Mask2FormerTransformerDecoder(
            dec.num_layers, d, dec.num_heads, dec.ffn_dim, eps=dec.norm_eps, **kw)
        self.decoder_positional_encoding = SinePositionalEncoding(dec.num_feats, normalize=True)
        init = nnx.initializers.normal(1.0)
        self.query_embed = nnx.Embed(cfg_head.num_queries, d, embedding_init=init, **kw)
        if cfg_head.query_init == "learned":
            self.query_feat = nnx.Embed(cfg_head.num_queries, d, embedding_init=init, **kw)
        self.level_embed = nnx.Embed(cfg_head.num_transformer_feat_level, d, embedding_init=init, **kw)
        self.cls_embed = nnx.Linear(d, num_classes + 1, **kw)
        self.mask_embed = nnx.List([nnx.Linear(d, d, **kw), ReLU(), nnx.Linear(d, d, **kw), ReLU(),
                                    nnx.Linear(d, d, **kw)])
        # dead in the original (only `0 * sum` in the loss, §8 #10); kept for exact loading
        self.enc_output = nnx.Linear(d, d, **kw)
        self.enc_output_norm = nnx.LayerNorm(d, epsilon=1e-5, **kw)
        self.query_init = cfg_head.query_init
        self.second_pass = bool(cfg_head.get("second_pixel_decoder_pass", True))
        self.batch_passes = bool(cfg_head.get("batch_pixel_decoder_passes", False))
        self.num_queries = cfg_head.num_queries
        self.num_heads = dec.num_heads
        self.dtype = dtype

    def _both_passes(self, feats_norm: Sequence[jax.Array], feats_raw: Sequence[jax.Array]):
        """The two pixel-decoder passes of §4.2 as one call on a batch of 2B: image i's
        normalised features at row 2i, its raw features at row 2i + 1 (interleaved, so a
        batch-sharded input stays on its device).  Every op of the pixel decoder is per image
        (GroupNorm, deformable attention, convolutions), so the results are those of two calls.
        Returns ((mask_features, memories) of the normalised pass, its intermediates, the raw
        pass's mask features)."""
        if len(feats_raw) != len(feats_norm):
            raise ValueError(f"feats_raw has {len(feats_raw)} maps, feats_norm {len(feats_norm)}")
        both = []
        for n, r in zip(feats_norm, feats_raw):
            if n.shape != r.shape:
                raise ValueError(f"feats_norm and feats_raw differ in shape: {tuple(n.shape)} vs "
                                 f"{tuple(r.shape)}")
            r = r.astype(n.dtype)
            both.append(jnp.stack([n, r], 1).reshape(2 * n.shape[0], *n.shape[1:]))
        (mf, mems), inter = self.pixel_decoder(both)

        def split(x):
            x = x.reshape(x.shape[0] // 2, 2, *x.shape[1:])
            return x[:, 0], x[:, 1]

        mask_features, pool_src = split(mf)
        memories = [split(m)[0] for m in mems]
        inter = jax.tree.map(lambda x: split(x)[0], inter)
        return (mask_features, memories), inter, pool_src

    def forward_head(self, q: jax.Array, mask_features: jax.Array, size: tuple[int, int]):
        """Prediction heads on the post-normed queries.  Returns (cls [B,Q,K+1],
        mask [B,Q,H/4,W/4], attention mask [B,Q,h*w] for the next layer, True = blocked)."""
        z = self.transformer_decoder.post_norm(q)
        cls = self.cls_embed(z)
        e = z
        for layer in self.mask_embed:
            e = layer(e)
        mask = jnp.einsum("bqc,bhwc->bqhw", e, mask_features.astype(e.dtype))
        small = resize_bilinear(mask, size, axes=(2, 3))
        attn_mask = jax.nn.sigmoid(small.astype(jnp.float32)) < 0.5
        attn_mask = jax.lax.stop_gradient(attn_mask.reshape(*attn_mask.shape[:2], -1))
        return cls, mask, attn_mask

    def __call__(self, feats_norm: Sequence[jax.Array], feats_raw: Sequence[jax.Array] | None,
                 proposals: jax.Array | None, *, invert_first_mask: bool = False, train: bool = False
                 ) -> tuple[list[dict[str, jax.Array]], dict]:
        """
        Args:
          feats_norm: 4 NHWC maps (finest first), the normalised backbone outputs.
          feats_raw: 4 NHWC maps, the un-normalised outputs (second pixel-decoder pass, §4.2);
            unused for "learned" queries or when `second_pixel_decoder_pass` is False.
          proposals: [B, Q, H, W] in [0, 1] (see `prepare_proposals`); None for "learned".
          invert_first_mask: §8 #4.
          train: unused (all head dropouts are 0); kept for a uniform model API.
        Returns:
          (10 predictions {"cls": [B,Q,K+1], "mask": [B,Q,H/4,W/4]} from d0 to the last layer,
           intermediates).
        """
        del train
        two_passes = (self.query_init == "sam_pooling" and self.second_pass
                      and proposals is not None and feats_raw is not None)
        if two_passes and self.batch_passes:
            with jax.named_scope("pixel_decoder"):
                (mask_features, memories), pd_inter, pool_src = self._both_passes(feats_norm,
                                                                                  feats_raw)
        else:
            with jax.named_scope("pixel_decoder"):
                (mask_features, memories), pd_inter = self.pixel_decoder(feats_norm)
            pool_src = None
        b = mask_features.shape[0]
        dt = mask_features.dtype
        inter: dict[str, Any] = {"pixel_decoder": pd_inter, "mask_features": mask_features,
                                 "memories": memories}
        first_mask = None
        if self.query_init == "sam_pooling":
            if proposals is None:
                raise ValueError("head.query_init='sam_pooling' needs proposals [B, Q, H, W]")
            if proposals.shape[:2] != (b, self.num_queries):
                raise ValueError(f"proposals must be [B={b}, Q={self.num_queries}, H, W], got "
                                 f"{tuple(proposals.shape)}")
            if self.second_pass:
                if feats_raw is None:
                    raise ValueError("second_pixel_decoder_pass needs feats_raw")
                if pool_src is None:
                    with jax.named_scope("pixel_decoder_second_pass"):
                        (pool_src, _), _ = self.pixel_decoder(feats_raw)
            else:
                pool_src = mask_features
            inter["adapter_features"] = pool_src
            query = mask_average_pool(proposals, pool_src).astype(dt)
            first_mask = first_layer_attn_mask(proposals, memories[0].shape[1:3], invert=invert_first_mask)
            inter["first_attn_mask"] = first_mask
        else:
            query = jnp.broadcast_to(self.query_feat.embedding.astype(dt)[None],
                                     (b, self.num_queries, mask_features.shape[-1]))
        inter["query_feat"] = query
        query_pos = jnp.broadcast_to(self.query_embed.embedding.astype(dt)[None], query.shape)
        mems, poss, sizes = [], [], []
        for i, m in enumerate(memories):
            h, w, c = m.shape[1:]
            sizes.append((h, w))
            mems.append(m.reshape(b, h * w, c) + self.level_embed.embedding[i].astype(m.dtype))
            poss.append(self.decoder_positional_encoding(h, w, m.dtype).reshape(1, h * w, c))
        n_lvl = len(mems)
        cls, mask, attn_mask = self.forward_head(query, mask_features, sizes[0])
        predictions = [{"cls": cls, "mask": mask}]
        if first_mask is not None:
            attn_mask = first_mask
        queries = []
        for i, layer in enumerate(self.transformer_decoder.layers):
            lvl = i % n_lvl
            attn_mask = reset_full_rows(attn_mask)
            query = layer(query, query_pos, mems[lvl], poss[lvl], attn_mask)
            queries.append(query)
            cls, mask, attn_mask = self.forward_head(query, mask_features, sizes[(i + 1) % n_lvl])
            predictions.append({"cls": cls, "mask": mask})
        inter["decoder_queries"] = queries
        return predictions, inter


def semantic_inference(cls: jax.Array, mask: jax.Array, out_size: tuple[int, int]) -> jax.Array:
    """§4.7: `seg[b,h,w,k] = sum_q softmax(cls)[b,q,k] * sigmoid(mask_up)[b,q,h,w]` for k < K
    (the void column is dropped after the softmax); masks are resized bilinearly to `out_size`
    first.  Args: cls [B,Q,K+1], mask [B,Q,h,w].  Returns [B, H, W, K] float32."""
    probs = jax.nn.softmax(cls.astype(jnp.float32), axis=-1)[..., :-1]
    up = resize_bilinear(mask.astype(jnp.float32), tuple(out_size), axes=(2, 3))
    return jnp.einsum("bqk,bqhw->bhwk", probs, jax.nn.sigmoid(up), precision=HIGHEST)
