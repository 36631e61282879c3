"""SARFormer / Mask2Former mmseg-1.x checkpoints -> `Segmentor` params (CHECKPOINTS.md §4, §5;
ARCHITECTURE.md §9).

The original repository's training writes mmengine checkpoints: a dict with `meta`,
`state_dict`, `message_hub` (mmengine `HistoryBuffer` objects, which `weights_only` refuses),
and in `iter_*.pth` files `optimizer` / `param_schedulers`.  The file is read through
`common.read_torch_checkpoint` (restricted unpickler: no code from the file runs) and only
`state_dict` is used; the other entries are listed in the report.

`state_dict` holds `backbone.*` (BEiT ViT-Adapter, §4.3), `decode_head.*` (Mask2Former head,
§4.4) and, for SARFormer-B, `auxiliary_head.*` (FCN head, §4.5).  The conversion is
`mmseg_head.split_in_proj` (the fused `nn.MultiheadAttention` q/k/v rows -> three linears) and
then one rule table: `beit.backbone_rules` + `mmseg_head.head_rules` (+ `aux_head_rules` when the
config has an auxiliary head), every target prefixed with its module name in `Segmentor`.

Every source key is either used or dropped by an explicit rule with a reason:
* `*.relative_position_index` (recomputed by the model) and `*.num_batches_tracked` (unused);
* `auxiliary_head.*` only on request (`drop_aux=True`, inference without the training head).
The dead `enc_output*` parameters (§8 #10) are loaded (our head keeps them so the checkpoint
round-trips exactly) and listed as dead in the report.  SAM is not in these files: its weights
come from `sarformer convert sam` (`sam_vit_b_01ec64.pth`).

Expected shapes come from `nnx.eval_shape` of `build_model(cfg)` (no parameters allocated).  All
problems (missing, unexpected and mis-shaped keys, malformed `in_proj`, and a B / L / baseline /
auxiliary-head mismatch between the file and the config, with the shapes that show it) are raised
together in one `CheckpointError` naming the file.

CLI: `sarformer convert sarformer SRC.pth DST.npz --config CONFIG [--set KEY=VALUE] [--drop-aux]`.
`load_converted(model, DST.npz)` writes the result into a `Segmentor`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import re
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
from sarformer_jax.convert.beit import backbone_rules
from sarformer_jax.convert.common import (
    CheckpointError,
    Rule,
    convert_with_rules,
    extract_state_dict,
    flat_shapes,
    load_params,
    read_torch_checkpoint,
    save_params,
    update_module,
)
from sarformer_jax.convert.mmseg_head import aux_head_rules, head_rules, split_in_proj

FORMAT = "sarformer_mmseg"

# Known configs, to point at the right one when the file does not fit (kind, size, classes).
KNOWN_CONFIGS = {
    ("SARFormer", "B", 150): "ade20k_sarformer_b",
    ("SARFormer", "L", 150): "ade20k_sarformer_l",
    ("Mask2Former baseline", "B", 150): "ade20k_mask2former_adapter_b",
    ("SARFormer", "B", 19): "cityscapes_sarformer_b",
}

NOT_IN_CHECKPOINT = (
    "SAM (a plain attribute of the mask generator, not a submodule): convert "
    "sam_vit_b_01ec64.pth with `sarformer convert sam`; YOLO; data-preprocessor mean/std, "
    "positional encodings and relative position indexes (constants)"
)

_IN_PROJ = re.compile(r".*\.attn\.in_proj_(weight|bias)")


# ----------------------------------------------------------------------------------------------
# Rules


def _prefixed(rules: list[Rule], target_prefix: str) -> list[Rule]:
    return [r if r.target is None else dataclasses.replace(r, target=target_prefix + r.target)
            for r in rules]


def segmentor_rules(cfg: Any, *, drop_aux: bool = False) -> list[Rule]:
    """The whole table for a `Segmentor` built from `cfg` (source names after `split_in_proj`)."""
    model = cfg.model
    rules = _prefixed(backbone_rules("backbone."), "backbone.")
    rules += head_rules("decode_head.", "decode_head.", query_init=model.head.query_init,
                        keep_enc_output=True)
    aux = model.get("aux_head")
    if drop_aux:
        rules.append(Rule(r"auxiliary_head\..*", None,
                          note="auxiliary head dropped on request (training only)"))
    elif aux is not None and aux.enabled:
        rules += aux_head_rules("auxiliary_head.", "auxiliary_head.")
    return rules


# ----------------------------------------------------------------------------------------------
# Expected shapes (no parameters allocated)

_SHAPES_CACHE: dict[str, tuple[dict, dict]] = {}


def expected_shapes(cfg: Any) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """(params, batch stats) of `build_model(cfg)` as flat path -> shape, via `nnx.eval_shape`.
    Cached per model config."""
    from flax import nnx

    from sarformer_jax.models.layers import init_rngs
    from sarformer_jax.models.sarformer import build_model

    key = json.dumps(cfg.model.to_dict() if hasattr(cfg.model, "to_dict") else dict(cfg.model),
                     sort_keys=True, default=repr)
    if key not in _SHAPES_CACHE:
        model = nnx.eval_shape(lambda: build_model(cfg, rngs=init_rngs(0)))
        _SHAPES_CACHE[key] = (flat_shapes(nnx.state(model, nnx.Param)),
                              flat_shapes(nnx.state(model, nnx.BatchStat)))
    params, stats = _SHAPES_CACHE[key]
    return dict(params), dict(stats)


# ----------------------------------------------------------------------------------------------
# Which model a file holds, vs which the config builds


def _shape(sd: Mapping[str, np.ndarray], key: str) -> tuple[int, ...] | None:
    return tuple(np.shape(sd[key])) if key in sd else None


def describe_checkpoint(sd: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The distinguishing sizes of an mmseg SARFormer state dict (None where a key is absent)."""
    cls = _shape(sd, "backbone.cls_token")
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"backbone\.layers\.(\d+)\.", k))}
    query = _shape(sd, "decode_head.query_embed.weight")
    classes = _shape(sd, "decode_head.cls_embed.weight")
    return {
        "backbone_width": cls[-1] if cls else None,
        "backbone_depth": max(layers) + 1 if layers else 0,
        "head_width": query[1] if query and len(query) == 2 else None,
        "num_queries": query[0] if query else None,
        "num_classes": classes[0] - 1 if classes else None,
        "query_feat": "decode_head.query_feat.weight" in sd,
        "aux_head": any(k.startswith("auxiliary_head.") for k in sd),
    }


