"""Head units: shapes / dtypes for SARFormer-B and -L at 640x640 and 512x1024 (abstract
evaluation), gradients of the full loss on a reduced config, the guidance functions, semantic
inference, the auxiliary head and the converter rules (round trip through an mmdet-named
state dict)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sarformer_jax.configs import common
from sarformer_jax.convert.common import (CheckpointError, convert_with_rules, flat_shapes,
                                          update_module)
from sarformer_jax.convert.mmseg_head import aux_head_rules, head_rules, split_in_proj
from sarformer_jax.losses import loss_fn
from sarformer_jax.models.aux_head import AdapterFCNHead
from sarformer_jax.models.mask2former import (Mask2FormerHead, first_layer_attn_mask,
                                              mask_average_pool, prepare_proposals,
                                              semantic_inference)


def _abstract_head(cfg, in_ch, k, dtype):
    return nnx.eval_shape(lambda: Mask2FormerHead(cfg, [in_ch] * 4, num_classes=k, dtype=dtype,
                                                  rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("variant", ["B", "L"])
@pytest.mark.parametrize("size", [(640, 640), (512, 1024)])
def test_shapes_and_dtypes_full_size(variant, size):
    if variant == "B":
        cfg, c = common.mask2former_head(), 768
    else:
        cfg, c = common.mask2former_head(1024, pd_heads=32, pd_ffn=4096, dec_heads=32, dec_ffn=4096,
                                         num_feats=512), 1024
    k, b, d = 150, 2, cfg.feat_channels
    head = _abstract_head(cfg, c, k, jnp.bfloat16)
    graphdef, state = nnx.split(head)
    params = jax.tree.leaves(nnx.state(head, nnx.Param))
    assert params and all(p.dtype == jnp.float32 for p in params)
    h, w = size
    feats = [jax.ShapeDtypeStruct((b, h // s, w // s, c), jnp.bfloat16) for s in (4, 8, 16, 32)]
    props = jax.ShapeDtypeStruct((b, 100, h, w), jnp.float32)

    def fwd(st, fn, fr, pr):
        return nnx.merge(graphdef, st)(fn, fr, pr, invert_first_mask=True, train=True)

    preds, inter = jax.eval_shape(fwd, state, feats, feats, props)
    assert len(preds) == 10
    for p in preds:
        assert p["cls"].shape == (b, 100, k + 1) and p["cls"].dtype == jnp.bfloat16
        assert p["mask"].shape == (b, 100, h // 4, w // 4) and p["mask"].dtype == jnp.bfloat16
    assert inter["first_attn_mask"].shape == (b, 100, (h // 32) * (w // 32))
    assert inter["query_feat"].shape == (b, 100, d)
    assert [m.shape[1:3] for m in inter["memories"]] == [(h // 32, w // 32), (h // 16, w // 16), (h // 8, w // 8)]
    if variant == "B":
        gt = jax.ShapeDtypeStruct((b, h, w), jnp.int32)
        aux = jax.ShapeDtypeStruct((b, h // 16, w // 16, k), jnp.bfloat16)
        total, parts = jax.eval_shape(lambda p, g, a: loss_fn(p, g, a, key=jax.random.key(0),
                                                              cfg_loss=common.loss(), num_classes=k),
                                      preds, gt, aux)
        assert total.shape == () and total.dtype == jnp.float32 and len(parts) == 31


def _tiny_cfg(query_init="sam_pooling"):
    cfg = common.mask2former_head(32, pd_heads=2, pd_ffn=48, dec_heads=2, dec_ffn=48, num_feats=16,
                                  num_classes=4)
    cfg.num_queries = 6
    cfg.pixel_decoder.num_layers = 1
    cfg.pixel_decoder.gn_groups = 8
    cfg.decoder.num_layers = 3
    cfg.query_init = query_init
    return cfg


def _flat_grads(g):
    return {f"{i}." + ".".join(map(str, p)): np.asarray(v.get_value() if hasattr(v, "get_value") else v)
            for i, gi in enumerate(g) for p, v in nnx.to_flat_state(gi)}


@pytest.mark.parametrize("query_init", ["sam_pooling"])
def test_gradients_reach_every_parameter_and_no_nan(query_init):
    k, b, c, hw = 4, 2, 24, 64
    cfg = _tiny_cfg(query_init)
    head = Mask2FormerHead(cfg, [c] * 4, num_classes=k, rngs=nnx.Rngs(0))
    aux_cfg = common.aux_head(True, c, num_classes=k)
    aux_cfg.channels = 16
    aux = AdapterFCNHead(aux_cfg, rngs=nnx.Rngs(1))
    # move off the Deformable-DETR init (zero offset / attention kernels make the query, hence
    # the positional and level encodings, inert at step 0)
    params = nnx.state(head, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(9), len(leaves))
    nnx.update(head, jax.tree.unflatten(treedef, [x + 0.02 * jax.random.normal(k, x.shape)
                                                  for x, k in zip(leaves, keys)]))
    loss_cfg = common.loss()
    loss_cfg.num_points = 64
    rng = np.random.default_rng(0)
    feats = [jnp.asarray(rng.normal(size=(b, hw // s, hw // s, c)), jnp.float32) for s in (4, 8, 16, 32)]
    raw = [f * 3.0 + 1.0 for f in feats]
    masks = jnp.asarray(rng.random((b, 9, hw, hw)) > 0.5)
    props = prepare_proposals(jax.random.key(3), masks, jnp.asarray(rng.random((b, 9)) > 0.3), 6)
    gt = rng.integers(0, k, size=(b, hw, hw))
    gt[:, :10] = 255

    def run(models, gt):
        head, aux = models
        preds, _ = head(feats, raw, props if query_init == "sam_pooling" else None, invert_first_mask=True,
                        train=True)
        aux_logits, _ = aux(feats, train=True)
        return loss_fn(preds, gt, aux_logits, key=jax.random.key(1), cfg_loss=loss_cfg, num_classes=k)

    @nnx.jit
    def grads(models, gt):
        diff = nnx.DiffState(0, nnx.Param)
        (total, parts), g = nnx.value_and_grad(run, argnums=diff, has_aux=True)(models, gt)
        return total, parts, g

    models = (head, aux)
    total, parts, g = grads(models, jnp.asarray(gt))
    assert np.isfinite(float(total)) and float(total) > 0
    assert set(parts) >= {"loss_cls", "d0.loss_mask", "d2.loss_dice", "aux.loss_ce"}
    flat = _flat_grads(g)
    dead = [n for n in flat if "enc_output" in n]
    assert len(dead) == 4
    # a key bias shifts every logit of a softmax row by the same q . b_k: its gradient is zero up
    # to rounding (see the full-size test below), so it is bounded, not required to be nonzero
    key_biases = [n for n in flat if n.endswith("attn.k_proj.bias")]
    assert len(key_biases) == 2 * cfg.decoder.num_layers
    for name, value in flat.items():
        assert np.all(np.isfinite(value)), name
        if name in key_biases:
            q_bias = flat[name.replace("k_proj", "q_proj")]
            assert np.linalg.norm(value) <= 0.1 * np.linalg.norm(q_bias), name
        elif name not in dead:
            assert np.any(value != 0), f"no gradient reaches {name}"
    # no valid label anywhere: finite loss, mask terms zero, finite gradients
    total, parts, g = grads(models, jnp.full((b, hw, hw), 255, jnp.int32))
    assert np.isfinite(float(total)) and float(parts["loss_mask"]) == 0 and float(parts["loss_dice"]) == 0
    assert all(np.all(np.isfinite(v)) for v in _flat_grads(g).values())


def test_prepare_proposals():
    b, n, q, hw = 3, 8, 5, 16
    rng = np.random.default_rng(0)
    masks = rng.random((b, n, hw, hw)) > 0.7
    valid = np.zeros((b, n), bool)
    valid[0, :7] = True  # more than Q: random subset of 5 of the 7
    valid[1, [1, 4]] = True  # fewer: 2 real + 3 Bernoulli placeholders
    out = np.asarray(jax.jit(prepare_proposals, static_argnums=3)(jax.random.key(0), jnp.asarray(masks),
                                                                  jnp.asarray(valid), q))
    assert out.shape == (b, q, hw, hw) and out.dtype == np.float32
    real0 = [any(np.array_equal(o, masks[0, i]) for i in range(7)) for o in out[0]]
    assert all(real0) and len({o.tobytes() for o in out[0]}) == q
    real1 = [i for i, o in enumerate(out[1]) if any(np.array_equal(o, masks[1, j]) for j in (1, 4))]
    assert len(real1) == 2
    holders = np.delete(out[1], real1, axis=0)
    assert set(np.unique(holders)) <= {0.0, 1.0} and 0.4 < holders.mean() < 0.6
    # no valid proposal: one continuous Gaussian map in [0, 1] among Bernoulli placeholders
    cont = [o for o in out[2] if not set(np.unique(o)) <= {0.0, 1.0}]
    assert len(cont) == 1 and cont[0].min() >= 0 and cont[0].max() <= 1 and abs(cont[0].mean() - 0.5) < 0.05
    # keys drive everything; deterministic mode ignores the key and is per-image
    again = np.asarray(prepare_proposals(jax.random.key(0), masks, valid, q))
    other = np.asarray(prepare_proposals(jax.random.key(1), masks, valid, q))
    assert np.allclose(out, again, atol=1e-6) and not np.allclose(out, other, atol=1e-6)  # jit vs eager
    d1 = np.asarray(prepare_proposals(jax.random.key(0), masks, valid, q, deterministic=True))
    d2 = np.asarray(prepare_proposals(jax.random.key(5), masks[::-1], valid[::-1], q, deterministic=True))
    assert np.array_equal(d1, d2[::-1])
    empty = np.asarray(prepare_proposals(jax.random.key(0), masks, valid, q, noise_placeholders=False))
    assert np.all(np.delete(empty[1], [i for i, o in enumerate(empty[1]) if o.any()], axis=0) == 0)
    with pytest.raises(ValueError, match="masks must be"):
        prepare_proposals(jax.random.key(0), masks[0], valid, q)


def test_first_mask_and_pooling_by_hand():
    p = np.zeros((1, 2, 64, 64), np.float32)
    p[0, 0, :32] = 1.0  # top half
    m = np.asarray(first_layer_attn_mask(jnp.asarray(p), (2, 2), invert=False)).reshape(2, 2, 2)
    assert m[0].tolist() == [[False, False], [True, True]] and m[1].all()
    mi = np.asarray(first_layer_attn_mask(jnp.asarray(p), (2, 2), invert=True)).reshape(2, 2, 2)
    assert np.array_equal(mi, ~m)
    f = np.arange(16 * 16 * 2, dtype=np.float32).reshape(1, 16, 16, 2)
    pooled = np.asarray(mask_average_pool(jnp.asarray(p), jnp.asarray(f)))
    np.testing.assert_allclose(pooled[0, 0], f[0, :8].reshape(-1, 2).mean(0), rtol=1e-6)
    assert np.all(pooled[0, 1] == 0)


def test_semantic_inference(rng):
    cls = rng.normal(size=(2, 5, 4)).astype(np.float32)
    mask = rng.normal(size=(2, 5, 6, 8)).astype(np.float32)
    seg = np.asarray(semantic_inference(jnp.asarray(cls), jnp.asarray(mask), (12, 16)))
    assert seg.shape == (2, 12, 16, 3)
    import torch

    up = torch.nn.functional.interpolate(torch.as_tensor(mask), size=(12, 16), mode="bilinear", align_corners=False)
    want = torch.einsum("bqc,bqhw->bhwc", torch.as_tensor(cls).softmax(-1)[..., :-1], up.sigmoid())
    np.testing.assert_allclose(seg, want.numpy(), rtol=1e-5, atol=1e-6)


def test_aux_head_shapes_and_modes():
    cfg = common.aux_head(True, 24, num_classes=5)
    cfg.channels = 8
    head = AdapterFCNHead(cfg, rngs=nnx.Rngs(0))
    feats = [jnp.ones((2, 32 // s, 32 // s, 24)) for s in (1, 2, 4, 8)]
    out, _ = head(feats, train=False)
    assert out.shape == (2, 8, 8, 5)  # in_index 2
    before = np.asarray(head.convs[0].bn.mean.get_value())
    head(feats, train=True)
    assert not np.array_equal(before, np.asarray(head.convs[0].bn.mean.get_value()))


def _to_torch_names(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of the converter: our flat params -> mmdet-named, torch-layout arrays (packed
    in_proj), to check the rules cover every parameter exactly once."""
    out = {}
    for name, v in flat.items():
        base, leaf = name.rsplit(".", 1)
        if leaf == "kernel":
            out[base + ".weight"] = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T
        elif leaf == "scale":
            out[base + ".weight"] = v
        elif leaf == "embedding":
            out[base + ".weight"] = v
        elif leaf == "mean":
            out[base + ".running_mean"] = v
        elif leaf == "var":
            out[base + ".running_var"] = v
        else:
            out[name] = v
    packed = {}
    for name in list(out):
        for x in ("q", "k", "v"):
            tag = f".attn.{x}_proj."
            if tag in name:
                key = name.replace(tag, ".attn.in_proj_")
                packed.setdefault(key, {})[x] = out.pop(name)
    for key, parts in packed.items():
        out[key] = np.concatenate([parts["q"], parts["k"], parts["v"]], 0)
    return out


