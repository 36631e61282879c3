"""mmseg-1.x SARFormer checkpoint converter (convert/mmseg.py): state dicts with exactly the key
names and shapes of CHECKPOINTS.md §4.3-§4.5 for SARFormer-B and -L, written here from the spec
tables (not from the converter's rules) and wrapped like an mmengine checkpoint (with an object
`weights_only` refuses); value placement and layouts, key bookkeeping, round trips through
inverse transforms written here, bad files, the Mask2Former baseline, the CLI, and a micro model
whose forward is unchanged by export -> convert -> load.

Full-size B/L parameters exist only as numpy arrays; model shapes come from `nnx.eval_shape`."""

from __future__ import annotations

import argparse
import math
import pickle
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from sarformer_jax.convert import mmseg as cm
from sarformer_jax.convert.common import CheckpointError, load_params, save_params

from sarformer_jax.config import load_config

# ----------------------------------------------------------------------------------------------
# The spec's key tables (CHECKPOINTS.md §4.3, §4.4, §4.5), written out independently


def _bn(prefix, c):
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def _lin(prefix, out, inp, bias=True):
    return {f"{prefix}.weight": (out, inp), **({f"{prefix}.bias": (out,)} if bias else {})}


def _ln(prefix, c):
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,)}


def _msda(prefix, c, heads, levels, value_dim):
    return {**_lin(f"{prefix}.sampling_offsets", heads * levels * 4 * 2, c),
            **_lin(f"{prefix}.attention_weights", heads * levels * 4, c),
            **_lin(f"{prefix}.value_proj", value_dim, c),
            **_lin(f"{prefix}.output_proj", c, value_dim)}


