"""The mask-proposal cache: SAM automatic masks (or the synthetic stand-ins) stored per image.

One file per image, `<cache_dir>/<split>/<stem>.npz`, with
  masks   uint8  np.packbits(bool [N, H, W], axis=-1)  (bit-packed along the width)
  shape   int64  (N, H, W)
  scores  float32 [N]   (predicted IoU for SAM; a confidence for the synthetic set)
Masks are in the frame of the stored image (not transposed, not resized: ARCHITECTURE §4.3 c is
a quirk of the original that `guidance.seed_compat` reproduces elsewhere, not in the cache).
"""

from __future__ import annotations

import os
import pathlib
import threading

import numpy as np


# np.load parses .npy headers with `ast.literal_eval`, which CPython 3.11 can break when several
# threads build ASTs at once ("AST constructor recursion depth mismatch"); grain's read-ahead
# threads load proposals concurrently, so header parsing is serialised.
_NPZ_LOCK = threading.Lock()


def proposal_path(cache_dir: str | os.PathLike, split: str, stem: str) -> pathlib.Path:
    return pathlib.Path(cache_dir) / split / f"{stem}.npz"


def save_proposals(path: str | os.PathLike, masks: np.ndarray, scores: np.ndarray) -> None:
    """Writes bool masks [N, H, W] and scores [N] in the cache format (compressed npz)."""
    masks = np.asarray(masks, bool)
    scores = np.asarray(scores, np.float32)
    if masks.ndim != 3 or scores.shape != (masks.shape[0],):
        raise ValueError(f"{path}: masks must be [N, H, W] and scores [N], got "
                         f"{masks.shape} and {scores.shape}")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, masks=np.packbits(masks, axis=-1),
                        shape=np.asarray(masks.shape, np.int64), scores=scores)
    os.replace(tmp, path)


def load_proposals(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Reads one cache file -> (bool masks [N, H, W], float32 scores [N]).

    A file that is missing, truncated or inconsistent raises a one-line error naming it."""
    path = pathlib.Path(path)
    try:
        with _NPZ_LOCK, np.load(path, allow_pickle=False) as f:
            packed, shape, scores = f["masks"], f["shape"], f["scores"]
    except FileNotFoundError:
        raise FileNotFoundError(f"proposal cache file missing: {path}") from None
    except Exception as e:  # zipfile / pickle / key errors all mean a bad file
        raise ValueError(f"unreadable proposal cache file {path}: {type(e).__name__}: {e}") from None
    shape = tuple(int(s) for s in np.asarray(shape).reshape(-1))
    if len(shape) != 3 or packed.shape != (shape[0], shape[1], (shape[2] + 7) // 8) \
            or np.asarray(scores).shape != (shape[0],):
        raise ValueError(f"inconsistent proposal cache file {path}: shape={shape}, "
                         f"masks {packed.shape}, scores {np.asarray(scores).shape}")
    masks = np.unpackbits(packed, axis=-1, count=shape[2]).astype(bool)
    return masks, np.asarray(scores, np.float32)


def to_label_planes(masks: np.ndarray) -> np.ndarray:
    """bool [N, H, W] -> uint8 [H, W, N] planes (0 / 1) so that the label transforms (nearest
    resize, crop, flip, pad) can warp them together with the label map."""
    return np.ascontiguousarray(np.moveaxis(np.asarray(masks, np.uint8), 0, -1))
