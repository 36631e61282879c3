"""Optimiser and learning-rate schedule (ARCHITECTURE.md §6.1).

Default = what the original actually ran: AdamW(lr 2e-5, wd 0.05 on *every* parameter, betas
(0.9, 0.999), eps 1e-8), global-norm clipping at 0.01, PolyLR power 0.9 to 0 over 160k steps, no
warmup.  Options for the upstream ViT-Adapter recipe: layer-wise lr decay (`layer_decay`), linear
warmup (`warmup_steps`) and no weight decay on norms, biases and embeddings
(`no_decay_norm_embed`).
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

_NO_DECAY_NAMES = re.compile(
    r"(^|\.)(cls_token|level_embed|relative_position_bias_table|query_embed|level_encoding|"
    r"pos_embed|rel_pos_h|rel_pos_w|gamma|gamma_1|gamma_2|q_bias|v_bias)(\.|$)"
)


def lr_schedule(cfg) -> optax.Schedule:
    """`lr_t = lr * (1 - t / T) ** power` (mmengine PolyLR with eta_min = end_lr), after an
    optional linear warmup from 0 over `warmup_steps`."""
    base, total, power = float(cfg.lr), int(cfg.num_steps), float(cfg.power)
    end = float(cfg.get("end_lr", 0.0))
    warmup = int(cfg.get("warmup_steps", 0))
    if cfg.schedule == "poly":

        def decay(step):
            frac = jnp.clip(step / total, 0.0, 1.0)
            return (base - end) * (1.0 - frac) ** power + end

    elif cfg.schedule == "constant":

        def decay(step):
            return jnp.asarray(base, jnp.float32)

    else:
        raise ValueError(f"unknown train.schedule {cfg.schedule!r} (poly | constant)")

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        lr = decay(step)
        if warmup > 0:
            lr = jnp.where(step < warmup, lr * (step + 1.0) / warmup, lr)
        return lr

    return schedule


def _path_str(path) -> str:
    parts = []
    for p in path:
        key = getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))
        parts.append(str(key))
    return ".".join(parts)


def decay_mask(params: Any) -> Any:
    """True where weight decay applies under the upstream recipe: matrices and conv kernels,
    not norms, biases, embeddings, layer scales or relative-position tables."""

    def is_decayed(path, leaf):
        name = _path_str(path)
        return bool(jnp.ndim(leaf) >= 2 and not _NO_DECAY_NAMES.search(name))

    return jax.tree_util.tree_map_with_path(is_decayed, params)


def layer_id(name: str, num_layers: int) -> int:
    """BEiT layer index for layer-wise lr decay (upstream `get_layer_id_for_vit`): embeddings 0,
    `backbone.layers.i` -> i + 1, everything else (adapter, head) num_layers + 1."""
    if re.search(r"(^|\.)backbone\.(cls_token|patch_embed|pos_embed|mask_token)", name):
        return 0
    m = re.search(r"(^|\.)backbone\.layers\.(\d+)\.", name)
    if m:
        return int(m.group(2)) + 1
    return num_layers + 1


def layer_scales(params: Any, decay: float, num_layers: int) -> Any:
    def scale(path, leaf):
        return decay ** (num_layers + 1 - layer_id(_path_str(path), num_layers))

    return jax.tree_util.tree_map_with_path(scale, params)


def _scale_by_tree(scales: Any) -> optax.GradientTransformation:
    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state

    return optax.GradientTransformation(init, update)


def build_optimizer(cfg, params: Any, *, num_layers: int | None = None) -> tuple[
        optax.GradientTransformation, Callable]:
    """Returns (optax transformation, lr schedule) for `cfg` = config.train."""
    if cfg.optimizer != "adamw":
        raise ValueError(f"unknown train.optimizer {cfg.optimizer!r} (adamw)")
    schedule = lr_schedule(cfg)
    parts = []
    if cfg.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(float(cfg.grad_clip_norm)))
    parts.append(optax.scale_by_adam(b1=float(cfg.b1), b2=float(cfg.b2), eps=float(cfg.eps)))
    if cfg.weight_decay:
        mask = decay_mask(params) if cfg.get("no_decay_norm_embed") else None
        parts.append(optax.add_decayed_weights(float(cfg.weight_decay), mask=mask))
    parts.append(optax.scale_by_learning_rate(schedule))
    if cfg.get("layer_decay"):
        if num_layers is None:
            raise ValueError("layer_decay needs the backbone depth")
        parts.append(_scale_by_tree(layer_scales(params, float(cfg.layer_decay), num_layers)))
    return optax.chain(*parts), schedule
