"""BEiT attention per batch shard (data-parallel training): the same outputs and gradients as
the plain attention, and under a batch-sharded jit the dense [n, t, t] relative-position-bias
gradient no longer crosses devices (only the [rows, n] table gradients are summed)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import rel_err
from sarformer_jax.models.beit import BEiTAttention, set_attention_per_batch_shard
from sarformer_jax.models.layers import init_rngs

GRID = (6, 5)
N_HEADS = 4


def _mesh(n: int):
    return jax.sharding.Mesh(np.asarray(jax.devices()[:n]).reshape(n, 1), ("data", "fsdp"))


def _attn(per_shard: bool, n_devices: int = 4) -> BEiTAttention:
    m = BEiTAttention(32, N_HEADS, GRID, implementation="xla", rngs=init_rngs(0))
    table = m.relative_position_bias_table[...]
    m.relative_position_bias_table[...] = jax.random.normal(jax.random.key(1), table.shape)
    if per_shard:
        assert set_attention_per_batch_shard(m, _mesh(n_devices), ("data", "fsdp")) == 1
    return m


def _loss_and_grads(m: BEiTAttention, x, ct):
    graphdef, params = nnx.split(m)

    def loss(params, x):
        out = nnx.merge(graphdef, params)(x, GRID)
        return jnp.sum(out * ct)

    return jax.value_and_grad(loss, argnums=(0, 1))(params, x)


def _inputs(b: int):
    rng = np.random.default_rng(0)
    t = 1 + GRID[0] * GRID[1]
    x = jnp.asarray(rng.standard_normal((b, t, 32)), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((b, t, 32)), jnp.float32)
    return x, ct


def test_per_shard_attention_equals_the_plain_attention_values_and_gradients():
    x, ct = _inputs(4)
    (l0, (g0, gx0)) = _loss_and_grads(_attn(False), x, ct)
    (l1, (g1, gx1)) = _loss_and_grads(_attn(True), x, ct)
    assert abs(float(l0) - float(l1)) <= 1e-5 * abs(float(l0))
    assert rel_err(gx1, gx0) <= 1e-6
    t0 = g0["relative_position_bias_table"][...]
    t1 = g1["relative_position_bias_table"][...]
    assert float(jnp.max(jnp.abs(t0))) > 0
    assert rel_err(t1, t0) <= 1e-6
    for k in ("qkv", "proj"):
        assert rel_err(g1[k]["kernel"][...], g0[k]["kernel"][...]) <= 1e-6


def _all_reduce_sizes(hlo: str) -> list[int]:
    """Element counts of every array an all-reduce reduces (each member of a combined tuple
    on its own) in a compiled module."""
    sizes = []
    for line in hlo.splitlines():
        m = re.search(r"=\s*(.*?)\s+all-reduce(?:-start)?\(", line)
        if not m:
            continue
        for dims in re.findall(r"\w+\[([\d,]*)\]", m.group(1)):
            sizes.append(int(np.prod([int(d) for d in dims.split(",") if d] or [1])))
    return sizes


@pytest.mark.parametrize("per_shard", [False, True])
def test_sharded_step_sums_table_gradients_not_dense_bias_gradients(per_shard):
    mesh = _mesh(4)
    x, ct = _inputs(8)
    m = _attn(per_shard)
    graphdef, params = nnx.split(m)
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    rep = NamedSharding(mesh, P())
    x_s, ct_s = jax.device_put(x, batch), jax.device_put(ct, batch)
    params = jax.device_put(params, rep)

    def grads(params, x, ct):
        def loss(params):
            return jnp.sum(nnx.merge(graphdef, params)(x, GRID) * ct)
        return jax.grad(loss)(params)

    f = jax.jit(grads, out_shardings=rep)
    g = f(params, x_s, ct_s)
    t = 1 + GRID[0] * GRID[1]
    dense = N_HEADS * t * t
    biggest = max(_all_reduce_sizes(f.lower(params, x_s, ct_s).compile().as_text()))
    if per_shard:
        assert biggest < dense, biggest
        # and the sharded gradients are the single-device ones
        (_, (g_ref, _)) = _loss_and_grads(_attn(False), x, ct)
        assert rel_err(g["relative_position_bias_table"][...],
                       g_ref["relative_position_bias_table"][...]) <= 1e-6
    else:
        # the shared bias: its dense gradient is what the devices sum (what the option removes)
        assert biggest >= dense, biggest


def test_a_batch_the_mesh_does_not_divide_runs_as_one_program():
    x, ct = _inputs(3)  # 3 examples, 4 shards (evaluation windows, say)
    (l0, (g0, _)) = _loss_and_grads(_attn(False), x, ct)
    (l1, (g1, _)) = _loss_and_grads(_attn(True), x, ct)
    assert abs(float(l0) - float(l1)) <= 1e-5 * abs(float(l0))
    assert rel_err(g1["relative_position_bias_table"][...],
                   g0["relative_position_bias_table"][...]) <= 1e-6


def test_config_resolution_auto_follows_the_batch_split_and_bad_values_are_named():
    from sarformer_jax.config import load_config
    from sarformer_jax.train import resolve_attention_per_batch_shard

    cfg = load_config("tiny")
    assert cfg.model.backbone.attention_per_batch_shard == "auto"
    assert resolve_attention_per_batch_shard(cfg, _mesh(4)) is True
    assert resolve_attention_per_batch_shard(cfg, _mesh(1)) is False
    cfg.model.backbone.attention_per_batch_shard = True
    assert resolve_attention_per_batch_shard(cfg, _mesh(1)) is True
    cfg.model.backbone.attention_per_batch_shard = "yes"
    with pytest.raises(ValueError, match="attention_per_batch_shard"):
        resolve_attention_per_batch_shard(cfg, _mesh(4))
