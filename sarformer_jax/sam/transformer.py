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
        """q [g, pq, lq, c], k and v [g, pk, lk, c] with pq, pk in {1, p}: prompts grouped by
        image (g images, p prompts each).  A side with one entry per group (the image tokens
        before any prompt has updated them) is projected once and shared by the group's p
        prompts; the result is [g, max(pq, pk), lq, c].  Rank-3 inputs [b, l, c] are the
        ungrouped case."""
        if q.ndim == 3:
            return self(q[:, None], k[:, None], v[:, None])[:, 0]
        n = self.num_heads
        d = self.internal_dim // n
        q = self.q_proj(q).reshape(*q.shape[:-1], n, d)
        k = self.k_proj(k).reshape(*k.shape[:-1], n, d)
        v = self.v_proj(v).reshape(*v.shape[:-1], n, d)
        g, pq, lq = q.shape[:3]
        pk = k.shape[1]
        if pk == 1 and pq > 1:  # shared keys: every prompt's queries in one batched product
            out = self._attend(q.reshape(g, 1, pq * lq, n, d), k, v).reshape(g, pq, lq, n * d)
        elif pq == 1 and pk > 1:  # shared queries against each prompt's own keys
            logits = jnp.einsum("gqnd,gpknd->gpnqk", q[:, 0], k) / math.sqrt(d)
            attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
            out = jnp.einsum("gpnqk,gpknd->gpqnd", attn, v).reshape(g, pk, lq, n * d)
        else:
            out = self._attend(q, k, v).reshape(g, pq, lq, n * d)
        return self.out_proj(out)

    @staticmethod
    def _attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        """Softmax attention over matching leading dims: q [g, p, lq, n, d], k v [g, p, lk, n, d]."""
        logits = jnp.einsum("gpqnd,gpknd->gpnqk", q, k) / math.sqrt(q.shape[-1])
        attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        return jnp.einsum("gpnqk,gpknd->gpqnd", attn, v)


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
        """image_embedding [g, h, w, c] or [g, p or 1, h, w, c], image_pe [1, h, w, c],
        point_embedding [g * p, t, c] (prompts grouped by image, image i's p prompts
        contiguous, as `jnp.repeat(embeddings, p, axis=0)` would pair them).  Returns
        (tokens [g * p, t, c], image tokens [g * p, h * w, c]).

        Until the first image-to-token attention the image tokens are the same for every
        prompt of an image, so their projections run once per image rather than once per
        prompt (the upstream code repeats the embedding for each prompt)."""
        if image_embedding.ndim == 4:
            image_embedding = image_embedding[:, None]
        g, ps, h, w, c = image_embedding.shape
        b, t = point_embedding.shape[:2]
        if b % g:
            raise ValueError(f"{b} prompts cannot be grouped over {g} image embeddings")
        p = b // g
        if ps not in (1, p):
            raise ValueError(f"image tokens per group must be 1 or {p}, got {ps}")
        keys = image_embedding.reshape(g, ps, h * w, c)
        key_pe = jnp.broadcast_to(image_pe, (1, h, w, c)).reshape(1, 1, h * w, c)
        point_embedding = point_embedding.reshape(g, p, t, c)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        attn = self.final_attn_token_to_image(queries + point_embedding, keys + key_pe, keys)
        queries = self.norm_final_attn(queries + attn)
        keys = jnp.broadcast_to(keys, (g, p, h * w, c))
        return queries.reshape(b, t, c), keys.reshape(b, h * w, c)
