"""Optimiser and schedule as the original ran them (ARCHITECTURE §6.1), checked against an
independent PyTorch AdamW + clip_grad_norm_ + a hand-written mmengine PolyLR."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from sarformer_jax.config import load_config
from sarformer_jax.optim import build_optimizer, decay_mask, layer_id, lr_schedule


def test_poly_schedule_matches_mmengine_closed_form():
    cfg = load_config("ade20k_sarformer_b").train
    sched = lr_schedule(cfg)
    for t in (0, 1, 1000, 80_000, 159_999, 160_000):
        expect = 2e-5 * (1 - t / 160_000) ** 0.9
        assert float(sched(t)) == pytest.approx(expect, rel=1e-6, abs=1e-12)


def test_warmup_option():
    cfg = load_config("ade20k_sarformer_b", ["train.warmup_steps=10"]).train
    sched = lr_schedule(cfg)
    assert float(sched(0)) == pytest.approx(2e-5 * (1 - 0 / 160_000) ** 0.9 / 10, rel=1e-6)
    assert float(sched(10)) == pytest.approx(2e-5 * (1 - 10 / 160_000) ** 0.9, rel=1e-6)


@pytest.mark.parametrize("flat", [False, True])
def test_adamw_clip_matches_torch(flat):
    """Three steps of clip(0.01) + AdamW(wd 0.05 on every parameter) + poly lr vs torch, per
    leaf and with the parameters laid end to end (`flat`)."""
    cfg = load_config("ade20k_sarformer_b", ["train.lr=0.01", "train.num_steps=10"]).train
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(4, 3)).astype(np.float32),
              "b": rng.normal(size=(3,)).astype(np.float32)}
    grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
             for _ in range(3)]
    tx, _ = build_optimizer(cfg, params, flat=flat)
    p = jax.tree_util.tree_map(jnp.asarray, params)
    state = tx.init(p)
    for g in grads:
        upd, state = tx.update(jax.tree_util.tree_map(jnp.asarray, g), state, p)
        p = optax.apply_updates(p, upd)

    tp = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    opt = torch.optim.AdamW(list(tp.values()), lr=0.01, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.05)
    for t, g in enumerate(grads):
        for k in tp:
            tp[k].grad = torch.tensor(g[k])
        torch.nn.utils.clip_grad_norm_(list(tp.values()), 0.01)
        for group in opt.param_groups:  # mmengine PolyLR, eta_min 0, by_epoch False
            group["lr"] = 0.01 * (1 - t / 10) ** 0.9
        opt.step()
    for k in params:
        np.testing.assert_allclose(np.asarray(p[k]), tp[k].detach().numpy(), rtol=1e-5, atol=1e-7)


def test_upstream_recipe_masks_and_layer_ids():
    params = {"backbone": {"cls_token": jnp.zeros((1, 1, 4)), "layers": {
        "0": {"attn": {"qkv": {"kernel": jnp.zeros((4, 12))}, "q_bias": jnp.zeros(4)}},
        "1": {"ln1": {"scale": jnp.zeros(4)}}}},
        "decode_head": {"cls_embed": {"kernel": jnp.zeros((4, 5)), "bias": jnp.zeros(5)}}}
    mask = decay_mask(params)
    assert mask["backbone"]["layers"]["0"]["attn"]["qkv"]["kernel"]
    assert not mask["backbone"]["layers"]["0"]["attn"]["q_bias"]
    assert not mask["backbone"]["cls_token"]
    assert not mask["backbone"]["layers"]["1"]["ln1"]["scale"]
    assert mask["decode_head"]["cls_embed"]["kernel"] and not mask["decode_head"]["cls_embed"]["bias"]
    assert layer_id("backbone.cls_token", 12) == 0
    assert layer_id("backbone.layers.3.attn.qkv.kernel", 12) == 4
    assert layer_id("backbone.interactions.0.injector.gamma", 12) == 13
    assert layer_id("decode_head.cls_embed.kernel", 12) == 13
    cfg = load_config("ade20k_sarformer_b", ["train.layer_decay=0.9",
                                             "train.no_decay_norm_embed=True"]).train
    tx, _ = build_optimizer(cfg, params, num_layers=2)
    st = tx.init(params)
    ones = jax.tree_util.tree_map(jnp.ones_like, params)
    upd, _ = tx.update(ones, st, params)
    u0 = float(upd["backbone"]["cls_token"].ravel()[0])
    u_head = float(upd["decode_head"]["cls_embed"]["kernel"].ravel()[0])
    assert u0 / u_head == pytest.approx(0.9 ** 3, rel=1e-5)


def _model_like_tree(rng):
    shapes = {"backbone": {"cls_token": (1, 1, 4), "patch_embed": {"projection": {"kernel": (2, 2, 3, 4)}},
                           "layers": {str(i): {"attn": {"qkv": {"kernel": (4, 12)}, "q_bias": (4,),
                                                        "relative_position_bias_table": (7, 2)},
                                               "ln1": {"scale": (4,), "bias": (4,)}}
                                      for i in range(3)}},
              "decode_head": {"cls_embed": {"kernel": (4, 5), "bias": (5,)}}}
    return jax.tree_util.tree_map(lambda sh: jnp.asarray(rng.normal(size=sh).astype(np.float32)),
                                  shapes, is_leaf=lambda x: isinstance(x, tuple))


@pytest.mark.parametrize("sets,num_groups", [
    ([], 1),
    # lr scales: embeddings, layers 0..2, head; each split by decayed / not (the cls token only not)
    (["train.layer_decay=0.9", "train.no_decay_norm_embed=True"], 10),
    (["train.grad_clip_norm=0", "train.layer_decay=0.8"], 5),
    (["train.weight_decay=0"], 1),
    # leaves of <= 8 elements in groups of their own: decayed and not
    (["train.pack_small_leaves=8"], 2),
    (["train.pack_small_leaves=8", "train.layer_decay=0.9", "train.no_decay_norm_embed=True"], 13),
])
def test_flat_optimizer_equals_per_leaf(sets, num_groups):
    """The flat optimizer (one vector per group of equal weight decay and lr scale) gives the
    per-leaf optimizer's parameters over 4 steps, with a few large moment vectors."""
    from sarformer_jax.optim import use_flat_optimizer

    cfg = load_config("ade20k_sarformer_b", ["train.lr=0.01", "train.num_steps=10"] + sets).train
    rng = np.random.default_rng(0)
    params = _model_like_tree(rng)
    grads = [jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32),
                                    params) for _ in range(4)]
    out = []
    for flat in (False, True):
        tx, _ = build_optimizer(cfg, params, num_layers=3, flat=flat)
        p, st = params, tx.init(params)
        for g in grads:
            u, st = tx.update(g, st, p)
            p = optax.apply_updates(p, u)
        out.append((p, st))
    (p0, st0), (p1, st1) = out
    for a, b in zip(jax.tree_util.tree_leaves(p0), jax.tree_util.tree_leaves(p1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-6, atol=1e-7)
    n_params = len(jax.tree_util.tree_leaves(params))
    assert len(jax.tree_util.tree_leaves(st0)) > n_params  # mu, nu per leaf
    assert len([x for x in jax.tree_util.tree_leaves(st1) if x.ndim == 1]) == 2 * num_groups
    assert use_flat_optimizer(cfg, 1) and not use_flat_optimizer(cfg, 2)


@pytest.mark.parametrize("sets", [
    [],
    ["train.layer_decay=0.9", "train.no_decay_norm_embed=True", "train.warmup_steps=2"],
    ["train.grad_clip_norm=0", "train.layer_decay=0.8"],
    ["train.pack_small_leaves=8", "train.layer_decay=0.9", "train.no_decay_norm_embed=True"],
])
def test_flat_guarded_step_equals_optax(sets):
    """`FlatTransformation.guarded_step` (the train step's: each parameter updated from its
    slices of the guarded new moments) gives optax's own state bit for bit and its parameters
    (p + update) to an ulp or two over 3 steps, keeps the old parameters and state on a
    non-finite step, and in a step that donates its state does not copy the old moments and
    needs fewer temporary bytes (the step that took optax's own flat updates copied them and
    also made the parameters and updates flat)."""
    cfg = load_config("ade20k_sarformer_b", ["train.lr=0.01", "train.num_steps=10"] + sets).train
    rng = np.random.default_rng(1)
    params = _model_like_tree(rng)
    tx, _ = build_optimizer(cfg, params, num_layers=3, flat=True)
    packed = [[tx.groups.sizes[i] for i in idx]
              for idx, pk in zip(tx.groups.members, tx.groups.packed) if pk]
    if cfg.pack_small_leaves:  # every leaf of <= 8 elements is in a packed group, and only those
        assert sorted(sum(packed, [])) == sorted(s for s in tx.groups.sizes if s <= 8)
        assert max(len(m) for m in packed) > 1
    else:
        assert not packed
    state = tx.init(params)
    step = jax.jit(tx.guarded_step)
    for _ in range(3):
        grads = jax.tree_util.tree_map(
            lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
        flat_g = tx.groups.flatten(grads)
        want_u, want_state = jax.jit(tx.inner.update)(flat_g, state, tx.groups.flatten(params))
        want_p = tx.groups.unflatten(tuple(p + u for p, u in zip(tx.groups.flatten(params), want_u)))
        got_p, got_state = step(flat_g, state, params, jnp.bool_(True))
        # parameters held flat (`train.flat_params`): the same numbers, flat
        flat_got, flat_state = jax.jit(tx.guarded_step_flat)(flat_g, state,
                                                             tx.groups.flatten(params),
                                                             jnp.bool_(True))
        for a, b in zip(tx.groups.flatten(got_p), flat_got):  # to an ulp (contractions)
            a = np.asarray(a)
            np.testing.assert_allclose(np.asarray(b), a, rtol=3e-7, atol=1e-7 * np.abs(a).max())
        for a, b in zip(jax.tree_util.tree_leaves(got_state), jax.tree_util.tree_leaves(flat_state)):
            np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
        for a, b in zip(jax.tree_util.tree_leaves(want_p), jax.tree_util.tree_leaves(got_p)):
            a = np.asarray(a)  # (XLA may contract a multiply-add differently)
            np.testing.assert_allclose(np.asarray(b), a, rtol=3e-7, atol=1e-7 * np.abs(a).max())
        for a, b in zip(jax.tree_util.tree_leaves(want_state), jax.tree_util.tree_leaves(got_state)):
            np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
        kept_p, kept = step(flat_g, state, params, jnp.bool_(False))
        for a, b in zip(jax.tree_util.tree_leaves((params, state)),
                        jax.tree_util.tree_leaves((kept_p, kept))):
            np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
        params, state = got_p, want_state

    def train_step(p_tree, st, g_tree, how):
        fg = tx.groups.flatten(g_tree)
        finite = jnp.isfinite(sum(jnp.sum(g) for g in fg))
        if how == "guarded_step":
            return tx.guarded_step(fg, st, p_tree, finite)
        # the step's update before `guarded_step`
        fp = tx.groups.flatten(p_tree)
        u, new = tx.inner.update(fg, st, fp)
        new = jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, st)
        return tx.groups.unflatten(tuple(jnp.where(finite, p + v, p) for p, v in zip(fp, u))), new

    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    moment = max(p.size for p in tx.groups.flatten(params))
    counts = []
    for how in ("optax", "guarded_step"):
        compiled = jax.jit(lambda p, s, g, how=how: train_step(p, s, g, how),
                           donate_argnums=(0, 1)).lower(params, state, grads).compile()
        counts.append((len(re.findall(rf"= f32\[{moment}\]\{{0\}} copy\(", compiled.as_text())),
                       compiled.memory_analysis().temp_size_in_bytes))
    assert counts[0][0] > 0 and counts[1][0] == 0, counts  # copies of the old moments
    assert counts[1][1] < counts[0][1], counts  # temporaries: no flat parameters (nor updates)


@pytest.mark.parametrize("sets", [
    [],
    ["train.layer_decay=0.9", "train.no_decay_norm_embed=True", "train.warmup_steps=2"],
    ["train.grad_clip_norm=0"],
])
def test_flat_one_pass_equals_barrier(sets, monkeypatch):
    """`guarded_step_flat` without the barrier between the new moments and the parameters (the
    default, `SARFORMER_OPT_ONE_PASS=1`) gives the same parameters and state as with it, bit for
    bit on the CPU over 3 steps and on a non-finite step, and its donated step copies no moment
    vector and needs no more temporary bytes."""
    cfg = load_config("ade20k_sarformer_b", ["train.lr=0.01", "train.num_steps=10"] + sets).train
    rng = np.random.default_rng(2)
    params = _model_like_tree(rng)
    tx, _ = build_optimizer(cfg, params, num_layers=3, flat=True)
    grads = [tx.groups.flatten(jax.tree_util.tree_map(
        lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)) for _ in range(3)]

    def run(flag):
        monkeypatch.setenv("SARFORMER_OPT_ONE_PASS", flag)
        # a new function each run, so that no trace is shared: the flag is read when tracing
        step = jax.jit(lambda g, s, p, ok: tx.guarded_step_flat(g, s, p, ok))
        p, st, out = tx.groups.flatten(params), tx.init(params), []
        for i, g in enumerate(grads):
            p, st = step(g, st, p, jnp.bool_(i != 1))  # step 1 is refused as non-finite
            out.append(jax.tree_util.tree_leaves((p, st)))

        def donated(p, s, g):
            return tx.guarded_step_flat(g, s, p, jnp.isfinite(sum(jnp.sum(x) for x in g)))

        lowered = jax.jit(donated, donate_argnums=(0, 1)).lower(
            tx.groups.flatten(params), tx.init(params), grads[0])
        compiled = lowered.compile()
        moment = max(x.size for x in tx.groups.flatten(params))
        copies = len(re.findall(rf"= f32\[{moment}\]\{{0\}} copy\(", compiled.as_text()))
        return out, copies, compiled.memory_analysis().temp_size_in_bytes, lowered.as_text()

    one, copies1, temp1, text1 = run("1")
    two, copies0, temp0, text0 = run("0")
    # the flag reached the program
    assert "optimization_barrier" in text0 and "optimization_barrier" not in text1
    for step_one, step_two in zip(one, two):
        for a, b in zip(step_one, step_two):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.any(np.asarray(one[0][0]) != np.asarray(tx.groups.flatten(params)[0]))
    np.testing.assert_array_equal(np.asarray(one[1][0]), np.asarray(one[0][0]))  # refused step
    assert copies1 == copies0 == 0 and temp1 <= temp0, (copies1, copies0, temp1, temp0)
    monkeypatch.setenv("SARFORMER_OPT_ONE_PASS", "yes")
    with pytest.raises(ValueError, match="SARFORMER_OPT_ONE_PASS must be 0 or 1"):
        tx.guarded_step_flat(grads[0], tx.init(params), tx.groups.flatten(params), jnp.bool_(True))


def test_unflatten_diff_gradient_is_flatten():
    """`FlatGroups.unflatten_diff`: the leaves of the flat vectors, and the gradient of a
    function of the leaves with respect to the flat vectors is the leaves' gradients flattened."""
    cfg = load_config("ade20k_sarformer_b", ["train.layer_decay=0.9",
                                             "train.no_decay_norm_embed=True"]).train
    rng = np.random.default_rng(2)
    params = _model_like_tree(rng)
    tx, _ = build_optimizer(cfg, params, num_layers=3, flat=True)
    flats = tx.groups.flatten(params)
    weights = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32),
                                     params)

    def f(tree):
        return sum(jnp.sum(w * jnp.sin(x)) for w, x in zip(jax.tree_util.tree_leaves(weights),
                                                          jax.tree_util.tree_leaves(tree)))

    back = tx.groups.unflatten_diff(flats)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    g_flat = jax.grad(lambda fl: f(tx.groups.unflatten_diff(fl)))(flats)
    want = tx.groups.flatten(jax.grad(f)(params))
    assert len(g_flat) == len(want) > 1
    for a, b in zip(want, g_flat):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6)