def _flat_values(module, *filters):
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(module, *filters))}


@pytest.mark.parametrize("query_init", ["sam_pooling", "learned"])
def test_converter_round_trip(query_init):
    cfg = _tiny_cfg(query_init)
    src = Mask2FormerHead(cfg, [24] * 4, num_classes=4, rngs=nnx.Rngs(0))
    dst = Mask2FormerHead(cfg, [24] * 4, num_classes=4, rngs=nnx.Rngs(7))
    ours = _flat_values(src, nnx.Param)
    sd = {"decode_head." + k: v for k, v in _to_torch_names(ours).items()}
    assert any(k.endswith("cross_attn.attn.in_proj_weight") for k in sd)
    expected = flat_shapes(nnx.state(dst, nnx.Param))
    converted, _ = convert_with_rules(split_in_proj(sd), head_rules(query_init=query_init), expected,
                                      source_name="test.pth")
    update_module(dst, converted)
    back = _flat_values(dst, nnx.Param)
    assert back.keys() == ours.keys()
    for k in ours:
        np.testing.assert_array_equal(back[k], ours[k], err_msg=k)
    sd.pop("decode_head.cls_embed.bias")
    sd["decode_head.bogus.weight"] = np.zeros(1)
    with pytest.raises(CheckpointError, match="missing keys.*cls_embed.bias.*unexpected keys.*bogus"):
        convert_with_rules(split_in_proj(sd), head_rules(query_init=query_init), expected, source_name="t")


