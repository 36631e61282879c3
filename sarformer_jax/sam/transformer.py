"""SAM's two-way transformer (mirrors segment_anything/modeling/transformer.py): prompt tokens and
image tokens attend to each other in turn; attention may project to a narrower internal width.

Legend: b batch, q tokens (queries), k keys, n heads, d head dim, c channels, h w image grid.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from sarformer_jax.kernels.triton_backend import gpu_kernels
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

    def _weights(self, dtype) -> tuple[jax.Array, ...]:
        """Projection kernels per head: q, k, v [c, n, d], out [n, d, c], and the q, v, out biases."""
        n = self.num_heads
        d = self.internal_dim // n
        kern = lambda lin: lin.kernel[...].astype(dtype)
        bias = lambda lin: lin.bias[...].astype(dtype)
        c = self.q_proj.kernel.shape[0]
        return (kern(self.q_proj).reshape(c, n, d), kern(self.k_proj).reshape(c, n, d),
                kern(self.v_proj).reshape(c, n, d), kern(self.out_proj).reshape(n, d, -1),
                bias(self.q_proj).reshape(n, d), bias(self.v_proj).reshape(n, d), bias(self.out_proj))

    def tokens_to_image(self, q: jax.Array, k: jax.Array, v: jax.Array,
                        k_pe: jax.Array | None = None) -> jax.Array:
        """`self(q, k, v)` for few queries (prompt tokens q [g, p, t, c]) and many keys (image
        tokens k, v [g, pk, l, c], pk in {1, p}), with the key and value projections moved to
        the query side ("absorbed"):

          logits[n, t, l] = (W_k,n q'[n, t]) . k[l] / sqrt(d)   (+ q'.b_k, the same for every l:
                                                                 it cancels in the softmax)
          out[t] = W_o (W_v,n^T (sum_l a[n, t, l] v[l]) + b_v) + b_o     (sum_l a = 1)

        so no [l, c] projection of the image tokens is formed: two products of the image tokens
        with [c, n*t] matrices per prompt instead of two [l, c] x [c, c/2] projections and the
        attention (with pk = 1, one product per image for all its prompts).  Same values as
        `self(q, k, v)` up to rounding.

        `k_pe` [1, 1, l, c]: the keys are then `k + k_pe`.  With one map per prompt the sum is
        not formed: its logits are those of k plus those of k_pe, and the k_pe part is one
        product per image for all its prompts (forming k + k_pe was a full pass over every
        prompt's [l, c] tokens: ~5 ms of the generator's 91.5 ms of kernels per 2 images on an H200)."""
        dtype = self.q_proj.dtype or jnp.result_type(q, self.q_proj.kernel[...])
        if k_pe is not None and k.shape[1] == 1:
            k, k_pe = k + k_pe, None
        q, k, v = (a.astype(dtype) for a in (q, k, v))
        n = self.num_heads
        d = self.internal_dim // n
        g, p, t, _ = q.shape
        _, wk, wv, _, _, bv, _ = self._weights(dtype)
        qh = self.q_proj(q).reshape(g, p, t, n, d)
        m = jnp.einsum("gptnd,cnd->gpntc", qh, wk) / jnp.asarray(math.sqrt(d), dtype)
        if k.shape[1] == 1:  # image tokens shared by the group's prompts: one product per image
            logits = jnp.einsum("glc,gpntc->gpntl", k[:, 0], m, preferred_element_type=jnp.float32)
            attn = jax.nn.softmax(logits, axis=-1).astype(dtype)
            pooled = jnp.einsum("gpntl,glc->gpntc", attn, v[:, 0])
        else:
            logits = jnp.einsum("gplc,gpntc->gpntl", k, m, preferred_element_type=jnp.float32)
            if k_pe is not None:
                logits = logits + jnp.einsum("lc,gpntc->gpntl", k_pe[0, 0].astype(dtype), m,
                                             preferred_element_type=jnp.float32)
            attn = jax.nn.softmax(logits, axis=-1).astype(dtype)
            pooled = jnp.einsum("gpntl,gplc->gpntc", attn, v)
        out = jnp.einsum("gpntc,cnd->gptnd", pooled, wv) + bv
        return self.out_proj(out.reshape(g, p, t, n * d))

    def image_to_tokens(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        """`self(q, k, v)` for many queries (image tokens q [g, pq, l, c], pq in {1, p}) and few
        keys (prompt tokens k, v [g, p, t, c]), with the query and output projections moved to
        the key side ("absorbed"):

          logits[l, n, t] = q[l] . (W_q,n k'[n, t]) / sqrt(d) + b_q,n . k'[n, t] / sqrt(d)
          out[l] = sum_{n,t} a[l, n, t] (W_o,n v'[n, t]) + b_o

        one [l, c] x [c, n*t] product and one [l, n*t] x [n*t, c] product per prompt (the first
        one per image when pq = 1), instead of the [l, c] x [c, c/2] query and [l, c/2] x
        [c/2, c] output projections and a softmax over the t-wide minor axis of [l, n, t]
        batched products.  Returns [g, p, l, c]; same values as `self(q, k, v)` up to rounding."""
        dtype = self.q_proj.dtype or jnp.result_type(q, self.q_proj.kernel[...])
        q = q.astype(dtype)
        m, bias, u, bo = self._token_side(k, v, dtype)
        if q.shape[1] == 1:
            logits = jnp.einsum("glc,gpnct->gplnt", q[:, 0], m, preferred_element_type=jnp.float32)
        else:
            logits = jnp.einsum("gplc,gpnct->gplnt", q, m, preferred_element_type=jnp.float32)
        attn = jax.nn.softmax(logits + bias[:, :, None], axis=-1).astype(dtype)
        return jnp.einsum("gplnt,gpntc->gplc", attn, u) + bo

    def _token_side(self, k: jax.Array, v: jax.Array, dtype) -> tuple[jax.Array, ...]:
        """The prompt-token side of the absorbed image-to-token attention, for tokens k, v
        [g, p, t, c]: m [g, p, n, c, t] = W_q,n k'[n]^T / sqrt(d), the logits' bias [g, p, n, t]
        (float32) = b_q,n . k'[n] / sqrt(d), u [g, p, n, t, c] = v'[n] W_o,n, and b_o."""
        k, v = k.astype(dtype), v.astype(dtype)
        n = self.num_heads
        d = self.internal_dim // n
        g, p, t, _ = k.shape
        wq, _, _, wo, bq, _, bo = self._weights(dtype)
        kh = self.k_proj(k).reshape(g, p, t, n, d)
        vh = self.v_proj(v).reshape(g, p, t, n, d)
        m = jnp.einsum("gptnd,cnd->gpnct", kh, wq) / jnp.asarray(math.sqrt(d), dtype)
        bias = jnp.einsum("gptnd,nd->gpnt", kh, bq, preferred_element_type=jnp.float32) / math.sqrt(d)
        u = jnp.einsum("gptnd,ndc->gpntc", vh, wo)
        return m, bias, u, bo

    def image_to_tokens_norm(self, keys: jax.Array, key_pe: jax.Array, k: jax.Array, v: jax.Array,
                             norm: nnx.LayerNorm, *, interpret: bool = False, **kernel_settings) -> jax.Array:
        """`norm(keys + self.image_to_tokens(keys + key_pe, k, v))` as one Pallas kernel
        (`sarformer_jax.kernels.sam_image_to_tokens`): image tokens keys [g, pk, l, c] (pk in
        {1, p}), key_pe [1, 1, l, c], prompt tokens k, v [g, p, t, c] -> [g, p, l, c].  The
        token-side matrices are `image_to_tokens`' (`_token_side`); the kernel reads each
        prompt's image tokens once and writes the normalised update.  Same values up to
        rounding (float32 residual and LayerNorm).  `kernel_settings` (block_l, num_warps,
        num_stages) go to the kernel (`sarformer bench sam_tokens` sweeps them)."""
        from sarformer_jax.kernels.sam_image_to_tokens import image_to_tokens_norm

        dtype = self.q_proj.dtype or jnp.result_type(keys, self.q_proj.kernel[...])
        if not interpret and jax.default_backend() != "gpu":
            raise ValueError(f"attention_implementation 'absorbed_pallas' is a GPU kernel (backend here: "
                             f"{jax.default_backend()}); use 'absorbed', or 'absorbed_pallas_interpret' for tests")
        m, bias, u, bo = self._token_side(k, v, dtype)
        l, c = keys.shape[2:]
        return image_to_tokens_norm(keys.astype(dtype), key_pe.reshape(l, c), m, bias, u, bo, norm.scale[...],
                                    norm.bias[...], eps=norm.epsilon, interpret=interpret, **kernel_settings)

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
                 key_pe: jax.Array, implementation: str = "upstream") -> tuple[jax.Array, jax.Array]:
        """queries [g, p, t, c], keys [g, p or 1, l, c]; `implementation` as
        `TwoWayTransformer.attention_implementation` (same values up to rounding)."""
        absorbed = implementation != "upstream"
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q = queries + query_pe
        if absorbed:
            t2i = self.cross_attn_token_to_image.tokens_to_image(q, keys, keys, key_pe)
        else:
            t2i = self.cross_attn_token_to_image(q, keys + key_pe, keys)
        queries = self.norm2(queries + t2i)
        queries = self.norm3(queries + self.mlp(queries))
        q = queries + query_pe
        if implementation in ("absorbed_pallas", "absorbed_pallas_interpret"):
            keys = self.cross_attn_image_to_token.image_to_tokens_norm(
                keys, key_pe, q, queries, self.norm4, interpret=implementation == "absorbed_pallas_interpret")
            return queries, keys
        k = keys + key_pe
        i2t = self.cross_attn_image_to_token.image_to_tokens if absorbed else self.cross_attn_image_to_token
        keys = self.norm4(keys + i2t(k, q, queries))
        return queries, keys


class TwoWayTransformer(nnx.Module):
    """`depth` two-way blocks, then a final token->image attention and LayerNorm.

    Call with image_embedding [b, h, w, c], image_pe [b, h, w, c], point_embedding [b, q, c];
    returns (tokens [b, q, c], image tokens [b, h*w, c]).

    `attention_implementation` (set on an instance): "upstream" projects the image tokens in
    every cross-attention as segment-anything does; "absorbed" moves those projections to the
    prompt-token side (`Attention.tokens_to_image`, `Attention.image_to_tokens`): same values
    up to rounding, far less work per prompt when thousands of prompts share an image;
    "absorbed_pallas" is "absorbed" with each block's image-token update (image-to-token
    attention, residual, LayerNorm) as one GPU kernel (`Attention.image_to_tokens_norm`,
    bf16 only), "absorbed_pallas_interpret" the same in the Pallas interpreter (CPU tests);
    "auto" (the default) is "absorbed_pallas" on a GPU in bfloat16 or float16 and "absorbed"
    otherwise (generator 57.2 vs 61.5 ms per 640² image on an H200: docs/benchmarks.md, SAM
    run 7)."""

    IMPLEMENTATIONS = ("auto", "upstream", "absorbed", "absorbed_pallas", "absorbed_pallas_interpret")

    def resolved_implementation(self, dtype, num_tokens: int) -> str:
        """The implementation a call with image tokens of `dtype` (before the layers' own
        dtype) and `num_tokens` per map runs: "auto" resolved, the others as set."""
        impl = self.attention_implementation
        if impl != "auto":
            return impl
        dtype = jnp.dtype(self.final_attn_token_to_image.q_proj.dtype or dtype)
        fits = num_tokens % 16 == 0 and dtype in (jnp.bfloat16, jnp.float16)
        return "absorbed_pallas" if fits and gpu_kernels() else "absorbed"

    attention_implementation: str = "auto"

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
        if self.attention_implementation not in self.IMPLEMENTATIONS:
            raise ValueError(f"attention_implementation must be one of {self.IMPLEMENTATIONS}, got "
                             f"{self.attention_implementation!r}")
        impl = self.resolved_implementation(image_embedding.dtype, h * w)
        absorbed = impl != "upstream"
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe, impl)
        final = self.final_attn_token_to_image
        if absorbed:
            attn = final.tokens_to_image(queries + point_embedding, keys, keys, key_pe)
        else:
            attn = final(queries + point_embedding, keys + key_pe, keys)
        queries = self.norm_final_attn(queries + attn)
        keys = jnp.broadcast_to(keys, (g, p, h * w, c))
        return queries.reshape(b, t, c), keys.reshape(b, h * w, c)