def describe_config(cfg: Any) -> dict[str, Any]:
    model = cfg.model
    aux = model.get("aux_head")
    return {
        "backbone_width": model.backbone.embed_dim,
        "backbone_depth": model.backbone.depth,
        "head_width": model.head.feat_channels,
        "num_queries": model.head.num_queries,
        "num_classes": model.head.num_classes,
        "query_feat": model.head.query_init == "learned",
        "aux_head": bool(aux is not None and aux.enabled),
    }


def variant_name(d: Mapping[str, Any]) -> str:
    """'SARFormer-B', 'Mask2Former baseline-L', ... or the raw sizes for other widths."""
    kind = "Mask2Former baseline" if d["query_feat"] else "SARFormer"
    size = {(768, 12): "B", (1024, 24): "L"}.get((d["backbone_width"], d["backbone_depth"]))
    if size is None:
        size = f"(width {d['backbone_width']}, depth {d['backbone_depth']})"
    return f"{kind}-{size}"


def _summary(d: Mapping[str, Any]) -> str:
    return (f"backbone width {d['backbone_width']}, depth {d['backbone_depth']}, head width "
            f"{d['head_width']}, {d['num_queries']} queries, {d['num_classes']} classes, "
            f"{'with' if d['query_feat'] else 'no'} query_feat, "
            f"{'with' if d['aux_head'] else 'no'} auxiliary head")


