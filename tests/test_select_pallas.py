"""The k-smallest selection kernel (kernels/select_pallas.py) in the Pallas interpreter against
`lax.top_k` (the set it picks, ties to the lower index) and numpy's stable argsort (the full
partition), its Triton lowering for a GPU, and the loss with it against the loss with top_k."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from sarformer_jax.kernels.select_pallas import _passes, smallest_k_pallas
from sarformer_jax.losses import smallest_k


def _values(rng, shape):
    """Normal values with the awkward cases in every row: runs of exact ties, -0.0 beside +0.0,
    infinities, tiny and huge magnitudes."""
    x = rng.standard_normal(shape).astype(np.float32)
    x[..., ::7] = np.round(x[..., ::7])  # many ties at -1, 0, 1, ...
    x[..., 3] = -0.0
    x[..., 4] = 0.0
    x[..., 5] = np.inf
    x[..., 6] = -np.inf
    x[..., 8] = 1e-38
    x[..., 10] = -3e38
    return x


def _partition(x, k):
    """numpy's stable partition: the k smallest (ties to the lower index) in index order, then
    the rest in index order."""
    order = np.argsort(np.where(x == 0, 0, x), axis=-1, kind="stable")
    chosen = np.zeros(x.shape, bool)
    np.put_along_axis(chosen, order[..., :k], True, axis=-1)
    idx = np.broadcast_to(np.arange(x.shape[-1]), x.shape)
    first = np.sort(np.where(chosen, idx, x.shape[-1] + idx), axis=-1)[..., :k]
    rest = np.sort(np.where(chosen, x.shape[-1] + idx, idx), axis=-1)[..., : x.shape[-1] - k]
    return np.concatenate([first, rest], axis=-1)


@pytest.mark.parametrize("radix_bits", [1, 2, 3, 5])
@pytest.mark.parametrize("shape,k,chunk", [((3, 100), 30, 16), ((2, 2, 301), 200, 64),
                                           ((1, 37), 37, 16), ((4, 50), 1, 16)])
def test_interpreter_matches_top_k_and_numpy(shape, k, chunk, radix_bits):
    x = _values(np.random.default_rng(k), shape)
    got = np.asarray(smallest_k_pallas(jnp.asarray(x), k, chunk=chunk, radix_bits=radix_bits,
                                       interpret=True))
    top = np.sort(np.asarray(jax.lax.top_k(-jnp.asarray(x), k)[1]), axis=-1)
    np.testing.assert_array_equal(got, top)
    # every position of the partition written (the output starts from -1), in numpy's order
    full = np.asarray(smallest_k_pallas(jnp.asarray(x), k, chunk=chunk, radix_bits=radix_bits,
                                        interpret=True, poison=True))
    np.testing.assert_array_equal(full, _partition(x, k))


def test_all_equal_row_and_vmap():
    """A row of one value (every key a tie: the first k indices), and the kernel under vmap."""
    x = np.zeros((2, 3, 40), np.float32)
    x[1] = np.random.default_rng(1).uniform(size=(3, 40))
    f = jax.vmap(lambda r: smallest_k_pallas(r, 11, chunk=16, interpret=True))
    got = np.asarray(f(jnp.asarray(x)))
    np.testing.assert_array_equal(got[0], np.broadcast_to(np.arange(11), (3, 11)))
    np.testing.assert_array_equal(got[1], np.sort(np.argsort(x[1], -1)[..., :11], -1))


def test_passes_cover_the_32_bits():
    for bits in range(1, 6):
        covered = sorted(b for shift, w in _passes(bits) for b in range(shift, shift + w))
        assert covered == list(range(32))
    assert _passes(3)[0] == (29, 3) and _passes(3)[-1] == (0, 2)


def test_validation():
    x = jnp.zeros((2, 10))
    with pytest.raises(ValueError, match=r"k = 11 must be in \[1, 10\]"):
        smallest_k_pallas(x, 11, interpret=True)
    with pytest.raises(ValueError, match="chunk = 24"):
        smallest_k_pallas(x, 3, chunk=24, interpret=True)
    with pytest.raises(ValueError, match="radix_bits = 6"):
        smallest_k_pallas(x, 3, radix_bits=6, interpret=True)


def test_lowers_to_one_triton_call_for_the_step():
    """The loss's call (10 layers x 2 images x 32 slots of 37632 candidates, vmapped as in the
    step) lowers to one Triton custom call with a program per row, for CUDA on this CPU host."""
    f = jax.jit(jax.vmap(jax.vmap(lambda x: smallest_k(x, 9408, "pallas"))))
    sds = jax.ShapeDtypeStruct((10, 2, 32, 37632), jnp.float32)
    exported = export.export(f, platforms=["cuda"], disabled_checks=[
        export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(sds)
    text = exported.mlir_module()
    assert text.count("@__gpu$xla.gpu.triton") == 1 and 'name = "smallest_k"' in text
    assert "grid_x = 32" in text and "grid_y = 2" in text and "grid_z = 10" in text
    assert "stablehlo.sort" not in text


def test_smallest_k_methods_agree_as_sets():
    x = np.abs(np.random.default_rng(0).normal(size=(3, 4, 300))).astype(np.float32)
    x[..., 5] = x[..., 9]
    x[0, 0, :50] = 0.0
    a = np.sort(np.asarray(smallest_k(jnp.asarray(x), 100, "top_k")), -1)
    b = np.asarray(smallest_k(jnp.asarray(x), 100, "pallas_interpret"))
    np.testing.assert_array_equal(a, b)


def test_loss_with_the_kernel_equals_the_loss_with_top_k():
    """The whole deep-supervision loss and its gradients with point_select "pallas_interpret"
    against "top_k": the same points in another order, so equal up to the rounding of the
    sums over them."""
    from sarformer_jax.config import load_config
    from sarformer_jax.losses import loss_fn

    k, q, b, n = 5, 7, 2, 3
    rng = np.random.default_rng(0)
    preds = [{"cls": jnp.asarray(rng.normal(size=(b, q, k + 1)), jnp.float32),
              "mask": jnp.asarray(rng.normal(size=(b, q, 12, 10)), jnp.float32)} for _ in range(n)]
    gt = jnp.asarray(rng.integers(0, k, (b, 24, 20)).astype(np.int32))
    key = jax.random.key(3)
    out = {}
    for method in ("top_k", "pallas_interpret"):
        cfg = load_config("tiny", ["model.loss.num_points=64",
                                   f"model.loss.point_select={method}"]).model.loss
        f = lambda p, cfg=cfg: loss_fn(p, gt, None, key=key, cfg_loss=cfg, num_classes=k)  # noqa: E731
        out[method] = jax.jit(jax.value_and_grad(f, has_aux=True))(preds)
    (t_a, parts_a), g_a = out["top_k"]
    (t_b, parts_b), g_b = out["pallas_interpret"]
    np.testing.assert_allclose(float(t_b), float(t_a), rtol=1e-6)
    for name in parts_a:
        np.testing.assert_allclose(parts_b[name], parts_a[name], rtol=1e-6, err_msg=name)
    for a, want in zip(jax.tree_util.tree_leaves(g_b), jax.tree_util.tree_leaves(g_a)):
        np.testing.assert_allclose(a, want, rtol=1e-5, atol=1e-7)
    # a different point set would change the mask losses well beyond rounding
    cfg = load_config("tiny", ["model.loss.num_points=64"]).model.loss
    (t_c, _), _ = jax.jit(jax.value_and_grad(
        lambda p: loss_fn(p, gt, None, key=jax.random.key(4), cfg_loss=cfg, num_classes=k),
        has_aux=True))(preds)
    assert abs(float(t_c) - float(t_a)) > 1e-4


def test_auto_point_select_resolution(monkeypatch):
    """"auto" is the kernel where the Pallas GPU kernels run, else sort (batch split over
    devices) or top_k (one device); an explicit choice is kept."""
    import sarformer_jax.kernels.triton_backend as tb
    from sarformer_jax.losses import resolve_point_select

    assert resolve_point_select("auto", 1) == "top_k"
    assert resolve_point_select("auto", 8) == "sort"
    assert resolve_point_select("sort", 1) == "sort"
    monkeypatch.setattr(tb, "gpu_kernels", lambda: True)
    assert resolve_point_select("auto", 1) == "pallas"
    assert resolve_point_select("auto", 2) == "pallas"
    assert resolve_point_select("top_k", 1) == "top_k"
