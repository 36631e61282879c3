"""Optimiser and learning-rate schedule (ARCHITECTURE.md §6.1).

Default = what the original actually ran: AdamW(lr 2e-5, wd 0.05 on *every* parameter, betas
(0.9, 0.999), eps 1e-8), global-norm clipping at 0.01, PolyLR power 0.9 to 0 over 160k steps, no
warmup.  Options for the upstream ViT-Adapter recipe: layer-wise lr decay (`layer_decay`), linear
warmup (`warmup_steps`) and no weight decay on norms, biases and embeddings
(`no_decay_norm_embed`).
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sarformer_jax.config import env_switch

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


class FlatGroups:
    """A static plan laying the leaves of a parameter tree end to end in a few flat vectors, one
    per group (leaves with equal `key_fn(path, leaf)` and dtype, in tree order)."""

    def __init__(self, params: Any, key_fn: Callable[[Any, Any], Any], pack_below: int = 0):
        """`pack_below` > 0: leaves of at most that many elements form groups of their own
        (`packed`), updated as one vector by `FlatTransformation.guarded_step`."""
        with_path, self.treedef = jax.tree_util.tree_flatten_with_path(params)
        self.shapes = [tuple(leaf.shape) for _, leaf in with_path]
        self.sizes = [int(math.prod(sh)) for sh in self.shapes]
        groups: dict[Any, list[int]] = {}
        packed: dict[Any, bool] = {}
        for i, (path, leaf) in enumerate(with_path):
            small = 0 < self.sizes[i] <= pack_below
            key = (key_fn(path, leaf), str(jnp.dtype(leaf.dtype)))
            groups.setdefault(key + ((True,) if small else ()), []).append(i)
        self.keys = [k[:2] for k in groups]
        self.packed = [len(k) == 3 for k in groups]
        self.members = list(groups.values())

    def unflatten_diff(self, flats: tuple[jax.Array, ...]) -> Any:
        """`unflatten` whose gradient is `flatten` of the leaves' gradients (one concatenation
        per group; the transpose of the slices alone would be a sum of zero-padded vectors)."""

        @jax.custom_vjp
        def split(flats):
            return self.unflatten(flats)

        def fwd(flats):
            return self.unflatten(flats), None

        def bwd(_, tree_ct):
            return (self.flatten(tree_ct),)

        split.defvjp(fwd, bwd)
        return split(tuple(flats))

    def flatten_group(self, leaves: list, idx: list[int]) -> jax.Array:
        return jnp.concatenate([jnp.ravel(leaves[i]) for i in idx])

    def flatten(self, tree: Any) -> tuple[jax.Array, ...]:
        leaves = self.treedef.flatten_up_to(tree)
        return tuple(self.flatten_group(leaves, idx) for idx in self.members)

    def unflatten(self, flats: tuple[jax.Array, ...]) -> Any:
        leaves: list[Any] = [None] * len(self.shapes)
        for flat, idx in zip(flats, self.members):
            start = 0
            for i in idx:
                leaves[i] = flat[start:start + self.sizes[i]].reshape(self.shapes[i])
                start += self.sizes[i]
        return self.treedef.unflatten(leaves)


def _per_group(txs: list[optax.GradientTransformation]) -> optax.GradientTransformation:
    """Transformation i applied to element i of a tuple of arrays."""

    def init(params):
        return tuple(tx.init(p) for tx, p in zip(txs, params))

    def update(updates, state, params=None):
        params = params if params is not None else (None,) * len(txs)
        out = [tx.update(u, s, p) for tx, u, s, p in zip(txs, updates, state, params)]
        return tuple(o[0] for o in out), tuple(o[1] for o in out)

    return optax.GradientTransformation(init, update)


class FlatTransformation(NamedTuple):
    """A transformation of trees (`init`, `update`, as optax's) that runs `inner` on the tuple of
    flat group vectors of `groups`; the train step uses the two parts directly to compute the
    gradient norm and apply the update on the flat vectors too."""

    init: Callable
    update: Callable
    groups: FlatGroups
    inner: optax.GradientTransformation
    # per group: (b1, b2, eps, weight decay or 0, lr scale); `inner` is clip + `_per_group`
    # when `clipped`; the learning-rate schedule
    specs: tuple = ()
    schedule: Callable | None = None
    clipped: bool = False

    def guarded_step(self, flat_g, state, params, finite):
        """One optimiser step with the non-finite guard: (new params, new state), both the old
        ones where `finite` is False.  `flat_g` is `groups.flatten(grads)`.

        The new state comes from `inner` (optax), guarded and passed through an optimisation
        barrier; each parameter leaf's update is then computed here from its slices of the new
        Adam moments and from the leaf itself, with optax's operations in optax's order.
        Taking `inner`'s own flat updates instead, XLA recomputed the moments from the old ones
        inside the kernels that write the parameters, so the old moments had to outlive the new
        ones written in their donated buffers (a full copy of each moment vector a step: train
        runs 34-35), and the parameters were first concatenated into flat vectors."""
        return self._guarded_step(flat_g, state, params, finite, flat_params=False)

    def guarded_step_flat(self, flat_g, state, flat_p, finite):
        """`guarded_step` for parameters held flat (`train.flat_params`): `flat_p` is
        `groups.flatten(params)` and so is the returned new parameters; each group's update
        is one element-wise pass over its whole vector.

        Here the new moments are not put behind the optimisation barrier (environment
        `SARFORMER_OPT_ONE_PASS=0` puts them back): with one vector a group XLA can write the
        moments and the parameters from one kernel, and there are no per-leaf kernels that would
        recompute the moments from the old ones.  On an H100 the SARFormer-B step's optimiser
        kernels went from 1.77 to 1.44 ms (one pass of 3.4 GB instead of two), −0.5 ms a step on
        average over five A/Bs, with the same peak memory (docs/benchmarks.md, train runs
        49-50); the numbers are the same formulas in the same order (tests/test_optim.py)."""
        return self._guarded_step(flat_g, state, tuple(flat_p), finite, flat_params=True)

    def _guarded_step(self, flat_g, state, params, finite, flat_params):
        if len(self.specs) != len(self.groups.members) or self.schedule is None:
            raise ValueError("guarded_step needs the per-group specs and the schedule "
                             "(a FlatTransformation built by build_optimizer(..., flat=True))")
        # for optax's decayed-weights term (its result is unused here)
        flat_p = params if flat_params else self.groups.flatten(params)
        _, new_state = self.inner.update(flat_g, state, flat_p)
        new_state = jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new_state, state)
        if not (flat_params and _one_pass()):
            new_state = jax.lax.optimization_barrier(new_state)
        groups_new = new_state[1] if self.clipped else new_state
        groups_old = state[1] if self.clipped else state
        leaves = [] if flat_params else self.groups.treedef.flatten_up_to(params)
        out = list(leaves)
        out_flat = []
        for (b1, b2, eps, wd, scale), g_new, g_old, idx, packed in zip(
                self.specs, groups_new, groups_old, self.groups.members, self.groups.packed):
            adam = _find_state(g_new, optax.ScaleByAdamState)
            count = _find_state(g_old, optax.ScaleByScheduleState).count
            bc1 = (1 - b1 ** adam.count).astype(adam.mu.dtype)
            bc2 = (1 - b2 ** adam.count).astype(adam.nu.dtype)
            step_size = -1 * self.schedule(count)

            def new_value(p, mu, nu):
                u = (mu / bc1) / (jnp.sqrt(nu / bc2 + 0.0) + eps)
                if wd:
                    u = u + wd * p
                u = jnp.array(step_size, dtype=u.dtype) * u
                if scale != 1.0:
                    u = scale * u
                return jnp.where(finite, (p + u).astype(p.dtype), p)

            if flat_params:  # the group's parameters are one vector already
                out_flat.append(new_value(params[len(out_flat)], adam.mu, adam.nu))
                continue
            if packed:  # small leaves: one update on their concatenation, then sliced back
                flat_new = new_value(self.groups.flatten_group(leaves, idx), adam.mu, adam.nu)
                start = 0
                for i in idx:
                    size = self.groups.sizes[i]
                    out[i] = flat_new[start:start + size].reshape(leaves[i].shape)
                    start += size
                continue
            start = 0
            for i in idx:
                p = leaves[i]
                size = self.groups.sizes[i]
                mu = adam.mu[start:start + size].reshape(p.shape)
                nu = adam.nu[start:start + size].reshape(p.shape)
                start += size
                out[i] = new_value(p, mu, nu)
        if flat_params:
            return tuple(out_flat), new_state
        return self.groups.treedef.unflatten(out), new_state


def _one_pass() -> bool:
    """`SARFORMER_OPT_ONE_PASS` (default 1): the flat-parameter update without the barrier."""
    return env_switch("SARFORMER_OPT_ONE_PASS", True)


def _find_state(chain_state, kind):
    """The first state of type `kind` in one group's optax chain state."""
    for s in chain_state:
        if isinstance(s, kind):
            return s
    raise ValueError(f"no {kind.__name__} in the optimiser state {type(chain_state).__name__}")


def _on_flat_groups(inner: optax.GradientTransformation, groups: FlatGroups, specs: tuple = (),
                    schedule: Callable | None = None, clipped: bool = False) -> FlatTransformation:
    def init(params):
        return inner.init(groups.flatten(params))

    def update(updates, state, params=None):
        flat_params = None if params is None else groups.flatten(params)
        flat, state = inner.update(groups.flatten(updates), state, flat_params)
        return groups.unflatten(flat), state

    return FlatTransformation(init, update, groups, inner, specs, schedule, clipped)


def use_flat_optimizer(cfg, fsdp: int) -> bool:
    """`train.flat_optimizer`: "auto" (flat unless parameters are split over fsdp), or a bool."""
    flag = cfg.get("flat_optimizer", "auto")
    if flag == "auto":
        return fsdp <= 1
    if isinstance(flag, bool):
        return flag
    raise ValueError(f"train.flat_optimizer must be auto, True or False, got {flag!r}")


def build_optimizer(cfg, params: Any, *, num_layers: int | None = None,
                    flat: bool = False) -> tuple[optax.GradientTransformation, Callable]:
    """Returns (optax transformation, lr schedule) for `cfg` = config.train.

    `flat=True` gives the same updates (up to the summation order of the clipping norm) with
    the parameters laid end to end in one vector per group of equal hyper-parameters (weight
    decay on or off, layer-wise lr scale): a handful of large element-wise kernels per step
    instead of ~20 small ones per parameter leaf, and a fraction of the compile time.  The
    Adam moments are then stored flat.  Use it when parameters are replicated (with fsdp the
    leaves are split along different axes, and flattening them would move data)."""
    if cfg.optimizer != "adamw":
        raise ValueError(f"unknown train.optimizer {cfg.optimizer!r} (adamw)")
    schedule = lr_schedule(cfg)
    if cfg.get("layer_decay") and num_layers is None:
        raise ValueError("layer_decay needs the backbone depth")
    if flat:
        return _build_flat(cfg, params, schedule, num_layers), schedule
    parts = []
    if cfg.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(float(cfg.grad_clip_norm)))
    parts.append(optax.scale_by_adam(b1=float(cfg.b1), b2=float(cfg.b2), eps=float(cfg.eps)))
    if cfg.weight_decay:
        mask = decay_mask(params) if cfg.get("no_decay_norm_embed") else None
        parts.append(optax.add_decayed_weights(float(cfg.weight_decay), mask=mask))
    parts.append(optax.scale_by_learning_rate(schedule))
    if cfg.get("layer_decay"):
        parts.append(_scale_by_tree(layer_scales(params, float(cfg.layer_decay), num_layers)))
    return optax.chain(*parts), schedule