_EVIDENCE = {
    "backbone_width": "backbone.cls_token",
    "backbone_depth": "backbone.layers.*",
    "head_width": "decode_head.query_embed.weight",
    "num_queries": "decode_head.query_embed.weight",
    "num_classes": "decode_head.cls_embed.weight",
    "query_feat": "decode_head.query_feat.weight",
    "aux_head": "auxiliary_head.*",
}


def variant_mismatch(sd: Mapping[str, np.ndarray], cfg: Any, *, drop_aux: bool = False) -> str | None:
    """One sentence saying how the file and the config disagree (None when they agree)."""
    found, want = describe_checkpoint(sd), describe_config(cfg)
    if drop_aux:
        found["aux_head"] = False
    diffs = []
    for field, expected in want.items():
        if found[field] == expected:
            continue
        key = _EVIDENCE[field]
        if field == "backbone_depth":
            evidence = ""
        elif key in sd:
            evidence = f" ({key} {_shape(sd, key)})"
        else:
            evidence = f" ({key} {'present' if found[field] else 'absent'})"
        diffs.append(f"{field.replace('_', ' ')}: expected {expected}, found {found[field]}{evidence}")
    if not diffs:
        return None
    name = cfg.get("name", "?")
    msg = (f"the checkpoint is {variant_name(found)} ({_summary(found)}) but config {name} builds "
           f"{variant_name(want)} ({_summary(want)}): " + "; ".join(diffs))
    kind, size = variant_name(found).rsplit("-", 1)
    suggestion = KNOWN_CONFIGS.get((kind, size, found["num_classes"]))
    if suggestion and suggestion != name:
        msg += f" (use --config {suggestion})"
    elif found["aux_head"] and not want["aux_head"]:
        msg += " (set model.aux_head.enabled=True, or drop it with --drop-aux)"
    elif want["aux_head"] and not found["aux_head"]:
        msg += " (set model.aux_head.enabled=False)"
    return msg


# ----------------------------------------------------------------------------------------------
# Conversion