def test_aux_converter_round_trip():
    cfg = common.aux_head(True, 24, num_classes=5)
    cfg.channels = 8
    src = AdapterFCNHead(cfg, rngs=nnx.Rngs(0))
    src.convs[0].bn.mean.set_value(jnp.arange(8.0))
    ours = _flat_values(src, (nnx.Param, nnx.BatchStat))
    sd = {"auxiliary_head." + k: v for k, v in _to_torch_names(ours).items()}
    sd["auxiliary_head.convs.0.bn.num_batches_tracked"] = np.asarray(3)
    dst = AdapterFCNHead(cfg, rngs=nnx.Rngs(1))
    converted, _ = convert_with_rules(sd, aux_head_rules(), flat_shapes(nnx.state(dst, (nnx.Param, nnx.BatchStat))),
                                      source_name="t")
    update_module(dst, converted)
    back = _flat_values(dst, (nnx.Param, nnx.BatchStat))
    for k in ours:
        np.testing.assert_array_equal(back[k], ours[k], err_msg=k)


def _full_size_head_cfg(variant):
    """The SARFormer head config of `variant` and its in-channels, as in
    `test_shapes_and_dtypes_full_size`."""
    if variant == "B":
        return common.mask2former_head(), 768
    return common.mask2former_head(1024, pd_heads=32, pd_ffn=4096, dec_heads=32, dec_ffn=4096,
                                   num_feats=512), 1024


