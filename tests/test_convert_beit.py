"""BEiT converter: unilm vs mmseg naming, pretraining files, adapter initialisation, the table
resize at run time vs in the converter, the full-backbone rules (CHECKPOINTS.md §4.3) and bad
files.  Small widths keep it fast; the numeric parity with timm is in test_beit_vs_timm.py."""

from __future__ import annotations

import argparse
import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from sarformer_jax.configs.common import beit_adapter_b
from sarformer_jax.convert import beit as cb
from sarformer_jax.convert.common import (CheckpointError, convert_with_rules, flat_shapes,
                                          load_params)
from sarformer_jax.models.beit import derive_table, table_rows
from sarformer_jax.models.vit_adapter import BEiTAdapter

timm_beit = pytest.importorskip("timm.models.beit")

DIM, HEADS, DEPTH = 64, 4, 4


def small_cfg(depth=DEPTH, indexes=((0, 0), (1, 1), (2, 2), (3, 3))):
    cfg = beit_adapter_b()
    cfg.update(embed_dim=DIM, num_heads=HEADS, deform_num_heads=HEADS, depth=depth,
               interaction_indexes=indexes)
    return cfg


@pytest.fixture(scope="module")
def unilm_sd():
    torch.manual_seed(0)
    model = timm_beit.Beit(img_size=224, patch_size=16, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
                           use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1,
                           num_classes=0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    sd = dict(model.state_dict())
    for i, blk in enumerate(model.blocks):
        sd[f"blocks.{i}.attn.relative_position_index"] = blk.attn.relative_position_index.clone()
    sd["head.weight"], sd["head.bias"] = torch.randn(7, DIM), torch.randn(7)
    return sd


def to_mmseg(sd):
    """What beit2mmseg.py writes (CHECKPOINTS.md §3): renamed blocks, plus the stale
    patch_embed.proj.* copy it keeps."""
    out = {}
    for k, v in sd.items():
        if k.startswith("patch_embed.proj."):
            out[k] = v
            out[k.replace("patch_embed.proj.", "patch_embed.projection.")] = v
        elif k.startswith("blocks."):
            k = k.replace("blocks.", "layers.", 1).replace(".norm1.", ".ln1.").replace(".norm2.", ".ln2.")
            k = k.replace(".mlp.fc1.", ".ffn.layers.0.0.").replace(".mlp.fc2.", ".ffn.layers.1.")
            out[k] = v
        else:
            out[k] = v
    return out


def save(tmp_path, name, sd, wrap=True):
    path = tmp_path / name
    torch.save({"model": sd} if wrap else sd, path)
    return path


def test_unilm_and_mmseg_give_the_same_params(tmp_path, unilm_sd):
    cfg = small_cfg()
    a, rep_a = cb.convert_beit(save(tmp_path, "u.pth", unilm_sd), cfg, 640)
    b, rep_b = cb.convert_beit(save(tmp_path, "m.pth", to_mmseg(unilm_sd), wrap=False), cfg, 640)
    assert (rep_a["naming"], rep_b["naming"]) == ("unilm", "mmseg")
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert a["layers.1.attn.relative_position_bias_table"].shape == (6244, HEADS)
    assert "patch_embed.proj.weight" in rep_b["dropped"] and "fc_norm.bias" in rep_a["dropped"]
    np.testing.assert_array_equal(a["layers.0.attn.qkv.kernel"], unilm_sd["blocks.0.attn.qkv.weight"].numpy().T)
    np.testing.assert_array_equal(a["patch_embed.projection.kernel"],
                                  unilm_sd["patch_embed.proj.weight"].numpy().transpose(2, 3, 1, 0))


def test_adapter_parameters_initialised_like_the_original(tmp_path, unilm_sd):
    cfg = small_cfg()
    flat, report = cb.convert_beit(save(tmp_path, "u.pth", unilm_sd), cfg, 640)
    expected = flat_shapes(nnx.state(nnx.eval_shape(lambda: BEiTAdapter(cfg, 640, rngs=nnx.Rngs(0))),
                                     nnx.Any(nnx.Param, nnx.BatchStat)))
    assert set(flat) == set(expected)
    init = set(report["initialised"])
    beit_part = {k for k in expected if re.match(r"(cls_token|patch_embed|layers)\b", k)}
    assert init == set(expected) - beit_part
    assert report["converted"] == len(beit_part)
    # §2.9: Linear trunc-normal(0.02) with zero bias (MSDA included), LN (1, 0), BN (1, 0, 0, 1),
    # level_embed N(0, 1)
    k = flat["interactions.0.injector.attn.sampling_offsets.kernel"]
    assert 0.015 < k.std() < 0.025 and not flat["interactions.0.injector.attn.sampling_offsets.bias"].any()
    assert 0.8 < flat["level_embed"].std() < 1.2
    np.testing.assert_array_equal(flat["interactions.1.extractor.ffn_norm.scale"], 1.0)
    np.testing.assert_array_equal(flat["norm_2.var"], 1.0)
    np.testing.assert_array_equal(flat["spm.stem.4.mean"], 0.0)
    np.testing.assert_allclose(flat["interactions.0.injector.gamma"], 0.1)


def test_pretraining_file_shared_table_expanded(tmp_path, unilm_sd):
    cfg = small_cfg()
    pt = {k: v for k, v in unilm_sd.items()
          if "relative_position" not in k and not k.startswith(("head.", "fc_norm."))}
    pt["rel_pos_bias.relative_position_bias_table"] = unilm_sd["blocks.0.attn.relative_position_bias_table"]
    pt["rel_pos_bias.relative_position_index"] = unilm_sd["blocks.0.attn.relative_position_index"]
    pt["mask_token"] = torch.zeros(1, 1, DIM)
    pt["norm.weight"], pt["norm.bias"] = torch.ones(DIM), torch.zeros(DIM)
    pt["lm_head.weight"], pt["lm_head.bias"] = torch.randn(16, DIM), torch.zeros(16)
    flat, report = cb.convert_beit(save(tmp_path, "pt.pth", pt), cfg, 640, adapter=False)
    assert report["shared_table_expanded"] and len(report["resized"]) == DEPTH
    ref, _ = cb.convert_beit(save(tmp_path, "u.pth", unilm_sd), cfg, 640, adapter=False)
    np.testing.assert_array_equal(flat["layers.1.attn.relative_position_bias_table"],
                                  ref["layers.0.attn.relative_position_bias_table"])


def test_run_time_table_derivation_matches_converter(rng):
    """Model: centre crop / numpy not-a-knot matrix; converter: RectBivariateSpline."""
    table = rng.normal(size=(table_rows((40, 40)), 3)).astype(np.float32)
    got = np.asarray(derive_table(jnp.asarray(table), (40, 40), (32, 64)))
    # rows shrink 79 -> 63 (crop), columns grow 79 -> 127 (spline)
    want = cb.resize_table(table, (32, 64))
    assert got.shape == want.shape == (63 * 127 + 3, 3)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    cropped = np.asarray(derive_table(jnp.asarray(table), (40, 40), (20, 20)))
    grid = table[:-3].reshape(79, 79, 3)[20:59, 20:59].reshape(-1, 3)
    np.testing.assert_array_equal(cropped, np.concatenate([grid, table[-3:]]))


def to_torch_backbone(flat, prefix="backbone."):
    """Our flat params -> an mmseg state dict (inverse layouts), with the buffers mmseg keeps."""
    out = {}
    for k, v in flat.items():
        v = np.asarray(v)
        if k.endswith(".kernel"):
            name = k[: -len(".kernel")] + ".weight"
            if k == "up.kernel":
                v = v[::-1, ::-1].transpose(2, 3, 0, 1)
            elif v.ndim == 4:
                v = v.transpose(3, 2, 0, 1)
            else:
                v = v.T
        else:
            name = re.sub(r"\.scale$", ".weight", k)
            name = re.sub(r"\.mean$", ".running_mean", name)
            name = re.sub(r"\.var$", ".running_var", name)
        out[prefix + name] = np.ascontiguousarray(v)
        if name.endswith(".running_var"):
            out[prefix + name.replace("running_var", "num_batches_tracked")] = np.array(5)
        if name.endswith("relative_position_bias_table"):
            out[prefix + name.replace("bias_table", "index")] = np.zeros((1601, 1601), np.int64)
    return out


def test_backbone_rules_cover_a_sarformer_backbone():
    cfg = small_cfg(depth=12, indexes=((0, 2), (3, 5), (6, 8), (9, 11)))
    model = BEiTAdapter(cfg, 640, rngs=nnx.Rngs(3))
    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    flat = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}
    sd = to_torch_backbone(flat)
    assert len(sd) == 446  # CHECKPOINTS.md §4.2, SARFormer-B backbone.* keys
    got, initialised = convert_with_rules(sd, cb.backbone_rules(), flat_shapes(state),
                                          source_name="sarformer.pth")
    assert initialised == [] and set(got) == set(flat)
    for k in flat:
        np.testing.assert_array_equal(got[k], flat[k], err_msg=k)


