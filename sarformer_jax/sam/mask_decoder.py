"""SAM's mask decoder (mirrors segment_anything/modeling/mask_decoder.py): IoU and mask tokens run
through the two-way transformer with the prompt tokens; the image tokens are upscaled 4x by two
transposed convs and dotted with per-token hypernetwork outputs; an MLP predicts mask IoU.

Legend: b batch (prompts), t tokens, m masks, c channels, h w grid.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sarformer_jax.kernels.triton_backend import gpu_kernels
from sarformer_jax.models.layers import StridedConvTranspose
from sarformer_jax.sam.common import GELU, layer_norm
from sarformer_jax.sam.transformer import TwoWayTransformer


class MLP(nnx.Module):
    """`num_layers` Linear layers with ReLU between them (none after the last)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int, *,
                 sigmoid_output: bool = False, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nnx.List([nnx.Linear(a, b, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                for a, b in zip(dims[:-1], dims[1:])])
        self.sigmoid_output = sigmoid_output

    def __call__(self, x: jax.Array) -> jax.Array:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = jax.nn.relu(x)
        return jax.nn.sigmoid(x) if self.sigmoid_output else x


class MaskDecoder(nnx.Module):
    """Predicts masks from image and prompt embeddings.

    `upscale_implementation` (set on an instance): "upstream" upscales the image tokens 4x
    (two 2x2 transposed convs, each interleaved into its grid) and then takes each mask token's
    product with them; "blocks" (the default) keeps both convs' outputs as blocks of their input token
    ([prompts, h, w, 2, 2, 2, 2, c/8]: the LayerNorm and GELUs act on the last axis, nothing is
    transposed) and interleaves only the masks at the end (same values, same sums, m/(c/8) of
    the bytes); "pallas" runs the upscaling and the mask product as one GPU kernel
    (`sarformer_jax.kernels.sam_upscale`: per prompt only its image tokens are read and its
    masks written; "pallas_interpret" runs it in the Pallas interpreter, for CPU tests), in the
    product form `upscale_products` ("rows" or "tensor": see `upscale_masks`); "blocks_pallas"
    runs blocks' first conv, LayerNorm and GELU in XLA and the second conv, its GELU and the
    mask products as one GPU kernel (`sam_upscale.conv2_masks`: the GELU output is never
    written; "blocks_pallas_interpret" in the interpreter; with `upscale_fuse_norm` the kernel
    also does the first conv's bias, LayerNorm and GELU); "auto" (the default) is
    "blocks_pallas" on a GPU in bfloat16 or float16 and "blocks" otherwise (the kernel's GELU
    then a polynomial within 1.6e-5 of erf; guidance in the online train step 66.4 vs 70.4 ms,
    generator 35.2 vs 36.4 ms per 640² image with the erf GELU, on an H200: docs/benchmarks.md,
    train runs 22-23, SAM run 13).  Only the requested masks are computed (3 of the 4 for
    multimask output).

    Args:
      transformer_dim: token width (256).
      num_multimask_outputs: masks for ambiguous prompts (3); one more token gives the single mask.
      iou_head_depth, iou_head_hidden_dim: the IoU MLP.
      transformer_depth, transformer_heads, transformer_mlp_dim: the TwoWayTransformer.
    """

    upscale_implementation: str = "auto"
    upscale_products: str = "rows"
    # blocks_pallas: the first conv's bias, LayerNorm and GELU inside the kernel too (XLA then
    # only runs the first conv's product)
    upscale_fuse_norm: bool = False

    def resolved_upscale(self, dtype, num_tokens: int) -> str:
        """The upscaling a call with image tokens of `dtype` (before the convs' own dtype) and
        `num_tokens` per map runs: "auto" resolved, the others as set."""
        impl = self.upscale_implementation
        if impl != "auto":
            return impl
        dtype = jnp.dtype(self.output_upscaling[0].dtype or dtype)
        fits = (4 * num_tokens) % 16 == 0 and dtype in (jnp.bfloat16, jnp.float16)
        return "blocks_pallas" if fits and gpu_kernels() else "blocks"

    def __init__(self, *, transformer_dim: int = 256, num_multimask_outputs: int = 3,
                 iou_head_depth: int = 3, iou_head_hidden_dim: int = 256, transformer_depth: int = 2,
                 transformer_heads: int = 8, transformer_mlp_dim: int = 2048, rngs: nnx.Rngs,
                 dtype=None, param_dtype=jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.transformer_dim = transformer_dim
        self.transformer = TwoWayTransformer(depth=transformer_depth, embedding_dim=transformer_dim,
                                             num_heads=transformer_heads, mlp_dim=transformer_mlp_dim, **kw)
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nnx.Embed(1, transformer_dim, param_dtype=param_dtype, rngs=rngs)
        self.mask_tokens = nnx.Embed(self.num_mask_tokens, transformer_dim, param_dtype=param_dtype, rngs=rngs)
        c = transformer_dim
        # ConvTranspose2d(k=2, s=2) as a GEMM + depth-to-space (models.layers): kernels are
        # (kh, kw, in, out) as flax's ConvTranspose keeps them; the converter flips torch's
        # (in, out, kh, kw) weights spatially (CHECKPOINTS §5.1).
        self.output_upscaling = nnx.List([
            StridedConvTranspose(c, c // 4, 2, **kw),
            layer_norm(c // 4, 1e-6, **kw),
            GELU(),
            StridedConvTranspose(c // 4, c // 8, 2, **kw),
            GELU(),
        ])
        self.output_hypernetworks_mlps = nnx.List([MLP(c, c, c // 8, 3, **kw) for _ in range(self.num_mask_tokens)])
        self.iou_prediction_head = MLP(c, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth, **kw)

    def __call__(self, image_embeddings: jax.Array, image_pe: jax.Array, sparse_prompt_embeddings: jax.Array,
                 dense_prompt_embeddings: jax.Array, multimask_output: bool) -> tuple[jax.Array, jax.Array]:
        """Args:
          image_embeddings: [g, h, w, c] with g dividing b: prompts grouped by image, image
            i's b/g prompts contiguous (g = 1: one image for all prompts; g = b: one each).
          image_pe: [1, h, w, c].
          sparse_prompt_embeddings: [b, t, c]; dense_prompt_embeddings: [b or 1, h, w, c].
          multimask_output: the 3 ambiguity-aware masks (True) or the single one (False).
        Returns:
          low-res mask logits [b, m, 4h, 4w] and IoU predictions [b, m]."""
        x, hyper_in, iou_pred = self.tokens_and_iou(image_embeddings, image_pe, sparse_prompt_embeddings,
                                                    dense_prompt_embeddings, multimask_output)
        return self.upscale_masks(x, hyper_in), iou_pred

    def tokens_and_iou(self, image_embeddings: jax.Array, image_pe: jax.Array,
                       sparse_prompt_embeddings: jax.Array, dense_prompt_embeddings: jax.Array,
                       multimask_output: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
        """`__call__` up to the upscaling: (each prompt's image tokens after the two-way
        transformer [b, h, w, c], the mask tokens' hypernetwork outputs [b, m, c/8], the IoU
        predictions [b, m]); `upscale_masks` of the first two gives `__call__`'s masks."""
        sl = slice(1, None) if multimask_output else slice(0, 1)
        x, hyper_in, iou_pred = self.predict_tokens(image_embeddings, image_pe, sparse_prompt_embeddings,
                                                    dense_prompt_embeddings, sl)
        return x, hyper_in, iou_pred[:, sl]

    def predict_masks(self, image_embeddings: jax.Array, image_pe: jax.Array, sparse_prompt_embeddings: jax.Array,
                      dense_prompt_embeddings: jax.Array,
                      mask_tokens: slice = slice(None)) -> tuple[jax.Array, jax.Array]:
        """The masks of the `mask_tokens` slice of the `num_mask_tokens` tokens [b, m, 4h, 4w]
        (all by default) and every token's IoU prediction [b, num_mask_tokens]."""
        x, hyper_in, iou_pred = self.predict_tokens(image_embeddings, image_pe, sparse_prompt_embeddings,
                                                    dense_prompt_embeddings, mask_tokens)
        return self.upscale_masks(x, hyper_in), iou_pred

    def predict_tokens(self, image_embeddings: jax.Array, image_pe: jax.Array, sparse_prompt_embeddings: jax.Array,
                       dense_prompt_embeddings: jax.Array,
                       mask_tokens: slice = slice(None)) -> tuple[jax.Array, jax.Array, jax.Array]:
        """`predict_masks` before the upscaling: the image tokens [b, h, w, c], the
        `mask_tokens` slice's hypernetwork outputs [b, m, c/8] and every token's IoU prediction
        [b, num_mask_tokens]."""
        b = sparse_prompt_embeddings.shape[0]
        out_tokens = jnp.concatenate([self.iou_token.embedding[...], self.mask_tokens.embedding[...]], axis=0)
        out_tokens = jnp.broadcast_to(out_tokens, (b,) + out_tokens.shape).astype(sparse_prompt_embeddings.dtype)
        tokens = jnp.concatenate([out_tokens, sparse_prompt_embeddings], axis=1)
        g = image_embeddings.shape[0]
        if b % g:
            raise ValueError(f"image_embeddings {image_embeddings.shape}: batch must divide the {b} prompts")
        _, h, w, c = image_embeddings.shape
        if dense_prompt_embeddings.shape[0] == 1:  # no mask prompts: one image per group
            src = (image_embeddings + dense_prompt_embeddings)[:, None]
        else:  # per-prompt mask prompts
            src = image_embeddings[:, None] + dense_prompt_embeddings.reshape(g, b // g, h, w, c)
        hs, src = self.transformer(src, image_pe, tokens)
        iou_token_out = hs[:, 0]
        mask_tokens_out = hs[:, 1:1 + self.num_mask_tokens]
        x = src.reshape(b, h, w, c)
        wanted = range(self.num_mask_tokens)[mask_tokens]
        hyper_in = jnp.stack([self.output_hypernetworks_mlps[i](mask_tokens_out[:, i]) for i in wanted],
                             axis=1)  # [b, m, c/8]
        return x, hyper_in, self.iou_prediction_head(iou_token_out)

    def upscale_masks(self, x: jax.Array, hyper_in: jax.Array, **kernel_settings) -> jax.Array:
        """The end of the decoder: image tokens [b, h, w, c] (one map per prompt) upscaled 4x
        and multiplied by the mask tokens' hypernetwork outputs [b, m, c/8] -> masks
        [b, m, 4h, 4w], by `upscale_implementation`.  `kernel_settings` (block_l, num_warps,
        num_stages, direct) go to the Pallas kernel (`sarformer bench sam_upscale` sweeps them)."""
        b, h, w, _ = x.shape
        impl = self.resolved_upscale(x.dtype, h * w)
        if impl == "blocks":
            up1, norm, act1, up2, act2 = self.output_upscaling
            y = act1(norm(up1.blocks(x)))  # [b, h, w, 2, 2, c/4]
            y = act2(up2.blocks(y.reshape(b, h, w * 4, -1)))  # [b, h, 4w, 2, 2, c/8]
            y = y.reshape(b, h, w, 2, 2, 2, 2, -1)  # token (i, j), first block (x, y), second (X, Y)
            # row 4i + 2x + X, column 4j + 2y + Y of the upscaled grid
            masks = jnp.einsum("bmc,bhwxyXYc->bmhxXwyY", hyper_in, y)
            masks = masks.reshape(b, hyper_in.shape[1], 4 * h, 4 * w)
        elif impl in ("blocks_pallas", "blocks_pallas_interpret"):
            from sarformer_jax.kernels.sam_upscale import conv2_masks

            interpret = impl == "blocks_pallas_interpret"
            if not interpret and jax.default_backend() != "gpu":
                raise ValueError(f"upscale_implementation 'blocks_pallas' runs a GPU kernel (backend here: "
                                 f"{jax.default_backend()}); use 'blocks', or 'blocks_pallas_interpret' for tests")
            up1, norm, act1, up2, _ = self.output_upscaling
            settings = dict(kernel_settings)
            if settings.pop("fuse_norm", self.upscale_fuse_norm):
                # the first conv's product alone; its bias, the LayerNorm and the GELU in the kernel
                y = up1.blocks(x, bias=False)
                settings.update(first=(up1.bias[...], norm.scale[...], norm.bias[...]), eps=norm.epsilon)
            else:
                y = act1(norm(up1.blocks(x)))  # [b, h, w, 2, 2, c/4]: token (i, j), first block (x, y)
            m = hyper_in.shape[1]
            r = conv2_masks(y.reshape(b, h * w * 4, -1), up2.block_kernel(), up2.bias[...], hyper_in,
                            interpret=interpret, **settings)  # [b, 4hw, 4 mp], column 4k + 2X + Y
            r = r.reshape(b, h, w, 2, 2, -1, 2, 2)[:, :, :, :, :, :m]  # [b, h, w, x, y, k, X, Y]
            masks = r.transpose(0, 5, 1, 3, 6, 2, 4, 7).reshape(b, m, 4 * h, 4 * w)
        elif impl in ("pallas", "pallas_interpret"):
            from sarformer_jax.kernels.sam_upscale import upscale_masks

            if impl == "pallas" and jax.default_backend() != "gpu":
                raise ValueError(f"upscale_implementation 'pallas' is a GPU kernel (backend here: "
                                 f"{jax.default_backend()}); use 'blocks', or 'pallas_interpret' for tests")
            up1, norm, _, up2, _ = self.output_upscaling
            dtype = up1.dtype or jnp.result_type(x, up1.kernel[...])
            masks = upscale_masks(x.astype(dtype), up1.block_kernel(), up1.bias[...], norm.scale[...],
                                  norm.bias[...], up2.block_kernel(), up2.bias[...], hyper_in,
                                  eps=norm.epsilon, interpret=impl == "pallas_interpret",
                                  **{"products": self.upscale_products, **kernel_settings})
        elif impl == "upstream":
            for layer in self.output_upscaling:
                x = layer(x)
            masks = jnp.einsum("bmc,bhwc->bmhw", hyper_in, x)
        else:
            raise ValueError(f"upscale_implementation must be 'auto', 'upstream', 'blocks', 'blocks_pallas', "
                             f"'blocks_pallas_interpret', 'pallas' or 'pallas_interpret', got "
                             f"{self.upscale_implementation!r}")
        return masks
