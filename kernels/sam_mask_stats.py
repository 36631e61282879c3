"""Pallas (Triton backend) kernel for SAM's mask post-processing: the low-res mask logits
[n, 256, 256] resized to the image (`Sam.postprocess_masks`: bilinear to 1024, crop, bilinear
to the original size) and thresholded, without the full-size logits ever reaching memory.

Two outputs, by `mode`:
- "stats" (the generator's candidates): per mask, the number of pixels above the high and the
  low stability thresholds and the rows and columns holding a pixel above the mask threshold,
  which is all `calculate_stability_score` and `batched_mask_to_box` need;
- "mask": the boolean masks (the kept ones);
- "logits" (tests): the resized float32 logits themselves.

Each program computes a [block_rows, block_cols] tile of one mask in two steps.  Along the
width it gathers, for the `span` low-res rows the tile's output rows read (a power of two >= 16,
fixed per geometry), the <= 4 taps of each output column (`common.postprocess_taps`): a
[span, block_cols] gather per tap, weighted and summed.  Along the height it multiplies that
[span, block_cols] tile by the [block_rows, span] local weights of the composed height map
(`common.postprocess_matrix`, other entries exact zeros) as one matrix product on the tensor
cores, in 3-pass TF32 ("TF32_TF32_F32_X3": float32 to ~1e-6; the interpreter uses exact float32
products).  Same weights as the "taps" post-processing; the sums run in another order.
Grid: (masks, row blocks, column blocks).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from sarformer_jax.kernels.triton_backend import plgpu, require
from sarformer_jax.sharding import batch_partitioned, per_batch_shard

MODES = ("stats", "mask", "logits")


def _span_pow2(n: int) -> int:
    p = 16  # the smallest operand side of a Triton matrix product
    while p < n:
        p *= 2
    return p


@functools.lru_cache(maxsize=32)
def height_blocks(low: int, img_size: int, crop: int, out: int, block_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(first low-res row per row block [nb] int32, local weights [nb, block_rows, span] float32):
    output row r of block b = sum_j weights[b, r, j] * low-res row (first[b] + j); span is the
    widest block's run of low-res rows rounded up to a power of two >= 16 (zero weights)."""
    from sarformer_jax.sam.common import postprocess_matrix

    m = postprocess_matrix(low, img_size, crop, out)  # [out, low]
    nb = -(-out // block_rows)
    padded = np.zeros((nb * block_rows, low), np.float32)
    padded[:out] = m
    blocks = padded.reshape(nb, block_rows, low)
    any_row = (blocks != 0).any(axis=1)  # [nb, low]
    first = np.where(any_row.any(1), any_row.argmax(1), 0)
    last = np.where(any_row.any(1), low - 1 - any_row[:, ::-1].argmax(1), 0)
    span = _span_pow2(int(max(1, (last - first + 1).max())))
    if span > low:
        raise ValueError(f"sam mask post-processing kernel: {block_rows} output rows of {out} read {span} of the "
                         f"{low} low-res rows (padded to a power of two >= 16); use fewer block_rows")
    first = np.minimum(first, low - span)  # the span stays inside the map
    idx = first[:, None] + np.arange(span)[None, :]  # [nb, span]
    local = np.take_along_axis(blocks, np.broadcast_to(idx[:, None, :], (nb, block_rows, span)), axis=2)
    return first.astype(np.int32), np.ascontiguousarray(local).astype(np.float32)


@functools.lru_cache(maxsize=32)
def width_taps(low: int, img_size: int, crop: int, out: int, block_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices [k, out padded to block_cols] int32, weights [k, ...] float32): the taps of
    `postprocess_taps`, tap-major, padded columns reading column 0 with weight 0."""
    from sarformer_jax.sam.common import postprocess_taps

    idx, w = postprocess_taps(low, img_size, crop, out)  # [out, k]
    padded = -(-out // block_cols) * block_cols
    pi = np.zeros((idx.shape[1], padded), np.int32)
    pw = np.zeros((idx.shape[1], padded), np.float32)
    pi[:, :out], pw[:, :out] = idx.T, w.T
    return pi, pw


def _kernel(low_ref, first_ref, hw_ref, ti_ref, tw_ref, *out_refs, mode: str, per_lead: int, span: int, taps: int,
            block_rows: int, block_cols: int, out_hw: tuple[int, int], thresholds: tuple[float, float, float],
            precision):
    n, rb, cb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    gi, mi = n // per_lead, n % per_lead  # the geometry arrays lead with the (sharded) first axis
    cols = pl.ds(cb * block_cols, block_cols)
    src = (first_ref[gi, rb] + jnp.arange(span, dtype=jnp.int32))[:, None]  # [span, 1] low-res rows
    u = None  # the width pass of the span's rows [span, block_cols]
    for k in range(taps):
        g = low_ref[gi, mi, src, ti_ref[gi, jnp.int32(k), cols][None, :]].astype(jnp.float32)
        term = tw_ref[gi, jnp.int32(k), cols][None, :] * g
        u = term if u is None else u + term
    acc = jnp.dot(hw_ref[gi, rb], u, precision=precision, preferred_element_type=jnp.float32)
    r = rb * block_rows + jnp.arange(block_rows, dtype=jnp.int32)
    c = cb * block_cols + jnp.arange(block_cols, dtype=jnp.int32)
    inside = (r < out_hw[0])[:, None] & (c < out_hw[1])[None, :]
    if mode == "logits":
        out_refs[0][n, pl.ds(rb * block_rows, block_rows), cols] = acc
        return
    t_high, t_low, t_mask = thresholds
    on = (acc > t_mask) & inside
    if mode == "mask":
        out_refs[0][n, pl.ds(rb * block_rows, block_rows), cols] = on.astype(jnp.int8)
        return
    high_ref, low_cnt_ref, rows_ref, cols_ref = out_refs
    high_ref[n, rb, cb] = jnp.sum(((acc > t_high) & inside).astype(jnp.int32))
    low_cnt_ref[n, rb, cb] = jnp.sum(((acc > t_low) & inside).astype(jnp.int32))
    rows_ref[n, cb, pl.ds(rb * block_rows, block_rows)] = jnp.max(on.astype(jnp.int32), axis=1)
    cols_ref[n, rb, cols] = jnp.max(on.astype(jnp.int32), axis=0)


def _call(low, first, hw, ti, tw, *, mode, out_hw, thresholds, block_rows, block_cols, num_warps, interpret):
    """The pallas_call on low [g, m, lh, lw] and the geometry (one copy per g: `_geometry`) ->
    the raw outputs, leading with g * m (per-tile partial statistics)."""
    g, m = low.shape[:2]
    n = g * m
    nb, span = hw.shape[1], hw.shape[3]
    ncb = ti.shape[2] // block_cols
    ph, pw = nb * block_rows, ncb * block_cols
    # 3-pass TF32 on the tensor cores (float32 to ~1e-6); exact float32 in the interpreter
    precision = jax.lax.Precision.HIGHEST if interpret else jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3
    kernel = functools.partial(_kernel, mode=mode, per_lead=m, span=span, taps=ti.shape[1], block_rows=block_rows,
                               block_cols=block_cols, out_hw=out_hw, thresholds=thresholds, precision=precision)
    if mode == "stats":
        out_shape = (jax.ShapeDtypeStruct((n, nb, ncb), jnp.int32), jax.ShapeDtypeStruct((n, nb, ncb), jnp.int32),
                     jax.ShapeDtypeStruct((n, ncb, ph), jnp.int32), jax.ShapeDtypeStruct((n, nb, pw), jnp.int32))
    else:
        out_shape = jax.ShapeDtypeStruct((n, ph, pw), jnp.float32 if mode == "logits" else jnp.int8)
    outs = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(n, nb, ncb),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret, name=f"sam_postprocess_{mode}",
    )(low, first, hw, ti, tw)
    return jax.tree.map(lambda a: a.reshape((g, m) + a.shape[1:]), outs)


@functools.lru_cache(maxsize=None)
def _partitioned(mode, out_hw, thresholds, block_rows, block_cols, num_warps, interpret):
    """`_call` run on each device's part of the first axis under a batch-sharded jit
    (`sharding.batch_partitioned`)."""
    def fn(low, first, hw, ti, tw):  # positional only: custom_partitioning binds by position
        return _call(low, first, hw, ti, tw, mode=mode, out_hw=out_hw, thresholds=thresholds, block_rows=block_rows,
                     block_cols=block_cols, num_warps=num_warps, interpret=interpret)

    ins = "g m h w, g a, g a r q, g k c, g k c"
    if mode == "stats":
        return batch_partitioned(fn, 4, ins + " -> g m a b, g m a b, g m b y, g m a z",
                                 ("m", "h", "w", "a", "r", "q", "k", "c", "b", "y", "z"))
    return batch_partitioned(fn, 1, ins + " -> g m y z", ("m", "h", "w", "a", "r", "q", "k", "c", "y", "z"))


def _pow2_at_most(n: int, cap: int) -> int:
    b = 16
    while b * 2 <= min(n, cap):
        b *= 2
    return b


@functools.partial(jax.jit, static_argnames=("img_size", "input_size", "original_size", "mode", "thresholds",
                                             "block_rows", "block_cols", "num_warps", "interpret"))
def postprocess_stats(low: jax.Array, *, img_size: int, input_size: tuple[int, int],
                      original_size: tuple[int, int], mode: str = "stats",
                      thresholds: tuple[float, float, float] = (1.0, -1.0, 0.0), block_rows: int | None = None,
                      block_cols: int | None = None, num_warps: int = 4, interpret: bool = False):
    """SAM's post-processing of low-res mask logits `low` [..., lh, lw] (float32 or bf16),
    thresholded on chip.

    Args:
      img_size, input_size, original_size: as `Sam.postprocess_masks` (the encoder's square
        side, the resized image (h, w) before padding, the image (H, W)).
      mode: "stats" -> dict(high, low: int32 [...] pixel counts above thresholds[0] and [1];
        rows: bool [..., H], cols: bool [..., W]: rows / columns with a pixel above
        thresholds[2]); "mask" -> bool [..., H, W] above thresholds[2]; "logits" -> the
        float32 logits [..., H, W] (tests).
      thresholds: (high, low, mask) = (threshold + offset, threshold - offset, threshold).
      block_rows, block_cols, num_warps: launch settings (None: 32 rows, 128 columns or the
        largest power of two from 16 that the image fits).
      interpret: run in the Pallas interpreter (CPU tests)."""
    require("sam_mask_stats")
    if mode not in MODES:
        raise ValueError(f"sam mask post-processing kernel: mode must be one of {MODES}, got {mode!r}")
    *lead, lh, lw = low.shape
    if len(lead) == 0 or low.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"sam mask post-processing kernel: low-res logits {low.shape} {low.dtype}: expected "
                         "[..., h, w] float32 or bfloat16")
    out_h, out_w = (int(v) for v in original_size)
    block_rows = block_rows or _pow2_at_most(out_h, 32)
    block_cols = block_cols or _pow2_at_most(out_w, 128)
    g, m = lead[0], int(np.prod(lead[1:]))
    first, hw = height_blocks(lh, img_size, int(input_size[0]), out_h, block_rows)
    ti, tw = width_taps(lw, img_size, int(input_size[1]), out_w, block_cols)
    copies = lambda a: jnp.broadcast_to(jnp.asarray(a), (g,) + a.shape)  # one per row of the first axis
    fn = _partitioned(mode, (out_h, out_w), tuple(float(t) for t in thresholds), block_rows, block_cols, num_warps,
                      interpret)
    outs = per_batch_shard(fn, 4 if mode == "stats" else 1, low.reshape(g, m, lh, lw), copies(first), copies(hw),
                           copies(ti), copies(tw))
    outs = outs if mode == "stats" else (outs,)
    if mode == "logits":
        return outs[0][:, :, :out_h, :out_w].reshape(*lead, out_h, out_w)
    if mode == "mask":
        return (outs[0][:, :, :out_h, :out_w] != 0).reshape(*lead, out_h, out_w)
    high, lowc, rows_any, cols_any = outs
    return dict(high=jnp.sum(high, axis=(2, 3)).reshape(lead), low=jnp.sum(lowc, axis=(2, 3)).reshape(lead),
                rows=jnp.any(rows_any[..., :out_h] != 0, axis=2).reshape(*lead, out_h),
                cols=jnp.any(cols_any[..., :out_w] != 0, axis=2).reshape(*lead, out_w))
