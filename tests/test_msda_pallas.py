"""The Pallas kernels in interpret mode (CPU) against the XLA reference: values and all three
gradients, 1 and 3 levels, non-square maps, Lq not a multiple of the block, points outside
[0, 1], fp32 and bf16; vmap over an extra axis; a batch-sharded jit on 8 fake CPU devices."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from conftest import RTOL, rel_err
from sarformer_jax.kernels import BlockSizes, ms_deform_attn

BS = BlockSizes(block_q=16, num_warps=4, block_q_bwd=16)  # small blocks: masked tails


def inputs(seed, shapes, b=2, q=21, n=2, p=2, d=16):
    rng = np.random.default_rng(seed)
    s = sum(h * w for h, w in shapes)
    value = rng.standard_normal((b, s, n, d)).astype(np.float32)
    loc = rng.uniform(-0.3, 1.3, (b, q, n, len(shapes), p, 2)).astype(np.float32)
    att = rng.uniform(0, 1, (b, q, n, len(shapes), p)).astype(np.float32)
    ct = rng.standard_normal((b, q, n * d)).astype(np.float32)
    return value, loc, att, ct


def loss_fn(impl, shapes, ct, block_sizes=None):
    def loss(v, lo, a):
        out = ms_deform_attn(v, shapes, lo, a, implementation=impl, block_sizes=block_sizes)
        return jnp.sum(out.astype(jnp.float32) * ct), out
    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)


def assert_matches_reference(inputs_, shapes, dtype, block_sizes):
    """The interpreted kernels' output and three gradients, in `dtype`, against the XLA
    reference in fp32 on the same rounded inputs, within RTOL[dtype]; outputs and gradients
    come back in the inputs' dtype."""
    value, loc, att, ct = inputs_
    args = [jnp.asarray(x, dtype) for x in (value, loc, att)]
    (_, out), grads = jax.jit(loss_fn("pallas_interpret", shapes, ct, block_sizes))(*args)
    ref_args = [a.astype(jnp.float32) for a in args]  # same rounded inputs, fp32 oracle
    (_, ref), ref_grads = loss_fn("xla", shapes, ct)(*ref_args)
    assert out.dtype == jnp.dtype(dtype)
    tol = RTOL[dtype]
    assert rel_err(out.astype(jnp.float32), ref) <= tol
    for name, got, want, arg in zip(("value", "loc", "att"), grads, ref_grads, args):
        assert got.dtype == arg.dtype, name
        assert rel_err(got.astype(jnp.float32), want) <= tol, name


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shapes", [((5, 7),), ((6, 9), (3, 5), (2, 1))], ids=["L1", "L3"])
def test_kernel_matches_reference(shapes, dtype):
    assert_matches_reference(inputs(0, shapes), shapes, dtype, BS)


@pytest.mark.parametrize("order", ["qhb", "hbq"])
def test_grid_order_matches_reference(order):
    """Any launch order of (batch, query block, head) finds each program's own b, queries and h:
    batch and heads differ in value, so a swapped axis shows in the output and gradients."""
    shapes = ((6, 9), (3, 5))
    value, loc, att, ct = inputs(3, shapes, b=2, q=37, n=3)
    bs = dataclasses.replace(BS, grid_order=order)
    args = [jnp.asarray(x) for x in (value, loc, att)]
    (_, out), grads = jax.jit(loss_fn("pallas_interpret", shapes, ct, bs))(*args)
    (_, ref), ref_grads = loss_fn("xla", shapes, ct)(*args)
    assert rel_err(out, ref) <= RTOL["float32"]
    for name, got, want in zip(("value", "loc", "att"), grads, ref_grads):
        assert rel_err(got, want) <= RTOL["float32"], name


