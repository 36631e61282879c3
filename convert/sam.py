"""Official Segment Anything checkpoints (`sam_vit_{b,l,h}_*.pth`) -> params of
`sarformer_jax.sam.Sam` (CHECKPOINTS.md §1, §5).

The files are plain state dicts.  Module names mirror segment-anything's, so most rules only
rename `weight` and change the layout; every key must be used (no drops are needed: pixel
mean/std are not in the files, the Fourier matrix is and is loaded).

    sarformer convert sam sam_vit_b_01ec64.pth sam_vit_b.npz
"""

from __future__ import annotations

import argparse
import hashlib
import pathlib
import re
import sys

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

_LINEARS = r"(?:attn\.qkv|attn\.proj|mlp\.lin1|mlp\.lin2|q_proj|k_proj|v_proj|out_proj|layers\.\d+)"

RULES: tuple[Rule, ...] = (
    # Every bias (Linear, Conv, ConvTranspose, LayerNorm) keeps its name and shape.
    Rule(r"(.+)\.bias", r"\1.bias"),
    # torch Linear (out, in) -> kernel (in, out).
    Rule(rf"(.+\.{_LINEARS})\.weight", r"\1.kernel", linear_kernel),
    # LayerNorm / LayerNorm2d weight -> scale.
    Rule(r"(image_encoder\.blocks\.\d+\.norm[12])\.weight", r"\1.scale"),
    Rule(r"(image_encoder\.neck\.[13])\.weight", r"\1.scale"),
    Rule(r"(prompt_encoder\.mask_downscaling\.[14])\.weight", r"\1.scale"),
    Rule(r"(mask_decoder\.output_upscaling\.1)\.weight", r"\1.scale"),
    Rule(r"(mask_decoder\.transformer\.(?:layers\.\d+\.norm[1-4]|norm_final_attn))\.weight", r"\1.scale"),
    # Conv2d (O, I, kh, kw) -> (kh, kw, I, O).
    Rule(r"(image_encoder\.patch_embed\.proj)\.weight", r"\1.kernel", conv_kernel),
    Rule(r"(image_encoder\.neck\.[02])\.weight", r"\1.kernel", conv_kernel),
    Rule(r"(prompt_encoder\.mask_downscaling\.[036])\.weight", r"\1.kernel", conv_kernel),
    # ConvTranspose2d (I, O, kh, kw) -> spatially flipped (kh, kw, I, O), transpose_kernel=False.
    Rule(r"(mask_decoder\.output_upscaling\.[03])\.weight", r"\1.kernel", conv_transpose_kernel),
    # nn.Embedding weight -> Embed embedding (no transpose).
    Rule(r"(prompt_encoder\.(?:point_embeddings\.\d+|not_a_point_embed|no_mask_embed))\.weight", r"\1.embedding"),
    Rule(r"(mask_decoder\.(?:iou_token|mask_tokens))\.weight", r"\1.embedding"),
    # Raw tensors: absolute position embedding (already NHWC), relative-position tables (resized at
    # run time for other grids, never here), the random Fourier matrix (a persistent buffer).
    Rule(r"image_encoder\.pos_embed", "image_encoder.pos_embed"),
    Rule(r"(image_encoder\.blocks\.\d+\.attn\.rel_pos_[hw])", r"\1"),
    Rule(r"prompt_encoder\.pe_layer\.positional_encoding_gaussian_matrix",
         "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
)

_WIDTH_TO_TYPE = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}


def infer_model_type(path: str | pathlib.Path, state: dict[str, np.ndarray] | None = None) -> str:
    """vit_b / vit_l / vit_h from the file name, else from the patch-embedding width."""
    m = re.search(r"vit_([blh])", pathlib.Path(path).name)
    if m:
        return f"vit_{m.group(1)}"
    w = None if state is None else state.get("image_encoder.patch_embed.proj.weight")
    if w is not None and w.shape[0] in _WIDTH_TO_TYPE:
        return _WIDTH_TO_TYPE[int(w.shape[0])]
    raise CheckpointError(f"{path}: cannot tell the SAM variant (no vit_b/l/h in the name, no "
                          "image_encoder.patch_embed.proj.weight of width 768/1024/1280); pass --model-type")


def expected_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Flat target shapes of a SAM built from `cfg`, without allocating it."""
    from flax import nnx
    from sarformer_jax.models.layers import init_rngs

    from sarformer_jax.sam.build import build_sam_from_config

    abstract = nnx.eval_shape(lambda: build_sam_from_config(cfg, rngs=init_rngs(0)))
    return flat_shapes(nnx.state(abstract))


def convert(path: str | pathlib.Path, *, model_type: str | None = None, cfg=None,
            encoder_depth: int | None = None,
            global_attn_indexes: tuple[int, ...] | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Reads an official SAM .pth and returns (flat params by dotted path, metadata).

    `model_type` None infers it (file name, then width); `cfg` (a `SamConfig`) overrides the
    preset, as do `encoder_depth` / `global_attn_indexes` (reduced test models).  A checkpoint
    of another size or family raises `CheckpointError` listing expected and found shapes."""
    from sarformer_jax.sam.build import SamConfig

    state = load_state_dict(path)
    if cfg is None:
        model_type = model_type or infer_model_type(path, state)
        cfg = SamConfig.preset(model_type).with_depth(encoder_depth, global_attn_indexes)
    else:
        model_type = model_type or _WIDTH_TO_TYPE.get(cfg.encoder_embed_dim, "custom")
    flat, _ = convert_with_rules(state, RULES, expected_shapes(cfg), source_name=f"{path} (as SAM {model_type})")
    meta = dict(family="sam", model_type=model_type, encoder_depth=cfg.encoder_depth,
                global_attn_indexes=list(cfg.encoder_global_attn_indexes), source=pathlib.Path(path).name)
    return flat, meta


def _md5(path: pathlib.Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="official checkpoint, e.g. sam_vit_b_01ec64.pth")
    parser.add_argument("dst", help="output .npz (load with sarformer_jax.sam.load_sam)")
    parser.add_argument("--model-type", choices=["auto", "vit_b", "vit_l", "vit_h"], default="auto",
                        help="SAM variant (auto: from the file name, else from the width)")
    parser.add_argument("--encoder-depth", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--global-attn-indexes", type=str, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    src = pathlib.Path(args.src)
    gidx = None if args.global_attn_indexes is None else tuple(int(i) for i in args.global_attn_indexes.split(","))
    try:
        flat, meta = convert(src, model_type=None if args.model_type == "auto" else args.model_type,
                             encoder_depth=args.encoder_depth, global_attn_indexes=gidx)
    except CheckpointError as e:
        print(f"sarformer convert sam: {e}", file=sys.stderr)
        return 1
    meta["source_md5"] = _md5(src)
    save_params(args.dst, flat, meta)
    n = sum(int(np.prod(v.shape)) for v in flat.values())
    print(f"{src} -> {args.dst}: SAM {meta['model_type']} (depth {meta['encoder_depth']}), "
          f"{len(flat)} tensors, {n:,} parameters; every source key used, none dropped; "
          f"md5 {meta['source_md5']}")
    return 0
