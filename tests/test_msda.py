"""The XLA reference of multi-scale deformable attention against independent oracles: a float64
numpy loop, PyTorch grid_sample, hand-computed bilinear cases, numerical gradients; and the
argument checks of the public op."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from conftest import RTOL, rel_err
from sarformer_jax.kernels import ms_deform_attn, ms_deform_attn_reference
from sarformer_jax.kernels.msda import default_implementation


def numpy_loop(value, shapes, loc, att):
    """One sampling point at a time, float64: the definition written out."""
    b, _, n, d = value.shape
    _, q, _, n_lvl, p, _ = loc.shape
    out = np.zeros((b, q, n, d))
    starts = np.cumsum([0] + [h * w for h, w in shapes])
    for bi in range(b):
        for qi in range(q):
            for hi in range(n):
                for li, (h, w) in enumerate(shapes):
                    fmap = value[bi, starts[li]:starts[li + 1], hi].reshape(h, w, d)
                    for pi in range(p):
                        x = loc[bi, qi, hi, li, pi, 0] * w - 0.5
                        y = loc[bi, qi, hi, li, pi, 1] * h - 0.5
                        x0, y0 = int(np.floor(x)), int(np.floor(y))
                        for yy in (y0, y0 + 1):
                            for xx in (x0, x0 + 1):
                                if 0 <= xx < w and 0 <= yy < h:
                                    wgt = (1 - abs(x - xx)) * (1 - abs(y - yy))
                                    out[bi, qi, hi] += (att[bi, qi, hi, li, pi] * wgt
                                                        * fmap[yy, xx])
    return out.reshape(b, q, n * d)


def random_inputs(rng, shapes, b=2, q=7, n=3, p=2, d=4, lo=-0.2, hi=1.2):
    s = sum(h * w for h, w in shapes)
    value = rng.standard_normal((b, s, n, d)).astype(np.float32)
    loc = rng.uniform(lo, hi, (b, q, n, len(shapes), p, 2)).astype(np.float32)
    att = rng.uniform(0, 1, (b, q, n, len(shapes), p)).astype(np.float32)
    return value, loc, att


SHAPES = [((5, 7),), ((6, 9), (3, 5), (2, 1)), ((4, 4), (1, 1))]


@pytest.mark.parametrize("shapes", SHAPES)
def test_reference_vs_numpy_loop(rng, shapes):
    value, loc, att = random_inputs(rng, shapes)
    got = ms_deform_attn(value, shapes, loc, att, implementation="xla")
    want = numpy_loop(value.astype(np.float64), shapes, loc.astype(np.float64),
                      att.astype(np.float64))
    assert rel_err(got, want) <= RTOL["float32"]


@pytest.mark.parametrize("shapes", SHAPES)
def test_reference_vs_torch_grid_sample(rng, shapes):
    torch = pytest.importorskip("torch")
    from sarformer_jax.benchmarks.msda import torch_msda

    value, loc, att = random_inputs(rng, shapes, b=2, q=25, n=2, p=4, d=8, lo=-0.1, hi=1.1)
    want = torch_msda(torch.tensor(value), shapes, torch.tensor(loc), torch.tensor(att))
    got = ms_deform_attn_reference(value, np.asarray(shapes), loc, att)
    assert rel_err(got, want.numpy()) <= RTOL["float32"]


@pytest.mark.parametrize("mode", ["vjp", "loss"])
def test_bench_fwd_bwd_keeps_the_forward(rng, mode):
    """The benchmark's fwd+bwd must run the forward too: `jit(grad)` of a sum would let XLA drop
    the forward kernel (its output is dead) and time the backward alone.  Both modes return the
    forward's result ("vjp" the output itself, "loss" the sum against ct) and the gradients for
    the cotangent ct."""
    from sarformer_jax.benchmarks.msda import _jax_fns

    shapes = ((5, 7), (3, 4))
    value, loc, att = random_inputs(rng, shapes, b=1, q=6, n=2, p=2, d=4, lo=0.0, hi=1.0)
    ct = rng.standard_normal((1, 6, 8)).astype(np.float32)
    fwd, fwd_bwd = _jax_fns("xla", shapes, None, mode)
    first, grads = fwd_bwd(value, loc, att, ct)
    out = np.asarray(fwd(value, loc, att))
    if mode == "vjp":
        np.testing.assert_allclose(np.asarray(first), out, rtol=1e-6, atol=1e-6)
    else:
        want = float(np.sum(out * ct))
        assert abs(float(first) - want) <= 1e-4 * max(1.0, abs(want))
    assert [g.shape for g in grads] == [value.shape, loc.shape, att.shape]
    # d(sum(out * ct)) / d value, by a finite difference along a random direction
    dv = rng.standard_normal(value.shape).astype(np.float32)
    eps = 1e-2
    num = (np.sum(np.asarray(fwd(value + eps * dv, loc, att)) * ct)
           - np.sum(np.asarray(fwd(value - eps * dv, loc, att)) * ct)) / (2 * eps)
    assert float(np.sum(np.asarray(grads[0]) * dv)) == pytest.approx(float(num), rel=1e-3)


def test_bench_fwd_bwd_mode_checked():
    from sarformer_jax.benchmarks.msda import _jax_fns

    with pytest.raises(ValueError, match="fwd\\+bwd mode 'grad'"):
        _jax_fns("xla", ((2, 2),), None, "grad")


def _one_point(fmap, x, y, a=1.0):
    """A single-head, single-point, one-level query of an [h, w] map; returns a scalar."""
    h, w = fmap.shape
    value = jnp.asarray(fmap, jnp.float32).reshape(1, h * w, 1, 1)
    loc = jnp.asarray([x, y], jnp.float32).reshape(1, 1, 1, 1, 1, 2)
    att = jnp.full((1, 1, 1, 1, 1), a, jnp.float32)
    return float(ms_deform_attn_reference(value, ((h, w),), loc, att)[0, 0, 0])


def test_hand_computed_bilinear():
    fmap = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # h=2, w=3
    # pixel centres (j + 0.5) / w, (i + 0.5) / h hit the pixel exactly (align_corners=False)
    for i in range(2):
        for j in range(3):
            assert _one_point(fmap, (j + 0.5) / 3, (i + 0.5) / 2) == pytest.approx(fmap[i, j])
    # between the four top-left centres: their mean; the attention weight scales it
    assert _one_point(fmap, 1.0 / 3, 0.5, a=0.5) == pytest.approx(0.5 * (1 + 2 + 4 + 5) / 4)
    # the map's corner (0, 0) is half a pixel outside both centres: a quarter of pixel (0, 0)
    assert _one_point(fmap, 0.0, 0.0) == pytest.approx(0.25 * 1.0)
    # right border at a row centre: half of the last column, the other half is zero padding
    assert _one_point(fmap, 1.0, 0.25) == pytest.approx(0.5 * 3.0)
    # bottom border between columns 1 and 2 (x = 2/3 -> px = 1.5): half of the mean of 5, 6
    assert _one_point(fmap, 2.0 / 3, 1.0) == pytest.approx(0.5 * (5 + 6) / 2)
    # out of range: zeros
    for x, y in [(1.5, 0.5), (-0.5, 0.5), (0.5, 1.3), (0.5, -0.26), (-3.0, 7.0)]:
        assert _one_point(fmap, x, y) == 0.0
    # 1x1 map: the centre gives the pixel, a quarter pixel off gives 3/4 of it
    assert _one_point(np.array([[7.0]]), 0.5, 0.5) == pytest.approx(7.0)
    assert _one_point(np.array([[7.0]]), 0.75, 0.5) == pytest.approx(7.0 * 0.75)


def test_reference_check_grads(rng):
    shapes = ((3, 4), (2, 2))
    value, loc, att = random_inputs(rng, shapes, b=1, q=3, n=2, p=2, d=2)
    # The function is piecewise bilinear: keep pixel coordinates 0.2 px away from the kinks
    # (integer pixel coordinates), borders included (k = -1 and k = size - 1).
    for lvl, (h, w) in enumerate(shapes):
        for c, size in ((0, w), (1, h)):
            k = rng.integers(-1, size, loc[..., lvl, :, c].shape)
            px = k + rng.uniform(0.2, 0.8, k.shape)
            loc[..., lvl, :, c] = (px + 0.5) / size
    f = lambda v, lo, a: ms_deform_attn_reference(v, shapes, lo, a)  # noqa: E731
    # fp32 arithmetic inside the reference: finite differences with eps 1e-3, tolerance 1e-2
    check_grads(f, (value, loc, att), order=1, modes=("rev",), eps=1e-3, atol=1e-2, rtol=1e-2)


def test_bf16_reference_close_to_fp32(rng):
    shapes = SHAPES[1]
    value, loc, att = random_inputs(rng, shapes)
    want = ms_deform_attn_reference(value, shapes, loc, att)
    got = ms_deform_attn_reference(jnp.asarray(value, jnp.bfloat16), shapes, loc,
                                   jnp.asarray(att, jnp.bfloat16))
    assert got.dtype == jnp.bfloat16
    assert rel_err(got.astype(jnp.float32), want) <= RTOL["bfloat16"]


def test_default_implementation_on_cpu():
    assert default_implementation() == "xla"


@pytest.mark.parametrize(
    "value_shape, loc_shape, att_shape, match",
    [
        ((2, 30, 3, 4), (2, 5, 3, 2, 2, 2), (2, 5, 3, 2, 2), r"S=30.*sum to 29"),  # S != sum(hw)
        ((2, 29, 3, 4), (2, 5, 3, 1, 2, 2), (2, 5, 3, 1, 2), r"\(2, 5, 3, 1, 2, 2\).*2 levels"),
        ((2, 29, 4, 4), (2, 5, 3, 2, 2, 2), (2, 5, 3, 2, 2), r"\(2, 29, 4, 4\)"),  # H
        ((2, 29, 3, 4), (2, 5, 3, 2, 2, 2), (2, 5, 3, 2, 3), r"\(2, 5, 3, 2, 3\)"),  # P
        ((2, 29, 12), (2, 5, 3, 2, 2, 2), (2, 5, 3, 2, 2), r"value must be \[B, S, H, D\]"),
        ((2, 29, 3, 4), (2, 5, 3, 2, 2), (2, 5, 3, 2, 2), r"sampling_locations must be"),
        ((2, 29, 3, 4), (2, 5, 3, 2, 2, 2), (2, 5, 3, 4), r"attention_weights must be"),
    ],
)
def test_bad_shapes_raise(value_shape, loc_shape, att_shape, match):
    shapes = ((5, 5), (2, 2))  # 29 tokens
    with pytest.raises(ValueError, match=match):
        ms_deform_attn(jnp.zeros(value_shape), shapes, jnp.zeros(loc_shape), jnp.zeros(att_shape))


def test_bad_spatial_shapes_and_implementation():
    v, lo, a = jnp.zeros((1, 4, 1, 16)), jnp.zeros((1, 2, 1, 1, 1, 2)), jnp.zeros((1, 2, 1, 1, 1))
    with pytest.raises(ValueError, match="value_spatial_shapes"):
        ms_deform_attn(v, (2, 2), lo, a)
    with pytest.raises(ValueError, match="unknown implementation"):
        ms_deform_attn(v, ((2, 2),), lo, a, implementation="cuda")
    with pytest.raises(ValueError, match="head dim"):
        ms_deform_attn(jnp.zeros((1, 4, 1, 12)), ((2, 2),), lo, a, implementation="pallas")


def test_bench_copies_runs_each_call_on_its_own_inputs(monkeypatch):
    """`--copies k` times one jitted program of k calls, each on a separate copy of the inputs,
    and divides by k."""
    import sarformer_jax.benchmarks.msda as bench

    seen = {}

    def fake_time(fn, args, reps):
        seen["outs"] = fn(*args)
        seen["args"] = args
        return 6.0

    monkeypatch.setattr(bench, "_time_jax", fake_time)
    x = jnp.arange(4.0)
    y = jnp.ones(4)
    t = bench._time_copies(lambda a, b: a * 2 + b, (x, y), reps=1, copies=3)
    assert t == pytest.approx(2.0)
    assert len(seen["args"]) == 6 and len(seen["outs"]) == 3
    ptrs = {a.unsafe_buffer_pointer() for a in seen["args"]}
    assert len(ptrs) == 6  # six separate buffers
    for out in seen["outs"]:
        np.testing.assert_array_equal(np.asarray(out), np.arange(4.0) * 2 + 1)
    assert bench._time_copies(lambda a, b: a + b, (x, y), reps=1, copies=1) == 6.0
    with pytest.raises(ValueError, match="--copies must be >= 1, got 0"):
        bench._time_copies(lambda a, b: a + b, (x, y), reps=1, copies=0)


def test_bench_grid_order_variants():
    """`--grid-orders` adds one Pallas variant per order other than the default's; a string that
    is not a permutation of 'bqh' is an error naming it."""
    from sarformer_jax.benchmarks.msda import _grid_order_variants
    from sarformer_jax.kernels import BlockSizes

    bs = BlockSizes.get_default(32)
    got = _grid_order_variants(bs, "bqh,qhb,hqb")
    assert [name for name, _ in got] == ["pallas", "pallas[qhb]", "pallas[hqb]"]
    assert [v.grid_order for _, v in got] == ["bqh", "qhb", "hqb"]
    assert all(v.block_q == bs.block_q and v.num_warps == bs.num_warps for _, v in got)
    assert _grid_order_variants(bs, None) == [("pallas", bs)]
    with pytest.raises(ValueError, match="'qhx'"):
        _grid_order_variants(bs, "qhx")


def test_bench_config_variants():
    """`--configs FQ:FW:BQ:BW,...` adds one Pallas variant per launch setting that differs from
    the default (the default's own is not timed twice); a malformed entry is an error naming it."""
    from sarformer_jax.benchmarks.msda import _config_variants
    from sarformer_jax.kernels import BlockSizes

    bs = BlockSizes.get_default(32)
    own = f"{bs.block_q}:{bs.num_warps}:{bs.block_q_bwd}:{bs.num_warps_bwd}"
    got = _config_variants(bs, f"{own},64:8:32:8,32:4:8:2")
    assert [n for n, _ in got] == ["pallas[f64w8,b32w8]", "pallas[f32w4,b8w2]"]
    v = got[1][1]
    assert (v.block_q, v.num_warps, v.block_q_bwd, v.num_warps_bwd) == (32, 4, 8, 2)
    assert v.skips_bwd == bs.skips_bwd and v.value_grad == bs.value_grad
    assert _config_variants(bs, None) == []
    from sarformer_jax.benchmarks.msda import _tile_variants
    twins = _tile_variants([("pallas", bs)] + got[:1], True)
    assert [n for n, _ in twins] == ["pallas", "pallas-tile", "pallas[f64w8,b32w8]",
                                     "pallas[f64w8,b32w8]-tile"]
    assert [v.tile_point_grads for _, v in twins] == [True, False, True, False]
    assert _tile_variants(got, False) == got
    for bad in ("64:8:16", "64:8:16:x", "64:0:16:4"):
        with pytest.raises(ValueError, match=repr(bad)):
            _config_variants(bs, bad)


def test_bench_skip_outside_variants():
    """`--skip-outside both` follows each Pallas variant (the default: skipping in the backward
    only) with its twins skipping in neither kernel and in both, `on` / `off` keep only those
    twins, `default` the variants as they are."""
    from sarformer_jax.benchmarks.msda import _grid_order_variants, _skip_outside_variants
    from sarformer_jax.kernels import BlockSizes

    bs = BlockSizes.get_default(32)
    assert (bs.skip_outside, bs.skips_bwd) == (False, True)
    plain = _grid_order_variants(bs, "bqh,qhb")
    both = _skip_outside_variants(plain, "both")
    assert [n for n, _ in both] == ["pallas", "pallas-skip", "pallas+skip",
                                    "pallas[qhb]", "pallas[qhb]-skip", "pallas[qhb]+skip"]
    assert [(v.skip_outside, v.skips_bwd) for _, v in both[:3]] == [(False, True),
                                                                    (False, False), (True, True)]
    assert both[5][1].grid_order == "qhb" and both[2][1].block_q == bs.block_q
    assert [n for n, _ in _skip_outside_variants(plain, "on")] == ["pallas+skip",
                                                                  "pallas[qhb]+skip"]
    assert [n for n, _ in _skip_outside_variants(plain, "off")] == ["pallas-skip",
                                                                   "pallas[qhb]-skip"]
    # a twin equal to its variant is not timed twice
    on = dataclasses.replace(bs, skip_outside=True, skip_outside_bwd=None)
    assert [n for n, _ in _skip_outside_variants([("pallas", on)], "both")] == ["pallas",
                                                                              "pallas-skip"]
    assert _skip_outside_variants(plain, "default") == plain
    with pytest.raises(ValueError, match="'yes'"):
        _skip_outside_variants(plain, "yes")


def test_bench_value_grad_variants():
    """`--value-grad pull --pull-configs ...` follows each Pallas variant with its "pull" twin
    and that twin at the other (rows, chunks, stages); the default triple is not timed twice;
    an unknown method or a malformed triple is refused."""
    from sarformer_jax.benchmarks.msda import _value_grad_variants
    from sarformer_jax.kernels import BlockSizes

    bs = BlockSizes.get_default(32)
    assert bs.value_grad == "scatter"
    assert (bs.block_rows_pull, bs.chunks_pull, bs.num_stages_pull) == (32, 1, 1)
    got = _value_grad_variants([("pallas", bs), ("pallas-skip", bs)], "pull",
                               "16:1:1,32:1:1,32:4:2,32:1:1:16")
    assert [n for n, _ in got] == ["pallas", "pallas/pull", "pallas/pull[r16,c1,s1]",
                                   "pallas/pull[r32,c4,s2]", "pallas/pull[r32,c1,s1,e16]",
                                   "pallas-skip", "pallas-skip/pull",
                                   "pallas-skip/pull[r16,c1,s1]", "pallas-skip/pull[r32,c4,s2]",
                                   "pallas-skip/pull[r32,c1,s1,e16]"]
    assert [(v.value_grad, v.block_rows_pull, v.chunks_pull, v.num_stages_pull, v.pull_run_entries)
            for _, v in got[:5]] == [("scatter", 32, 1, 1, 0), ("pull", 32, 1, 1, 0),
                                     ("pull", 16, 1, 1, 0), ("pull", 32, 4, 2, 0),
                                     ("pull", 32, 1, 1, 16)]
    assert _value_grad_variants([("pallas", bs)], "scatter", None) == [("pallas", bs)]
    assert _value_grad_variants([("pallas", bs)], None, "16:1:1") == [("pallas", bs)]
    with pytest.raises(ValueError, match="--value-grad 'sorted': choose from scatter, pull"):
        _value_grad_variants([("pallas", bs)], "sorted", None)
    for bad in ("16:4", "1:1:1:1:1", "a:1:1"):
        with pytest.raises(ValueError, match=f"--pull-configs '{bad}': expected ROWS:CHUNKS"):
            _value_grad_variants([("pallas", bs)], "pull", bad)


@pytest.mark.parametrize("case", ["pixdec_enc", "adapter_inj", "adapter_ext"])
def test_bench_init_locations_sit_around_each_query(case):
    """`--locations init`: every query samples around its own pixel centre, (p + 1) pixels of
    each level along its head's direction (the jitter averages out over queries), so
    neighbouring queries share rows; "uniform" stays anchors.md's draw."""
    from sarformer_jax.benchmarks.msda import CASES, QUERY_GRIDS, make_inputs

    b, q, shapes, n, p, _ = CASES[case]
    _, _, loc, att = make_inputs(case, locations="init")
    assert loc.shape == (b, q, n, len(shapes), p, 2) and loc.dtype == np.float32
    h0, w0 = QUERY_GRIDS[case][0]
    first = np.asarray([0.5 / w0, 0.5 / h0])  # query 0: the top-left pixel of the first grid
    size = np.asarray([(w, h) for h, w in shapes], np.float64)
    px = (loc - first) * size[None, None, None, :, None, :]  # query 0's offsets in pixels
    # head 0 points along +x: its mean offset over queries is (p + 1, 0) pixels at every level
    refs = np.concatenate([np.stack(np.meshgrid((np.arange(w) + 0.5) / w, (np.arange(h) + 0.5) / h,
                                                indexing="xy"), -1).reshape(-1, 2)
                           for h, w in QUERY_GRIDS[case]])
    off = (loc - refs[None, :, None, None, None, :]) * size[None, None, None, :, None, :]
    got = off[:, :, 0].mean(axis=(0, 1))  # [L, P, 2]
    want = np.stack([np.arange(1, p + 1), np.zeros(p)], -1)
    np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), atol=0.05)
    jitter = off[:, :, 0] - want  # N(0, 0.5) pixels
    assert 0.48 < float(jitter.std()) < 0.52
    assert np.abs(px[:, 0]).max() < p + 4  # query 0 stays near its corner
    _, _, uni, _ = make_inputs(case)
    assert uni.min() >= -0.05 and uni.max() <= 1.05
    with pytest.raises(ValueError, match="--locations 'random': choose from uniform, init"):
        make_inputs(case, locations="random")