@pytest.mark.parametrize("skip", [(True, None), (False, True)], ids=["both", "bwd_only"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_skip_outside_matches_reference(dtype, skip):
    """`BlockSizes.skip_outside` / `skip_outside_bwd`: corners outside the map are neither read
    nor scattered (masked loads and atomics), in both kernels or (the default) in the backward
    only.  Locations spread to [-0.3, 1.3] put about half the corners outside;
    a mask that dropped an inside corner, or kept the value gradient's adds of an outside one
    on its clamped border row, shows in the output or the gradients.  Lq = 37 (masked tail)."""
    shapes = ((6, 9), (3, 5), (2, 1))
    bs = dataclasses.replace(BS, skip_outside=skip[0], skip_outside_bwd=skip[1])
    assert_matches_reference(inputs(5, shapes, b=2, q=37, n=3), shapes, dtype, bs)


@pytest.mark.parametrize("dtype,value_grad,grads", [("float32", "scatter", False),
                                                    ("bfloat16", "scatter", False),
                                                    ("float32", "scatter", True),
                                                    ("bfloat16", "pull", True)])
def test_tile_point_grads_matches_reference(dtype, value_grad, grads):
    """`BlockSizes.tile_point_grads` (the default, so the other tests here run it too): the
    backward gathers each program's location and weight gradients into two tiles and stores them
    once (off: three stores a point); also in the pull path's points kernel.  A point filed
    under another column (x for y, one point for the next) or a level's points left out show in
    the location or weight gradients.  Three levels of 2 points (12 location columns), Lq = 37
    (masked tail)."""
    shapes = ((6, 9), (3, 5), (2, 1))
    bs = dataclasses.replace(BS, tile_point_grads=grads, skip_outside_bwd=True,
                             value_grad=value_grad, block_rows_pull=8)
    assert_matches_reference(inputs(5, shapes, b=2, q=37, n=3), shapes, dtype, bs)


@pytest.mark.parametrize("skip", [(False, False), (False, True), (True, True)])
def test_triton_lowering_on_the_cpu(skip):
    """Both kernels lower to Triton for a CUDA target here, without a GPU (jax lowers for another
    platform): the masked gathers and atomics of `skip_outside`, which the interpreter cannot
    run, at least pass the Pallas Triton lowering.  (Compiling them needs the GPU tests.)"""
    shapes = ((6, 9), (3, 5))
    b, q, n, d = 2, 37, 2, 32
    sds = [jax.ShapeDtypeStruct(s, jnp.bfloat16)
           for s in ((b, 69, n, d), (b, q, n, 2, 2, 2), (b, q, n, 2, 2))]
    bs = dataclasses.replace(BS, skip_outside=skip[0], skip_outside_bwd=skip[1])

    def lowered(bs):
        def fwd_bwd(v, lo, a):
            out, pull = jax.vjp(lambda *x: ms_deform_attn(*x[:1], shapes, *x[1:],
                                                          implementation="pallas", block_sizes=bs),
                                v, lo, a)
            return out, pull(out)

        return jax.jit(fwd_bwd).trace(*sds).lower(lowering_platforms=("cuda",)).as_text()

    text = lowered(bs)
    assert text.count("xla.gpu.triton") == 2  # msda_fwd and msda_bwd
    # the point gradients as three stores a point (the default stores padded, masked tiles)
    assert lowered(dataclasses.replace(bs, tile_point_grads=False)).count("xla.gpu.triton") == 2
    # value_grad="pull": the points kernel, the sort of the points, the pull kernel
    for chunks, entries in ((1, 0), (4, 0), (1, 2)):
        text = lowered(dataclasses.replace(bs, value_grad="pull", chunks_pull=chunks,
                                           pull_run_entries=entries))
        assert text.count("xla.gpu.triton") == 3 and text.count("stablehlo.sort") == 1


PULL = BlockSizes(block_q=16, num_warps=4, block_q_bwd=16, value_grad="pull", block_rows_pull=8)


@pytest.mark.parametrize("skip,chunks,entries", [(False, 1, 0), (True, 1, 0), (True, 3, 0),
                                                  (True, 1, 2)],
                         ids=["gather_all", "skip_bwd", "3_chunks", "level_chunks"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shapes", [((5, 7),), ((6, 9), (3, 5), (2, 1)), ((1, 1), (4, 1))],
                         ids=["L1", "L3", "thin"])
def test_value_grad_pull_matches_reference(shapes, dtype, skip, chunks, entries):
    """`BlockSizes.value_grad="pull"`: the value gradient from the points sorted by their
    top-left cell, each row summing its four cells' runs.  Locations in [-0.3, 1.3] put points
    in the padded border cells (x0 or y0 = -1, or h-1 / w-1) and beyond the map (no cell);
    8 rows a program straddle the levels (S = 54 + 15 + 2) and leave a masked tail; Lq = 37.
    A point filed under a wrong cell, a wrong corner's weight, a lost run or a row written
    twice shows in the value gradient; the other two gradients come from the points kernel.
    With `chunks_pull` = 3 each run is split over three programs whose partial sums are added:
    an entry taken by two chunks, or by none, shows too.  With `pull_run_entries` = 2 the levels
    split their runs differently (L3: 1, 2 and 7 chunks; thin: 10 and 4; L1 not at all), and
    the blocks straddling two levels take the larger split."""
    bs = dataclasses.replace(PULL, skip_outside_bwd=skip, chunks_pull=chunks,
                             pull_run_entries=entries)
    if entries:
        from sarformer_jax.kernels.msda_pallas import pull_level_chunks
        assert pull_level_chunks(shapes, 37 * 2, bs) == {
            "L1": (1,), "L3": (1, 2, 7), "thin": (10, 4)}[
            {1: "L1", 3: "L3", 2: "thin"}[len(shapes)]]
    assert_matches_reference(inputs(5, shapes, b=2, q=37, n=3), shapes, dtype, bs)


def test_sorted_points_files_each_point_under_its_cell():
    """`_sorted_points` on hand-placed points of a 2 x 3 map (padded grid 3 x 4, 12 cells):
    the runs, the queries and the four corner coefficients."""
    from sarformer_jax.kernels.msda_pallas import _sorted_points

    shapes = ((2, 3),)
    # pixel coordinates (px, py) = (x*3 - 0.5, y*2 - 0.5)
    pix = [(0.25, 0.5), (-0.5, -0.75), (2.5, 1.0), (3.2, 0.0), (0.25, 0.5), (1.0, -1.5)]
    loc = jnp.asarray([((px + 0.5) / 3, (py + 0.5) / 2) for px, py in pix], jnp.float32)
    loc = loc.reshape(1, 6, 1, 1, 1, 2)
    att = jnp.asarray([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).reshape(1, 6, 1, 1, 1)
    starts, query, coef = _sorted_points(loc, att, shapes)
    # cells (y0+1)*4 + x0+1: q0 (0,0) -> 5; q1 (-1,-1) -> 0; q2 (1,2) -> 11; q3 x0 = 3 > w-1:
    # no cell; q4 as q0; q5 y0 = -2: no cell
    counts = np.diff(np.asarray(starts))
    want_counts = np.zeros(13, np.int64)
    want_counts[[5, 0, 11]] = [2, 1, 1]
    want_counts[12] = 2  # the two points with no cell, under the last key
    np.testing.assert_array_equal(counts, want_counts)
    q = np.asarray(query)
    # a stable sort: within a run (and among the points with no cell) queries stay in order
    assert q.tolist() == [1, 0, 4, 2, 3, 5]
    c = np.asarray(coef).T  # [N, 4]
    # q1: fx = 0.5, fy = 0.25 -> (1-fy)(1-fx), (1-fy)fx, fy(1-fx), fy fx, times a = 2
    np.testing.assert_allclose(c[0], 2.0 * np.array([0.375, 0.375, 0.125, 0.125]), rtol=1e-6)
    np.testing.assert_allclose(c[1], [0.375, 0.125, 0.375, 0.125], rtol=1e-6)  # q0: fx .25, fy .5
    np.testing.assert_allclose(c[2], 5.0 * c[1], rtol=1e-6)  # q4: the same place, a = 5
    np.testing.assert_allclose(c[3], 3.0 * np.array([0.5, 0.5, 0.0, 0.0]), rtol=1e-6)


@pytest.mark.parametrize("n,n_starts", [(1, 3), (60, 10), (2000, 45), (9, 400)])
def test_run_starts_equal_searchsorted(n, n_starts):
    """The runs' starts from sorted keys (first-entry scatter + reverse running minimum) equal
    numpy's searchsorted: keys with no entry (leading, inner, trailing) start where the next
    run does, the last start is the entry count."""
    from sarformer_jax.kernels.msda_pallas import _run_starts

    keys = np.sort(np.random.default_rng(n).integers(1, n_starts - 1, n)).astype(np.int32)
    got = np.asarray(jax.jit(_run_starts, static_argnums=1)(jnp.asarray(keys), n_starts))
    np.testing.assert_array_equal(got, np.searchsorted(keys, np.arange(n_starts), "left"))


def test_value_grad_pull_vmap_and_batch_sharded():
    """The sort and the pull kernel run per batch shard (8 fake devices: the kernels see batch
    1, no all-gather) and under vmap (the vmapped axis folded into the batch)."""
    shapes = ((4, 5), (2, 3))
    value, loc, att, ct = inputs(2, shapes, b=8, q=9)
    mesh = jax.make_mesh((8,), ("data",))
    sharded = [jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
               for x in (value, loc, att)]
    step = jax.jit(loss_fn("pallas_interpret", shapes, ct, PULL))
    hlo = step.lower(*sharded).compile().as_text()
    assert "all-gather" not in hlo and "f32[1,26,2,16]" in hlo
    (_, out), grads = step(*sharded)
    (_, ref), ref_grads = loss_fn("xla", shapes, ct)(value, loc, att)
    assert rel_err(out, ref) <= RTOL["float32"]
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) <= RTOL["float32"]
    vs, ls = jnp.stack([value[:1], -value[:1]]), jnp.stack([loc[:1], 1 - loc[:1]])
    f = lambda impl: jax.vmap(loss_fn(impl, shapes, ct[:1], PULL), in_axes=(0, 0, None))  # noqa: E731
    (_, out), grads = jax.jit(f("pallas_interpret"))(vs, ls, att[:1])
    (_, ref), ref_grads = f("xla")(vs, ls, att[:1])
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) <= RTOL["float32"]


def test_value_grad_from_the_environment(monkeypatch):
    """`SARFORMER_MSDA_VALUE_GRAD` picks the default's value-gradient method (and the pull
    kernel's rows, chunks and stages); a malformed value is refused, naming the variable."""
    monkeypatch.delenv("SARFORMER_MSDA_VALUE_GRAD", raising=False)
    assert BlockSizes.get_default(32).value_grad == "scatter"
    monkeypatch.setenv("SARFORMER_MSDA_VALUE_GRAD", "pull")
    bs = BlockSizes.get_default(32)
    assert (bs.value_grad, bs.block_rows_pull, bs.chunks_pull, bs.block_q_bwd) == ("pull", 32, 1, 16)
    monkeypatch.setenv("SARFORMER_MSDA_VALUE_GRAD", "pull:16:4:2")
    bs = BlockSizes.get_default(32)
    assert (bs.block_rows_pull, bs.chunks_pull, bs.num_stages_pull) == (16, 4, 2)
    assert bs.pull_run_entries == 0
    monkeypatch.setenv("SARFORMER_MSDA_VALUE_GRAD", "pull:32:1:1:16")
    bs = BlockSizes.get_default(32)
    assert (bs.block_rows_pull, bs.chunks_pull, bs.pull_run_entries) == (32, 1, 16)
    for bad in ("push", "pull:16:4", "pull:a:1:1", "pull:1:1:1:1:1"):
        monkeypatch.setenv("SARFORMER_MSDA_VALUE_GRAD", bad)
        with pytest.raises(ValueError, match=f"SARFORMER_MSDA_VALUE_GRAD='{bad}'"):
            BlockSizes.get_default(32)


def test_tile_point_grads_from_the_environment(monkeypatch):
    """`SARFORMER_MSDA_TILE_POINT_GRADS=0` turns the default's tiled point gradients off for a
    whole program; unset or "1" keeps them; anything else is refused, naming the variable."""
    monkeypatch.delenv("SARFORMER_MSDA_TILE_POINT_GRADS", raising=False)
    assert BlockSizes.get_default(32).tile_point_grads
    monkeypatch.setenv("SARFORMER_MSDA_TILE_POINT_GRADS", "0")
    assert not BlockSizes.get_default(32).tile_point_grads
    monkeypatch.setenv("SARFORMER_MSDA_TILE_POINT_GRADS", "1")
    assert BlockSizes.get_default(32).tile_point_grads
    monkeypatch.setenv("SARFORMER_MSDA_TILE_POINT_GRADS", "no")
    with pytest.raises(ValueError, match="SARFORMER_MSDA_TILE_POINT_GRADS='no'"):
        BlockSizes.get_default(32)


def test_value_grad_method_is_checked():
    with pytest.raises(ValueError, match="value_grad must be one of .*'push'"):
        BlockSizes(block_q=16, num_warps=4, value_grad="push")
    with pytest.raises(ValueError, match="chunks_pull and block_rows_pull must be >= 1, got 0"):
        BlockSizes(block_q=16, num_warps=4, value_grad="pull", chunks_pull=0)
    with pytest.raises(ValueError, match="pull_run_entries must be >= 0, got -1"):
        BlockSizes(block_q=16, num_warps=4, value_grad="pull", pull_run_entries=-1)


def test_pull_level_chunks():
    """Each level's split from its mean run: pixdec_enc (Lq 8400, P 4) has ~5, ~20 and ~76
    points a padded cell from the finest level up; `chunks_pull` applies to all levels when
    `pull_run_entries` is 0."""
    from sarformer_jax.kernels.msda_pallas import pull_level_chunks

    shapes = ((80, 80), (40, 40), (20, 20))
    bs = dataclasses.replace(PULL, pull_run_entries=16)
    assert pull_level_chunks(shapes, 8400 * 4, bs) == (1, 2, 5)
    assert pull_level_chunks(shapes, 8400 * 4, dataclasses.replace(bs, pull_run_entries=8)) == (
        1, 3, 10)
    assert pull_level_chunks(shapes, 8400 * 4, dataclasses.replace(
        bs, pull_run_entries=0, chunks_pull=3)) == (3, 3, 3)


def test_grid_order_rejects_unknown_axes():
    with pytest.raises(ValueError, match="grid_order.*'bqq'"):
        BlockSizes(block_q=16, num_warps=4, grid_order="bqq")


def test_pixel_centres_and_borders_exact():
    """Hand-placed points: centres, the map's edge, fully outside; Lq = 5 < block."""
    shapes = ((2, 3),)
    fmap = np.arange(1.0, 7.0, dtype=np.float32).reshape(2, 3)
    value = jnp.asarray(fmap).reshape(1, 6, 1, 1) * jnp.ones((1, 1, 1, 16))
    pts = [(0.5 / 3, 0.25), (2.5 / 3, 0.75), (0.0, 0.0), (1.0, 0.25), (1.5, 0.5)]
    want = [1.0, 6.0, 0.25, 1.5, 0.0]
    loc = jnp.asarray(pts, jnp.float32).reshape(1, 5, 1, 1, 1, 2)
    att = jnp.ones((1, 5, 1, 1, 1), jnp.float32)
    out = ms_deform_attn(value, shapes, loc, att, implementation="pallas_interpret",
                         block_sizes=BS)
    np.testing.assert_allclose(np.asarray(out)[0, :, 0], want, rtol=1e-6, atol=1e-6)


def test_vmap_extra_axis():
    shapes = ((4, 5), (2, 3))
    value, loc, att, ct = inputs(1, shapes, b=1, q=9)
    vs = jnp.stack([value, 2 * value, -value])
    ls = jnp.stack([loc, loc[:, ::-1], 1 - loc])
    f = lambda impl: jax.vmap(loss_fn(impl, shapes, ct, BS), in_axes=(0, 0, None))  # noqa: E731
    (_, out), grads = jax.jit(f("pallas_interpret"))(vs, ls, att)
    (_, ref), ref_grads = f("xla")(vs, ls, att)
    assert rel_err(out, ref) <= RTOL["float32"]
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape
        assert rel_err(got, want) <= RTOL["float32"]


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_batch_sharded_jit_keeps_batch_local(axis_type):
    """8 fake devices, batch-sharded inputs: same result, no all-gather of the value, and the
    kernel runs on the per-device shape (batch 1)."""
    shapes = ((4, 5), (2, 3))
    value, loc, att, ct = inputs(2, shapes, b=8, q=9)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    sharded = [jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
               for x in (value, loc, att)]
    step = jax.jit(loss_fn("pallas_interpret", shapes, ct, BS))
    hlo = step.lower(*sharded).compile().as_text()
    assert "all-gather" not in hlo
    assert "f32[1,26,2,16]" in hlo  # the value shard the kernel sees
    (val, out), grads = step(*sharded)
    (ref_val, ref), ref_grads = loss_fn("xla", shapes, ct)(value, loc, att)
    assert rel_err(out, ref) <= RTOL["float32"]
    assert abs(float(val) - float(ref_val)) <= 1e-4 * abs(float(ref_val))
    for got, want in zip(grads, ref_grads):
        assert got.sharding.spec[0] == "data"
        assert rel_err(got, want) <= RTOL["float32"]


def test_default_block_sizes_heuristic():
    for d in (16, 32, 64, 128):
        bs = BlockSizes.get_default(d)
        assert bs.block_q * d <= 2048 and bs.block_q >= 16
        assert bs.block_q & (bs.block_q - 1) == 0
    assert BlockSizes.get_default(32, num_queries=5).block_q == 16
    # the backward's tile is about a quarter of the forward's (measured: MSDA runs 3, 5, 7)
    assert [BlockSizes.get_default(d).block_q_bwd for d in (16, 32, 64, 128)] == [32, 16, 16, 16]
    # corners outside the map are skipped in the backward, not in the forward (MSDA run 13)
    bs = BlockSizes.get_default(32)
    assert (bs.skip_outside, bs.skip_outside_bwd, bs.skips_bwd) == (False, True, True)
    assert not BS.skips_bwd and BlockSizes(16, 4, skip_outside=True).skips_bwd
    assert BlockSizes.get_default(32, num_queries=5).block_q_bwd == 16
    # the backward stores a program's point gradients as one tile (MSDA run 17)
    assert bs.tile_point_grads


def test_batch_sharded_kernel_inside_scan():
    """The pixel decoder runs its layers as a lax.scan: the kernel's custom partitioning still
    keeps the batch local inside the loop, forward and backward."""
    shapes = ((4, 5), (2, 3))
    value, loc, att, _ = inputs(2, shapes, b=8, q=26)  # q = S: the output feeds the next layer
    mesh = jax.make_mesh((8,), ("data",))

    def grad_fn(impl):
        def loss(v, lo, a):
            def body(c, w):
                out = ms_deform_attn(c * w, shapes, lo, a, implementation=impl,
                                     block_sizes=BS if impl != "xla" else None)
                return out.reshape(c.shape), None

            c, _ = jax.lax.scan(body, v, jnp.asarray([1.0, 0.5]))
            return jnp.sum(c)

        return jax.value_and_grad(loss, argnums=(0, 1, 2))

    sharded = [jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
               for x in (value, loc, att)]
    step = jax.jit(grad_fn("pallas_interpret"))
    hlo = step.lower(*sharded).compile().as_text()
    assert "all-gather" not in hlo
    assert "f32[1,26,2,16]" in hlo
    val, grads = step(*sharded)
    ref_val, ref_grads = grad_fn("xla")(value, loc, att)
    assert abs(float(val) - float(ref_val)) <= 1e-5 * abs(float(ref_val))
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) <= RTOL["float32"]


def test_roofline_scatter_probe_does_the_backwards_atomics():
    """The bench's `scatter` probe (benchmarks/msda_roofline.py) must add exactly what the
    backward adds to d value, or its timing says nothing about the backward."""
    from sarformer_jax.benchmarks import msda_roofline as rl

    shapes = ((6, 9), (3, 5), (2, 1))
    value, loc, att, ct = inputs(3, shapes)
    g = ct.reshape(2, 21, 2, 16)
    got = rl.probe_fn("scatter", shapes, 16, 4, interpret=True)(
        jnp.asarray(loc), jnp.asarray(att), jnp.asarray(g))
    (_, _), (want, _, _) = loss_fn("xla", shapes, ct)(*map(jnp.asarray, (value, loc, att)))
    assert got.shape == value.shape
    assert rel_err(got, want) <= RTOL["float32"]
    with pytest.raises(ValueError, match="unknown roofline probe 'gather'"):
        rl.probe_fn("gather", shapes, 16, 4)
