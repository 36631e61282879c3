"""Pixel decoder parity against HF transformers' `Mask2FormerPixelDecoder` (random weights mapped
into ours), fp32 on the CPU.

Deliberate differences between HF's and mmdet's pixel decoder, none with a numeric effect here:
* HF builds reference points from valid ratios (`linspace(0.5, H-0.5)/ (ratio*H) * ratio`); mmdet
  (and we) use pixel centres with ratio 1.  Without padding the two agree up to rounding.
* HF masks the value with the padding mask (all False here) and clamps non-finite encoder outputs
  in training mode only; we do neither.
* HF's level embedding is a raw `nn.Parameter` (`level_embed`), mmdet's an `nn.Embedding`
  (`level_encoding`); HF hard-codes GroupNorm(32) and 3 levels x 4 points; names differ
  (`input_projections`, `adapter_1`/`layer_1`, `mask_projection`, `fc1`/`fc2`).
* Both order the encoder levels coarse to fine (1/32, 1/16, 1/8) and sample the sine encoding
  with `num_feats = D / 2`, normalised.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import RTOL, rel_err
from sarformer_jax.config import Config
from sarformer_jax.convert.common import conv_kernel, linear_kernel, update_module
from sarformer_jax.models.pixel_decoder import MSDeformAttnPixelDecoder, _sine_table

transformers = pytest.importorskip("transformers")
from transformers.models.mask2former import modeling_mask2former as hf  # noqa: E402

D, HEADS, C_IN, ENC_LAYERS, DEC_LAYERS, Q, K = 64, 4, 48, 2, 3, 12, 5


def hf_config() -> "transformers.Mask2FormerConfig":
    return transformers.Mask2FormerConfig(
        feature_size=D, mask_feature_size=D, hidden_dim=D, encoder_feedforward_dim=96,
        encoder_layers=ENC_LAYERS, decoder_layers=DEC_LAYERS + 1, num_attention_heads=HEADS,
        dim_feedforward=80, num_queries=Q, num_labels=K, dropout=0.0, backbone_config=None,
        use_pretrained_backbone=False,
    )


def head_config() -> Config:
    from sarformer_jax.configs.common import mask2former_head

    cfg = mask2former_head(D, pd_heads=HEADS, pd_ffn=96, dec_heads=HEADS, dec_ffn=80, num_feats=D // 2,
                           num_classes=K)
    cfg.num_queries = Q
    cfg.pixel_decoder.num_layers = ENC_LAYERS
    cfg.decoder.num_layers = DEC_LAYERS
    return cfg


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere (HF leaves `level_embed` uninitialised); sampling offsets small
    enough that most sampling points land inside the maps."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 0.02 if "sampling_offsets.weight" in name else 0.3
            if name.endswith("sampling_offsets.bias"):
                scale = 1.5
            p.copy_(torch.randn(p.shape, generator=g) * scale)
            if ("norm" in name or name.endswith(".1.weight")) and name.endswith("weight") and p.ndim == 1:
                p.add_(1.0)


def _t(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()


def hf_pixel_decoder_to_ours(sd: dict[str, torch.Tensor], prefix: str = "", out_prefix: str = "") -> dict:
    """HF `Mask2FormerPixelDecoder` state dict -> our flat parameter paths."""
    out = {}

    def put(name, value):
        out[out_prefix + name] = value

    for i in range(3):
        p = f"{prefix}input_projections.{i}."
        put(f"input_convs.{i}.conv.kernel", conv_kernel(_t(sd[p + "0.weight"])))
        put(f"input_convs.{i}.conv.bias", _t(sd[p + "0.bias"]))
        put(f"input_convs.{i}.gn.scale", _t(sd[p + "1.weight"]))
        put(f"input_convs.{i}.gn.bias", _t(sd[p + "1.bias"]))
    for j in range(ENC_LAYERS):
        p = f"{prefix}encoder.layers.{j}."
        q = f"encoder.layers.{j}."
        for lin in ("sampling_offsets", "attention_weights", "value_proj", "output_proj"):
            put(q + f"self_attn.{lin}.kernel", linear_kernel(_t(sd[p + f"self_attn.{lin}.weight"])))
            put(q + f"self_attn.{lin}.bias", _t(sd[p + f"self_attn.{lin}.bias"]))
        for src, dst in (("fc1", "ffn.layers.0.0"), ("fc2", "ffn.layers.1")):
            put(q + dst + ".kernel", linear_kernel(_t(sd[p + src + ".weight"])))
            put(q + dst + ".bias", _t(sd[p + src + ".bias"]))
        for src, dst in (("self_attn_layer_norm", "norms.0"), ("final_layer_norm", "norms.1")):
            put(q + dst + ".scale", _t(sd[p + src + ".weight"]))
            put(q + dst + ".bias", _t(sd[p + src + ".bias"]))
    put("level_encoding.embedding", _t(sd[prefix + "level_embed"]))
    put("lateral_convs.0.conv.kernel", conv_kernel(_t(sd[prefix + "adapter_1.0.weight"])))
    put("lateral_convs.0.gn.scale", _t(sd[prefix + "adapter_1.1.weight"]))
    put("lateral_convs.0.gn.bias", _t(sd[prefix + "adapter_1.1.bias"]))
    put("output_convs.0.conv.kernel", conv_kernel(_t(sd[prefix + "layer_1.0.weight"])))
    put("output_convs.0.gn.scale", _t(sd[prefix + "layer_1.1.weight"]))
    put("output_convs.0.gn.bias", _t(sd[prefix + "layer_1.1.bias"]))
    put("mask_feature.kernel", conv_kernel(_t(sd[prefix + "mask_projection.weight"])))
    put("mask_feature.bias", _t(sd[prefix + "mask_projection.bias"]))
    return out


def random_features(seed: int, b: int, h: int, w: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, C_IN, h // s, w // s, generator=g) for s in (4, 8, 16, 32)]


def nhwc(x: torch.Tensor) -> jax.Array:
    return jnp.asarray(_t(x.permute(0, 2, 3, 1)))


@pytest.fixture(scope="module")
def pd_pair():
    torch.manual_seed(0)
    hf_pd = hf.Mask2FormerPixelDecoder(hf_config(), feature_channels=[C_IN] * 4).eval()
    randomize_(hf_pd, 1)
    ours = {}
    for scan in (False, True):  # the encoder layers unrolled / as one lax.scan
        ours[scan] = MSDeformAttnPixelDecoder(
            [C_IN] * 4, feat_channels=D, num_layers=ENC_LAYERS, num_heads=HEADS, n_points=4,
            ffn_dim=96, num_feats=D // 2, gn_groups=32, scan_layers=scan, rngs=nnx.Rngs(0))
        update_module(ours[scan], hf_pixel_decoder_to_ours(hf_pd.state_dict()))
    return hf_pd, ours


def test_sine_encoding_matches_hf():
    pe = hf.Mask2FormerSinePositionEmbedding(num_position_features=16, normalize=True)
    ref = pe((1, 3, 5, 7), torch.device("cpu"), torch.float32)[0].permute(1, 2, 0)
    assert rel_err(_sine_table(5, 7, 16, 10000.0, True, 2 * np.pi), _t(ref)) <= RTOL["float32"]


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
@pytest.mark.parametrize("size", [(128, 96), (64, 64)])
def test_pixel_decoder_matches_hf(pd_pair, size, scan):
    hf_pd, ours = pd_pair
    ours = ours[scan]
    feats = random_features(2, 2, *size)
    with torch.no_grad():
        ref = hf_pd(feats)
    (mask_features, memories), _ = ours([nhwc(f) for f in feats])
    err = rel_err(mask_features, _t(ref.mask_features.permute(0, 2, 3, 1)))
    assert err <= RTOL["float32"], f"mask_features rel err {err:.2e}"
    assert len(memories) == 3
    for i, (m, r) in enumerate(zip(memories, ref.multi_scale_features)):
        err = rel_err(m, _t(r.permute(0, 2, 3, 1)))
        assert err <= RTOL["float32"], f"memory {i} rel err {err:.2e}"
