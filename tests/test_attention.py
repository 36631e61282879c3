"""Attention through `models.layers.attention`: the padding that lets cuDNN's fused attention
take any shape gives the same attention (checked here with the XLA implementation on the padded
operands), and SAM's decomposed relative positions as extra channels of one fused attention call
equal the explicit softmax.  The cuDNN path itself is checked on the GPU in
tests/test_attention_gpu.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sarformer_jax.models.layers import attention, init_rngs, pad_for_cudnn, resolve_attention


def _padded_xla(q, k, v, bias):
    t, d, dv = q.shape[1], q.shape[-1], v.shape[-1]
    qp, kp, vp, bp = pad_for_cudnn(q, k, v, bias)
    out = jax.nn.dot_product_attention(qp, kp, vp, bias=bp, scale=d ** -0.5)
    return out[:, :t, :, :dv]


@pytest.mark.parametrize("t,s,d,dv,bias_shape", [
    (7, 7, 12, 12, (1, 3, 7, 7)),      # odd lengths (BEiT: 1 + h*w), head dim not a multiple of 8
    (9, 5, 16, 6, (2, 3, 9, 5)),       # q != kv length, v narrower than q
    (6, 8, 8, 8, None),                # no bias: no length padding
    (5, 5, 8, 8, (3, 5, 5)),           # bias without the batch axis
])
def test_cudnn_padding_is_the_same_attention(t, s, d, dv, bias_shape):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, t, 3, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, s, 3, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, s, 3, dv)), jnp.float32)
    bias = None if bias_shape is None else jnp.asarray(rng.normal(size=bias_shape), jnp.float32)
    qp, kp, vp, bp = pad_for_cudnn(q, k, v, bias)
    assert qp.shape[-1] == kp.shape[-1] == vp.shape[-1] and qp.shape[-1] % 8 == 0
    if bias is not None:
        assert qp.shape[1] % 2 == 0 and kp.shape[1] % 2 == 0 and bp.ndim == 4
    ref = jax.nn.dot_product_attention(q, k, jnp.pad(v, ((0, 0),) * 3 + ((0, d - dv),))
                                       if dv < d else v, bias=bias)[..., :dv] if dv != d else \
        jax.nn.dot_product_attention(q, k, v, bias=bias)
    np.testing.assert_allclose(_padded_xla(q, k, v, bias), ref, rtol=1e-5, atol=1e-6)
    if bias is None:
        return

    # gradients, the bias's included (BEiT trains its relative position table through it)
    def loss(fn):
        return lambda q, k, v, b: jnp.sum(jnp.sin(fn(q, k, v, b)))

    def direct(q, k, v, b):
        vv = jnp.pad(v, ((0, 0),) * 3 + ((0, d - dv),)) if dv < d else v
        return jax.nn.dot_product_attention(q, k, vv, bias=b)[..., :dv]

    g_ref = jax.grad(loss(direct), argnums=(0, 1, 2, 3))(q, k, v, bias)
    g_pad = jax.grad(loss(_padded_xla), argnums=(0, 1, 2, 3))(q, k, v, bias)
    for a, b in zip(g_pad, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_attention_default_and_xla_agree():
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 5, 2, 8)), jnp.float32) for _ in range(3))
    np.testing.assert_allclose(attention(q, k, v, implementation="xla"),
                               attention(q, k, v, implementation=None), rtol=1e-6)


def test_resolve_attention():
    assert resolve_attention("cudnn", jnp.float32) == "cudnn"
    assert resolve_attention("xla", jnp.bfloat16) == "xla"
    on_gpu = jax.default_backend() == "gpu"
    assert resolve_attention(None, jnp.bfloat16) == ("cudnn" if on_gpu else "xla")
    assert resolve_attention("auto", jnp.float32) == "xla"  # cuDNN's fused attention: bf16/fp16
    with pytest.raises(ValueError, match="flash"):
        resolve_attention("flash", jnp.float32)


@pytest.mark.parametrize("hw,d,n", [((14, 14), 32, 2), ((8, 6), 16, 3)])
def test_sam_relative_positions_as_channels(hw, d, n):
    """SAM's attention with decomposed relative positions, as one fused attention call over
    queries [scale q, rel_h, rel_w] and keys [k, onehot(row), onehot(col)], equals the explicit
    einsum + softmax (and the relative positions do matter in this case)."""
    from sarformer_jax.sam.image_encoder import Attention

    a = Attention(n * d, num_heads=n, input_size=hw, rngs=init_rngs(0))
    a.rel_pos_h[...] = jax.random.normal(jax.random.key(1), a.rel_pos_h[...].shape)
    a.rel_pos_w[...] = jax.random.normal(jax.random.key(2), a.rel_pos_w[...].shape)
    x = jax.random.normal(jax.random.key(3), (2, *hw, n * d))
    ref = a(x)  # CPU: the explicit path
    qkv = a.qkv(x).reshape(2, *hw, 3, n, d)
    fused = a._fused(qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :], implementation="xla")
    out = a.proj(fused.reshape(2, *hw, n * d))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    a.rel_pos_h[...] = jnp.zeros_like(a.rel_pos_h[...])
    assert float(jnp.max(jnp.abs(a(x) - ref))) > 1e-3


def test_xla_attention_takes_a_narrower_v():
    rng = np.random.default_rng(2)
    q, k = (jnp.asarray(rng.normal(size=(1, 6, 2, 16)), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.normal(size=(1, 6, 2, 5)), jnp.float32)
    out = attention(q, k, v, implementation="xla")
    assert out.shape == (1, 6, 2, 5)
    logits = jnp.einsum("btnd,bsnd->bnts", q, k) / 4.0
    ref = jnp.einsum("bnts,bsnd->btnd", jax.nn.softmax(logits, -1), v)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_gelu_matches_torch_in_float32_and_bfloat16():
    """`layers.gelu` is PyTorch's exact GELU (erf form, float32 inside): ≤ 1e-6 in float32; in
    bf16 it rounds like torch's bf16 GELU (which also computes in float32), unlike
    `jax.nn.gelu(approximate=False)` in bf16 (~1e-3 off: it runs erfc in bf16).  Gradient too."""
    import torch

    from conftest import rel_err
    from sarformer_jax.models.layers import gelu

    x = (np.random.default_rng(0).normal(size=(4096,)) * 3).astype(np.float32)
    t = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
    assert rel_err(np.asarray(gelu(jnp.asarray(x))), t) <= 1e-6
    tb = torch.nn.functional.gelu(torch.from_numpy(x).bfloat16()).float().numpy()
    got = np.asarray(gelu(jnp.asarray(x, jnp.bfloat16))).astype(np.float32)
    assert got.dtype == np.float32 and rel_err(got, tb) <= 1e-5
    xt = torch.from_numpy(x).requires_grad_()
    torch.nn.functional.gelu(xt).sum().backward()
    g = jax.grad(lambda v: jnp.sum(gelu(v)))(jnp.asarray(x))
    assert rel_err(np.asarray(g), xt.grad.numpy()) <= 1e-6
