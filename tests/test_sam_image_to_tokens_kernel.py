"""The fused image-token update of SAM's two-way transformer (kernels/sam_image_to_tokens.py) on
the CPU, in the Pallas interpreter: against an independent numpy evaluation of upstream's form
(image tokens + positional encoding projected to queries, prompt tokens to keys and values,
per-head softmax attention, output projection, residual, LayerNorm), with the kernel's
token-side matrices formed from the same weights in numpy; its shape checks and its Triton
lowering.  The decoder-level parity with segment-anything is in test_sam_vs_segment_anything.py
(attention "absorbed_pallas_interpret"); the GPU run is test_sam_image_to_tokens_gpu.py."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import RTOL, rel_err
from sarformer_jax.kernels.sam_image_to_tokens import default_block_l, image_to_tokens_norm


def _weights(rng, c, inner):
    w = lambda *s: (rng.normal(size=s) / math.sqrt(s[0])).astype(np.float32)
    b = lambda n: (0.1 * rng.normal(size=n)).astype(np.float32)
    return dict(wq=w(c, inner), bq=b(inner), wk=w(c, inner), bk=b(inner), wv=w(c, inner), bv=b(inner),
                wo=w(inner, c), bo=b(c), g=(1 + 0.1 * rng.normal(size=c)).astype(np.float32), be=b(c))


def _numpy_update(keys, pe, tokens_k, tokens_v, p, heads, eps):
    """Upstream's order of operations in float64; keys [bk, l, c] shared by b / bk prompts."""
    b = tokens_k.shape[0]
    out = []
    for i in range(b):
        x = keys[i // (b // keys.shape[0])]
        q = (x + pe) @ p["wq"] + p["bq"]
        k = tokens_k[i] @ p["wk"] + p["bk"]
        v = tokens_v[i] @ p["wv"] + p["bv"]
        d = q.shape[-1] // heads
        o = []
        for n in range(heads):
            s = slice(n * d, (n + 1) * d)
            lg = q[:, s] @ k[:, s].T / math.sqrt(d)
            a = np.exp(lg - lg.max(-1, keepdims=True))
            o.append((a / a.sum(-1, keepdims=True)) @ v[:, s])
        y = x + np.concatenate(o, -1) @ p["wo"] + p["bo"]
        mu = y.mean(-1, keepdims=True)
        var = ((y - mu) ** 2).mean(-1, keepdims=True)
        out.append((y - mu) / np.sqrt(var + eps) * p["g"] + p["be"])
    return np.stack(out)


def _kernel_inputs(tokens_k, tokens_v, p, heads):
    """The absorbed token-side matrices, in numpy: m [b,n,c,t], bias [b,n,t], u [b,n,t,c]."""
    b, t, c = tokens_k.shape
    inner = p["wq"].shape[1]
    d = inner // heads
    k = (tokens_k @ p["wk"] + p["bk"]).reshape(b, t, heads, d)
    v = (tokens_v @ p["wv"] + p["bv"]).reshape(b, t, heads, d)
    wq = p["wq"].reshape(c, heads, d)
    m = np.einsum("btnd,cnd->bnct", k, wq) / math.sqrt(d)
    bias = np.einsum("btnd,nd->bnt", k, p["bq"].reshape(heads, d)) / math.sqrt(d)
    u = np.einsum("btnd,ndc->bntc", v, p["wo"].reshape(heads, d, c))
    return m, bias, u


def _grouped(keys, m, bias, u, g):
    """[bk, ...] keys and [b, ...] token-side arrays as the kernel's [g, pk or p, ...]."""
    split = lambda a: a.reshape((g, a.shape[0] // g) + a.shape[1:])
    return split(keys), split(m), split(bias), split(u)


# merged heads padded to 16 tokens (the default pads them to 8: t=7 -> 8, 20 -> 24)
MERGED_16 = ("merged", {"token_pad": 16})


@pytest.mark.parametrize("layout,settings", [("loop", {}), ("merged", {}), MERGED_16])
@pytest.mark.parametrize("bk,b,g,l,t,block_l", [
    (2, 6, 2, 64, 7, None),  # tokens shared by 3 prompts per image (the first block); t padded to 8 or 16
    (4, 4, 1, 48, 5, 16),  # one map per prompt
    (4, 4, 2, 48, 5, 16),  # one map per prompt, 2 images
    (1, 3, 1, 32, 16, 32),  # no padding
    (1, 2, 1, 64, 20, 16),  # padded to 32
])
def test_kernel_matches_a_numpy_evaluation(bk, b, g, l, t, block_l, layout, settings):
    rng = np.random.default_rng(b * l + t)
    c, inner, heads, eps = 32, 16, 4, 1e-5
    p = _weights(rng, c, inner)
    keys = rng.normal(size=(bk, l, c)).astype(np.float32)
    pe = rng.normal(size=(l, c)).astype(np.float32)
    tk, tv = (rng.normal(size=(b, t, c)).astype(np.float32) for _ in range(2))
    ref = _numpy_update(*[a.astype(np.float64) for a in (keys, pe, tk, tv)],
                        {k: v.astype(np.float64) for k, v in p.items()}, heads, eps)
    gk, m, bias, u = _grouped(keys, *_kernel_inputs(tk, tv, p, heads), g)
    out = image_to_tokens_norm(*map(jnp.asarray, (gk, pe, m, bias, u, p["bo"], p["g"], p["be"])), eps=eps,
                               block_l=block_l, interpret=True, heads=layout, **settings)
    assert out.shape == (g, b // g, l, c)
    assert rel_err(np.asarray(out).reshape(b, l, c), ref) <= RTOL["float32"]


@pytest.mark.parametrize("layout,settings", [("loop", {}), ("merged", {}), MERGED_16])
def test_kernel_in_bfloat16_interpreted(layout, settings):
    rng = np.random.default_rng(3)
    c, inner, heads, b, l, t = 64, 32, 8, 2, 64, 7
    p = _weights(rng, c, inner)
    keys = rng.normal(size=(1, l, c)).astype(np.float32)
    pe = rng.normal(size=(l, c)).astype(np.float32)
    tk, tv = (rng.normal(size=(b, t, c)).astype(np.float32) for _ in range(2))
    ref = _numpy_update(keys, pe, tk, tv, p, heads, 1e-5)
    keys, m, bias, u = _grouped(keys, *_kernel_inputs(tk, tv, p, heads), 1)
    bf = lambda a: jnp.asarray(a, jnp.bfloat16)
    out = image_to_tokens_norm(bf(keys), bf(pe), bf(m), jnp.asarray(bias), bf(u), *map(jnp.asarray, (p["bo"], p["g"], p["be"])),
                               interpret=True, heads=layout, **settings)
    assert out.dtype == jnp.bfloat16
    assert rel_err(np.asarray(out.astype(jnp.float32))[0], ref) <= RTOL["bfloat16"]


def test_kernel_rejects_bad_shapes():
    z = lambda *s: jnp.zeros(s, jnp.float32)
    with pytest.raises(ValueError, match=r"keys \(1, 2, 16, 8\).*m \(1, 3, 2, 8, 7\).*pk 1 or p"):
        image_to_tokens_norm(z(1, 2, 16, 8), z(16, 8), z(1, 3, 2, 8, 7), z(1, 3, 2, 7), z(1, 3, 2, 7, 8), z(8), z(8),
                             z(8), interpret=True)
    with pytest.raises(ValueError, match=r"u \(1, 2, 2, 7, 4\)"):
        image_to_tokens_norm(z(1, 1, 16, 8), z(16, 8), z(1, 2, 2, 8, 7), z(1, 2, 2, 7), z(1, 2, 2, 7, 4), z(8), z(8),
                             z(8), interpret=True)
    ok = (z(1, 1, 16, 8), z(16, 8), z(1, 2, 2, 8, 7), z(1, 2, 2, 7), z(1, 2, 2, 7, 8), z(8), z(8), z(8))
    with pytest.raises(ValueError, match="block_l=32 must divide the 16 image tokens"):
        image_to_tokens_norm(*ok, block_l=32, interpret=True)
    with pytest.raises(ValueError, match="12 image tokens are not a multiple of 16"):
        default_block_l(12)
    with pytest.raises(ValueError, match="token_pad must be 16, or 8 with 'merged' heads.*heads='loop'"):
        image_to_tokens_norm(*ok, interpret=True, heads="loop", token_pad=8)
    with pytest.raises(ValueError, match="token_pad must be 16.*token_pad=4"):
        image_to_tokens_norm(*ok, interpret=True, token_pad=4)
    with pytest.raises(ValueError, match="float32 image tokens are not supported on the GPU"):
        image_to_tokens_norm(*ok)


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_kernel_runs_per_image_shard_without_gathering(axis_type):
    """Under a jit with the images sharded over 8 devices (conftest's fake CPU devices), the
    kernel runs on each device's images: the result equals the unsharded call and the compiled
    program holds no all-gather."""
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    assert len(jax.devices()) >= 8  # conftest's fake CPU devices
    mesh = jax.make_mesh((8,), ("data",), axis_types=(getattr(AxisType, axis_type),))
    rng = np.random.default_rng(4)
    c, inner, heads, g, p_, l, t = 16, 16, 2, 8, 2, 16, 3
    prm = _weights(rng, c, inner)
    keys = rng.normal(size=(g, 1, l, c)).astype(np.float32)
    pe = rng.normal(size=(l, c)).astype(np.float32)
    tk, tv = (rng.normal(size=(g * p_, t, c)).astype(np.float32) for _ in range(2))
    _, m, bias, u = _grouped(keys[:, 0], *_kernel_inputs(tk, tv, prm, heads), g)
    args = [jnp.asarray(a) for a in (keys, pe, m, bias, u, prm["bo"], prm["g"], prm["be"])]
    want = image_to_tokens_norm(*args, interpret=True)
    shard = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))
    sharded = [shard(a) for a in args[:1]] + args[1:2] + [shard(a) for a in args[2:5]] + args[5:]
    f = jax.jit(lambda *a: image_to_tokens_norm(*a, interpret=True))
    got = f(*sharded)
    hlo = f.lower(*sharded).compile().as_text()
    assert np.array_equal(np.asarray(got), np.asarray(want))
    assert "all-gather" not in hlo


@pytest.mark.parametrize("layout", ["loop", "merged"])
def test_kernel_lowers_to_triton_for_a_gpu(layout):
    """Lowering for CUDA on this CPU machine runs the Pallas Triton lowering of every primitive
    in the kernel; the GPU run is the gpu test."""
    s = jax.ShapeDtypeStruct
    b, l, c, n, t = 64, 4096, 256, 8, 7
    f32, dtype = jnp.float32, jnp.bfloat16
    args = [s((2, 1, l, c), dtype), s((l, c), dtype), s((2, b, n, c, t), dtype), s((2, b, n, t), f32),
            s((2, b, n, t, c), dtype), s((c,), f32), s((c,), f32), s((c,), f32)]
    lowered = jax.jit(lambda *a: image_to_tokens_norm(*a, heads=layout)).trace(*args).lower(
        lowering_platforms=("cuda",))
    assert "__gpu$xla.gpu.triton" in lowered.as_text()


def test_auto_picks_the_kernel_on_a_gpu_in_half_precision_only(monkeypatch):
    from flax import nnx

    from sarformer_jax.sam.transformer import TwoWayTransformer

    tr = TwoWayTransformer(depth=1, embedding_dim=32, num_heads=2, mlp_dim=16, rngs=nnx.Rngs(0))
    assert tr.attention_implementation == "auto"
    assert tr.resolved_implementation(jnp.bfloat16, 4096) == "absorbed"  # the CPU here
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert tr.resolved_implementation(jnp.bfloat16, 4096) == "absorbed_pallas"
    assert tr.resolved_implementation(jnp.float16, 4096) == "absorbed_pallas"
    assert tr.resolved_implementation(jnp.float32, 4096) == "absorbed"
    assert tr.resolved_implementation(jnp.bfloat16, 12) == "absorbed"  # not a multiple of 16 tokens
    tr.attention_implementation = "upstream"
    assert tr.resolved_implementation(jnp.bfloat16, 4096) == "upstream"


def test_kernel_under_vmap_folds_the_mapped_axis_into_the_images():
    rng = np.random.default_rng(6)
    c, inner, heads, v, g, p_, l, t = 16, 16, 2, 3, 2, 2, 16, 3
    prm = _weights(rng, c, inner)
    keys = rng.normal(size=(v, g, 1, l, c)).astype(np.float32)
    pe = rng.normal(size=(l, c)).astype(np.float32)
    tk, tv = (rng.normal(size=(v * g * p_, t, c)).astype(np.float32) for _ in range(2))
    _, m, bias, u = _grouped(keys.reshape(v * g, l, c), *_kernel_inputs(tk, tv, prm, heads), v * g)
    split = lambda a: jnp.asarray(a.reshape((v, g) + a.shape[1:]))
    shared = [jnp.asarray(a) for a in (pe, prm["bo"], prm["g"], prm["be"])]
    f = lambda k, m, b, u: image_to_tokens_norm(k, shared[0], m, b, u, *shared[1:], interpret=True)
    got = jax.jit(jax.vmap(f))(jnp.asarray(keys), split(m), split(bias), split(u))
    for i in range(v):
        want = f(jnp.asarray(keys[i]), split(m)[i], split(bias)[i], split(u)[i])
        np.testing.assert_allclose(np.asarray(got[i]), np.asarray(want), rtol=1e-6, atol=1e-6)
