"""`sarformer convert FAMILY ...`: one converter module per checkpoint family.

    sarformer convert sam sam_vit_b_01ec64.pth sam_vit_b.npz
    sarformer convert beit beit_base_patch16_224_pt22k_ft22k.pth beit_b.npz
    sarformer convert sarformer iter_160000.pth sarformer_b.npz

Each family module exposes `add_arguments(parser)` and `run(args) -> int` and is imported only
when chosen; a family whose module is not built yet says so on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

FAMILIES: dict[str, tuple[str, str]] = {
    "sam": ("sarformer_jax.convert.sam", "official Segment Anything checkpoints (vit_b / vit_l / vit_h)"),
    "beit": ("sarformer_jax.convert.beit", "unilm BEiT checkpoints used to initialise the backbone"),
    "sarformer": ("sarformer_jax.convert.mmseg", "SARFormer / Mask2Former mmseg-1.x checkpoints"),
}


def _module(family: str):
    name = FAMILIES[family][0]
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:
            return None
        raise
    return module if hasattr(module, "add_arguments") and hasattr(module, "run") else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("family", choices=sorted(FAMILIES), help="checkpoint family")
    parser.add_argument("family_args", nargs=argparse.REMAINDER, help="arguments of the converter")


def run(args: argparse.Namespace) -> int:
    module = _module(args.family)
    if module is None:
        print(f"sarformer convert {args.family}: not built yet in this version", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog=f"sarformer convert {args.family}", description=FAMILIES[args.family][1])
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(args.family_args)) or 0)
