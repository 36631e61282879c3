"""The assembled SAM model (mirrors segment_anything/modeling/sam.py): image encoder, prompt encoder
and mask decoder, with SAM's pre-processing (normalise, pad to 1024) and post-processing (upscale
the low-res logits, crop the padding, resize to the original image).

Legend: b batch, h w spatial, c channels, m masks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sarformer_jax.kernels.triton_backend import gpu_kernels
from sarformer_jax.sam.common import postprocess_matrix, postprocess_taps
from sarformer_jax.sam.image_encoder import ImageEncoderViT
from sarformer_jax.sam.mask_decoder import MaskDecoder
from sarformer_jax.sam.prompt_encoder import PromptEncoder

POSTPROCESS = ("matmul", "taps", "pallas", "pallas_interpret", "auto")
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


class Sam(nnx.Module):
    """Segment Anything: `image_encoder`, `prompt_encoder`, `mask_decoder` (state-dict names)."""

    mask_threshold: float = 0.0
    image_format: str = "RGB"
    # how `postprocess_masks` applies its per-axis linear maps: "matmul" (dense float32 GEMMs at
    # HIGHEST precision), "taps" (the <= 4 nonzero weights of each output, gathered) or "pallas"
    # (a GPU kernel, kernels/sam_mask_stats.py, that also thresholds on chip: `threshold_masks`
    # and `mask_stats` then never store the full-size logits; "pallas_interpret" runs it in the
    # Pallas interpreter for CPU tests); "auto" is "pallas" on a GPU and "taps" elsewhere (the
    # kernel: generator 36.2 vs 42.8 ms per 640² image on an H200, benchmarks SAM run 11); same
    # weights, sums in another order.  Set on an instance to change it.
    postprocess_implementation: str = "matmul"

    def __init__(self, image_encoder: ImageEncoderViT, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder):
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder

    @property
    def img_size(self) -> int:
        return self.image_encoder.img_size

    def inference_state(self) -> nnx.State:
        """`nnx.split(self)[1]` for frozen use: the image encoder's Linear / Conv weights held in
        its compute dtype (bf16) instead of cast from float32 at every call -- the same bf16
        weights, without re-reading the float32 ones (vit_h: 2.5 GB per image).  The predictor,
        the automatic mask generators and the online guidance run on it."""
        from sarformer_jax.models.layers import state_with_compute_dtype_weights

        return state_with_compute_dtype_weights(self, within="image_encoder")

    def preprocess(self, x: jax.Array) -> jax.Array:
        """[b, h, w, 3] RGB in 0..255 (h, w <= img_size) -> normalised, zero-padded at the
        bottom/right to [b, img_size, img_size, 3]."""
        x = (x.astype(jnp.float32) - jnp.asarray(PIXEL_MEAN, jnp.float32)) / jnp.asarray(PIXEL_STD, jnp.float32)
        s = self.img_size
        return jnp.pad(x, ((0, 0), (0, s - x.shape[1]), (0, s - x.shape[2]), (0, 0)))

    def postprocess_masks(self, masks: jax.Array, input_size: tuple[int, int],
                          original_size: tuple[int, int]) -> jax.Array:
        """Low-res logits [..., 256, 256] -> [..., H, W] at the original image size: bilinear to
        img_size, crop to the resized (unpadded) input, bilinear to the original size -- done
        as one float32 matrix product per axis (the composition of the three linear steps),
        which on a GPU is an order of magnitude faster than materialising the 1024² masks of
        thousands of candidates."""
        s = self.img_size
        lh, lw = masks.shape[-2:]
        if self._postprocess_kernel():
            return self._kernel_postprocess(masks, input_size, original_size, "logits")
        x = masks.astype(jnp.float32)
        impl = self.resolved_postprocess()
        if impl == "taps":
            ih, wh = postprocess_taps(lh, s, int(input_size[0]), int(original_size[0]))
            iw, ww = postprocess_taps(lw, s, int(input_size[1]), int(original_size[1]))
            # (XLA fuses both passes into the consumer; forcing the width pass to memory with
            # an optimization barrier was measured 3.4x slower on an H200: benchmarks SAM run 9)
            x = jnp.sum(jnp.take(x, jnp.asarray(iw), axis=-1) * jnp.asarray(ww), axis=-1)
            x = jnp.take(x, jnp.asarray(ih), axis=-2)  # [..., out_h, k, out_w]
            return jnp.sum(x * jnp.asarray(wh)[..., None], axis=-2)
        if impl != "matmul":
            raise ValueError(f"postprocess_implementation must be one of {POSTPROCESS}, got "
                             f"{self.postprocess_implementation!r}")
        mh = jnp.asarray(postprocess_matrix(lh, s, int(input_size[0]), int(original_size[0])))
        mw = jnp.asarray(postprocess_matrix(lw, s, int(input_size[1]), int(original_size[1])))
        x = jnp.einsum("...hw,ow->...ho", x, mw, precision=jax.lax.Precision.HIGHEST)
        return jnp.einsum("...hw,oh->...ow", x, mh, precision=jax.lax.Precision.HIGHEST)

    def resolved_postprocess(self) -> str:
        """`postprocess_implementation` with "auto" resolved for the default backend."""
        impl = self.postprocess_implementation
        if impl == "auto":
            return "pallas" if gpu_kernels() else "taps"
        return impl

    def _postprocess_kernel(self) -> bool:
        impl = self.resolved_postprocess()
        if impl == "pallas" and jax.default_backend() != "gpu":
            raise ValueError(f"postprocess_implementation 'pallas' is a GPU kernel (backend here: "
                             f"{jax.default_backend()}); use 'taps', or 'pallas_interpret' for tests")
        return impl in ("pallas", "pallas_interpret")

    def _kernel_postprocess(self, masks, input_size, original_size, mode, offset: float = 0.0):
        from sarformer_jax.kernels.sam_mask_stats import postprocess_stats

        t = float(self.mask_threshold)
        return postprocess_stats(masks if masks.dtype in (jnp.float32, jnp.bfloat16) else masks.astype(jnp.float32),
                                 img_size=self.img_size, input_size=tuple(int(v) for v in input_size),
                                 original_size=tuple(int(v) for v in original_size), mode=mode,
                                 thresholds=(t + offset, t - offset, t),
                                 interpret=self.resolved_postprocess() == "pallas_interpret")

    def threshold_masks(self, masks: jax.Array, input_size: tuple[int, int],
                        original_size: tuple[int, int]) -> jax.Array:
        """`postprocess_masks(...) > mask_threshold`: boolean masks [..., H, W] (with "pallas",
        thresholded on chip)."""
        if self._postprocess_kernel():
            return self._kernel_postprocess(masks, input_size, original_size, "mask")
        return self.postprocess_masks(masks, input_size, original_size) > self.mask_threshold

    def mask_stats(self, masks: jax.Array, input_size: tuple[int, int], original_size: tuple[int, int],
                   offset: float) -> tuple[jax.Array, jax.Array]:
        """What the automatic generator needs of each full-size mask: (stability score [...],
        upstream's `calculate_stability_score` with `offset`; inclusive xyxy box [..., 4] int32
        of the mask above `mask_threshold`, zeros when empty)."""
        from sarformer_jax.sam import amg

        if self._postprocess_kernel():
            st = self._kernel_postprocess(masks, input_size, original_size, "stats", offset)
            stab = st["high"].astype(jnp.float32) / st["low"].astype(jnp.float32)
            return stab, amg.box_from_rows_cols(st["rows"], st["cols"])
        logits = self.postprocess_masks(masks, input_size, original_size)
        bits = amg.mask_bits(logits, self.mask_threshold, offset)
        return amg.stability_from_bits(bits), amg.batched_mask_to_box((bits & 4) != 0)

    def embed_image(self, x: jax.Array) -> jax.Array:
        """Resized uint8/float RGB [b, h, w, 3] with max(h, w) = img_size -> [b, 64, 64, 256]."""
        return self.image_encoder(self.preprocess(x))[0]

    def decode(self, image_embeddings: jax.Array, points: tuple[jax.Array, jax.Array] | None = None,
               boxes: jax.Array | None = None, mask_input: jax.Array | None = None,
               multimask_output: bool = True) -> tuple[jax.Array, jax.Array]:
        """Prompts in the img_size frame -> (low-res logits [b, m, 256, 256], IoU [b, m]).

        `image_embeddings` [g, 64, 64, c] with g dividing the b prompts: image i serves the
        i-th run of b/g contiguous prompts (pass each image once, not repeated per prompt:
        the decoder then projects its tokens once for all of them)."""
        sparse, dense = self.prompt_encoder(points, boxes, mask_input)
        return self.mask_decoder(image_embeddings, self.prompt_encoder.get_dense_pe(), sparse, dense,
                                 multimask_output)

    def decode_tokens(self, image_embeddings: jax.Array, points: tuple[jax.Array, jax.Array] | None = None,
                      multimask_output: bool = True) -> tuple[jax.Array, jax.Array, jax.Array]:
        """`decode` up to the upscaling: (image tokens [b, 64, 64, c], hypernetwork outputs
        [b, m, c/8], IoU [b, m]); `self.mask_decoder.upscale_masks` of the first two gives
        `decode`'s low-res logits."""
        sparse, dense = self.prompt_encoder(points, None, None)
        return self.mask_decoder.tokens_and_iou(image_embeddings, self.prompt_encoder.get_dense_pe(),
                                                sparse, dense, multimask_output)