def spec_backbone(c, depth, heads):
    """§4.3, `backbone.` prefix; deform heads = BEiT heads, deform_ratio 0.5, 640 px (79² + 3)."""
    k = {"cls_token": (1, 1, c), "level_embed": (3, c),
         "patch_embed.projection.weight": (c, 3, 16, 16), "patch_embed.projection.bias": (c,)}
    for i in range(depth):
        p = f"layers.{i}"
        k.update({f"{p}.gamma_1": (c,), f"{p}.gamma_2": (c,), **_ln(f"{p}.ln1", c), **_ln(f"{p}.ln2", c),
                  f"{p}.attn.q_bias": (c,), f"{p}.attn.v_bias": (c,), f"{p}.attn.qkv.weight": (3 * c, c),
                  f"{p}.attn.relative_position_bias_table": (79 * 79 + 3, heads),
                  f"{p}.attn.relative_position_index": (1601, 1601),
                  **_lin(f"{p}.attn.proj", c, c), **_lin(f"{p}.ffn.layers.0.0", 4 * c, c),
                  **_lin(f"{p}.ffn.layers.1", c, 4 * c)})
    spm_convs = {"stem.0": (64, 3), "stem.3": (64, 64), "stem.6": (64, 64), "conv2.0": (128, 64),
                 "conv3.0": (256, 128), "conv4.0": (256, 256)}
    for name, (o, i) in spm_convs.items():
        k[f"spm.{name}.weight"] = (o, i, 3, 3)
    for name, ch in {"stem.1": 64, "stem.4": 64, "stem.7": 64, "conv2.1": 128, "conv3.1": 256,
                     "conv4.1": 256}.items():
        k.update(_bn(f"spm.{name}", ch))
    for j, ch in enumerate((64, 128, 256, 256), 1):
        k[f"spm.fc{j}.weight"], k[f"spm.fc{j}.bias"] = (c, ch, 1, 1), (c,)

    def extractor(p):
        return {**_ln(f"{p}.query_norm", c), **_ln(f"{p}.feat_norm", c), **_ln(f"{p}.ffn_norm", c),
                **_msda(f"{p}.attn", c, heads, 1, c // 2), **_lin(f"{p}.ffn.fc1", c // 4, c),
                f"{p}.ffn.dwconv.dwconv.weight": (c // 4, 1, 3, 3), f"{p}.ffn.dwconv.dwconv.bias": (c // 4,),
                **_lin(f"{p}.ffn.fc2", c, c // 4)}

    for s in range(4):
        p = f"interactions.{s}"
        k.update({f"{p}.injector.gamma": (c,), **_ln(f"{p}.injector.query_norm", c),
                  **_ln(f"{p}.injector.feat_norm", c), **_msda(f"{p}.injector.attn", c, heads, 3, c // 2),
                  **extractor(f"{p}.extractor")})
    for e in range(2):
        k.update(extractor(f"interactions.3.extra_extractors.{e}"))
    k["up.weight"], k["up.bias"] = (c, c, 2, 2), (c,)
    for j in range(1, 5):
        k.update(_bn(f"norm_{j}", c))
    return {f"backbone.{n}": s for n, s in k.items()}


def spec_decode_head(c, d, pd_heads, pd_ffn, dec_ffn, query_feat=False):
    """§4.4, `decode_head.` prefix (plus `query_feat` for the Mask2Former baseline)."""
    k = {}
    pd = "pixel_decoder"
    for lvl in range(3):
        k.update({f"{pd}.input_convs.{lvl}.conv.weight": (d, c, 1, 1), f"{pd}.input_convs.{lvl}.conv.bias": (d,),
                  **_ln(f"{pd}.input_convs.{lvl}.gn", d)})
    for j in range(6):
        p = f"{pd}.encoder.layers.{j}"
        k.update({**_msda(f"{p}.self_attn", d, pd_heads, 3, d), **_lin(f"{p}.ffn.layers.0.0", pd_ffn, d),
                  **_lin(f"{p}.ffn.layers.1", d, pd_ffn), **_ln(f"{p}.norms.0", d), **_ln(f"{p}.norms.1", d)})
    k[f"{pd}.level_encoding.weight"] = (3, d)
    k.update({f"{pd}.lateral_convs.0.conv.weight": (d, c, 1, 1), **_ln(f"{pd}.lateral_convs.0.gn", d),
              f"{pd}.output_convs.0.conv.weight": (d, d, 3, 3), **_ln(f"{pd}.output_convs.0.gn", d),
              f"{pd}.mask_feature.weight": (d, d, 1, 1), f"{pd}.mask_feature.bias": (d,)})
    for j in range(9):
        p = f"transformer_decoder.layers.{j}"
        for att in ("self_attn", "cross_attn"):
            k.update({f"{p}.{att}.attn.in_proj_weight": (3 * d, d), f"{p}.{att}.attn.in_proj_bias": (3 * d,),
                      **_lin(f"{p}.{att}.attn.out_proj", d, d)})
        k.update({**_lin(f"{p}.ffn.layers.0.0", dec_ffn, d), **_lin(f"{p}.ffn.layers.1", d, dec_ffn),
                  **{n: s for m in range(3) for n, s in _ln(f"{p}.norms.{m}", d).items()}})
    k.update(_ln("transformer_decoder.post_norm", d))
    k.update({"query_embed.weight": (100, d), "level_embed.weight": (3, d),
              **_lin("cls_embed", 151, d), **_lin("mask_embed.0", d, d), **_lin("mask_embed.2", d, d),
              **_lin("mask_embed.4", d, d), **_lin("enc_output", d, d), **_ln("enc_output_norm", d)})
    if query_feat:
        k["query_feat.weight"] = (100, d)
    return {f"decode_head.{n}": s for n, s in k.items()}


def spec_aux_head():
    """§4.5 (B only)."""
    k = {"conv_seg.weight": (150, 256, 1, 1), "conv_seg.bias": (150,),
         "convs.0.conv.weight": (256, 768, 3, 3), **_bn("convs.0.bn", 256)}
    return {f"auxiliary_head.{n}": s for n, s in k.items()}


def spec_b(baseline=False):
    return {**spec_backbone(768, 12, 12), **spec_decode_head(768, 256, 8, 1024, 2048, query_feat=baseline),
            **({} if baseline else spec_aux_head())}


def spec_l():
    return {**spec_backbone(1024, 24, 16), **spec_decode_head(1024, 1024, 32, 4096, 4096)}


def is_buffer(key):
    return key.endswith(("running_mean", "running_var", "num_batches_tracked", "relative_position_index"))


def is_int(key):
    return key.endswith(("num_batches_tracked", "relative_position_index"))


# ----------------------------------------------------------------------------------------------
# Random state dicts and mmengine-like files


class HistoryBuffer:
    """Stands in for mmengine's class of the same name (weights_only refuses it)."""

    def __init__(self, values):
        self._log_history = np.asarray(values)


# torch views behind numpy arrays made by `random_state_dict(pool=True)`, keyed by (data pointer,
# shape): `save_mmengine` saves those views, so the file holds one storage instead of one per key.
_TORCH_VIEWS: dict = {}


def random_state_dict(spec, seed, *, pool=False):
    """numpy arrays of the spec's shapes.  `pool=True`: float tensors are windows of one random
    pool at key-dependent offsets (one storage in the saved file: used for L and for the bad-file
    tests to save time, memory and disk), int buffers share one array."""
    rng = np.random.default_rng(seed)
    big = torch.from_numpy(rng.random(1 << 24, dtype=np.float32) - 0.5) if pool else None
    index = (torch.arange(1601 * 1601, dtype=torch.int64) % 6244).reshape(1601, 1601)
    out = {}

    def put(key, tensor):
        out[key] = tensor.numpy()
        _TORCH_VIEWS[(out[key].ctypes.data, out[key].shape)] = tensor

    for i, (key, shape) in enumerate(spec.items()):
        n = int(np.prod(shape))
        if key.endswith("num_batches_tracked"):
            out[key] = np.asarray(1000 + i, np.int64)
        elif key.endswith("relative_position_index"):
            put(key, index)
        elif key.endswith("running_var"):
            out[key] = rng.random(n, dtype=np.float32).reshape(shape) + 0.5
        elif pool:
            off = (i * 104729) % (big.numel() - n)
            put(key, big[off:off + n].view(shape))
        else:
            out[key] = (rng.random(n, dtype=np.float32) - 0.5).reshape(shape)
    return out


def _as_torch(v):
    v = np.asarray(v)
    view = _TORCH_VIEWS.get((v.ctypes.data, v.shape))
    return view if view is not None else torch.from_numpy(np.asarray(v, order="C"))


def save_mmengine(path, sd):
    """torch.save of {meta, state_dict, message_hub (HistoryBuffer objects), optimizer}."""
    ckpt = {"meta": {"iter": 160000, "cfg": "model = dict(...)", "mmengine_version": "0.10.4"},
            "state_dict": {k: _as_torch(v) for k, v in sd.items()},
            "message_hub": {"log_scalars": {"train/loss": HistoryBuffer([1.0, 0.5])}, "resumed_keys": {}},
            "optimizer": {"state": {}, "param_groups": [{"lr": 2e-5}]}}
    torch.save(ckpt, path)
    with pytest.raises(pickle.UnpicklingError):  # what the restricted unpickler is for
        torch.load(path, weights_only=True)
    return path


# ----------------------------------------------------------------------------------------------
# Inverse transforms (ours -> torch layout), written here independently of the converter


def to_torch(flat):
    """Flat Segmentor params -> an mmseg state dict (buffers that the model does not keep are
    added: num_batches_tracked per BatchNorm, relative_position_index per layer)."""
    sd, qkv, index = {}, {}, {}
    for path, v in flat.items():
        v = np.asarray(v)
        m = re.fullmatch(r"(.*\.attn)\.([qkv])_proj\.(kernel|bias)", path)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = v.T if m.group(3) == "kernel" else v
            continue
        base, leaf = path.rsplit(".", 1)
        if leaf == "kernel":
            if v.ndim == 2:
                sd[f"{base}.weight"] = v.T
            elif path == "backbone.up.kernel":  # flipped (kh,kw,I,O) -> (I,O,kh,kw)
                sd[f"{base}.weight"] = v[::-1, ::-1].transpose(2, 3, 0, 1).copy()
            else:  # (kh,kw,I,O) -> (O,I,kh,kw)
                sd[f"{base}.weight"] = v.transpose(3, 2, 0, 1)
        elif leaf in ("scale", "embedding"):
            sd[f"{base}.weight"] = v
        elif leaf in ("mean", "var"):
            sd[f"{base}.running_{leaf}"] = v
            sd[f"{base}.num_batches_tracked"] = np.asarray(7, np.int64)
        elif leaf == "relative_position_bias_table":
            sd[path] = v
            side = (math.isqrt(v.shape[0] - 3) + 1) // 2  # (2s-1)^2 + 3 rows -> s*s + 1 tokens
            sd[f"{base}.relative_position_index"] = index.setdefault(
                side, np.zeros((side * side + 1,) * 2, np.int64))
        else:
            sd[path] = v
    for (base, leaf), parts in qkv.items():
        name = "in_proj_weight" if leaf == "kernel" else "in_proj_bias"
        sd[f"{base}.{name}"] = np.concatenate([parts["q"], parts["k"], parts["v"]], 0)
    return sd


# ----------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def cfg_b():
    return load_config("ade20k_sarformer_b")


@pytest.fixture(scope="module")
def b_case(tmp_path_factory, cfg_b):
    """SARFormer-B: spec state dict (independent random arrays), mmengine file, conversion."""
    sd = random_state_dict(spec_b(), seed=0)
    path = save_mmengine(tmp_path_factory.mktemp("b") / "iter_160000.pth", sd)
    flat, report = cm.convert_sarformer(path, cfg_b)
    return sd, path, flat, report


# ----------------------------------------------------------------------------------------------
# Tests


def test_spec_tables_match_checkpoints_md():
    """The tables above reproduce §4.2's counts (keys, per group, parameters vs buffers)."""
    for spec, counts, n_params, buffers in ((spec_b(), (446, 295, 8), 122_420_749, 45),
                                            (spec_l(), (650, 295, 0), 569_154_135, 54)):
        groups = tuple(sum(k.startswith(g) for k in spec) for g in ("backbone.", "decode_head.", "auxiliary_head."))
        assert groups == counts and len(spec) == sum(counts)
        assert sum(map(is_buffer, spec)) == buffers
        assert sum(int(np.prod(s)) for k, s in spec.items() if not is_buffer(k)) == n_params


def test_b_converts_with_the_right_layouts(b_case, cfg_b):
    sd, _, flat, report = b_case
    params, stats = cm.expected_shapes(cfg_b)
    assert set(flat) == set(params) | set(stats)
    assert all(flat[k].shape == params.get(k, stats.get(k)) for k in flat)
    # bookkeeping: every source key used or dropped for a stated reason
    assert report["num_source_keys"] == len(sd) == 749
    assert report["used"] + report["num_dropped"] == 749
    dropped = sorted(k for keys in report["dropped"].values() for k in keys)
    assert dropped == sorted(k for k in sd if is_int(k))
    assert report["num_dropped"] == 12 + 11
    assert len(report["in_proj_split"]) == 36
    assert report["num_parameters"] == 122_420_749
    assert report["num_batch_stats"] == 22 and report["num_targets"] == 798
    assert report["dead_loaded"] == sorted(k for k in sd if ".enc_output" in k)
    assert report["checkpoint"] == "SARFormer-B"
    assert report["ignored_entries"] == ["message_hub", "meta", "optimizer"]
    assert "sarformer convert sam" in report["not_in_checkpoint"]

    eq = np.testing.assert_array_equal
    # Linear (out, in) -> (in, out); BEiT fused qkv; MSDA linears
    eq(flat["backbone.layers.3.attn.proj.kernel"], sd["backbone.layers.3.attn.proj.weight"].T)
    eq(flat["backbone.layers.0.attn.qkv.kernel"], sd["backbone.layers.0.attn.qkv.weight"].T)
    eq(flat["backbone.interactions.2.injector.attn.sampling_offsets.kernel"],
       sd["backbone.interactions.2.injector.attn.sampling_offsets.weight"].T)
    eq(flat["decode_head.pixel_decoder.encoder.layers.5.ffn.layers.1.kernel"],
       sd["decode_head.pixel_decoder.encoder.layers.5.ffn.layers.1.weight"].T)
    # conv (O, I, kh, kw) -> (kh, kw, I, O), depthwise (C, 1, 3, 3) -> (3, 3, 1, C)
    w = sd["backbone.spm.stem.3.weight"]
    k = flat["backbone.spm.stem.3.kernel"]
    for o, i, y, x in ((5, 7, 0, 2), (63, 0, 2, 1)):
        assert k[y, x, i, o] == w[o, i, y, x]
    eq(flat["backbone.interactions.1.extractor.ffn.dwconv.dwconv.kernel"][:, :, 0, :],
       sd["backbone.interactions.1.extractor.ffn.dwconv.dwconv.weight"][:, 0].transpose(1, 2, 0))
    assert flat["decode_head.pixel_decoder.output_convs.0.conv.kernel"].shape == (3, 3, 256, 256)
    # nn.MultiheadAttention in_proj rows q | k | v
    for att in ("self_attn", "cross_attn"):
        base = f"decode_head.transformer_decoder.layers.4.{att}.attn"
        w, b = sd[f"{base}.in_proj_weight"], sd[f"{base}.in_proj_bias"]
        for j, name in enumerate("qkv"):
            eq(flat[f"{base}.{name}_proj.kernel"], w[256 * j:256 * (j + 1)].T)
            eq(flat[f"{base}.{name}_proj.bias"], b[256 * j:256 * (j + 1)])
    # BatchNorm running statistics -> batch stats; norms; embeddings; raw tensors copied
    for bn in ("backbone.norm_2", "backbone.spm.conv3.1", "auxiliary_head.convs.0.bn"):
        eq(flat[f"{bn}.mean"], sd[f"{bn}.running_mean"])
        eq(flat[f"{bn}.var"], sd[f"{bn}.running_var"])
        eq(flat[f"{bn}.scale"], sd[f"{bn}.weight"])
    eq(flat["decode_head.transformer_decoder.post_norm.scale"], sd["decode_head.transformer_decoder.post_norm.weight"])
    eq(flat["decode_head.query_embed.embedding"], sd["decode_head.query_embed.weight"])
    eq(flat["decode_head.pixel_decoder.level_encoding.embedding"], sd["decode_head.pixel_decoder.level_encoding.weight"])
    for key in ("backbone.layers.7.attn.relative_position_bias_table", "backbone.cls_token",
                "backbone.level_embed", "backbone.layers.11.gamma_2", "backbone.interactions.0.injector.gamma",
                "backbone.layers.2.attn.q_bias"):
        eq(flat[key], sd[key])
    eq(flat["decode_head.enc_output.kernel"], sd["decode_head.enc_output.weight"].T)


def test_b_conv_transpose_up_matches_torch(b_case):
    """`backbone.up` (ConvTranspose2d, (I,O,2,2), stride 2) gives torch's output through a flax
    ConvTranspose configured as in the model (VALID, stride 2, transpose_kernel=False)."""
    sd, _, flat, _ = b_case
    x = np.random.default_rng(1).standard_normal((1, 768, 3, 2)).astype(np.float32)
    want = torch.nn.functional.conv_transpose2d(torch.from_numpy(x), torch.from_numpy(sd["backbone.up.weight"]),
                                                torch.from_numpy(sd["backbone.up.bias"]), stride=2).numpy()
    up = nnx.ConvTranspose(768, 768, (2, 2), strides=(2, 2), padding="VALID", rngs=nnx.Rngs(0))
    up.kernel.set_value(jnp.asarray(flat["backbone.up.kernel"]))
    up.bias.set_value(jnp.asarray(flat["backbone.up.bias"]))
    with jax.default_matmul_precision("highest"):
        got = np.asarray(up(jnp.asarray(x.transpose(0, 2, 3, 1)))).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def assert_round_trip(sd, flat):
    """ours -> torch gives back every key of `sd` with its shape, and its value (index buffers
    are rebuilt, so only their shapes are compared).  Returns the torch-named dict."""
    back = to_torch(flat)
    assert set(back) == set(sd)
    for key, value in sd.items():
        assert back[key].shape == value.shape, key
        if not is_int(key):
            np.testing.assert_array_equal(back[key], value, err_msg=key)
    return back


def test_b_round_trip(b_case, cfg_b, tmp_path):
    """torch -> ours -> torch (inverse transforms) gives back every used key exactly, with the
    spec's names and shapes; ours -> torch -> ours is the identity."""
    sd, _, flat, _ = b_case
    back = assert_round_trip(sd, flat)
    # a plain state dict (weights_only path) of our params converts back to them
    path = tmp_path / "plain.pth"
    torch.save({k: _as_torch(v) for k, v in back.items()}, path)
    again, report = cm.convert_sarformer(path, cfg_b)
    assert report["ignored_entries"] == []
    assert set(again) == set(flat)
    for key in flat:
        np.testing.assert_array_equal(again[key], flat[key], err_msg=key)


def test_l_converts_and_round_trips(tmp_path):
    cfg = load_config("ade20k_sarformer_l")
    sd = random_state_dict(spec_l(), seed=1, pool=True)
    path = save_mmengine(tmp_path / "sarformer_l.pth", sd)
    flat, report = cm.convert_sarformer(path, cfg)
    assert report["num_source_keys"] == 945 and report["used"] + report["num_dropped"] == 945
    assert report["num_dropped"] == 24 + 10 and report["num_batch_stats"] == 20
    assert report["num_parameters"] == 569_154_135 and report["checkpoint"] == "SARFormer-L"
    base = "decode_head.transformer_decoder.layers.8.self_attn.attn"
    np.testing.assert_array_equal(flat[f"{base}.v_proj.kernel"], sd[f"{base}.in_proj_weight"][2048:].T)
    np.testing.assert_array_equal(flat["backbone.layers.23.attn.relative_position_bias_table"],
                                  sd["backbone.layers.23.attn.relative_position_bias_table"])
    assert_round_trip(sd, flat)


@pytest.fixture(scope="module")
def b_pool_sd():
    return random_state_dict(spec_b(), seed=2, pool=True)


def test_bad_file_reports_everything(b_pool_sd, cfg_b, tmp_path):
    sd = dict(b_pool_sd)
    del sd["backbone.layers.5.ffn.layers.1.bias"]
    sd["decode_head.bogus.weight"] = np.zeros((3,), np.float32)
    sd["backbone.spm.fc2.weight"] = np.zeros((768, 64, 1, 1), np.float32)
    sd["decode_head.transformer_decoder.layers.2.cross_attn.attn.in_proj_weight"] = np.zeros((700, 256), np.float32)
    path = save_mmengine(tmp_path / "bad.pth", sd)
    with pytest.raises(CheckpointError) as e:
        cm.convert_sarformer(path, cfg_b)
    msg = str(e.value)
    assert msg.startswith(str(path)) and "\n" not in msg
    for part in ("backbone.layers.5.ffn.layers.1.bias", "decode_head.bogus.weight",
                 "backbone.spm.fc2.weight: expected (1, 1, 128, 768)", "in_proj_weight: found (700, 256)",
                 "layers.2.cross_attn.attn.q_proj.kernel"):
        assert part in msg, part
    assert "the checkpoint is" not in msg  # still a B file


def test_b_file_with_l_config(b_pool_sd, tmp_path):
    path = save_mmengine(tmp_path / "b.pth", b_pool_sd)
    with pytest.raises(CheckpointError) as e:
        cm.convert_sarformer(path, load_config("ade20k_sarformer_l"))
    msg = str(e.value)
    assert msg.startswith(f"{path}: the checkpoint is SARFormer-B") and "builds SARFormer-L" in msg
    assert "backbone width: expected 1024, found 768 (backbone.cls_token (1, 1, 768))" in msg
    assert "head width: expected 1024, found 256" in msg and "use --config ade20k_sarformer_b" in msg
    assert "aux head: expected False, found True (auxiliary_head.* present)" in msg
    assert "missing keys: backbone.cls_token" in msg and "mis-shaped keys: backbone.cls_token" in msg
    assert "8 unexpected keys: auxiliary_head.conv_seg.bias" in msg


def test_baseline_cli_and_mismatch(b_pool_sd, tmp_path, capsys):
    """Mask2Former baseline: query_feat present, no auxiliary head; through the CLI with an
    override, and the SARFormer-B file against the baseline config."""
    spec = spec_b(baseline=True)
    sd = {k: b_pool_sd.get(k) for k in spec}
    sd["decode_head.query_feat.weight"] = np.random.default_rng(3).random((100, 256), dtype=np.float32)
    src = save_mmengine(tmp_path / "m2f.pth", sd)
    dst = tmp_path / "m2f.npz"
    parser = argparse.ArgumentParser()
    cm.add_arguments(parser)
    args = parser.parse_args([str(src), str(dst), "--config", "ade20k_mask2former_adapter_b",
                              "--set", "model.aux_head.enabled=False"])
    assert cm.run(args) == 0
    assert "Mask2Former baseline-B" in capsys.readouterr().out
    flat, meta = load_params(dst)
    np.testing.assert_array_equal(flat["decode_head.query_feat.embedding"], sd["decode_head.query_feat.weight"])
    assert not any(k.startswith("auxiliary_head.") for k in flat)
    assert meta["format"] == cm.FORMAT and meta["config"] == "ade20k_mask2former_adapter_b"
    assert meta["report"]["num_source_keys"] == 742 == meta["report"]["used"] + meta["report"]["num_dropped"]

    # the SARFormer-B file (aux head, no query_feat) against the baseline config without aux
    sar = save_mmengine(tmp_path / "sar.pth", b_pool_sd)
    args = parser.parse_args([str(sar), str(tmp_path / "x.npz"), "--config", "ade20k_mask2former_adapter_b",
                              "--set", "model.aux_head.enabled=False"])
    assert cm.run(args) == 1
    err = capsys.readouterr().err
    assert "query feat: expected True, found False (decode_head.query_feat.weight absent)" in err
    assert "aux head: expected False, found True" in err and "use --config ade20k_sarformer_b" in err
    assert "decode_head.query_feat.embedding" in err  # missing target
    assert not (tmp_path / "x.npz").exists()
    # a baseline file with an auxiliary head (as `Beit+mask2former_adapter_640.py` trains one):
    # dropping it on request accounts for its 8 keys
    with_aux = save_mmengine(tmp_path / "m2f_aux.pth", {**sd, **{k: v for k, v in b_pool_sd.items()
                                                                 if k.startswith("auxiliary_head.")}})
    cfg = load_config("ade20k_mask2former_adapter_b", ["model.aux_head.enabled=False"])
    flat, report = cm.convert_sarformer(with_aux, cfg, drop_aux=True)
    assert report["num_source_keys"] == 750 and report["used"] == 750 - 30 and report["num_dropped"] == 30
    assert len(report["dropped"]["auxiliary head dropped on request (training only)"]) == 8


def test_micro_forward_after_export_convert_load(tmp_path):
    """A micro Segmentor's (perturbed) params exported to the mmseg layout, converted, and loaded
    back after scrambling the model give the same forward output; files that do not fit the model
    are refused by load_converted with every problem listed."""
    from micro import micro_config
    from sarformer_jax.convert.common import update_module

    from sarformer_jax.models.sarformer import build_model

    cfg = micro_config(root=str(tmp_path))
    model = build_model(cfg, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    rng = np.random.default_rng(4)
    flat = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}
    for k, v in list(flat.items()):  # non-trivial BN statistics and perturbed params
        v = (v + 0.05 * rng.standard_normal(v.shape)).astype(np.float32)
        flat[k] = np.abs(v) + 0.5 if k.endswith(".var") else v
    update_module(model, flat)
    images = jnp.asarray(rng.standard_normal((1, 64, 64, 3)), jnp.float32)
    proposals = jnp.asarray(rng.random((1, cfg.model.head.num_queries, 64, 64)) > 0.5, jnp.float32)
    forward = nnx.jit(lambda m, x, p: m(x, p)[0])
    want = jax.tree.map(np.asarray, forward(model, images, proposals))

    path = save_mmengine(tmp_path / "micro.pth", to_torch(flat))
    converted, report = cm.convert_sarformer(path, cfg)
    assert report["used"] + report["num_dropped"] == report["num_source_keys"]
    save_params(tmp_path / "micro.npz", converted, {"config": "micro"})
    update_module(model, {k: np.zeros_like(v) for k, v in flat.items()})  # scramble
    assert cm.load_converted(model, tmp_path / "micro.npz")["config"] == "micro"
    got = forward(model, images, proposals)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), b)

    bad = dict(converted)
    bad.pop("decode_head.cls_embed.bias")
    bad["decode_head.query_embed.embedding"] = np.zeros((6, 32), np.float32)
    bad["decode_head.bogus"] = np.zeros(1, np.float32)
    save_params(tmp_path / "bad.npz", bad, {"config": "other"})
    with pytest.raises(CheckpointError, match=r"bad\.npz \(converted for config other\): does not fit Segmentor: "
                                              r"1 missing: decode_head\.cls_embed\.bias \| 1 not in the model: "
                                              r"decode_head\.bogus \| 1 mis-shaped: decode_head\.query_embed"):
        cm.load_converted(model, tmp_path / "bad.npz")
