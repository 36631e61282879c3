"""BEiT checkpoints -> `BEiTAdapter` / `BEiT` params (CHECKPOINTS.md §2, §3, §4.3, §5).

Reads BEiT .pth files in unilm/timm naming (`blocks.{i}.norm1`, `mlp.fc1`, `patch_embed.proj`)
and in mmseg naming (`layers.{i}.ln1`, `ffn.layers.0.0`, `patch_embed.projection`, the output of
`beit2mmseg.py`).  A pretraining-only file's shared `rel_pos_bias.relative_position_bias_table`
is copied to every block first.  Every relative position table is then resized from the file's
window (27*27 + 3 rows at 224 px) to the model's table grid (79*79 + 3 at 640 px) with BEiT's
geometric-sequence bicubic interpolation (§2.4; SciPy's `RectBivariateSpline`, which replaces the
removed `interp2d` exactly), keeping the 3 cls rows at the end.

Adapter parameters (`spm`, `interactions`, `level_embed`, `up`, `norm_1..4`) are not in a BEiT
file: they take the model's own initial values, which follow the original's initialisation
(§2.9), and the report lists them.  Missing, unexpected and mis-shaped keys are reported together
in one `CheckpointError` naming the file (§8 #21: nothing is ignored silently).

`backbone_rules(prefix)` is the table for a full SARFormer backbone state dict in mmseg naming
(tables already 6244 rows); `convert/mmseg.py` reuses it under `backbone.`.

CLI: `sarformer convert beit SRC.pth DST.npz [--model auto|b|l] [--image-size 640]`.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import re
import sys
from typing import Any, Sequence

import numpy as np

from sarformer_jax.convert.common import (
    CheckpointError,
    Rule,
    conv_kernel,
    conv_transpose_kernel,
    convert_with_rules,
    flat_shapes,
    linear_kernel,
    load_state_dict,
    save_params,
)

# Adapter parameters a BEiT file does not hold (initialised by the model).
ADAPTER_PATTERNS = (r"(spm|interactions|up|norm_[1-4])\..*", r"level_embed")

# Source keys of BEiT files that SARFormer does not use (§5.2).
_BEIT_DROPS = (
    (r"fc_norm\.(weight|bias)", "ImageNet mean-pooling norm"),
    (r"norm\.(weight|bias)", "final norm of the pretraining model"),
    (r"head\.(weight|bias)", "ImageNet classifier"),
    (r"lm_head\.(weight|bias)", "masked-image-modelling head"),
    (r"mask_token", "masked-image-modelling token"),
    (r"rel_pos_bias\.relative_position_index", "buffer, recomputed"),
)


# ----------------------------------------------------------------------------------------------
# Rule helpers: `src` is a regex (named groups allowed), `dst` a re.sub template.


def _linear(src: str, dst: str) -> list[Rule]:
    return [Rule(src + r"\.weight", dst + ".kernel", linear_kernel, "Linear (out,in) -> (in,out)"),
            Rule(src + r"\.bias", dst + ".bias")]


def _layernorm(src: str, dst: str) -> list[Rule]:
    return [Rule(src + r"\.weight", dst + ".scale"), Rule(src + r"\.bias", dst + ".bias")]


def _batchnorm(src: str, dst: str) -> list[Rule]:
    return [Rule(src + r"\.weight", dst + ".scale"), Rule(src + r"\.bias", dst + ".bias"),
            Rule(src + r"\.running_mean", dst + ".mean"), Rule(src + r"\.running_var", dst + ".var"),
            Rule(src + r"\.num_batches_tracked", None, note="BatchNorm counter, unused")]


def _conv(src: str, dst: str, *, bias: bool) -> list[Rule]:
    rules = [Rule(src + r"\.weight", dst + ".kernel", conv_kernel, "Conv2d (O,I,kh,kw) -> (kh,kw,I,O)")]
    return rules + ([Rule(src + r"\.bias", dst + ".bias")] if bias else [])


def _beit_layer_rules(src: str, dst: str, *, unilm: bool) -> list[Rule]:
    """One BEiT layer; `src` matches the layer prefix with a named group `i`."""
    n1, n2 = ("norm1", "norm2") if unilm else ("ln1", "ln2")
    fc1, fc2 = (r"mlp\.fc1", r"mlp\.fc2") if unilm else (r"ffn\.layers\.0\.0", r"ffn\.layers\.1")
    return [
        *_layernorm(rf"{src}\.{n1}", dst + ".ln1"),
        *_layernorm(rf"{src}\.{n2}", dst + ".ln2"),
        Rule(src + r"\.attn\.qkv\.weight", dst + ".attn.qkv.kernel", linear_kernel,
             "qkv (3C,C) -> (C,3C); q/k/v blocks stay contiguous"),
        Rule(src + r"\.attn\.(?P<b>q_bias|v_bias)", dst + r".attn.\g<b>"),
        Rule(src + r"\.attn\.relative_position_bias_table", dst + ".attn.relative_position_bias_table",
             note="resized to the model's grid before the rules run"),
        Rule(src + r"\.attn\.relative_position_index", None, note="buffer, recomputed"),
        *_linear(src + r"\.attn\.proj", dst + ".attn.proj"),
        *_linear(src + "\\." + fc1, dst + ".ffn.layers.0.0"),
        *_linear(src + "\\." + fc2, dst + ".ffn.layers.1"),
        Rule(src + r"\.(?P<g>gamma_[12])", dst + r".\g<g>"),
    ]


def _extractor_rules(src: str, dst: str) -> list[Rule]:
    rules = [*_layernorm(src + r"\.(?P<nrm>query_norm|feat_norm|ffn_norm)", dst + r".\g<nrm>"),
             *_linear(src + r"\.attn\.(?P<lin>sampling_offsets|attention_weights|value_proj|output_proj)",
                      dst + r".attn.\g<lin>"),
             *_linear(src + r"\.ffn\.(?P<fc>fc1|fc2)", dst + r".ffn.\g<fc>"),
             *_conv(src + r"\.ffn\.dwconv\.dwconv", dst + ".ffn.dwconv.dwconv", bias=True)]
    return rules


def _injector_rules(src: str, dst: str) -> list[Rule]:
    return [*_layernorm(src + r"\.(?P<nrm>query_norm|feat_norm)", dst + r".\g<nrm>"),
            *_linear(src + r"\.attn\.(?P<lin>sampling_offsets|attention_weights|value_proj|output_proj)",
                     dst + r".attn.\g<lin>"),
            Rule(src + r"\.gamma", dst + ".gamma")]


def beit_rules(prefix: str = "", *, unilm: bool = False) -> list[Rule]:
    """BEiT part of the backbone: cls token, patch embedding and layers (mmseg or unilm names)."""
    p = re.escape(prefix)
    layer = rf"{p}blocks\.(?P<i>\d+)" if unilm else rf"{p}layers\.(?P<i>\d+)"
    return [
        Rule(rf"{p}cls_token", "cls_token"),
        *_conv(rf"{p}patch_embed\.proj" + ("" if unilm else "ection"), "patch_embed.projection", bias=True),
        *_beit_layer_rules(layer, r"layers.\g<i>", unilm=unilm),
    ]


def adapter_rules(prefix: str = "") -> list[Rule]:
    """SPM, interactions, level embedding, up-sampling and the four output BatchNorms."""
    p = re.escape(prefix)
    spm = rf"{p}spm"
    inter = rf"{p}interactions\.(?P<s>\d+)"
    return [
        Rule(rf"{p}level_embed", "level_embed"),
        *_conv(spm + r"\.(?P<c>stem\.[036]|conv[234]\.0)", r"spm.\g<c>", bias=False),
        *_batchnorm(spm + r"\.(?P<c>stem\.[147]|conv[234]\.1)", r"spm.\g<c>"),
        *_conv(spm + r"\.(?P<c>fc[1-4])", r"spm.\g<c>", bias=True),
        *_injector_rules(inter + r"\.injector", r"interactions.\g<s>.injector"),
        *_extractor_rules(inter + r"\.(?P<e>extractor|extra_extractors\.\d+)", r"interactions.\g<s>.\g<e>"),
        Rule(rf"{p}up\.weight", "up.kernel", conv_transpose_kernel,
             "ConvTranspose2d (I,O,kh,kw) -> flipped (kh,kw,I,O), transpose_kernel=False"),
        Rule(rf"{p}up\.bias", "up.bias"),
        *_batchnorm(rf"{p}(?P<n>norm_[1-4])", r"\g<n>"),
    ]


def backbone_rules(prefix: str = "backbone.") -> list[Rule]:
    """Rules for a whole SARFormer backbone state dict in mmseg naming (CHECKPOINTS.md §4.3),
    relative position tables already at the model's size (6244 rows at 640 px)."""
    return beit_rules(prefix) + adapter_rules(prefix)