def test_bad_checkpoints_one_error(tmp_path, unilm_sd):
    cfg = small_cfg()
    bad = dict(unilm_sd)
    del bad["blocks.1.gamma_2"]
    bad["blocks.0.attn.k_bias"] = torch.zeros(DIM)
    bad["blocks.1.mlp.fc1.weight"] = torch.zeros(4 * DIM, DIM + 1)
    path = save(tmp_path, "bad_beit.pth", bad)
    with pytest.raises(CheckpointError) as e:
        cb.convert_beit(path, cfg, 640)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    # the mis-shaped key's target also counts as missing
    for part in ("2 missing keys", "layers.1.gamma_2", "1 unexpected keys", "blocks.0.attn.k_bias",
                 "1 mis-shaped keys", "blocks.1.mlp.fc1.weight"):
        assert part in msg, part


def test_sam_file_is_rejected(tmp_path):
    sam = {"image_encoder.patch_embed.proj.weight": torch.zeros(8, 3, 16, 16),
           "image_encoder.blocks.0.attn.qkv.weight": torch.zeros(24, 8),
           "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": torch.zeros(2, 4),
           "mask_decoder.iou_token.weight": torch.zeros(1, 8)}
    path = save(tmp_path, "sam_vit_b.pth", sam, wrap=False)
    with pytest.raises(CheckpointError, match=r"sam_vit_b\.pth: not a BEiT checkpoint"):
        cb.convert_beit(path, small_cfg(), 640)


def test_cli_writes_params(tmp_path, unilm_sd, monkeypatch):
    src = save(tmp_path, "u.pth", unilm_sd)
    parser = argparse.ArgumentParser()
    cb.add_arguments(parser)
    monkeypatch.setattr("sarformer_jax.configs.common.beit_adapter_b", small_cfg)
    args = parser.parse_args([str(src), str(tmp_path / "out.npz"), "--model", "b", "--beit-only"])
    assert cb.run(args) == 0
    flat, meta = load_params(tmp_path / "out.npz")
    assert meta["naming"] == "unilm" and meta["format"] == "beit"
    assert flat["layers.0.attn.relative_position_bias_table"].shape == (6244, HEADS)