def _build_flat(cfg, params: Any, schedule, num_layers: int | None) -> optax.GradientTransformation:
    masked = bool(cfg.weight_decay) and bool(cfg.get("no_decay_norm_embed"))
    decay = cfg.get("layer_decay")

    def key(path, leaf):
        name = _path_str(path)
        decayed = bool(cfg.weight_decay) and (
            not masked or (jnp.ndim(leaf) >= 2 and not _NO_DECAY_NAMES.search(name)))
        scale = (float(decay) ** (num_layers + 1 - layer_id(name, num_layers))
                 if decay else 1.0)
        return decayed, scale

    groups = FlatGroups(params, key, int(cfg.get("pack_small_leaves", 0) or 0))
    txs, specs = [], []
    b1, b2, eps = float(cfg.b1), float(cfg.b2), float(cfg.eps)
    for (decayed, scale), _ in groups.keys:
        parts = [optax.scale_by_adam(b1=b1, b2=b2, eps=eps)]
        if decayed:
            parts.append(optax.add_decayed_weights(float(cfg.weight_decay)))
        parts.append(optax.scale_by_learning_rate(schedule))
        if scale != 1.0:
            parts.append(optax.scale(scale))
        txs.append(optax.chain(*parts))
        specs.append((b1, b2, eps, float(cfg.weight_decay) if decayed else 0.0, scale))
    inner = _per_group(txs)
    if cfg.grad_clip_norm:
        inner = optax.chain(optax.clip_by_global_norm(float(cfg.grad_clip_norm)), inner)
    return _on_flat_groups(inner, groups, tuple(specs), schedule, bool(cfg.grad_clip_norm))