def _drop_rules(extra: Sequence[tuple[str, str]] = ()) -> list[Rule]:
    return [Rule(pattern, None, note=note) for pattern, note in (*_BEIT_DROPS, *extra)]


def unilm_file_rules() -> list[Rule]:
    """Every key a unilm / timm BEiT file may hold."""
    return beit_rules(unilm=True) + _drop_rules()


def mmseg_file_rules() -> list[Rule]:
    """Every key a `beit2mmseg.py` BEiT file may hold (it keeps a stale copy of
    `patch_embed.proj.*` next to `patch_embed.projection.*`)."""
    return beit_rules() + _drop_rules([(r"patch_embed\.proj\.(weight|bias)",
                                        "duplicate left by beit2mmseg")])


# ----------------------------------------------------------------------------------------------
# Relative position tables


def expand_shared_table(sd: dict[str, np.ndarray]) -> bool:
    """Pretraining files hold one shared table: copy it to every block that lacks its own.
    Returns whether a shared table was found (and removed from `sd`)."""
    shared = sd.pop("rel_pos_bias.relative_position_bias_table", None)
    if shared is None:
        return False
    blocks = sorted({m.groups() for k in sd if (m := re.match(r"(blocks|layers)\.(\d+)\.", k))})
    for kind, i in blocks:
        sd.setdefault(f"{kind}.{i}.attn.relative_position_bias_table", shared.copy())
    return True


