"""Converter rules for the SARFormer decode head (`decode_head.*`, mmdet 3.x `Mask2FormerHead`)
and the auxiliary FCN head (`auxiliary_head.*`) of an mmseg 1.x checkpoint, CHECKPOINTS.md §4.4,
§4.5, §5.  `sarformer_jax.convert.mmseg` combines them with the backbone rules.

Our modules mirror the torch names, so the rules are renames plus layout transforms, with one
deliberate exception: `nn.MultiheadAttention.in_proj_weight` / `in_proj_bias` (3D rows: q, k, v)
are split into `q_proj` / `k_proj` / `v_proj`.  A rule maps one source key to one target, so the
split is a pre-pass, `split_in_proj`, to run on the state dict before the rules.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from sarformer_jax.convert.common import Rule, conv_kernel, identity, linear_kernel

_IN_PROJ = re.compile(r"(.*\.attn)\.in_proj_(weight|bias)")


def split_in_proj(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rewrites every `<...>.attn.in_proj_{weight,bias}` ((3D, D) / (3D)) into
    `<...>.attn.{q,k,v}_proj.{weight,bias}` row blocks; other keys pass through."""
    out: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        m = _IN_PROJ.fullmatch(key)
        if not m:
            out[key] = value
            continue
        value = np.asarray(value)
        if value.shape[0] % 3:
            raise ValueError(f"{key}: first dimension {value.shape[0]} is not 3 * D")
        d = value.shape[0] // 3
        for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[f"{m.group(1)}.{name}.{m.group(2)}"] = value[i * d:(i + 1) * d]
    return out


def _linear(src: str, dst: str) -> list[Rule]:
    return [Rule(src + r"\.weight", dst + ".kernel", linear_kernel), Rule(src + r"\.bias", dst + ".bias")]


def _conv(src: str, dst: str, bias: bool = True) -> list[Rule]:
    rules = [Rule(src + r"\.weight", dst + ".kernel", conv_kernel)]
    return rules + ([Rule(src + r"\.bias", dst + ".bias")] if bias else [])


def _norm(src: str, dst: str) -> list[Rule]:
    return [Rule(src + r"\.weight", dst + ".scale"), Rule(src + r"\.bias", dst + ".bias")]


def head_rules(prefix: str = "decode_head.", target_prefix: str = "", *, query_init: str = "sam_pooling",
               keep_enc_output: bool = True) -> list[Rule]:
    """Rules for `prefix` keys of the decode head onto a `Mask2FormerHead` at `target_prefix`.

    `query_init="learned"` also maps `query_feat` (Mask2Former baselines).  `keep_enc_output=False`
    drops the dead `enc_output*` parameters (§8 #10) instead of loading them."""
    s, t = re.escape(prefix), target_prefix
    pd, tpd = s + r"pixel_decoder\.", t + "pixel_decoder."
    td, ttd = s + r"transformer_decoder\.", t + "transformer_decoder."
    rules: list[Rule] = []
    # pixel decoder
    rules += _conv(pd + r"input_convs\.(\d+)\.conv", tpd + r"input_convs.\1.conv")
    rules += _conv(pd + r"(lateral_convs|output_convs)\.(\d+)\.conv", tpd + r"\1.\2.conv", bias=False)
    rules += _norm(pd + r"(input_convs|lateral_convs|output_convs)\.(\d+)\.gn", tpd + r"\1.\2.gn")
    enc = pd + r"encoder\.layers\.(\d+)\."
    tenc = tpd + r"encoder.layers.\1."
    rules += _linear(enc + r"self_attn\.(sampling_offsets|attention_weights|value_proj|output_proj)",
                     tenc + r"self_attn.\2")
    rules += _linear(enc + r"ffn\.layers\.0\.0", tenc + "ffn.layers.0.0")
    rules += _linear(enc + r"ffn\.layers\.1", tenc + "ffn.layers.1")
    rules += _norm(enc + r"norms\.(\d+)", tenc + r"norms.\2")
    rules.append(Rule(pd + r"level_encoding\.weight", tpd + "level_encoding.embedding"))
    rules += _conv(pd + r"mask_feature", tpd + "mask_feature")
    # transformer decoder (in_proj already split by `split_in_proj`)
    lay = td + r"layers\.(\d+)\."
    tlay = ttd + r"layers.\1."
    rules += _linear(lay + r"(self_attn|cross_attn)\.attn\.(q_proj|k_proj|v_proj|out_proj)",
                     tlay + r"\2.attn.\3")
    rules += _linear(lay + r"ffn\.layers\.0\.0", tlay + "ffn.layers.0.0")
    rules += _linear(lay + r"ffn\.layers\.1", tlay + "ffn.layers.1")
    rules += _norm(lay + r"norms\.(\d+)", tlay + r"norms.\2")
    rules += _norm(td + r"post_norm", ttd + "post_norm")
    # embeddings and prediction heads
    rules.append(Rule(s + r"query_embed\.weight", t + "query_embed.embedding"))
    rules.append(Rule(s + r"level_embed\.weight", t + "level_embed.embedding"))
    if query_init == "learned":
        rules.append(Rule(s + r"query_feat\.weight", t + "query_feat.embedding"))
    rules += _linear(s + r"cls_embed", t + "cls_embed")
    rules += _linear(s + r"mask_embed\.(\d+)", t + r"mask_embed.\1")
    if keep_enc_output:
        rules += _linear(s + r"enc_output", t + "enc_output")
        rules += _norm(s + r"enc_output_norm", t + "enc_output_norm")
    else:
        rules.append(Rule(s + r"enc_output(_norm)?\.(weight|bias)", None, identity,
                          note="dead parameters (§8 #10)"))
    return rules


def aux_head_rules(prefix: str = "auxiliary_head.", target_prefix: str = "") -> list[Rule]:
    """Rules for the auxiliary FCN head onto `AdapterFCNHead` (BN running stats -> batch stats)."""
    s, t = re.escape(prefix), target_prefix
    rules = _conv(s + r"convs\.(\d+)\.conv", t + r"convs.\1.conv", bias=False)
    rules += _norm(s + r"convs\.(\d+)\.bn", t + r"convs.\1.bn")
    rules.append(Rule(s + r"convs\.(\d+)\.bn\.running_mean", t + r"convs.\1.bn.mean"))
    rules.append(Rule(s + r"convs\.(\d+)\.bn\.running_var", t + r"convs.\1.bn.var"))
    rules.append(Rule(s + r"convs\.(\d+)\.bn\.num_batches_tracked", None, identity, note="not used"))
    rules += _conv(s + r"conv_seg", t + "conv_seg")
    return rules
