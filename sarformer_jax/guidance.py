"""Where SARFormer's mask proposals come from (config `guidance.source`), ARCHITECTURE §4.3.

* `cached`: the batch carries `proposals` uint8 [B, Q, H, W] and `num_proposals` [B] (warped by
  the data pipeline like the label); the first `num_proposals` slots are real masks.
* `online`: SAM's automatic mask generator runs on the device on the de-normalised image
  (`sarformer_jax.sam`), inside the same jit as the train step.
* `none`: the Mask2Former baseline; no proposals.

In every case the masks are then brought to exactly Q slots by
`mask2former.prepare_proposals` (random subset, Bernoulli placeholders, permutation by PRNG key;
deterministic at evaluation when `guidance.deterministic_eval`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from sarformer_jax.models.mask2former import prepare_proposals


def online_unbuilt_message(cfg, command: str) -> str | None:
    """The one-line refusal for configs that need SAM inside the jitted step (not built yet),
    or None when the config can run."""
    if cfg.model.head.query_init == "sam_pooling" and cfg.guidance.source == "online":
        return (f"sarformer {command}: guidance.source='online' (SAM inside the step) is not built "
                "yet in this version; write a proposal cache with `sarformer amg --dataset ROOT "
                "--out CACHE --sam-checkpoint SAM.npz` and pass --set guidance.source=cached "
                "--set guidance.cache_dir=CACHE")
    return None


def denormalize(images: jax.Array, mean, std) -> jax.Array:
    """Normalised RGB float -> uint8 RGB (what SAM expects, §8 #2 'clean')."""
    x = images.astype(jnp.float32) * jnp.asarray(std, jnp.float32) + jnp.asarray(mean, jnp.float32)
    return jnp.clip(jnp.round(x), 0, 255).astype(jnp.uint8)


def cached_masks(batch: dict[str, Any], num_queries: int) -> tuple[jax.Array, jax.Array]:
    masks = batch["proposals"]
    valid = jnp.arange(masks.shape[1])[None, :] < batch["num_proposals"][:, None]
    return masks, valid[:, :num_queries]


def make_proposal_fn(cfg, sam_generate: Callable | None = None) -> Callable | None:
    """Returns `fn(batch, key, deterministic) -> proposals [B, Q, H, W] float32` or None for the
    baseline.  `sam_generate(images_uint8) -> (masks [B, K, H, W] bool, valid [B, K])` is needed
    for `online`."""
    source = cfg.guidance.source
    q = int(cfg.model.head.num_queries)
    noise = bool(cfg.guidance.noise_placeholders)
    if cfg.model.head.query_init != "sam_pooling":
        return None
    if source == "cached":

        def fn(batch, key, deterministic):
            masks, valid = cached_masks(batch, q)
            return prepare_proposals(key, masks, valid, q, noise_placeholders=noise,
                                     deterministic=deterministic)

        return fn
    if source == "online":
        if sam_generate is None:
            raise ValueError("guidance.source='online' needs a SAM generator "
                             "(guidance.sam.checkpoint: converted SAM params)")

        def fn(batch, key, deterministic):
            images = denormalize(batch["image"], cfg.data.mean, cfg.data.std)
            masks, valid = sam_generate(images)
            return prepare_proposals(key, masks, valid, q, noise_placeholders=noise,
                                     deterministic=deterministic)

        return fn
    raise ValueError(f"guidance.source={source!r} is not usable with query_init='sam_pooling' "
                     "(choose cached | online)")