def _axis_coordinates(src_len: int, dst_len: int) -> tuple[np.ndarray, np.ndarray, slice]:
    """(source offsets, target offsets, crop of the source axis) for one table axis."""
    from sarformer_jax.models.beit import geometric_coordinates

    if dst_len > src_len:
        x, dx = geometric_coordinates(src_len, dst_len)
        return x, dx, slice(None)
    half_src, half_dst = src_len // 2, dst_len // 2
    offsets = np.arange(-half_dst, half_dst + 1, dtype=np.float64)
    return offsets, offsets, slice(half_src - half_dst, half_src + half_dst + 1)


def resize_table(table: np.ndarray, grid: Sequence[int]) -> np.ndarray:
    """[(2S-1)^2 + 3, n] table of a square S x S window -> [(2h-1)(2w-1) + 3, n] for grid
    (h, w), per CHECKPOINTS.md §2.4 (geometric-sequence bicubic spline, 3 cls rows kept last).
    Axes that shrink take the centre offsets (exact)."""
    from scipy.interpolate import RectBivariateSpline

    h, w = grid
    rows, heads = table.shape
    src = math.isqrt(rows - 3)
    dst_h, dst_w = 2 * h - 1, 2 * w - 1
    if (src, src) == (dst_h, dst_w):
        return table.astype(np.float32)
    xh, dxh, crop_h = _axis_coordinates(src, dst_h)
    xw, dxw, crop_w = _axis_coordinates(src, dst_w)
    out = []
    for head in range(heads):
        z = table[:-3, head].astype(np.float32).reshape(src, src)[crop_h, crop_w]
        spline = RectBivariateSpline(xh, xw, z.astype(np.float64), kx=3, ky=3, s=0)
        out.append(spline(dxh, dxw).reshape(-1))
    return np.concatenate([np.stack(out, -1), table[-3:]], 0).astype(np.float32)


def resize_tables(sd: dict[str, np.ndarray], grid: Sequence[int]) -> list[str]:
    """Resizes every per-layer table whose size is that of a square window but not of `grid`.
    Tables of any other shape are left for the rule engine to report.  Returns notes."""
    from sarformer_jax.models.beit import table_rows

    want = table_rows(grid)
    notes = []
    for key in sorted(sd):
        if not key.endswith("relative_position_bias_table"):
            continue
        t = sd[key]
        if t.ndim != 2 or t.shape[0] == want or t.shape[0] < 4:
            continue
        side = math.isqrt(t.shape[0] - 3)
        if side * side + 3 != t.shape[0] or side % 2 == 0:
            continue
        sd[key] = resize_table(t, grid)
        notes.append(f"{key}: {t.shape[0]} -> {want} rows")
    return notes


# ----------------------------------------------------------------------------------------------
# Conversion