@pytest.mark.parametrize("variant,size,reduced", [
    pytest.param("B", (640, 640), True, id="B-640x640-reduced-depth"),
    pytest.param("B", (640, 640), False, id="B-640x640", marks=pytest.mark.gpu),
    pytest.param("B", (512, 1024), False, id="B-512x1024", marks=pytest.mark.gpu),
    pytest.param("L", (640, 640), False, id="L-640x640", marks=pytest.mark.gpu),
    pytest.param("L", (512, 1024), False, id="L-512x1024", marks=pytest.mark.gpu),
])
def test_full_size_gradients_reach_every_parameter(variant, size, reduced):
    """Real (not abstract) gradients of the full loss (default `common.loss()`: 12544 points)
    through the full-width SARFormer heads at the training sizes, bf16 compute, fp32 params and
    gradients, batch 1.

    The full-depth cases are marked gpu (the device machine: `JAX_PLATFORMS=cuda python3 -m
    pytest -q -m gpu tests/test_head.py -k full_size_gradients`, 67-92 s each there, mostly
    compile).  On the CPU, B at 640x640 runs with one pixel-decoder layer and three decoder
    layers (each of the three feature levels once): every parameter kind is there, the deeper
    stacks only repeat them.  The CPU takes the XLA reference of deformable attention, which
    keeps its gathered corners, f32[B, heads, tokens, 48, 32] per pixel-decoder layer and pass,
    for the backward: the full-depth B at 640x640 peaks at 16.5 GB and takes 80-95 s on 2
    cores, and L at 512x1024 needs 26 GB of temporaries."""
    k, b, h, w = 150, 1, *size
    cfg, c = _full_size_head_cfg(variant)
    if reduced:
        cfg.pixel_decoder.num_layers = 1
        cfg.decoder.num_layers = 3
    n_preds = cfg.decoder.num_layers + 1
    head = Mask2FormerHead(cfg, [c] * 4, num_classes=k, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    models = [head]
    if variant == "B":  # SARFormer-B trains with the auxiliary FCN head (configs/ade20k_sarformer_b.py)
        models.append(AdapterFCNHead(common.aux_head(True, c, num_classes=k), dtype=jnp.bfloat16,
                                     rngs=nnx.Rngs(1)))
    models = tuple(models)
    params = jax.tree.leaves(nnx.state(models, nnx.Param))
    assert params and all(p.dtype == jnp.float32 for p in params)
    rng = np.random.default_rng(0)
    # move off the Deformable-DETR init (zero offset / attention kernels make the query, hence
    # the positional and level encodings, inert at step 0), as in the reduced-config test
    state = nnx.state(head, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    nnx.update(head, jax.tree.unflatten(treedef, [
        x + jnp.asarray(0.02 * rng.standard_normal(x.shape, np.float32)) for x in leaves]))
    feats = [jnp.asarray(rng.standard_normal((b, h // s, w // s, c), np.float32), jnp.bfloat16)
             for s in (4, 8, 16, 32)]
    raw = [(f * 3.0 + 1.0).astype(jnp.bfloat16) for f in feats]
    n = 64  # ~45 valid proposals (16x16-pixel blocks): the other slots are Bernoulli placeholders
    masks = np.repeat(np.repeat(rng.random((b, n, h // 16, w // 16)) > 0.5, 16, 2), 16, 3)
    props = jax.jit(prepare_proposals, static_argnums=3)(
        jax.random.key(3), jnp.asarray(masks), jnp.asarray(rng.random((b, n)) > 0.3), cfg.num_queries)
    # blocky labels from 20 of the classes (segments, not salt-and-pepper), an ignored band
    labels = rng.choice(k, 20, replace=False)[rng.integers(0, 20, size=(b, h // 32, w // 32))]
    gt = np.repeat(np.repeat(labels, 32, 1), 32, 2).astype(np.int32)
    gt[:, : h // 10] = 255
    loss_cfg = common.loss()

    def run(models, feats, raw, props, gt):
        preds, _ = models[0](feats, raw, props, invert_first_mask=True, train=True)
        aux_logits = models[1](feats, train=True)[0] if len(models) > 1 else None
        total, parts = loss_fn(preds, gt, aux_logits, key=jax.random.key(1), cfg_loss=loss_cfg,
                               num_classes=k)
        return total, (parts, preds)

    @nnx.jit  # the inputs are arguments, not closed-over constants (as those, ~50 s more)
    def grads(models, feats, raw, props, gt):
        diff = nnx.DiffState(0, nnx.Param)
        (total, (parts, preds)), g = nnx.value_and_grad(run, argnums=diff, has_aux=True)(
            models, feats, raw, props, gt)
        return total, parts, preds, g

    total, parts, preds, g = grads(models, feats, raw, props, jnp.asarray(gt))
    assert np.isfinite(float(total)) and float(total) > 0
    assert all(np.isfinite(float(v)) for v in parts.values())
    assert len(parts) == 3 * n_preds + (1 if variant == "B" else 0)
    assert len(preds) == n_preds
    for p in preds:
        assert p["cls"].dtype == jnp.bfloat16 and p["mask"].dtype == jnp.bfloat16
        assert p["cls"].shape == (b, 100, k + 1) and p["mask"].shape == (b, 100, h // 4, w // 4)
    flat = _flat_grads(g)
    assert len(flat) == len(params)
    for name, value in flat.items():
        assert value.dtype == np.float32, name
        assert np.all(np.isfinite(value)), name
    dead = [name for name in flat if "enc_output" in name]
    assert len(dead) == 4
    # The key bias of softmax attention is inert: it adds q . b_k to every logit of a row, which
    # the softmax cancels, so its gradient is 0 up to rounding (~1e-7 of the query bias's in
    # fp32, ~1e-2 in bf16 on the CPU, and exactly 0 for L's decoder layer 4 cross-attention on
    # the GPU).  Bounded against the query bias of the same attention instead of asserted nonzero.
    key_biases = [name for name in flat if name.endswith("attn.k_proj.bias")]
    assert len(key_biases) == 2 * cfg.decoder.num_layers  # self- and cross-attention per layer
    for name in key_biases:
        q_bias = flat[name.replace("k_proj", "q_proj")]
        assert np.linalg.norm(flat[name]) <= 0.1 * np.linalg.norm(q_bias), name
    # A decoder layer whose attention mask (the previous prediction, sigmoid >= 0.5 at the
    # layer's level) leaves exactly one key visible in every row attends one-hot: its
    # cross-attention output cannot depend on the query or key projections, which then get no
    # gradient, correctly.  Random weights do this: L at 512x1024, layer 4 (seen on the GPU and
    # the CPU: every query's mask is positive at one of 2048 keys).  Only such layers may lose
    # those gradients; every other parameter must get one.
    from sarformer_jax.models.layers import resize_bilinear

    n_lvl = 3
    level_sizes = [(h // s, w // s) for s in (32, 16, 8)]
    one_hot_layers = []
    for i in range(1, cfg.decoder.num_layers):  # layer 0's mask comes from the proposals
        small = resize_bilinear(preds[i]["mask"], level_sizes[i % n_lvl], axes=(2, 3))
        visible = np.asarray(jnp.sum(jax.nn.sigmoid(small.astype(jnp.float32)) >= 0.5, axis=(2, 3)))
        if np.all(visible == 1):
            one_hot_layers.append(i)
    explained = {f"0.transformer_decoder.layers.{i}.cross_attn.attn.{p}" for i in one_hot_layers
                 for p in ("q_proj.kernel", "q_proj.bias", "k_proj.kernel")}
    zero = [name for name, value in flat.items() if not np.any(value != 0) and name not in key_biases]
    unexplained = sorted(set(zero) - set(dead) - explained)
    assert not unexplained, f"no gradient reaches {unexplained}"
    assert set(dead) <= set(zero)


def test_pixel_decoder_scan_setting_resolves_by_backend():
    """`head.pixel_decoder.scan_layers`: the default "auto" scans the encoder layers on the CPU
    and unrolls them on an accelerator (train run 28); True / False force one; other strings
    are refused with the setting named."""
    cfg = common.mask2former_head(48, pd_heads=4, pd_ffn=64, dec_heads=4, dec_ffn=64,
                                  num_feats=24)
    cfg.pixel_decoder.gn_groups = 8
    assert cfg.pixel_decoder.scan_layers == "auto"

    def encoder_scans(value):
        cfg.pixel_decoder.scan_layers = value
        head = nnx.eval_shape(lambda: Mask2FormerHead(cfg, [32] * 4, num_classes=3,
                                                      rngs=nnx.Rngs(0)))
        return head.pixel_decoder.encoder.scan

    assert encoder_scans("auto") is (jax.default_backend() == "cpu")
    assert encoder_scans(True) is True and encoder_scans(False) is False
    with pytest.raises(ValueError, match="scan_layers.*'sometimes'"):
        encoder_scans("sometimes")


def test_batched_pixel_decoder_passes_equal_two_calls():
    """`batch_pixel_decoder_passes`: the two passes of §4.2 as one call on 2B images give the
    predictions, intermediates and parameter gradients of two calls (float32)."""
    k, b, c, hw = 4, 2, 24, 64
    cfgs = []
    for batched in (False, True):
        cfg = _tiny_cfg()
        cfg.pixel_decoder.num_layers = 2
        cfg.batch_pixel_decoder_passes = batched
        cfgs.append(cfg)
    heads = [Mask2FormerHead(cfg, [c] * 4, num_classes=k, rngs=nnx.Rngs(0)) for cfg in cfgs]
    params = nnx.state(heads[0], nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(9), len(leaves))
    moved = jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(kk, x.shape)
                                         for x, kk in zip(leaves, keys)])
    for h in heads:
        nnx.update(h, moved)
    rng = np.random.default_rng(1)
    feats = [jnp.asarray(rng.normal(size=(b, hw // s, hw // s, c)), jnp.float32) for s in (4, 8, 16, 32)]
    # raw features far from the normalised ones, so that mixing up the passes shows
    raw = [jnp.asarray(rng.normal(size=f.shape) * 3.0 + 1.0, jnp.float32) for f in feats]
    masks = jnp.asarray(rng.random((b, 9, hw, hw)) > 0.5)
    props = prepare_proposals(jax.random.key(3), masks, jnp.asarray(rng.random((b, 9)) > 0.3), 6)

    def run(head):
        preds, inter = head(feats, raw, props)
        out = sum(jnp.sum(p["mask"] ** 2) + jnp.sum(p["cls"] ** 2) for p in preds)
        return out, (preds, inter)

    results = []
    for head in heads:
        (out, (preds, inter)), g = nnx.jit(nnx.value_and_grad(run, has_aux=True))(head)
        results.append((out, preds, inter, {".".join(map(str, p)): np.asarray(v.get_value())
                                            for p, v in nnx.to_flat_state(g)}))
    (o0, p0, i0, g0), (o1, p1, i1, g1) = results
    np.testing.assert_allclose(float(o1), float(o0), rtol=1e-6)
    for a, bb in zip(jax.tree.leaves((p0, i0["pixel_decoder"], i0["mask_features"],
                                      i0["memories"], i0["adapter_features"], i0["query_feat"])),
                     jax.tree.leaves((p1, i1["pixel_decoder"], i1["mask_features"],
                                      i1["memories"], i1["adapter_features"], i1["query_feat"]))):
        assert a.shape == bb.shape
        np.testing.assert_allclose(np.asarray(bb), np.asarray(a), rtol=1e-5, atol=1e-5)
    # the two passes really differ, so a swapped or duplicated pass would fail above
    assert not np.allclose(np.asarray(i0["adapter_features"]), np.asarray(i0["mask_features"]),
                           atol=1e-2)
    assert set(g0) == set(g1)
    compared = 0
    for name in g0:
        if name.endswith("k_proj.bias"):  # zero up to rounding (see the test above): noise
            continue
        scale = max(float(np.abs(g0[name]).max()), 1e-6)
        np.testing.assert_allclose(g1[name] / scale, g0[name] / scale, atol=2e-5, err_msg=name)
        compared += 1
    assert compared > 60 and any("pixel_decoder" in n for n in g0)
