"""SAM's two-way transformer (mirrors segment_anything/modeling/transformer.py): prompt tokens and
image tokens attend to each other in turn; attention may project to a narrower internal width.

Legend: b batch, q tokens (queries), k keys, n heads, d head dim, c channels, h w image grid.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from sarformer_jax.sam.common import MLPBlock, layer_norm


class Attention(nnx.Module):
    """Multi-head attention with separate q/k/v projections to `embedding_dim // downsample_rate`."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1, *,
                 rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide internal_dim={self.internal_dim}")
        self.q_proj = nnx.Linear(embedding_dim, self.internal_dim, **kw)
        self.k_proj = nnx.Linear(embedding_dim, self.internal_dim, **kw)
        self.v_proj = nnx.Linear(embedding_dim, self.internal_dim, **kw)
        self.out_proj = nnx.Linear(self.internal_dim, embedding_dim, **kw)

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        n = self.num_heads
        d = self.internal_dim // n
        q = self.q_proj(q).reshape(*q.shape[:-1], n, d)
        k = self.k_proj(k).reshape(*k.shape[:-1], n, d)
        v = self.v_proj(v).reshape(*v.shape[:-1], n, d)
        logits = jnp.einsum("bqnd,bknd->bnqk", q, k) / math.sqrt(d)
        attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bnqk,bknd->bqnd", attn, v)
        return self.out_proj(out.reshape(*out.shape[:2], self.internal_dim))


class TwoWayAttentionBlock(nnx.Module):
    """Token self-attention, token->image cross-attention, token MLP, image->token cross-attention."""

    def __init__(self, *, embedding_dim: int, num_heads: int, mlp_dim: int = 2048,
                 attention_downsample_rate: int = 2, skip_first_layer_pe: bool = False,
                 rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = Attention(embedding_dim, num_heads, **kw)
        self.norm1 = layer_norm(embedding_dim, 1e-5, **kw)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate, **kw)
        self.norm2 = layer_norm(embedding_dim, 1e-5, **kw)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, act=jax.nn.relu, **kw)
        self.norm3 = layer_norm(embedding_dim, 1e-5, **kw)
        self.norm4 = layer_norm(embedding_dim, 1e-5, **kw)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, attention_downsample_rate, **kw)
        self.skip_first_layer_pe = skip_first_layer_pe

    def __call__(self, queries: jax.Array, keys: jax.Array, query_pe: jax.Array,
                 key_pe: jax.Array) -> tuple[jax.Array, jax.Array]:
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nnx.Module):
    """`depth` two-way blocks, then a final token->image attention and LayerNorm.

    Call with image_embedding [b, h, w, c], image_pe [b, h, w, c], point_embedding [b, q, c];
    returns (tokens [b, q, c], image tokens [b, h*w, c])."""

    def __init__(self, *, depth: int = 2, embedding_dim: int = 256, num_heads: int = 8,
                 mlp_dim: int = 2048, attention_downsample_rate: int = 2, rngs: nnx.Rngs, dtype=None,
                 param_dtype=jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([
            TwoWayAttentionBlock(embedding_dim=embedding_dim, num_heads=num_heads, mlp_dim=mlp_dim,
                                 attention_downsample_rate=attention_downsample_rate,
                                 skip_first_layer_pe=(i == 0), **kw)
            for i in range(depth)
        ])
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate, **kw)
        self.norm_final_attn = layer_norm(embedding_dim, 1e-5, **kw)

    def __call__(self, image_embedding: jax.Array, image_pe: jax.Array,
                 point_embedding: jax.Array) -> tuple[jax.Array, jax.Array]:
        b, h, w, c = image_embedding.shape
        keys = image_embedding.reshape(b, h * w, c)
        key_pe = jnp.broadcast_to(image_pe, (b, h, w, c)).reshape(b, h * w, c)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        attn = self.final_attn_token_to_image(queries + point_embedding, keys + key_pe, keys)
        queries = self.norm_final_attn(queries + attn)
        return queries, keys
