"""`sarformer predict`: segment images and write, per image, the raw label PNG and a colour
overlay with the dataset palette and a legend of the classes present.

With `guidance.source="cached"` each image's proposals are looked up in the cache by file stem
(`<cache_dir>/<split>/<stem>.npz`, written by `sarformer amg --dataset` or the synthetic
generator); with `guidance.source="boxes"` its detector boxes are `<boxes_dir>/<stem>.json` or
`<boxes_dir>/<split>/<stem>.json` (`--boxes DIR` overrides `guidance.boxes_dir`).  An image that
cannot be decoded, or whose proposals / boxes are missing, is reported by name and skipped.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

from sarformer_jax.config import Config, load_config
from sarformer_jax.guidance import guidance_refusal


def class_names_and_palette(cfg: Config) -> tuple[list[str], np.ndarray]:
    from sarformer_jax import visualize

    k = int(cfg.model.head.num_classes)
    dataset = str(cfg.data.dataset)
    if dataset in ("ade20k", "tfds:scene_parse150") and k == 150:
        return list(visualize.ADE20K_CLASSES), np.asarray(visualize.ADE20K_PALETTE, np.uint8)
    if dataset in ("cityscapes", "tfds:cityscapes") and k == 19:
        return list(visualize.CITYSCAPES_CLASSES), np.asarray(visualize.CITYSCAPES_PALETTE,
                                                              np.uint8)
    if dataset == "synthetic":
        from sarformer_jax.data.synthetic import class_style

        # after reduce_zero_label, train id i is synthetic class i + 1
        names = [f"{st.shape}/{st.texture}" for st in (class_style(i + 1, k) for i in range(k))]
    else:
        names = [f"class {i}" for i in range(k)]
    return names, np.asarray(visualize.ADE20K_PALETTE, np.uint8)[:k]


def _find_proposals(cfg: Config, stem: str):
    from sarformer_jax.data.pipeline import proposal_cache_dir
    from sarformer_jax.data.proposals import load_proposals

    root = pathlib.Path(proposal_cache_dir(cfg))
    hits = sorted(root.glob(f"*/{stem}.npz")) + sorted(root.glob(f"*/*/{stem}.npz"))
    if not hits:
        raise FileNotFoundError(
            f"no cached proposals for {stem!r} under {root} (write them with "
            f"`sarformer amg --dataset ...`)")
    return load_proposals(hits[0])


def _find_boxes(boxes_dir: str | pathlib.Path, stem: str) -> np.ndarray:
    """Detector boxes of image `stem`: `<boxes_dir>/<stem>.json`, else `<boxes_dir>/*/<stem>.json`."""
    from sarformer_jax.data.pipeline import read_boxes

    root = pathlib.Path(boxes_dir)
    hits = [root / f"{stem}.json"] if (root / f"{stem}.json").is_file() else \
        sorted(root.glob(f"*/{stem}.json"))
    if not hits:
        raise FileNotFoundError(f"no detector boxes for {stem!r} under {root} "
                                f"(<dir>/{stem}.json or <dir>/<split>/{stem}.json)")
    return read_boxes(str(hits[0]))


def write_prediction(cfg: Config, record: dict, label: np.ndarray, out_dir: pathlib.Path
                     ) -> tuple[pathlib.Path, pathlib.Path]:
    from sarformer_jax import visualize

    names, palette = class_names_and_palette(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = pathlib.Path(str(record["name"])).stem
    label_path = out_dir / f"{stem}_label.png"
    visualize.save_label_png(label, label_path)
    overlay_path = out_dir / f"{stem}_overlay.png"
    visualize.overlay(record["image"], label, palette, class_names=names,
                      legend=True).save(overlay_path)
    return label_path, overlay_path


def predict_records(cfg: Config, trainer, state, records, out_dir, *, mode=None,
                    progress: bool = False) -> list[pathlib.Path]:
    from tqdm.auto import tqdm

    from sarformer_jax.evaluate import cached_window_fn, predict_scores

    with_proposals = (cfg.model.head.query_init == "sam_pooling"
                      and cfg.guidance.source == "cached")
    window_fn = cached_window_fn(cfg, trainer, with_proposals=with_proposals)
    params = state["params"]
    if hasattr(trainer, "params_tree"):  # a train state with its parameters held flat
        params = trainer.params_tree(params)
    paths = []
    pending = None  # the previous image and its labels, still on the device

    def write(record, label):
        label = np.asarray(label).astype(np.uint8)
        paths.append(write_prediction(cfg, record, label, pathlib.Path(out_dir))[1])

    for i, record in enumerate(tqdm(records, desc="predict", disable=not progress)):
        label = predict_scores(cfg, window_fn, params, state["batch_stats"], record, i,
                               mode=mode or cfg.eval.mode, aug_test=False,
                               with_proposals=with_proposals, labels=True, to_host=False)
        if pending is not None:  # written once this image's work is queued on the device
            write(*pending)
        pending = (record, label)
    if pending is not None:
        write(*pending)
    return paths


def predict_dataset_examples(cfg: Config, trainer, state, out_dir, count: int = 1
                             ) -> list[pathlib.Path]:
    """Overlays for the first `count` validation images (the demo's prediction picture)."""
    from sarformer_jax.data.pipeline import build_eval_dataset

    ds = build_eval_dataset(cfg, "validation")
    records = [ds[i] for i in range(min(count, len(ds)))]
    return predict_records(cfg, trainer, state, records, out_dir)


def _read_image(path: pathlib.Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return np.asarray(im.convert("RGB"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--config", default="tiny", help="config file or name")
    parser.add_argument("--checkpoint", required=True, help="workdir or checkpoint directory")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--mode", choices=("whole", "slide"), default=None)
    parser.add_argument("--boxes", default=None, metavar="DIR",
                        help="detector boxes per image (guidance.source=boxes): DIR/<stem>.json "
                             "(default: guidance.boxes_dir)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    refusal = guidance_refusal(cfg, "predict")
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    from sarformer_jax.convert.common import CheckpointError
    from sarformer_jax.evaluate import load_for_eval
    from sarformer_jax.train import ConfigMismatchError

    try:
        trainer, state, step = load_for_eval(cfg, args.checkpoint)
    except (ConfigMismatchError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    guided = cfg.model.head.query_init == "sam_pooling"
    cached = guided and cfg.guidance.source == "cached"
    boxes_dir = (args.boxes or str(cfg.guidance.get("boxes_dir", "") or "")) \
        if guided and cfg.guidance.source == "boxes" else None
    if boxes_dir == "":
        print("error: guidance.source='boxes' needs --boxes DIR (or guidance.boxes_dir)",
              file=sys.stderr)
        return 2
    failed = []

    def records():  # read one at a time: a folder of any size is never all in memory
        for p in map(pathlib.Path, args.images):
            try:
                rec = {"image": _read_image(p), "name": p.name}
                if cached:
                    rec["proposals"], rec["proposal_scores"] = _find_proposals(cfg, p.stem)
                if boxes_dir is not None:
                    rec["boxes"] = _find_boxes(boxes_dir, p.stem)
            except (OSError, ValueError, SyntaxError) as e:  # DataError is a ValueError
                print(f"skipped {p}: {e}", file=sys.stderr)
                failed.append(p)
                continue
            yield rec

    paths = predict_records(cfg, trainer, state, records(), args.out, mode=args.mode,
                            progress=True)
    for path in paths:
        print(f"wrote {path}")
    if failed:
        print(f"{len(failed)} image(s) skipped", file=sys.stderr)
    return 0 if paths else 1
