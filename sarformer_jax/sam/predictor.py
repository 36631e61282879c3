"""`SamPredictor` (mirrors segment_anything/predictor.py): embed an image once with `set_image`,
then decode any number of point / box / mask prompts with `predict`.  Inputs and outputs are
numpy arrays as upstream; `predict_jax` is the device-array variant (upstream's `predict_torch`).

Differences from upstream: `get_image_embedding` returns [1, 64, 64, 256] (NHWC, as everything in
JAX here) instead of [1, 256, 64, 64]; mask inputs keep upstream's [b, 1, 256, 256] layout.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sarformer_jax.sam.sam import Sam
from sarformer_jax.sam.transforms import ResizeLongestSide


@functools.partial(jax.jit, static_argnums=(0,))
def _embed(graphdef, state, image: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state).embed_image(image)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("multimask_output", "return_logits",
                                                                  "input_size", "original_size"))
def _decode(graphdef, state, features, coords, labels, boxes, mask_input, *, multimask_output: bool,
            return_logits: bool, input_size: tuple[int, int], original_size: tuple[int, int]):
    sam: Sam = nnx.merge(graphdef, state)
    points = None if coords is None else (coords, labels)
    if mask_input is not None:
        mask_input = jnp.moveaxis(mask_input, 1, -1)  # [b, 1, 256, 256] -> NHWC
    low_res, iou = sam.decode(features, points, boxes, mask_input, multimask_output)
    masks = sam.postprocess_masks(low_res, input_size, original_size)
    if not return_logits:
        masks = masks > sam.mask_threshold
    return masks, iou, low_res


class SamPredictor:
    """Efficient repeated prompting of one image with a SAM model."""

    def __init__(self, sam_model: Sam) -> None:
        self.model = sam_model
        self.transform = ResizeLongestSide(sam_model.img_size)
        self._graphdef, self._state = nnx.graphdef(sam_model), sam_model.inference_state()
        self.reset_image()

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Computes the embedding of an HWC uint8 image (RGB unless `image_format="BGR"`)."""
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(f"set_image expects an HxWx3 uint8 array, got {image.dtype} {image.shape}")
        if image_format != self.model.image_format:
            image = image[..., ::-1]
        resized = self.transform.apply_image(image)
        self.set_jax_image(jnp.asarray(resized)[None], image.shape[:2])

    def set_jax_image(self, transformed_image: jax.Array, original_image_size: tuple[int, int]) -> None:
        """Embeds an already resized [1, h, w, 3] image whose longest side is img_size."""
        s = self.model.img_size
        if transformed_image.ndim != 4 or transformed_image.shape[-1] != 3 or max(transformed_image.shape[1:3]) != s:
            raise ValueError(f"set_jax_image expects [1, h, w, 3] with longest side {s}, got {transformed_image.shape}")
        self.reset_image()
        self.original_size = tuple(int(v) for v in original_image_size)
        self.input_size = tuple(int(v) for v in transformed_image.shape[1:3])
        self.features = _embed(self._graphdef, self._state, transformed_image)
        self.is_image_set = True

    def predict(self, point_coords: np.ndarray | None = None, point_labels: np.ndarray | None = None,
                box: np.ndarray | None = None, mask_input: np.ndarray | None = None,
                multimask_output: bool = True, return_logits: bool = False
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Prompts in original-image pixels: point_coords [p, 2] (x, y), point_labels [p] (1 fg,
        0 bg), box [4] xyxy, mask_input [1, 256, 256] logits from a previous call.

        Returns masks [m, H, W] (bool, or float logits with return_logits), IoU predictions [m]
        and low-res logits [m, 256, 256], as numpy."""
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        coords = labels = boxes = masks_in = None
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels must be supplied if point_coords is supplied.")
            coords = jnp.asarray(self.transform.apply_coords(point_coords, self.original_size), jnp.float32)[None]
            labels = jnp.asarray(point_labels, jnp.int32)[None]
        if box is not None:
            boxes = jnp.asarray(self.transform.apply_boxes(box, self.original_size), jnp.float32)[None, :].reshape(1, 4)
        if mask_input is not None:
            masks_in = jnp.asarray(mask_input, jnp.float32)[None]
        masks, iou, low = self.predict_jax(coords, labels, boxes, masks_in, multimask_output, return_logits)
        return np.asarray(masks[0]), np.asarray(iou[0]), np.asarray(low[0])

    def predict_jax(self, point_coords: jax.Array | None, point_labels: jax.Array | None,
                    boxes: jax.Array | None = None, mask_input: jax.Array | None = None,
                    multimask_output: bool = True, return_logits: bool = False
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Batched prompts already in the img_size frame: point_coords [b, p, 2], point_labels
        [b, p], boxes [b, 4], mask_input [b, 1, 256, 256].  Returns masks [b, m, H, W], IoU [b, m],
        low-res logits [b, m, 256, 256]."""
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        return _decode(self._graphdef, self._state, self.features, point_coords, point_labels, boxes, mask_input,
                       multimask_output=bool(multimask_output), return_logits=bool(return_logits),
                       input_size=self.input_size, original_size=self.original_size)

    def get_image_embedding(self) -> jax.Array:
        """The image embedding [1, 64, 64, 256] (NHWC)."""
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) to generate an embedding.")
        return self.features

    def reset_image(self) -> None:
        self.is_image_set = False
        self.features = None
        self.original_size = None
        self.input_size = None
