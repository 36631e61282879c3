"""BEiT parity against timm's `Beit` (random weights saved as a real unilm-layout .pth, converted
with `convert.beit`), fp32 on the CPU, depth reduced to 2.

* 224 px: the file's 14x14 tables are used as they are; tokens after every layer agree.
* 640 px: the converter resizes the tables to 40x40; they equal an independent re-derivation of
  CHECKPOINTS.md §2.4 (own bisection, SciPy `CubicSpline` not-a-knot applied per axis, not
  FITPACK), and timm built at 640 with those tables gives the same tokens as ours.
* 512x1024 with the 40x40 tables: our run-time derivation (centre crop of the rows, geometric
  spline of the columns) loaded into timm built at 512x1024 gives the same tokens.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import RTOL, rel_err
from sarformer_jax.configs.common import beit_adapter_b
from sarformer_jax.convert.beit import convert_beit
from sarformer_jax.convert.common import update_module
from sarformer_jax.models.beit import BEiT, derive_table

timm_beit = pytest.importorskip("timm.models.beit")

DEPTH, HEADS, DIM = 2, 12, 768


def timm_model(img_size) -> "torch.nn.Module":
    return timm_beit.Beit(img_size=img_size, patch_size=16, embed_dim=DIM, depth=DEPTH,
                          num_heads=HEADS, use_abs_pos_emb=False, use_rel_pos_bias=True,
                          init_values=0.1, num_classes=0).eval()


@pytest.fixture(scope="module")
def unilm_file(tmp_path_factory):
    """A random-weight timm BEiT at 224, saved like unilm's ft22k files ({'model': ...}, with the
    per-block relative_position_index buffers and a classifier head)."""
    torch.manual_seed(0)
    model = timm_model(224)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                p.copy_(torch.randn_like(p))
            elif "gamma" in name or name.endswith("norm1.weight") or name.endswith("norm2.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 + 0.05 * torch.randn_like(p))
            else:
                p.copy_(0.02 * torch.randn_like(p) if p.ndim > 1 else 0.05 * torch.randn_like(p))
    sd = dict(model.state_dict())
    for i, blk in enumerate(model.blocks):
        sd[f"blocks.{i}.attn.relative_position_index"] = blk.attn.relative_position_index.clone()
    sd["head.weight"] = torch.randn(10, DIM)
    sd["head.bias"] = torch.randn(10)
    path = tmp_path_factory.mktemp("beit") / "beit_base_random.pth"
    torch.save({"model": sd}, path)
    return path, model, sd


def _cfg(grid):
    cfg = beit_adapter_b()
    cfg.update(depth=DEPTH, rel_pos_grid=grid, interaction_indexes=((0, 1),))
    return cfg


def _ours(path, grid, image_size):
    cfg = _cfg(grid)
    flat, report = convert_beit(path, cfg, image_size, adapter=False)
    model = BEiT(cfg, image_size, rngs=nnx.Rngs(1))
    update_module(model, flat)
    return model, flat, report


def _timm_tokens(model, x_nhwc):
    layers = []
    hooks = [blk.register_forward_hook(lambda m, i, o: layers.append(o.detach().numpy()))
             for blk in model.blocks]
    with torch.no_grad():
        out = model.forward_features(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)).numpy()
    for h in hooks:
        h.remove()
    return out, layers


def test_tokens_224(unilm_file, rng):
    path, tmodel, _ = unilm_file
    model, _, report = _ours(path, (14, 14), 224)
    assert report["naming"] == "unilm" and report["resized"] == []
    assert set(report["dropped"]) >= {"fc_norm.weight", "head.weight", "blocks.0.attn.relative_position_index"}
    x = rng.normal(size=(2, 224, 224, 3)).astype(np.float32)
    ref, ref_layers = _timm_tokens(tmodel, x)
    got, inter = model(jnp.asarray(x))
    for i in range(DEPTH):
        assert rel_err(inter[f"layers.{i}"], ref_layers[i]) <= RTOL["float32"], i
    assert rel_err(got, ref) <= RTOL["float32"]


def _rederive_table(table: np.ndarray, dst_len: int) -> np.ndarray:
    """CHECKPOINTS.md §2.4 written out again: bisection for the ratio, geometric source
    offsets, then a not-a-knot cubic spline along rows and then columns (SciPy CubicSpline)."""
    from scipy.interpolate import CubicSpline

    src_len = int(round((table.shape[0] - 3) ** 0.5))
    half_src, half_dst = src_len // 2, dst_len // 2
    lo, hi, ratio = 1.01, 1.5, None
    while hi - lo > 1e-6:
        ratio = 0.5 * (lo + hi)
        total = sum(ratio**k for k in range(half_src))
        lo, hi = (lo, ratio) if total > half_dst else (ratio, hi)
    pos = []
    acc = 0.0
    for k in range(half_src):
        acc += ratio**k
        pos.append(acc)
    src = np.array([-p for p in reversed(pos)] + [0.0] + pos)
    dst = np.arange(-half_dst, half_dst + 1, dtype=np.float64)
    out = []
    for head in range(table.shape[1]):
        z = table[:-3, head].astype(np.float32).astype(np.float64).reshape(src_len, src_len)
        z = CubicSpline(src, z, axis=0, bc_type="not-a-knot")(dst)
        z = CubicSpline(src, z, axis=1, bc_type="not-a-knot")(dst)
        out.append(z.reshape(-1))
    return np.concatenate([np.stack(out, -1), table[-3:]], 0)


def _timm_at(img_size, sd, tables):
    model = timm_model(img_size)
    new = {k: v for k, v in sd.items() if "relative_position_index" not in k and not k.startswith("head.")}
    for i in range(DEPTH):
        new[f"blocks.{i}.attn.relative_position_bias_table"] = torch.from_numpy(np.array(tables[i]))
    model.load_state_dict(new, strict=True)
    return model


@pytest.fixture(scope="module")
def converted_640(unilm_file):
    return _ours(unilm_file[0], (40, 40), 640)


def test_tables_and_tokens_640(unilm_file, converted_640, rng):
    _, _, sd = unilm_file
    model, flat, report = converted_640
    assert len(report["resized"]) == DEPTH
    tables = []
    for i in range(DEPTH):
        got = flat[f"layers.{i}.attn.relative_position_bias_table"]
        want = _rederive_table(sd[f"blocks.{i}.attn.relative_position_bias_table"].numpy(), 79)
        assert got.shape == (6244, HEADS)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(got[-3:], sd[f"blocks.{i}.attn.relative_position_bias_table"][-3:].numpy())
        tables.append(got)
    tmodel = _timm_at(640, sd, tables)
    x = rng.normal(size=(1, 640, 640, 3)).astype(np.float32)
    ref, _ = _timm_tokens(tmodel, x)
    got, _ = model(jnp.asarray(x))
    assert rel_err(got, ref) <= RTOL["float32"]


def test_tokens_512x1024_derived_tables(unilm_file, converted_640, rng):
    _, _, sd = unilm_file
    model, flat, _ = converted_640
    tables = [np.asarray(derive_table(jnp.asarray(flat[f"layers.{i}.attn.relative_position_bias_table"]),
                                      (40, 40), (32, 64))) for i in range(DEPTH)]
    assert tables[0].shape == (63 * 127 + 3, HEADS)
    tmodel = _timm_at((512, 1024), sd, tables)
    x = rng.normal(size=(1, 512, 1024, 3)).astype(np.float32)
    ref, _ = _timm_tokens(tmodel, x)
    got, _ = model(jnp.asarray(x))
    assert rel_err(got, ref) <= RTOL["float32"]
