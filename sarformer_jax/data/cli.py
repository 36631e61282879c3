"""`sarformer data ...`: dataset jobs.

  sarformer data synth --out data/synthetic [--num-train N --num-val M --size HxW --classes K
                                             --seed S --layout ade20k|cityscapes]
  sarformer data cityscapes-train-ids --root /data/cityscapes [--overwrite]

`synth` defaults come from configs/tiny.py (`data_gen`, `data.num_classes`).
"""

from __future__ import annotations

import argparse
import sys


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like HxW (e.g. 160x192), got {text!r}")
    return h, w


def _tiny_defaults():
    from sarformer_jax.configs import tiny

    cfg = tiny.get_config()
    return cfg.data_gen, cfg.data.num_classes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    gen, num_classes = _tiny_defaults()
    sub = parser.add_subparsers(dest="data_command", metavar="JOB", required=True)
    p = sub.add_parser("synth", help="write the synthetic dataset (+ proposal cache)")
    p.add_argument("--out", required=True, help="output directory (data.root of configs/tiny.py)")
    p.add_argument("--num-train", type=int, default=gen.num_train)
    p.add_argument("--num-val", type=int, default=gen.num_val)
    p.add_argument("--size", type=_size, default=tuple(gen.image_size), help="image HxW")
    p.add_argument("--classes", type=int, default=num_classes, help="number of object classes K")
    p.add_argument("--seed", type=int, default=gen.seed)
    p.add_argument("--layout", choices=("ade20k", "cityscapes"), default="ade20k")
    p = sub.add_parser("cityscapes-train-ids",
                       help="write *_gtFine_labelTrainIds.png from *_gtFine_labelIds.png")
    p.add_argument("--root", required=True, help="Cityscapes root (holds gtFine/)")
    p.add_argument("--overwrite", action="store_true", help="rewrite existing labelTrainIds files")


def run(args: argparse.Namespace) -> int:
    if args.data_command == "synth":
        from sarformer_jax.data import synthetic

        summary = synthetic.generate(args.out, num_train=args.num_train, num_val=args.num_val,
                                     image_size=args.size, num_classes=args.classes,
                                     seed=args.seed, layout=args.layout, progress=True)
        print(f"wrote {summary['num_train']} train / {summary['num_val']} val {args.layout} "
              f"images of {args.size[0]}x{args.size[1]}, {args.classes} classes, to {args.out}")
        return 0
    if args.data_command == "cityscapes-train-ids":
        from sarformer_jax.data import cityscapes

        written = cityscapes.convert_label_ids(args.root, overwrite=args.overwrite, progress=True)
        print(f"wrote {written} labelTrainIds files under {args.root}/gtFine")
        return 0
    print(f"unknown data job {args.data_command!r}", file=sys.stderr)
    return 2
