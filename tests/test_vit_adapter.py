"""ViT-Adapter backbone: full B / L output shapes at 640x640 and 512x1024 (abstract evaluation),
one real forward at 640 with a reduced-depth B, gradients, freezing, BatchNorm modes, remat,
and stage-level checks against PyTorch ops (SPM, the transposed-conv layout, the depthwise conv
split) through the converter's layouts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from conftest import RTOL, rel_err
from sarformer_jax.configs.common import beit_adapter_b, beit_adapter_l
from sarformer_jax.convert.common import conv_kernel, conv_transpose_kernel
from sarformer_jax.models.beit import relative_position_bias, relative_position_index, table_rows
from sarformer_jax.models.vit_adapter import BEiTAdapter, ConvFFN, deform_inputs

SIZES = [(640, 640), (512, 1024)]


def small_cfg(**kw):
    cfg = beit_adapter_b()
    cfg.update(embed_dim=64, num_heads=4, deform_num_heads=4, depth=4,
               interaction_indexes=((0, 0), (1, 1), (2, 2), (3, 3)))
    cfg.update(kw)
    return cfg


def _flat(tree):
    return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(tree)}


@pytest.mark.parametrize("variant", ["b", "l"])
def test_full_size_shapes(variant):
    cfg = beit_adapter_b() if variant == "b" else beit_adapter_l()
    c, heads = (768, 12) if variant == "b" else (1024, 16)
    model = nnx.eval_shape(lambda: BEiTAdapter(cfg, 640, rngs=nnx.Rngs(0)))
    assert len(model.layers) == cfg.depth and len(model.interactions[3].extra_extractors) == 2
    assert model.layers[0].attn.relative_position_bias_table.shape == (6244, heads)
    assert model.interactions[0].injector.attn.sampling_offsets.kernel.shape == (c, heads * 3 * 4 * 2)
    assert model.interactions[0].extractor.ffn.dwconv.dwconv.kernel.shape == (3, 3, 1, c // 4)
    graphdef, state = nnx.split(model)

    def forward(state, x):
        return nnx.merge(graphdef, state)(x, train=False)[:2]

    for h, w in SIZES:
        feats, raw = jax.eval_shape(forward, state, jax.ShapeDtypeStruct((2, h, w, 3), jnp.float32))
        for stride, f, r in zip((4, 8, 16, 32), feats, raw):
            assert f.shape == r.shape == (2, h // stride, w // stride, c)
            assert f.dtype == jnp.float32


def test_forward_640_reduced_b_deterministic(rng):
    cfg = beit_adapter_b()
    cfg.update(depth=4, interaction_indexes=((0, 0), (1, 1), (2, 2), (3, 3)))
    model = BEiTAdapter(cfg, 640, rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.normal(size=(1, 640, 640, 3)).astype(np.float32))
    fwd = nnx.jit(lambda m, x: m(x, train=False))
    feats, raw, inter = fwd(model, x)
    feats2, raw2, _ = fwd(model, x)
    for s, f, r, f2, r2 in zip((4, 8, 16, 32), feats, raw, feats2, raw2):
        assert f.shape == (1, 640 // s, 640 // s, 768)
        assert np.isfinite(np.asarray(f)).all()
        np.testing.assert_array_equal(np.asarray(f), np.asarray(f2))
        np.testing.assert_array_equal(np.asarray(r), np.asarray(r2))
    assert inter["stage3.c"].shape == (1, 80 * 80 + 40 * 40 + 20 * 20, 768)
    assert inter["stage0.x"].shape == (1, 40, 40, 768)


def _loss(model, x, train, proj):
    feats, raw, _ = model(x, train=train)
    # random projections: a plain sum of batch-normalised outputs has no gradient
    return sum(jnp.sum(f * p) for f, p in zip(feats + raw, proj))


_forward = nnx.jit(lambda model, x, train: model(x, train=train)[:2], static_argnums=2)
_grad = nnx.jit(nnx.grad(_loss), static_argnums=2)


def _proj(model, x, rng):
    feats, raw = _forward(model, x, False)
    return [jnp.asarray(rng.normal(size=f.shape).astype(np.float32)) for f in feats + raw]


def test_gradients_reach_every_parameter_and_freezing(rng):
    model = BEiTAdapter(small_cfg(), 128, rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.normal(size=(2, 32, 64, 3)).astype(np.float32))
    proj = _proj(model, x, rng)
    stats0 = _flat(nnx.state(model, nnx.BatchStat))
    grads = _grad(model, x, True, proj)
    flat = _flat(grads)
    params = _flat(nnx.state(model, nnx.Param))
    assert set(flat) == set(params)
    dead = [k for k, g in flat.items() if not np.any(np.asarray(g))]
    assert dead == []

    # freezing: stage 0 (patch embedding, cls) and stage 1 (layer 0) get no update
    frozen = model.frozen_filter(2)
    frozen_names = set(_flat(nnx.state(model, frozen)))
    assert "patch_embed.projection.kernel" in frozen_names and "layers.0.ln1.scale" in frozen_names
    assert not any(k.startswith(("layers.1.", "spm.", "interactions.")) for k in frozen_names)
    wrt = nnx.All(nnx.Param, nnx.Not(frozen))
    opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=wrt)
    before = _flat(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))
    opt.update(model, nnx.filter_state(grads, wrt))
    after = _flat(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))
    for k in before:
        same = np.array_equal(np.asarray(before[k]), np.asarray(after[k]))
        if k in frozen_names:
            assert same, k
        elif k in params:
            assert not same, k
    # batch statistics: updated by a training forward, untouched by an eval forward
    assert not np.array_equal(np.asarray(stats0["norm_1.mean"]), np.asarray(after["norm_1.mean"]))
    _forward(model, x, False)
    np.testing.assert_array_equal(_flat(nnx.state(model, nnx.BatchStat))["norm_1.mean"], after["norm_1.mean"])


def test_remat_same_gradients(rng):
    x = jnp.asarray(rng.normal(size=(2, 32, 64, 3)).astype(np.float32))
    plain = BEiTAdapter(small_cfg(), 128, rngs=nnx.Rngs(0))
    proj = _proj(plain, x, rng)
    remat = BEiTAdapter(small_cfg(with_cp=True), 128, rngs=nnx.Rngs(0))
    g1 = _flat(_grad(plain, x, False, proj))
    g2 = _flat(_grad(remat, x, False, proj))
    for k in g1:
        assert rel_err(g2[k], g1[k]) <= RTOL["float32"], k


SCAN_GROUPS = dict(depth=6, interaction_indexes=((0, 1), (2, 3), (4, 4), (5, 5)))


@pytest.mark.parametrize("with_cp", [False, True])
def test_scanned_layer_groups_equal_unrolled(rng, with_cp):
    """`scan_layers` runs each interaction's BEiT layers as one lax.scan over parameters stacked
    on the fly: the same outputs and the same gradients, per layer, as the unrolled layers
    (groups of 2 here, the first holding layer 0, which has no stochastic-depth stream)."""
    x = jnp.asarray(rng.normal(size=(2, 32, 64, 3)).astype(np.float32))
    plain = BEiTAdapter(small_cfg(scan_layers=False, **SCAN_GROUPS), 128, rngs=nnx.Rngs(0))
    scan = BEiTAdapter(small_cfg(scan_layers=True, with_cp=with_cp, **SCAN_GROUPS), 128,
                       rngs=nnx.Rngs(0))
    proj = _proj(plain, x, rng)
    for a, b in zip(_forward(plain, x, False), _forward(scan, x, False)):
        for fa, fb in zip(a, b):
            assert rel_err(fb, fa) <= RTOL["float32"]
    g1 = _flat(_grad(plain, x, False, proj))
    g2 = _flat(_grad(scan, x, False, proj))
    assert set(g1) == set(g2) and any(k.startswith("layers.1.") for k in g2)
    for k in g1:
        assert rel_err(g2[k], g1[k]) <= RTOL["float32"], k
    # the scan is really there (and the unrolled model has none)
    jaxpr = lambda m: str(jax.make_jaxpr(lambda m, x: m(x, train=False)[0])(m, x))  # noqa: E731
    assert "scan[" in jaxpr(scan) and "scan[" not in jaxpr(plain)


def test_scanned_layers_apply_stochastic_depth_per_layer_and_sample():
    """Training through a scanned group: layer 0 (rate 0) never drops; each sample's layer-1
    branches are each either dropped or kept and rescaled by 1/keep, and the draws differ
    between samples."""
    from sarformer_jax.models.beit import BEiT

    cfg = small_cfg(depth=2, drop_path_rate=0.6, scan_layers=True, rel_pos_grid=(2, 2))
    beit = BEiT(cfg, 32, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 5, 64)).astype(np.float32))
    xs = jnp.broadcast_to(x, (48, 5, 64))
    out = np.asarray(beit.run_layers(xs, (2, 2), 0, 1, train=True))
    h = beit.layers[0](x, (2, 2), train=False)
    keep = 1.0 - 0.6
    combos = {}
    for m0 in (0.0, 1.0):
        for m1 in (0.0, 1.0):
            drop = lambda y, i, m=(m0, m1): y * m[i] / keep  # noqa: E731
            combos[(m0, m1)] = np.asarray(beit.layers[1](h, (2, 2), train=True, drop=drop))[0]
    seen = set()
    for o in out:
        match = [c for c, v in combos.items() if np.allclose(o, v, rtol=1e-5, atol=1e-5)]
        assert len(match) == 1
        seen.add(match[0])
    assert len(seen) >= 3  # 48 samples over combinations of probability .16, .24, .24, .36


def test_cls_flag(rng):
    x = jnp.asarray(rng.normal(size=(2, 32, 64, 3)).astype(np.float32))
    plain = BEiTAdapter(small_cfg(), 128, rngs=nnx.Rngs(0))
    # carry_cls=False (the original) re-feeds the learned token: later stages do not see the
    # updated cls, so the outputs differ from carry_cls=True.  A large patch->cls bias makes
    # the patches attend mostly to cls and large layer scales let the cls change, so the
    # difference is visible.
    carry = BEiTAdapter(small_cfg(carry_cls=True), 128, rngs=nnx.Rngs(0))
    cls = jnp.asarray(rng.normal(size=(1, 1, 64)).astype(np.float32))
    for m in (plain, carry):
        m.cls_token.set_value(cls)
        for layer in m.layers:
            table = layer.attn.relative_position_bias_table
            table.set_value(table[...].at[-2].set(6.0))
            layer.gamma_1.set_value(jnp.full((64,), 10.0))
            layer.gamma_2.set_value(jnp.full((64,), 10.0))
    a, b = _forward(plain, x, False)[0][2], _forward(carry, x, False)[0][2]
    assert rel_err(a, b) > 1e-3


def test_relative_position_index_and_bias():
    index = relative_position_index((40, 40))
    assert index.shape == (1601, 1601)
    assert index[0, 5] == 6241 and index[7, 0] == 6242 and index[0, 0] == 6243
    # patch (r, c) = (2, 3) -> (5, 1): (2 - 5 + 39) * 79 + (3 - 1 + 39)
    assert index[1 + 2 * 40 + 3, 1 + 5 * 40 + 1] == 36 * 79 + 41
    table = np.random.default_rng(0).normal(size=(table_rows((5, 7)), 3)).astype(np.float32)
    got = np.asarray(relative_position_bias(jnp.asarray(table), (5, 7)))
    np.testing.assert_array_equal(got, table[relative_position_index((5, 7))].transpose(2, 0, 1))
    # bf16: each entry is one table value, so exactly the rounded table
    got16 = relative_position_bias(jnp.asarray(table), (5, 7), jnp.bfloat16)
    assert got16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got16.astype(jnp.float32)),
                                  np.asarray(jnp.asarray(table[relative_position_index((5, 7))]
                                                         .transpose(2, 0, 1), jnp.bfloat16)
                                             .astype(jnp.float32)))


def test_relative_position_bias_gradient_is_the_scatter_sum():
    """d(sum(bias * ct)) / d table = ct summed over every pair with the table row's offset (the
    gather's scatter-add), in float32; in bf16 the cotangent is bf16 but its sums are float32
    (summed in bf16, as the products' intermediate once was, they missed by ~2e-3), and the
    gradient program has no scatter (on a GPU a scatter-add with this many collisions is slow)."""
    grid = (6, 4)
    rng = np.random.default_rng(1)
    table = jnp.asarray(rng.normal(size=(table_rows(grid), 3)), jnp.float32)
    t = 1 + grid[0] * grid[1]
    ct = rng.normal(size=(3, t, t)).astype(np.float32)
    index = relative_position_index(grid)
    expected = np.zeros((table_rows(grid), 3), np.float64)
    np.add.at(expected, index, ct.transpose(1, 2, 0).astype(np.float64))
    for dtype, tol in ((jnp.float32, 1e-6), (jnp.bfloat16, 1e-6)):
        def loss(tb):
            return jnp.sum(relative_position_bias(tb, grid, dtype).astype(jnp.float32)
                           * jnp.asarray(ct, dtype).astype(jnp.float32))

        got = jax.grad(loss)(table)
        assert "scatter" not in jax.jit(jax.grad(loss)).lower(table).as_text()
        ref = np.zeros_like(expected)
        np.add.at(ref, index, np.asarray(jnp.asarray(ct, dtype).astype(jnp.float32))
                  .transpose(1, 2, 0).astype(np.float64))
        err = np.linalg.norm(np.asarray(got, np.float64) - ref) / np.linalg.norm(ref)
        assert err <= tol, (dtype, err)


def test_deform_inputs_640():
    (ref1, shapes1), (ref2, shapes2) = deform_inputs(640, 640)
    assert ref1.shape == (1, 1600, 1, 2) and shapes1 == ((80, 80), (40, 40), (20, 20))
    assert ref2.shape == (1, 8400, 1, 2) and shapes2 == ((40, 40),)
    np.testing.assert_allclose(ref1[0, 41, 0], [1.5 / 40, 1.5 / 40])  # (x, y) of patch (1, 1)
    np.testing.assert_allclose(ref2[0, 6400 + 1600, 0], [0.5 / 20, 0.5 / 20])


def test_bad_input_size():
    model = BEiTAdapter(small_cfg(), 128, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="divisible by 32"):
        model(jnp.zeros((1, 64, 80, 3)))


def _torch(a):
    return torch.from_numpy(np.array(a, copy=True))


def test_spm_and_up_vs_torch(rng):
    """SPM in eval mode (random running statistics) and `up` against torch conv/BN/pool ops with
    weights mapped back through the converter's layouts."""
    model = BEiTAdapter(small_cfg(), 128, rngs=nnx.Rngs(0))
    for bn in [model.spm.stem[1], model.spm.stem[4], model.spm.stem[7], model.spm.conv2[1],
               model.spm.conv3[1], model.spm.conv4[1]]:
        bn.mean.set_value(jnp.asarray(rng.normal(size=bn.mean.shape).astype(np.float32)))
        bn.var.set_value(jnp.asarray(rng.uniform(0.5, 2.0, size=bn.var.shape).astype(np.float32)))
        bn.scale.set_value(jnp.asarray(rng.uniform(0.5, 1.5, size=bn.scale.shape).astype(np.float32)))
    x = rng.normal(size=(2, 64, 96, 3)).astype(np.float32)
    c1, c2, c3, c4 = model.spm(jnp.asarray(x), train=False)

    def conv_w(conv):  # our kernel back to torch (O, I, kh, kw)
        return _torch(np.asarray(conv.kernel[...]).transpose(3, 2, 0, 1))

    def block(t, conv, bn, stride):
        t = F.conv2d(t, conv_w(conv), stride=stride, padding=1)
        t = F.batch_norm(t, _torch(bn.mean[...]), _torch(bn.var[...]), _torch(bn.scale[...]),
                         _torch(bn.bias[...]), False, 0.0, 1e-5)
        return F.relu(t)

    s = model.spm
    with torch.no_grad():
        t = _torch(x).permute(0, 3, 1, 2)
        t = block(t, s.stem[0], s.stem[1], 2)
        t = block(t, s.stem[3], s.stem[4], 1)
        t = block(t, s.stem[6], s.stem[7], 1)
        t1 = F.max_pool2d(t, 3, 2, 1)
        t2 = block(t1, s.conv2[0], s.conv2[1], 2)
        t3 = block(t2, s.conv3[0], s.conv3[1], 2)
        t4 = block(t3, s.conv4[0], s.conv4[1], 2)
        outs = [F.conv2d(tt, conv_w(fc), _torch(fc.bias[...]))
                for tt, fc in zip((t1, t2, t3, t4), (s.fc1, s.fc2, s.fc3, s.fc4))]
    np.testing.assert_array_less(rel_err(c1, outs[0].permute(0, 2, 3, 1).numpy()), RTOL["float32"])
    for ours, ref in zip((c2, c3, c4), outs[1:]):
        ref = ref.flatten(2).transpose(1, 2).numpy()
        assert rel_err(ours, ref) <= RTOL["float32"]

    # ConvTranspose2d layout: a torch weight through the converter's transform into `up`
    w = rng.normal(size=(64, 64, 2, 2)).astype(np.float32)
    model.up.kernel.set_value(jnp.asarray(conv_transpose_kernel(w)))
    y = rng.normal(size=(2, 5, 7, 64)).astype(np.float32)
    ref = F.conv_transpose2d(_torch(y).permute(0, 3, 1, 2), _torch(w), _torch(model.up.bias[...]), stride=2)
    assert rel_err(model.up(jnp.asarray(y)), ref.permute(0, 2, 3, 1).numpy()) <= RTOL["float32"]


def test_conv_ffn_vs_torch(rng):
    """ConvFFN: one shared depthwise conv per level map (the original's N // 21 split)."""
    ffn = ConvFFN(32, 8, rngs=nnx.Rngs(0))
    dw = rng.normal(size=(8, 1, 3, 3)).astype(np.float32)
    ffn.dwconv.dwconv.kernel.set_value(jnp.asarray(conv_kernel(dw)))
    shapes = ((8, 12), (4, 6), (2, 3))
    x = rng.normal(size=(2, sum(h * w for h, w in shapes), 32)).astype(np.float32)
    got = ffn(jnp.asarray(x), shapes)
    with torch.no_grad():
        t = F.linear(_torch(x), _torch(np.asarray(ffn.fc1.kernel[...]).T), _torch(ffn.fc1.bias[...]))
        n = t.shape[1] // 21
        parts, start = [], 0
        for (h, w), size in zip(shapes, (16 * n, 4 * n, n)):
            m = t[:, start : start + size].transpose(1, 2).reshape(2, 8, h, w)
            m = F.conv2d(m, _torch(dw), _torch(ffn.dwconv.dwconv.bias[...]), padding=1, groups=8)
            parts.append(m.flatten(2).transpose(1, 2))
            start += size
        t = F.gelu(torch.cat(parts, 1))
        ref = F.linear(t, _torch(np.asarray(ffn.fc2.kernel[...]).T), _torch(ffn.fc2.bias[...])).numpy()
    assert rel_err(got, ref) <= RTOL["float32"]


def test_scan_layers_auto_resolves_by_backend():
    """"auto" scans on the CPU (compile time) and unrolls on an accelerator (step time); anything
    but a bool or "auto" is refused by name."""
    from sarformer_jax.models.beit import resolve_scan_layers

    assert resolve_scan_layers("auto") is (jax.default_backend() == "cpu")
    assert resolve_scan_layers(False) is False and resolve_scan_layers(1) is True
    with pytest.raises(ValueError, match="scan_layers.*'yes'"):
        resolve_scan_layers("yes")


@pytest.mark.parametrize("variant,size", [
    pytest.param("b", (640, 640), id="b-640x640", marks=pytest.mark.gpu),
    pytest.param("b", (512, 1024), id="b-512x1024", marks=pytest.mark.gpu),
    pytest.param("l", (640, 640), id="l-640x640", marks=pytest.mark.gpu),
    pytest.param("l", (512, 1024), id="l-512x1024", marks=pytest.mark.gpu),
])
def test_full_width_gradients_at_real_sizes(variant, size, rng):
    """Real (not abstract) gradients of the full-width B and L backbones at the sizes the model
    trains on: every parameter gets a finite, non-zero fp32 gradient; the outputs are the same
    bit for bit on a second run, the gradients too on the CPU and to bf16 rounding on the GPU,
    where the backward accumulates with atomic adds.  One BEiT layer per interaction (depth 4) keeps the cost down: every
    parameter kind of the full model is there (the full depth only repeats layers; its shapes
    are checked above).  GPU cases (`JAX_PLATFORMS=cuda python3 -m pytest -q -m gpu
    tests/test_vit_adapter.py -k full_width`), in bf16 compute as training runs.  On 2 CPU
    cores even B at 640x640 takes 200 s (78 s a gradient, nearly all of it the backward of the
    XLA deformable-attention reference's scatter-adds; BEiT's own part is 6 s), so the CPU
    suite keeps the reduced-width gradient test above; run there, the test uses fp32."""
    on_gpu = jax.default_backend() != "cpu"
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    cfg = beit_adapter_b() if variant == "b" else beit_adapter_l()
    cfg.update(depth=4, interaction_indexes=((0, 0), (1, 1), (2, 2), (3, 3)), drop_path_rate=0.0)
    model = BEiTAdapter(cfg, size, dtype=dtype, rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.normal(size=(1, *size, 3)).astype(np.float32))
    proj = _proj(model, x, rng)
    assert all(f.dtype == dtype for f in _forward(model, x, False)[0])
    grads = _flat(_grad(model, x, True, proj))
    params = _flat(nnx.state(model, nnx.Param))
    assert set(grads) == set(params)
    for name, g in grads.items():
        g = np.asarray(g)
        assert params[name].dtype == jnp.float32 and g.dtype == np.float32, name
        assert np.isfinite(g).all(), name
        assert np.any(g != 0), f"no gradient reaches {name}"
    first, again_out = _forward(model, x, False), _forward(model, x, False)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again_out)):  # outputs: bit for bit
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    again = _flat(_grad(model, x, True, proj))
    if not on_gpu:
        for name in grads:
            np.testing.assert_array_equal(np.asarray(grads[name]), np.asarray(again[name]), err_msg=name)
        return
    # On the GPU the backward accumulates with atomic adds (the deformable-attention kernel's
    # value gradient, XLA's scatter-adds), whose order varies from run to run: the gradients
    # agree to bf16 rounding, not bit for bit.  Seen on an H200 (2026-11-30): single elements
    # one bf16 ulp apart (12.4375 vs 12.5); per tensor at most 1.5e-2 relative L2, in biases
    # whose gradient is a sum over every token with cancellation (B: the injector's
    # attention-weight bias, the extractor's fc1 bias), <= 1e-2 for L.  A race or a stale
    # buffer would differ by O(1).
    worst = max((float(np.linalg.norm(np.asarray(grads[n]) - np.asarray(again[n]))
                       / np.linalg.norm(np.asarray(grads[n]))), n) for n in grads)
    assert worst[0] <= 5e-2, f"gradients of two identical runs differ by {worst[0]:.2e} (rel L2) at {worst[1]}"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_strided_conv_transpose_equals_flax_conv_transpose(dtype, rng):
    """`up` as a GEMM + depth-to-space gives nnx.ConvTranspose's parameters (same seed, same
    draws) and outputs, values and gradients; torch's layout is pinned by
    test_spm_and_up_vs_torch."""
    from sarformer_jax.models.beit import torch_bias_init, torch_conv_init
    from sarformer_jax.models.layers import StridedConvTranspose

    c_in, c_out = 12, 8
    ours = StridedConvTranspose(c_in, c_out, 2, kernel_init=torch_conv_init,
                                bias_init=torch_bias_init(4 * c_in), dtype=dtype, rngs=nnx.Rngs(3))
    ref = nnx.ConvTranspose(c_in, c_out, (2, 2), strides=(2, 2), padding="VALID",
                            kernel_init=torch_conv_init, bias_init=torch_bias_init(4 * c_in),
                            dtype=dtype, rngs=nnx.Rngs(3))
    np.testing.assert_array_equal(ours.kernel[...], ref.kernel[...])
    np.testing.assert_array_equal(ours.bias[...], ref.bias[...])
    x = jnp.asarray(rng.normal(size=(2, 5, 7, c_in)).astype(np.float32))
    y, y_ref = ours(x), ref(x)
    assert y.shape == y_ref.shape == (2, 10, 14, c_out) and y.dtype == y_ref.dtype == dtype
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    assert rel_err(y.astype(jnp.float32), y_ref.astype(jnp.float32)) < tol
    proj = jnp.asarray(rng.normal(size=y.shape).astype(np.float32))
    loss = lambda m: jnp.sum(m(x).astype(jnp.float32) * proj)  # noqa: E731
    g, g_ref = nnx.grad(loss)(ours), nnx.grad(loss)(ref)
    for name in ("kernel", "bias"):
        assert rel_err(getattr(g, name)[...], getattr(g_ref, name)[...]) < tol, name
