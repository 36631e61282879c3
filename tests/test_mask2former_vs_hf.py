"""Mask2Former head parity against HF transformers (pixel decoder + `Mask2FormerTransformerModule`
+ class predictor, random weights mapped into ours): all per-layer class and mask predictions,
fp32 on the CPU.

Deliberate differences between HF's and mmdet's decoder (which we follow), and how the test
bridges them:
* HF's `decoder_layers` counts the prediction from the initial queries: `decoder_layers = L + 1`
  builds L layers.  Ours (mmdet) counts layers.
* HF's self-attention has separate q/k/v projections (`Mask2FormerAttention`), mmdet uses
  `nn.MultiheadAttention` with a packed `in_proj_weight` for both attentions; the maths is the
  same (HF's cross-attention is an `nn.MultiheadAttention`, split here like the converter does).
* HF keeps the class predictor outside the decoder (`class_predictor`) and calls the post norm
  `layernorm`; mmdet's `cls_embed` / `post_norm` sit in the head.  Both apply the post norm
  before every prediction.
* The SARFormer path (pooled query features, layer-0 mask from proposals) does not exist in HF:
  the test feeds HF's decoder our pooling oracle (torch, float64 as the original) as
  `inputs_embeds` and overrides the first attention mask HF computes from prediction 0.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import RTOL, rel_err
from sarformer_jax.convert.common import linear_kernel, update_module
from sarformer_jax.models.mask2former import Mask2FormerHead
from test_pixel_decoder_vs_hf import (C_IN, D, DEC_LAYERS, K, Q, _t, head_config, hf,
                                      hf_config, hf_pixel_decoder_to_ours, nhwc, random_features,
                                      randomize_)


def hf_decoder_to_ours(sd: dict, cls_sd: dict) -> dict:
    """HF transformer module + class predictor state dicts -> our flat paths (head level)."""
    out = {}

    def lin(dst, w, b):
        out[dst + ".kernel"] = linear_kernel(_t(w))
        out[dst + ".bias"] = _t(b)

    out["query_embed.embedding"] = _t(sd["queries_embedder.weight"])
    out["query_feat.embedding"] = _t(sd["queries_features.weight"])
    out["level_embed.embedding"] = _t(sd["level_embed.weight"])
    for k in range(DEC_LAYERS):
        p, q = f"decoder.layers.{k}.", f"transformer_decoder.layers.{k}."
        for x in "qkv":
            lin(q + f"self_attn.attn.{x}_proj", sd[p + f"self_attn.{x}_proj.weight"], sd[p + f"self_attn.{x}_proj.bias"])
        lin(q + "self_attn.attn.out_proj", sd[p + "self_attn.out_proj.weight"], sd[p + "self_attn.out_proj.bias"])
        w, b = sd[p + "cross_attn.in_proj_weight"], sd[p + "cross_attn.in_proj_bias"]
        for i, x in enumerate("qkv"):
            lin(q + f"cross_attn.attn.{x}_proj", w[i * D:(i + 1) * D], b[i * D:(i + 1) * D])
        lin(q + "cross_attn.attn.out_proj", sd[p + "cross_attn.out_proj.weight"], sd[p + "cross_attn.out_proj.bias"])
        lin(q + "ffn.layers.0.0", sd[p + "fc1.weight"], sd[p + "fc1.bias"])
        lin(q + "ffn.layers.1", sd[p + "fc2.weight"], sd[p + "fc2.bias"])
        for src, n in (("cross_attn_layer_norm", 0), ("self_attn_layer_norm", 1), ("final_layer_norm", 2)):
            out[q + f"norms.{n}.scale"] = _t(sd[p + src + ".weight"])
            out[q + f"norms.{n}.bias"] = _t(sd[p + src + ".bias"])
    out["transformer_decoder.post_norm.scale"] = _t(sd["decoder.layernorm.weight"])
    out["transformer_decoder.post_norm.bias"] = _t(sd["decoder.layernorm.bias"])
    for i, j in ((0, 0), (1, 2), (2, 4)):
        p = f"decoder.mask_predictor.mask_embedder.{i}.0."
        lin(f"mask_embed.{j}", sd[p + "weight"], sd[p + "bias"])
    lin("cls_embed", cls_sd["weight"], cls_sd["bias"])
    return out


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    cfg = hf_config()
    hf_pd = hf.Mask2FormerPixelDecoder(cfg, feature_channels=[C_IN] * 4).eval()
    hf_tm = hf.Mask2FormerTransformerModule(in_features=D, config=cfg).eval()
    hf_cls = torch.nn.Linear(D, K + 1)
    for i, m in enumerate((hf_pd, hf_tm, hf_cls)):
        randomize_(m, 10 + i)
    flat = hf_pixel_decoder_to_ours(hf_pd.state_dict(), out_prefix="pixel_decoder.")
    flat.update(hf_decoder_to_ours(hf_tm.state_dict(), hf_cls.state_dict()))
    heads = {}
    for mode in ("learned", "sam_pooling"):
        hc = head_config()
        hc.query_init = mode
        head = Mask2FormerHead(hc, [C_IN] * 4, num_classes=K, rngs=nnx.Rngs(0))
        kept = {k: v for k, v in flat.items() if mode == "learned" or "query_feat" not in k}
        update_module(head, kept, partial=True)
        heads[mode] = head
    return hf_pd, hf_tm, hf_cls, heads


def _compare(preds, hf_masks, hf_hidden, hf_cls):
    assert len(preds) == len(hf_masks) == DEC_LAYERS + 1
    for i, (p, m, z) in enumerate(zip(preds, hf_masks, hf_hidden)):
        cls_ref = _t(hf_cls(z.transpose(0, 1)))
        e_cls, e_mask = rel_err(p["cls"], cls_ref), rel_err(p["mask"], _t(m))
        assert e_cls <= RTOL["float32"], f"prediction {i}: cls rel err {e_cls:.2e}"
        assert e_mask <= RTOL["float32"], f"prediction {i}: mask rel err {e_mask:.2e}"


def test_learned_queries_match_hf(models):
    hf_pd, hf_tm, hf_cls, heads = models
    feats = random_features(3, 2, 128, 96)
    with torch.no_grad():
        pd_out = hf_pd(feats)
        dec = hf_tm(pd_out.multi_scale_features, pd_out.mask_features)
        preds, inter = heads["learned"]([nhwc(f) for f in feats], None, None)
        _compare(preds, dec.masks_queries_logits, dec.intermediate_hidden_states, hf_cls)
    assert preds[0]["mask"].shape == (2, Q, 32, 24)


def _torch_guidance(proposals: torch.Tensor, adapter_feat: torch.Tensor, size, invert: bool, heads: int):
    """Oracle for §4.4 / §4.5 written as the original: F.interpolate, float64 pooling."""
    F = torch.nn.functional
    w = F.interpolate(proposals, size=adapter_feat.shape[-2:], mode="bilinear", align_corners=False)
    w = w.flatten(2).double()
    f = adapter_feat.flatten(2).transpose(1, 2).double()
    den = w.sum(-1, keepdim=True)
    den = torch.where(den == 0, torch.ones_like(den), den)
    query = (torch.bmm(w, f) / den).float()
    s = F.interpolate(proposals, size=size, mode="bilinear", align_corners=False).flatten(2)
    mask = s < 0.5
    if invert:
        mask = ~mask
    return query, mask.repeat_interleave(heads, 0)


@pytest.mark.parametrize("invert", [True, False])
def test_sam_pooling_matches_hf_decoder(models, invert):
    hf_pd, hf_tm, hf_cls, heads = models
    feats = random_features(4, 2, 128, 96)
    raw = random_features(5, 2, 128, 96)
    g = torch.Generator().manual_seed(6)
    proposals = (torch.rand(2, Q, 128, 96, generator=g) > 0.6).float()
    proposals[0, 3] = 0.0  # an empty proposal pools to zero
    with torch.no_grad():
        pd_out = hf_pd(feats)
        adapter_feat = hf_pd(raw).mask_features
        m32 = pd_out.multi_scale_features[0]
        query, first_mask = _torch_guidance(proposals, adapter_feat, m32.shape[-2:], invert, hf_tm.decoder.layers[0].cross_attn.num_heads)
        predictor = hf_tm.decoder.mask_predictor
        original_forward = predictor.forward
        calls = []

        def forward(*args, **kwargs):  # replace the layer-0 mask computed from prediction 0
            out_mask, attn = original_forward(*args, **kwargs)
            calls.append(1)
            return out_mask, (first_mask if len(calls) == 1 else attn)

        predictor.forward = forward
        try:
            # Mask2FormerTransformerModule.forward with pooled `inputs_embeds`
            pos, mem, sizes = [], [], []
            for i, x in enumerate(pd_out.multi_scale_features):
                sizes.append(x.shape[-2:])
                pos.append(hf_tm.position_embedder(x.shape, x.device, x.dtype, None).flatten(2).permute(2, 0, 1))
                mem.append((x.flatten(2) + hf_tm.level_embed.weight[i][None, :, None]).permute(2, 0, 1))
            qpos = hf_tm.queries_embedder.weight.unsqueeze(1).repeat(1, 2, 1)
            dec = hf_tm.decoder(inputs_embeds=query.transpose(0, 1), multi_stage_positional_embeddings=pos,
                                pixel_embeddings=pd_out.mask_features, encoder_hidden_states=mem,
                                query_position_embeddings=qpos, feature_size_list=sizes, return_dict=True)
        finally:
            predictor.forward = original_forward
        preds, inter = heads["sam_pooling"]([nhwc(f) for f in feats], [nhwc(f) for f in raw],
                                            jnp.asarray(_t(proposals)), invert_first_mask=invert)
    assert rel_err(inter["query_feat"], _t(query)) <= RTOL["float32"]
    assert np.array_equal(np.asarray(inter["first_attn_mask"]), _t(first_mask[::hf_tm.decoder.layers[0].cross_attn.num_heads]))
    assert np.all(np.asarray(inter["query_feat"][0, 3]) == 0)
    _compare(preds, dec.masks_queries_logits, dec.intermediate_hidden_states, hf_cls)