def detect_naming(sd: dict[str, np.ndarray], path: str) -> str:
    """'unilm' (blocks.*) or 'mmseg' (layers.*); anything else is not a BEiT file."""
    unilm = any(k.startswith("blocks.") for k in sd)
    mmseg = any(k.startswith("layers.") for k in sd)
    if unilm == mmseg:
        sample = ", ".join(sorted(sd)[:5])
        what = "both blocks.* and layers.*" if unilm else "no blocks.* or layers.* keys"
        raise CheckpointError(f"{path}: not a BEiT checkpoint ({what}; first keys: {sample})")
    return "unilm" if unilm else "mmseg"


def detect_variant(sd: dict[str, np.ndarray]) -> str:
    width = sd["cls_token"].shape[-1] if "cls_token" in sd else None
    return {768: "b", 1024: "l"}.get(width, "b")


def convert_beit(path: str | pathlib.Path, cfg: Any, image_size: Sequence[int] | int = 640, *,
                 adapter: bool = True, seed: int = 0) -> tuple[dict[str, np.ndarray], dict]:
    """Converts a BEiT .pth file (unilm or mmseg naming) into flat params of
    `BEiTAdapter(cfg, image_size)` (or of `BEiT(cfg, image_size)` when `adapter=False`).

    Returns (flat params by dotted path, including BatchNorm statistics; report dict with the
    naming, resized tables, dropped source keys and the adapter paths left at their
    initialisation).  Raises `CheckpointError` listing every problem at once."""
    from flax import nnx

    from sarformer_jax.models.beit import BEiT, table_grid_of
    from sarformer_jax.models.vit_adapter import BEiTAdapter

    path = str(path)
    sd = load_state_dict(path)
    naming = detect_naming(sd, path)
    shared = expand_shared_table(sd)
    grid = table_grid_of(cfg, image_size)
    resized = resize_tables(sd, grid)
    rules = unilm_file_rules() if naming == "unilm" else mmseg_file_rules()
    dropped = sorted(k for k in sd if any(r.target is None and r.match(k) for r in rules))

    cls = BEiTAdapter if adapter else BEiT
    model = cls(cfg, image_size, rngs=nnx.Rngs(seed))
    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    expected = flat_shapes(state)
    flat, initialised = convert_with_rules(sd, rules, expected, source_name=path,
                                           allow_missing=ADAPTER_PATTERNS if adapter else ())
    init_values = {".".join(str(p) for p in k): v.get_value() for k, v in nnx.to_flat_state(state)}
    for name in initialised:
        flat[name] = np.asarray(init_values[name])
    report = {
        "source": path,
        "naming": naming,
        "table_grid": list(grid),
        "shared_table_expanded": shared,
        "resized": resized,
        "dropped": dropped,
        "converted": len(flat) - len(initialised),
        "initialised": initialised,
    }
    return flat, report


# ----------------------------------------------------------------------------------------------
# CLI: `sarformer convert beit SRC DST`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="BEiT .pth (unilm/timm or mmseg naming)")
    parser.add_argument("dst", help="output .npz (dotted parameter paths)")
    parser.add_argument("--model", choices=("auto", "b", "l"), default="auto",
                        help="backbone config (auto: from the embedding width)")
    parser.add_argument("--image-size", type=int, nargs="+", default=[640],
                        help="training crop (H [W]); sets the table grid when the config has none")
    parser.add_argument("--beit-only", action="store_true",
                        help="write only the BEiT parameters (no adapter initialisation)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the adapter initialisation")


def run(args: argparse.Namespace) -> int:
    from sarformer_jax.configs.common import beit_adapter_b, beit_adapter_l

    model = args.model
    size = tuple(args.image_size) if len(args.image_size) == 2 else args.image_size[0]
    try:
        if model == "auto":
            model = detect_variant(load_state_dict(args.src))
        cfg = beit_adapter_b() if model == "b" else beit_adapter_l()
        flat, report = convert_beit(args.src, cfg, size, adapter=not args.beit_only, seed=args.seed)
    except CheckpointError as e:
        print(f"sarformer convert beit: {e}", file=sys.stderr)
        return 1
    meta = {"format": "beit_adapter" if not args.beit_only else "beit", "model": model,
            "image_size": list(np.atleast_1d(size).tolist()), **report}
    save_params(args.dst, flat, meta)
    print(f"{args.src} ({report['naming']} naming) -> {args.dst}: {report['converted']} converted, "
          f"{len(report['resized'])} tables resized to grid {tuple(report['table_grid'])}, "
          f"{len(report['dropped'])} source keys dropped, "
          f"{len(report['initialised'])} adapter parameters initialised")
    return 0