def test_flat_params_auto_is_on_for_gpus_with_the_flat_optimizer():
    """`train.flat_params="auto"` (the default): the flat layout on GPU devices whenever the
    optimiser is flat, the parameter tree elsewhere and with the per-leaf optimiser; True
    without the flat optimiser and other values are errors naming the key."""
    from sarformer_jax.train import use_flat_params

    cfg = load_config("ade20k_sarformer_b", []).train
    assert cfg.flat_params == "auto"
    params = _model_like_tree(np.random.default_rng(0))
    flat_tx, _ = build_optimizer(cfg, params, num_layers=3, flat=True)
    leaf_tx, _ = build_optimizer(cfg, params, num_layers=3, flat=False)
    assert use_flat_params(cfg, flat_tx, "gpu")
    assert not use_flat_params(cfg, flat_tx, "cpu")
    assert not use_flat_params(cfg, leaf_tx, "gpu")
    off = load_config("ade20k_sarformer_b", ["train.flat_params=False"]).train
    on = load_config("ade20k_sarformer_b", ["train.flat_params=True"]).train
    assert not use_flat_params(off, flat_tx, "gpu") and use_flat_params(on, flat_tx, "cpu")
    with pytest.raises(ValueError, match="needs the flat optimiser"):
        use_flat_params(on, leaf_tx, "gpu")
    bad = load_config("ade20k_sarformer_b", ["train.flat_params=yes"]).train
    with pytest.raises(ValueError, match="train.flat_params must be auto, True or False, got 'yes'"):
        use_flat_params(bad, flat_tx, "gpu")
