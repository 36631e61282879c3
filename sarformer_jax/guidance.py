"""Where SARFormer's mask proposals come from (config `guidance.source`), ARCHITECTURE §4.3.

* `cached`: the batch carries `proposals` uint8 [B, Q, H, W] and `num_proposals` [B] (warped by
  the data pipeline like the label); the first `num_proposals` slots are real masks.
* `online`: SAM's automatic mask generator (`sarformer_jax.sam`) runs on the device on the
  de-normalised image, inside the same jit as the train / eval step.  SAM's parameters travel as
  an argument of the step (`guide["sam"]`, never trained, never checkpointed).
* `boxes`: as `online`, plus external detector boxes per image (`batch["boxes"]` [B, m, 4] xyxy
  in image pixels, NaN rows absent) used as SAM box prompts and merged as the original merged its
  YOLO boxes (§4.3 step 3): SAM masks whose box lies inside a detector box (5 px tolerance) are
  dropped and the box masks come first.
* `none`: the Mask2Former baseline; no proposals.

In every case the masks are then brought to exactly Q slots by
`mask2former.prepare_proposals` (random subset, Bernoulli placeholders, permutation by PRNG key;
deterministic at evaluation when `guidance.deterministic_eval`).

`guidance.seed_compat=True` reproduces the original's SAM input handling (§8 #1-3) for evaluating
released checkpoints as they were evaluated: SAM gets the already-normalised image (normalised a
second time by SAM's own preprocessing), transposed (H <-> W; square inputs only, as the
original), and one image embedding, that of the first image the run sees
(`guide["stale_embedding"]`, set by `init_stale_embedding`), is reused for every later image.
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from sarformer_jax.models.mask2former import prepare_proposals

BOX_TOLERANCE = 5.0  # pixels, the original's `mask_filt`


def guidance_refusal(cfg, command: str) -> str | None:
    """A one-line refusal for guided configs that cannot run as given (online guidance without
    a SAM checkpoint; cached guidance without its cache), or None when the config can run."""
    if cfg.model.head.query_init == "sam_pooling" and cfg.guidance.source == "cached":
        from sarformer_jax.data.pipeline import proposal_cache_dir

        try:
            cache = proposal_cache_dir(cfg)
        except ValueError as e:
            return f"sarformer {command}: {e}"
        if str(cfg.data.get("dataset", "")) != "synthetic" and not pathlib.Path(cache).is_dir():
            return (f"sarformer {command}: guidance.cache_dir={cache}: no such directory (write "
                    "it with `sarformer amg --dataset ROOT --out CACHE --sam-checkpoint SAM.npz`)")
        return None
    if cfg.model.head.query_init != "sam_pooling" or cfg.guidance.source not in ("online", "boxes"):
        return None
    ckpt = str(cfg.guidance.sam.checkpoint or "")
    if not ckpt:
        return (f"sarformer {command}: guidance.source={cfg.guidance.source!r} runs SAM inside the "
                "step and needs its weights: --set guidance.sam.checkpoint=SAM.npz (from `sarformer "
                "convert sam sam_vit_b_01ec64.pth SAM.npz`), or use a proposal cache: `sarformer amg "
                "--dataset ROOT --out CACHE --sam-checkpoint SAM.npz` then --set "
                "guidance.source=cached --set guidance.cache_dir=CACHE")
    if not pathlib.Path(ckpt).is_file():
        return f"sarformer {command}: guidance.sam.checkpoint={ckpt}: no such file"
    return None


def uses_sam(cfg) -> bool:
    return cfg.model.head.query_init == "sam_pooling" and cfg.guidance.source in ("online", "boxes")


def denormalize(images: jax.Array, mean, std) -> jax.Array:
    """Normalised RGB float -> uint8 RGB (what SAM expects, §8 #2 'clean')."""
    x = images.astype(jnp.float32) * jnp.asarray(std, jnp.float32) + jnp.asarray(mean, jnp.float32)
    return jnp.clip(jnp.round(x), 0, 255).astype(jnp.uint8)


def cached_masks(batch: dict[str, Any], num_queries: int) -> tuple[jax.Array, jax.Array]:
    """The batch's cached proposals: `proposals` [B, N, H, W], or `proposals_packed` (the
    loader's bit-packed form, unpacked here on the device)."""
    if "proposals_packed" in batch:
        width = batch["image"].shape[2]
        masks = jnp.unpackbits(batch["proposals_packed"], axis=-1, count=width)
    else:
        masks = batch["proposals"]
    valid = jnp.arange(masks.shape[1])[None, :] < batch["num_proposals"][:, None]
    return masks, valid[:, :num_queries]


def amg_settings(cfg):
    from sarformer_jax.sam.automatic_mask_generator import AmgSettings

    s = cfg.guidance.sam
    return AmgSettings(int(s.points_per_side), int(s.points_per_batch), float(s.pred_iou_thresh),
                       float(s.stability_score_thresh), float(s.stability_score_offset),
                       float(s.box_nms_thresh), int(s.max_masks),
                       skip_low_iou=bool(s.get("skip_low_iou", True)))


def load_guidance_sam(cfg, sam=None):
    """(graphdef, state) of the guidance SAM in `guidance.sam.dtype`: `sam` if given (an
    `nnx` SAM, e.g. random weights for benchmarks and tests), else `guidance.sam.checkpoint`
    (.npz from `sarformer convert sam`, or an official .pth converted on the fly).  Sets the
    model's `postprocess_implementation` to `guidance.sam.postprocess`, its mask decoder's
    `upscale_implementation` and `upscale_fuse_norm` to `guidance.sam.upscale` and
    `guidance.sam.upscale_fuse_norm`, and the decoder transformer's
    `attention_implementation` to `guidance.sam.decoder_attention` (on `sam` too).  The state
    is `Sam.inference_state()`: the encoder's Linear / Conv weights held in the compute dtype."""
    from flax import nnx

    from sarformer_jax.sam.build import build_sam, load_sam

    dtype = jnp.dtype(cfg.guidance.sam.get("dtype", "float32"))
    attention = cfg.guidance.sam.get("attention", "auto")
    if sam is None:
        ckpt = str(cfg.guidance.sam.checkpoint or "")
        if not ckpt:
            raise ValueError(f"guidance.source={cfg.guidance.source!r} needs guidance.sam.checkpoint "
                             "(converted SAM params, `sarformer convert sam`)")
        if ckpt.endswith(".npz"):
            sam = load_sam(ckpt, dtype=dtype, attention_implementation=attention)
        else:
            sam = build_sam(cfg.guidance.sam.model_type, checkpoint=ckpt, dtype=dtype,
                            attention_implementation=attention)
        want = int(cfg.guidance.sam.image_size)
        if sam.img_size != want:
            raise ValueError(f"{ckpt}: SAM input size {sam.img_size}, config says {want}")
    post = str(cfg.guidance.sam.get("postprocess", "matmul"))
    if post not in ("auto", "matmul", "taps", "pallas"):
        raise ValueError(f"guidance.sam.postprocess must be 'auto', 'matmul', 'taps' or 'pallas', got {post!r}")
    sam.postprocess_implementation = post
    up = str(cfg.guidance.sam.get("upscale", "auto"))
    if up not in ("auto", "upstream", "blocks", "blocks_pallas", "pallas"):
        raise ValueError(f"guidance.sam.upscale must be 'auto', 'upstream', 'blocks', 'blocks_pallas' or 'pallas', "
                         f"got {up!r}")
    sam.mask_decoder.upscale_implementation = up
    fuse = cfg.guidance.sam.get("upscale_fuse_norm", False)
    if not isinstance(fuse, bool):
        raise ValueError(f"guidance.sam.upscale_fuse_norm must be True or False, got {fuse!r}")
    sam.mask_decoder.upscale_fuse_norm = fuse
    att = str(cfg.guidance.sam.get("decoder_attention", "auto"))
    allowed = ("auto", "upstream", "absorbed", "absorbed_pallas")
    if att not in allowed:
        raise ValueError(f"guidance.sam.decoder_attention must be one of {allowed}, got {att!r}")
    sam.mask_decoder.transformer.attention_implementation = att
    return nnx.graphdef(sam), sam.inference_state()


def _faithful_input(images: jax.Array, img_size: int) -> jax.Array:
    """§8 #2-3: the normalised float image, transposed (H <-> W), resized (bilinear, long side
    to img_size; the original's antialias is a no-op when upscaling) -> [b, h', w', 3] float32
    for SAM's own (second) normalisation."""
    from sarformer_jax.models.layers import resize_bilinear
    from sarformer_jax.sam.transforms import get_preprocess_shape

    x = jnp.swapaxes(images.astype(jnp.float32), 1, 2)
    size = get_preprocess_shape(x.shape[1], x.shape[2], img_size)
    return resize_bilinear(x, size)


def faithful_embedding(sam, images: jax.Array) -> jax.Array:
    """SAM embeddings of the original's handling (§8 #2-3) of normalised images [b, H, W, 3]."""
    return sam.embed_image(_faithful_input(images, sam.img_size))


def boxes_inside(mask_boxes: jax.Array, det_boxes: jax.Array, det_valid: jax.Array,
                 tol: float = BOX_TOLERANCE) -> jax.Array:
    """[K] True where the xyxy box of a SAM mask lies inside some valid detector box (xyxy),
    within `tol` pixels on every side (the original's `mask_filt`)."""
    m, d = mask_boxes[:, None, :], det_boxes[None, :, :]
    inside = ((m[..., 0] >= d[..., 0] - tol) & (m[..., 1] >= d[..., 1] - tol)
              & (m[..., 2] <= d[..., 2] + tol) & (m[..., 3] <= d[..., 3] + tol))
    return jnp.any(inside & det_valid[None, :], axis=1)


def merge_box_masks(out: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """[box masks, SAM masks not inside a box] per image, valid ones first (§4.3 step 3)."""
    keep = out["valid"] & ~jax.vmap(boxes_inside)(out["boxes"], out["det_boxes"], out["box_valid"])
    masks = jnp.concatenate([out["box_masks"], out["masks"]], axis=1)
    valid = jnp.concatenate([out["box_valid"], keep], axis=1)
    order = jnp.argsort(~valid, axis=1, stable=True)  # valid first, original order kept
    masks = jnp.take_along_axis(masks, order[:, :, None, None], axis=1)
    return masks, jnp.take_along_axis(valid, order, axis=1)


def sam_masks(sam, batch: dict[str, Any], cfg, settings, stale_embedding=None, stale_auto=None):
    """SAM's automatic masks (+ box masks for `boxes`) of a batch: (masks [B, K', H, W] bool,
    valid [B, K']).

    `stale_auto` (seed_compat only, from `init_stale_embedding`): the automatic masks of
    `stale_embedding`, {"masks" [1, K, W, H], "valid" [1, K], "boxes" [1, K, 4]} in SAM's
    (transposed) frame.  The point grid decodes a fixed embedding to the same masks for every
    image of the same size, so they are reused instead of decoded again (used only when their
    frame is this batch's; otherwise they are decoded as usual)."""
    from sarformer_jax.sam.automatic_mask_generator import _decode_boxes, automatic_masks
    from sarformer_jax.sam.transforms import get_preprocess_shape

    from sarformer_jax.sam.transforms import resize_uint8

    images = batch["image"]
    b, h, w, _ = images.shape
    emb = None
    if cfg.guidance.seed_compat:
        if h != w:
            raise ValueError(f"guidance.seed_compat needs square inputs (the original transposes "
                             f"H and W), got {h}x{w}")
        emb = (faithful_embedding(sam, images) if stale_embedding is None
               else jnp.broadcast_to(stale_embedding, (b,) + stale_embedding.shape[1:]))
        src = jax.ShapeDtypeStruct((b, w, h, 3), jnp.uint8)  # SAM's (transposed) frame
    else:
        src = denormalize(images, cfg.data.mean, cfg.data.std)
    input_size = get_preprocess_shape(src.shape[1], src.shape[2], sam.img_size)
    if emb is None:
        emb = sam.embed_image(resize_uint8(src, input_size))
    if (cfg.guidance.seed_compat and stale_embedding is not None and stale_auto is not None
            and tuple(stale_auto["masks"].shape[2:]) == tuple(src.shape[1:3])):
        out = {k: jnp.broadcast_to(stale_auto[k], (b,) + stale_auto[k].shape[1:])
               for k in ("masks", "valid", "boxes")}
    else:
        out = automatic_masks(sam, src, settings, emb=emb)
    if cfg.guidance.source != "boxes":
        return out["masks"], out["valid"]
    # detector boxes are in the image frame; seed_compat keeps the original's use of them on
    # the transposed SAM frame as they are (§4.3 step 3 with quirk #3)
    boxes = jnp.asarray(batch["boxes"], jnp.float32)
    out = dict(out)
    out.update(_decode_boxes(sam, src, boxes, input_size, emb=emb))
    out["det_boxes"] = jnp.where(out["box_valid"][..., None], boxes, 0.0)
    return merge_box_masks(out)


def make_proposal_fn(cfg, sam_graphdef=None) -> Callable | None:
    """Returns `fn(batch, key, deterministic, guide=None) -> proposals [B, Q, H, W] float32`
    or None for the baseline.  `guide` is {"sam": SAM state, "stale_embedding": optional} for
    the SAM sources (`sam_graphdef` from `load_guidance_sam`)."""
    source = cfg.guidance.source
    q = int(cfg.model.head.num_queries)
    noise = bool(cfg.guidance.noise_placeholders)
    if cfg.model.head.query_init != "sam_pooling":
        return None
    if source == "cached":

        def fn(batch, key, deterministic, guide=None):
            masks, valid = cached_masks(batch, q)
            return prepare_proposals(key, masks, valid, q, noise_placeholders=noise,
                                     deterministic=deterministic)

        return fn
    if source in ("online", "boxes"):
        if sam_graphdef is None:
            raise ValueError(f"guidance.source={source!r} needs the SAM model (load_guidance_sam)")
        settings = amg_settings(cfg)

        def fn(batch, key, deterministic, guide=None):
            from flax import nnx

            if guide is None or "sam" not in guide:
                raise ValueError(f"guidance.source={source!r}: the step needs guide['sam']")
            sam = nnx.merge(sam_graphdef, guide["sam"])
            masks, valid = sam_masks(sam, batch, cfg, settings, guide.get("stale_embedding"),
                                     guide.get("stale_auto"))
            return jax.lax.stop_gradient(prepare_proposals(
                key, masks, valid, q, noise_placeholders=noise, deterministic=deterministic))

        return fn
    raise ValueError(f"guidance.source={source!r} is not usable with query_init='sam_pooling' "
                     "(choose cached | online | boxes)")


def init_stale_embedding(cfg, sam_graphdef, guide: dict, images, sharding=None) -> dict:
    """seed_compat (§8 #1): the embedding of the first image the run sees, kept for all later
    images.  Returns `guide` with "stale_embedding" [1, 64, 64, C] set (unchanged if already
    set or not in seed_compat mode), and "stale_auto": the automatic masks of that embedding
    for images of this size (masks [1, K, W, H] in SAM's transposed frame, valid [1, K], boxes
    [1, K, 4]).  The original decodes the same point grid on the same embedding for every
    image, which gives the same masks every time (§4.3 2d); here they are decoded once, with
    one image as the original did, and the step reuses them.  `sharding`: where to place them
    (the step's replicated sharding, so that they are not copied at every call)."""
    if not cfg.guidance.seed_compat or guide.get("stale_embedding") is not None:
        return guide
    from flax import nnx

    from sarformer_jax.sam.automatic_mask_generator import automatic_masks

    settings = amg_settings(cfg)
    images = jnp.asarray(images)
    h, w = images.shape[1:3]
    if h != w:
        raise ValueError(f"guidance.seed_compat needs square inputs (the original transposes "
                         f"H and W), got {h}x{w}")

    @functools.partial(jax.jit, out_shardings=sharding)
    def embed_and_decode(state, x):
        sam = nnx.merge(sam_graphdef, state)
        emb = faithful_embedding(sam, x[:1])
        src = jax.ShapeDtypeStruct((1, w, h, 3), jnp.uint8)  # SAM's (transposed) frame
        out = automatic_masks(sam, src, settings, emb=emb)
        return emb, {k: out[k] for k in ("masks", "valid", "boxes")}

    emb, auto = embed_and_decode(guide["sam"], images)
    return dict(guide, stale_embedding=emb, stale_auto=auto)