def test_bench_vjp_cotangent_in_the_output_dtype():
    """fwd+bwd in "vjp" mode is timed with a cotangent already in the output's dtype, as the
    torch peer's `randn_like(out)`: no cast of it inside the timed bf16 program (MSDA runs
    8-12 had one).  "loss" mode multiplies it with the float32 output, so it stays float32."""
    import jax
    import jax.numpy as jnp

    from sarformer_jax.benchmarks.msda import _jax_fns, cotangent

    assert cotangent((2, 3), "bfloat16", "vjp").dtype == jnp.bfloat16
    assert cotangent((2, 3), "float32", "vjp").dtype == jnp.float32
    assert cotangent((2, 3), "bfloat16", "loss").dtype == jnp.float32
    shapes = ((3, 4), (2, 2))
    b, q, n, d = 1, 5, 2, 16
    rng = np.random.default_rng(0)
    value = jnp.asarray(rng.standard_normal((b, 16, n, d)), jnp.bfloat16)
    loc = jnp.asarray(rng.uniform(0, 1, (b, q, n, 2, 2, 2)), jnp.bfloat16)
    att = jnp.asarray(rng.uniform(0, 1, (b, q, n, 2, 2)), jnp.bfloat16)
    # the kernels (interpreted): the XLA reference computes in float32, so its own backward
    # casts any cotangent
    _, fwd_bwd = _jax_fns("pallas_interpret", shapes, None, "vjp")

    def casts_of_ct(ct):
        jaxpr = jax.make_jaxpr(fwd_bwd)(value, loc, att, ct).jaxpr.eqns[0].params["jaxpr"].jaxpr
        ct_var = jaxpr.invars[3]
        return [e for e in jaxpr.eqns
                if e.primitive.name == "convert_element_type" and ct_var in e.invars]

    assert casts_of_ct(cotangent((b, q, n * d), "bfloat16", "vjp")) == []
    assert len(casts_of_ct(cotangent((b, q, n * d), "bfloat16", "loss"))) == 1  # the old way