def _split(sd: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    """`split_in_proj` on the well-formed in_proj tensors; malformed ones become problems (their
    targets are then reported missing too)."""
    split_keys, problems = [], []
    good = {}
    for key, value in sd.items():
        if _IN_PROJ.fullmatch(key):
            shape = np.shape(value)
            if len(shape) == 0 or shape[0] % 3 or (key.endswith("weight") and len(shape) != 2) \
                    or (key.endswith("bias") and len(shape) != 1):
                problems.append(f"{key}: found {tuple(shape)}, expected (3D, D) / (3D)")
                continue
            split_keys.append(key)
        good[key] = value
    return split_in_proj(good), sorted(split_keys), problems


def convert_state_dict(sd: Mapping[str, np.ndarray], cfg: Any, *, source_name: str,
                       drop_aux: bool = False) -> tuple[dict[str, np.ndarray], dict]:
    """`convert_sarformer` on an already extracted state dict (numpy arrays, mmseg names)."""
    sd = dict(sd)
    mismatch = variant_mismatch(sd, cfg, drop_aux=drop_aux)
    split, split_keys, problems = _split(sd)
    rules = segmentor_rules(cfg, drop_aux=drop_aux)
    params, stats = expected_shapes(cfg)
    expected = {**params, **stats}
    try:
        flat, _ = convert_with_rules(split, rules, expected, source_name=source_name)
    except CheckpointError as e:
        problems.append(str(e).removeprefix(f"{source_name}: "))
    if mismatch or problems:
        raise CheckpointError(f"{source_name}: " + " | ".join(([mismatch] if mismatch else []) + problems))

    dropped: dict[str, list[str]] = {}
    for key in sorted(split):
        rule = next(r for r in rules if r.match(key))
        if rule.target is None:
            dropped.setdefault(rule.note or "dropped", []).append(key)
    n_dropped = sum(len(v) for v in dropped.values())
    used = len(sd) - n_dropped
    dead = sorted(k for k in sd if re.fullmatch(r"decode_head\.enc_output(_norm)?\.(weight|bias)", k))
    report = {
        "source": source_name,
        "config": cfg.get("name", "?"),
        "checkpoint": variant_name(describe_checkpoint(sd)),
        "num_source_keys": len(sd),
        "used": used,
        "dropped": dropped,
        "num_dropped": n_dropped,
        "in_proj_split": split_keys,
        "dead_loaded": dead,
        "num_targets": len(flat),
        "num_batch_stats": sum(1 for k in flat if k in stats),
        "num_parameters": int(sum(int(np.prod(params[k])) for k in flat if k in params)),
        "not_in_checkpoint": NOT_IN_CHECKPOINT,
    }
    return flat, report


def convert_sarformer(path: str | pathlib.Path, cfg: Any, *, drop_aux: bool = False
                      ) -> tuple[dict[str, np.ndarray], dict]:
    """Converts an mmseg-1.x SARFormer / Mask2Former checkpoint for the model of `cfg`.

    Returns (flat params by `Segmentor` state path, BatchNorm statistics included; report dict:
    source, config, detected variant, key bookkeeping (num_source_keys == used + num_dropped),
    dropped keys by reason, split in_proj keys, dead keys loaded, target and parameter counts,
    the other top-level entries of the file that were ignored).  Raises `CheckpointError`
    naming the file and listing every problem at once."""
    path = str(path)
    obj = read_torch_checkpoint(path)
    sd = extract_state_dict(obj, path)
    ignored = sorted(str(k) for k in obj if k != "state_dict") if "state_dict" in obj else []
    flat, report = convert_state_dict(sd, cfg, source_name=path, drop_aux=drop_aux)
    report["ignored_entries"] = ignored
    return flat, report


# ----------------------------------------------------------------------------------------------
# Loading a converted file


def load_converted(model: Any, path: str | pathlib.Path) -> dict:
    """Writes a converted .npz (from `convert_sarformer` / the CLI) into `model` (a `Segmentor`)
    in place, after checking that the file holds exactly the model's params and batch stats
    with the model's shapes.  Returns the file's meta."""
    path = str(path)
    flat, meta = load_params(path)
    made_for = meta.get("config")
    hint = f" (converted for config {made_for})" if made_for else ""
    update_module(model, flat, source=path + hint)
    return meta


# ----------------------------------------------------------------------------------------------
# CLI: `sarformer convert sarformer SRC DST --config CONFIG`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="mmseg-1.x checkpoint (.pth) of SARFormer-B/-L or the baseline")
    parser.add_argument("dst", help="output .npz (dotted Segmentor state paths)")
    parser.add_argument("--config", required=True,
                        help="config file or name whose model the file holds (e.g. ade20k_sarformer_b)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override (repeatable)")
    parser.add_argument("--drop-aux", action="store_true",
                        help="drop auxiliary_head.* (with model.aux_head.enabled=False)")


def run(args: argparse.Namespace) -> int:
    from sarformer_jax.config import load_config

    cfg = load_config(args.config, args.set)
    try:
        flat, report = convert_sarformer(args.src, cfg, drop_aux=args.drop_aux)
    except CheckpointError as e:
        print(f"sarformer convert sarformer: {e}", file=sys.stderr)
        return 1
    meta = {"format": FORMAT, "config": cfg.get("name", args.config), "config_spec": args.config,
            "overrides": list(args.set), "source": str(args.src), "report": report}
    save_params(args.dst, flat, meta)
    print(f"{args.src} ({report['checkpoint']}) -> {args.dst}: {report['used']} of "
          f"{report['num_source_keys']} keys used, {report['num_dropped']} dropped, "
          f"{report['num_targets']} arrays ({report['num_parameters']:,} parameters); "
          f"SAM weights: `sarformer convert sam`")
    return 0
