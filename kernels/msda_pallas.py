"""Pallas (Triton backend) kernels for multi-scale deformable attention, forward and backward.

One program instance handles one (batch b, block of `block_q` queries, head h).  For every level
and point (static, unrolled loops) it loads the block's sampling locations and attention weights
(strided [block_q] vectors), turns them into the four bilinear corners, and gathers the corner
rows value[b, s, h, :] -- D contiguous elements each -- as [block_q, D] tiles.  Nothing but the
[block_q, D] accumulator (forward) or the [block_q, D] output gradient (backward) stays in
registers; value is read through L1/L2 (the SARFormer-B value tensors, 2-17 MB, fit in the H100's
50 MB L2).

Forward:  out[b, q, h] = sum_{l,p,corner} a[b,q,h,l,p] * w_corner * value[b, s_corner, h].
Backward: per corner, dot = <value row, grad_out row>.  Attention-weight and location gradients
come from the four dots (no atomics: each program owns its queries), gathered in registers and
stored as one tile a program (`BlockSizes.tile_point_grads`); the value gradient is scattered
with fp32 atomic adds into an fp32 [B, S, H, D] buffer, cast by the caller.

Grid: (B, cdiv(Lq, block_q), H), launched in `BlockSizes.grid_order`.  Queries past Lq are
masked on every load and store.
Corners outside the map use a clamped index and a zero weight (zero padding), which also keeps
every address in bounds; with `BlockSizes.skip_outside` / `skip_outside_bwd` (by default in the
backward only) their gathers and value-gradient adds are also masked off, so they cost no memory
traffic.

Both calls are wrapped so that they work under vmap (the vmapped axis is folded into B) and
under a batch-sharded jit (custom_partitioning runs the kernel on each device's batch shard).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sarformer_jax.kernels.triton_backend import plgpu, require
from sarformer_jax.sharding import batch_partitioned, per_batch_shard

Shapes = tuple[tuple[int, int], ...]
VALUE_GRAD_METHODS = ("scatter", "pull")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the kernels.  `block_q` queries per program (a power of two)."""

    block_q: int
    num_warps: int
    num_stages: int = 1
    block_q_bwd: int | None = None  # None = block_q
    num_warps_bwd: int | None = None  # None = num_warps
    relaxed_atomics: bool = True  # relaxed-order fp32 adds for d value (see _relaxed_atomic_add)
    # Launch order of the grid axes, fastest first: "b" batch, "q" query block, "h" head.  The
    # GPU starts programs in this order, so it decides which programs run at the same time and
    # share the value rows they gather in L1.
    grid_order: str = "bqh"
    # Corners outside the map (zero padding) neither gathered nor, in the backward, added to the
    # value gradient: their loads and atomics are masked off.  Off, they gather a clamped row and
    # add zeros to it.  With the anchors' locations, uniform in [-0.05, 1.05], 17 % of the
    # corners are outside (each axis' corner misses with probability 0.1 / 1.1).
    # `skip_outside` is the forward's setting, `skip_outside_bwd` the backward's (None = the
    # forward's).  The default skips in the backward only: there the masked atomics saved 3-13 %
    # of fwd+bwd, while in the forward the clamped rows hit in cache anyway and the masked
    # loads cost about 2 us a call (MSDA run 13, H100).
    skip_outside: bool = False
    skip_outside_bwd: bool | None = None
    # How the backward writes the location and attention-weight gradients.  False: three
    # [block_q] stores a point (x, y, weight), each lane 4 bytes into its own sector (a query's
    # L*P*2 location gradients are contiguous, its queries H*L*P*2 elements apart), so a
    # program makes 3 * L * P partial-sector writes a query.  True (the default): the program
    # gathers them in registers as a [block_q, L*P*2] and a [block_q, L*P] tile and stores each
    # once, a query's gradients as one contiguous run.  On an H100 (MSDA run 17) that took
    # fwd+bwd 11-18 % down in every case: pixdec_enc 0.414 -> 0.345 ms fp32, 0.406 -> 0.335 ms
    # bf16.  The backward is bound by L2 transactions, and these partial writes were ~20 % of
    # them beside the value gradient's row adds.
    tile_point_grads: bool = True
    # How the backward makes the value gradient.  "scatter": every corner of every sampling point
    # adds its [D] row into an fp32 buffer with atomics (0.82 GB of fp32 adds into L2 in
    # pixdec_enc, the backward's limit: MSDA run 12).  "pull": the sampling points are sorted by
    # the map cell of their top-left corner (one key-value sort of the [B, Lq, H, L, P] points,
    # built from the locations alone), and a second kernel gives every value row the sum of its
    # corners' contributions, read in place from the output gradient and summed in fp32
    # registers: no atomics, no zero-filled buffer, each row written once in value's dtype.
    value_grad: str = "scatter"
    block_rows_pull: int = 32  # value rows a program of the "pull" kernel
    num_warps_pull: int = 4
    # Measured on an H100 (MSDA run 15, before `tile_point_grads`), pixdec_enc: "pull"
    # 0.65-0.77 ms fwd+bwd against "scatter"'s 0.41-0.42: its two kernels are faster than the
    # fused one, but the sort and the run bookkeeping cost more.  So "scatter" is the default.
    # "pull" stays for its determinism: in one chunk no float is added atomically, so d value
    # is the same bit for bit from run to run.
    # > 1: every run split over this many programs (entries c, c + chunks, ...), their partial
    # sums added (fp32 atomics, a few a row) into a zero-filled fp32 buffer.  Meant to shorten
    # the loop of the coarse levels' rows (~300 contributions a row at pixdec_enc's 20 x 20
    # level); measured slower than one chunk (MSDA run 15), as is `pull_run_entries`.
    chunks_pull: int = 1
    num_stages_pull: int = 1  # Triton's software pipelining of the pull kernel's loop
    # > 0: chunks per level instead of `chunks_pull` for all: each level's runs split so that a
    # chunk walks about this many entries of a run (the level's mean run, B*H fixed, is
    # Lq * P / ((h + 1) * (w + 1)) points a cell: pixdec_enc ~5, ~20 and ~80 from the finest
    # level up), so the fine levels keep one program a block and the coarse ones get several.
    pull_run_entries: int = 0

    @property
    def skips_bwd(self) -> bool:
        """Whether the backward skips corners outside the map."""
        return self.skip_outside if self.skip_outside_bwd is None else self.skip_outside_bwd

    def __post_init__(self):
        if sorted(self.grid_order) != ["b", "h", "q"]:
            raise ValueError(f"BlockSizes.grid_order must order 'b', 'q' and 'h', got "
                             f"{self.grid_order!r}")
        if self.chunks_pull < 1 or self.block_rows_pull < 1:
            raise ValueError(f"BlockSizes.chunks_pull and block_rows_pull must be >= 1, got "
                             f"{self.chunks_pull} and {self.block_rows_pull}")
        if self.pull_run_entries < 0:
            raise ValueError(f"BlockSizes.pull_run_entries must be >= 0, got "
                             f"{self.pull_run_entries}")
        if self.value_grad not in VALUE_GRAD_METHODS:
            raise ValueError(f"BlockSizes.value_grad must be one of {VALUE_GRAD_METHODS}, got "
                             f"{self.value_grad!r}")

    @classmethod
    def get_default(cls, head_dim: int, num_queries: int = 1 << 30) -> "BlockSizes":
        return default_block_sizes(head_dim, num_queries)


def default_block_sizes(head_dim: int, num_queries: int = 1 << 30) -> BlockSizes:
    """The one heuristic: a [block_q, D] fp32 tile of about 2048 elements (8 registers a thread
    at 8 warps) in the forward, about 512 in the backward (at least 16 queries, 4 warps), which
    holds the output gradient and the corner tile at once and issues a tile of atomics per corner.

    The backward's quarter-size tile is measured, not derived: at D = 32 on an H200 its 16 queries
    were as fast as 32 or faster in every case and dtype of three runs (benchmarks.md MSDA runs
    3, 5 and 7), by up to 13 % in bf16 (adapter_inj 0.170 vs 0.195 ms).  So are the forward's 8
    warps (8 elements a thread): on an H100, pixdec_enc's forward took 0.079 / 0.060 ms (fp32 /
    bf16) against 0.091 / 0.068 ms at 4 warps (MSDA run 10).  The backward skips corners outside
    the map, the forward does not (see `BlockSizes.skip_outside`; MSDA run 13)."""
    block_q = max(16, min(128, 2048 // head_dim))
    block_q = min(block_q, max(16, pl.next_power_of_2(num_queries)))
    block_q_bwd = min(block_q, max(16, 512 // head_dim))
    return BlockSizes(block_q=block_q, num_warps=8, num_stages=1, block_q_bwd=block_q_bwd,
                      num_warps_bwd=4, skip_outside=False, skip_outside_bwd=True,
                      tile_point_grads=_tile_point_grads_from_env(), **_value_grad_from_env())


def _tile_point_grads_from_env() -> bool:
    """The environment's `SARFORMER_MSDA_TILE_POINT_GRADS`: "1" (also when unset) or "0", so that
    a whole program can take the backward's three stores a point instead of the tiles (`sarformer
    bench train --variant 'points:env.SARFORMER_MSDA_TILE_POINT_GRADS=0'`)."""
    text = os.environ.get("SARFORMER_MSDA_TILE_POINT_GRADS", "").strip()
    if text not in ("", "0", "1"):
        raise ValueError(f"SARFORMER_MSDA_TILE_POINT_GRADS={text!r}: expected '0' or '1'")
    return text != "0"


def _value_grad_from_env() -> dict:
    """The environment's `SARFORMER_MSDA_VALUE_GRAD`: "scatter" (also when unset), "pull", or
    "pull:ROWS:CHUNKS:STAGES[:ENTRIES]" (block_rows_pull, chunks_pull, num_stages_pull,
    pull_run_entries), so that a whole
    program (`sarformer bench train --variant 'pull:env.SARFORMER_MSDA_VALUE_GRAD=pull'`) can
    take the other value-gradient method without a config key."""
    text = os.environ.get("SARFORMER_MSDA_VALUE_GRAD", "").strip()
    if not text or text == "scatter":
        return {}
    method, *rest = text.split(":")
    if method != "pull" or len(rest) not in (0, 3, 4) or not all(v.isdigit() for v in rest):
        raise ValueError(f"SARFORMER_MSDA_VALUE_GRAD={text!r}: expected 'scatter', 'pull' or "
                         "'pull:ROWS:CHUNKS:STAGES[:ENTRIES]'")
    out = dict(value_grad="pull")
    if rest:
        out.update(block_rows_pull=int(rest[0]), chunks_pull=int(rest[1]),
                   num_stages_pull=int(rest[2]))
    if len(rest) == 4:
        out.update(pull_run_entries=int(rest[3]))
    return out


def _make_relaxed_atomic_add():
    """An fp32 atomic add with relaxed memory order for the Triton backend.

    `plgpu.atomic_add` always lowers to acq_rel atomics at GPU scope; the value-gradient scatter
    needs no ordering at all (every add commutes and nothing reads the buffer in the kernel), and
    acq_rel costs a fence per add.  This primitive reuses the public op's abstract evaluation and
    differs only in the memory order.  It reaches into jax._src (pinned jax 0.10.2 / 0.11.2);
    where those internals are missing it returns None and the public op is used.
    """
    try:
        from jax._src import core as jax_core
        from jax._src import tree_util
        from jax._src.lib.triton import dialect as tt_dialect
        from jax._src.pallas.triton import lowering as tlow
        from jax._src.pallas.triton import primitives as tprim
        from jax._src.state import primitives as state_prims

        add_type = tprim.AtomicOpType.ADD
        prim = jax_core.Primitive("msda_relaxed_atomic_add")

        @prim.def_effectful_abstract_eval
        def _abstract(*avals, args_tree):
            return tprim._atomic_abstract_eval(*avals, args_tree=args_tree, atomic_type=add_type)

        @tlow.register_lowering(prim)
        def _lower(ctx, *args_flat, args_tree):
            block_info = ctx.block_infos[0]
            ptr, transforms, val, mask = args_tree.unflatten(args_flat)
            *_, value_aval, mask_aval = args_tree.unflatten(ctx.avals_in)
            (indexer,) = transforms
            ptr = tlow._compute_pointers_from_indices(ptr, block_info, indexer)
            val = tlow._ensure_ir_value(val, value_aval)
            if mask is not None:  # the value's shape: lanes masked off issue no memory request
                mask = tlow._ensure_ir_value(mask, mask_aval)
            return tlow._atomic_rmw(tt_dialect.RMWOp.FADD, ptr, val, mask=mask,
                                    semantic=tt_dialect.MemSemantic.RELAXED)
    except (ImportError, AttributeError):
        return None

    def relaxed_atomic_add(ref, idx, val, mask=None):
        x_ref, transforms = state_prims.get_ref_and_transforms(ref, idx, "atomic_rmw")
        args_flat, args_tree = tree_util.tree_flatten((x_ref, transforms, val, mask))
        return prim.bind(*args_flat, args_tree=args_tree)

    return relaxed_atomic_add


_relaxed_atomic_add = _make_relaxed_atomic_add()


def _grid(order: str, sizes: dict[str, int]) -> tuple[int, ...]:
    return tuple(sizes[a] for a in order)


def _this_block(order: str, block_q: int, num_q: int):
    """This program's batch b, head h, query slice and [block_q] mask of the queries < num_q,
    under the launch order `order`."""
    b, qb, h = (pl.program_id(order.index(a)) for a in "bqh")
    q0 = qb * block_q
    return b, h, pl.ds(q0, block_q), q0 + jnp.arange(block_q) < num_q


def _load_point(loc_ref, att_ref, b, qs, h, lvl: int, p: int, qmask):
    """Point p of level lvl for the block's queries: x, y and attention weight, [block_q] fp32
    each (strided loads, H*L*P*2 elements apart); zero on masked queries."""
    x = plgpu.load(loc_ref.at[b, qs, h, _i(lvl), _i(p), _i(0)], mask=qmask, other=0.0)
    y = plgpu.load(loc_ref.at[b, qs, h, _i(lvl), _i(p), _i(1)], mask=qmask, other=0.0)
    a = plgpu.load(att_ref.at[b, qs, h, _i(lvl), _i(p)], mask=qmask, other=0.0)
    return x.astype(jnp.float32), y.astype(jnp.float32), a.astype(jnp.float32)


def _level_starts(shapes: Shapes) -> list[int]:
    starts, acc = [], 0
    for h, w in shapes:
        starts.append(acc)
        acc += h * w
    return starts


def _i(k: int) -> jax.Array:
    # static indices as int32 scalars: the interpreter's masked load rejects Python ints
    return jnp.int32(k)


def _corners(x, y, h: int, w: int):
    """Bilinear corners of normalised (x, y) on an h x w map, align_corners=False.

    Returns fx, fy and four (flat index, bilinear weight, inside-the-map) triples in the order
    (y0, x0), (y0, x1), (y1, x0), (y1, x1); out-of-map corners get a clamped index and weight 0.
    """
    # Clamp far-away points before the int conversion; all four corners stay invalid.
    px = jnp.clip(x * w - 0.5, -2.0, w + 1.0)
    py = jnp.clip(y * h - 0.5, -2.0, h + 1.0)
    fx0 = jnp.floor(px)
    fy0 = jnp.floor(py)
    fx = px - fx0
    fy = py - fy0
    x0 = fx0.astype(jnp.int32)
    y0 = fy0.astype(jnp.int32)
    out = []
    for dy, wy in ((0, 1.0 - fy), (1, fy)):
        yi = y0 + dy
        vy = (yi >= 0) & (yi <= h - 1)
        yc = jnp.clip(yi, 0, h - 1)
        for dx, wx in ((0, 1.0 - fx), (1, fx)):
            xi = x0 + dx
            valid = vy & (xi >= 0) & (xi <= w - 1)
            idx = yc * w + jnp.clip(xi, 0, w - 1)
            out.append((idx, jnp.where(valid, wx * wy, 0.0), valid))
    return fx, fy, out


def _gather_rows(value_ref, b, rows, h, valid, skip: bool, interpret: bool):
    """value[b, rows[i], h, :] for every i: a [block_q, D] gather.  With `skip`, rows whose
    corner is not `valid` are not read (their lanes masked off) and come back as zeros.  (The
    interpreter has no masked gather: there the rows are read and the invalid ones zeroed.)"""
    if not skip:
        return value_ref[b, rows, h, :]
    if interpret:
        return jnp.where(valid[:, None], value_ref[b, rows, h, :], 0)
    d = value_ref.shape[-1]
    mask = jnp.broadcast_to(valid[:, None], (rows.shape[0], d))
    return plgpu.load(value_ref.at[b, rows, h, :], mask=mask, other=0.0)


def _msda_fwd_kernel(value_ref, loc_ref, att_ref, out_ref, *, shapes: Shapes, n_points: int,
                     num_q: int, block_q: int, order: str, skip: bool, interpret: bool):
    b, h, qs, qmask = _this_block(order, block_q, num_q)
    d = value_ref.shape[-1]
    acc = jnp.zeros((block_q, d), jnp.float32)  # [block_q, D], the only on-chip state
    for lvl, (start, (hl, wl)) in enumerate(zip(_level_starts(shapes), shapes)):
        for p in range(n_points):
            x, y, a = _load_point(loc_ref, att_ref, b, qs, h, lvl, p, qmask)
            _, _, corners = _corners(x, y, hl, wl)
            for idx, cw, valid in corners:
                row = _gather_rows(value_ref, b, start + idx, h, valid & qmask, skip, interpret)
                acc += (a * cw)[:, None] * row.astype(jnp.float32)
    plgpu.store(out_ref.at[b, qs, h, :], acc.astype(out_ref.dtype), mask=qmask[:, None])


def _scatter_add_rows(ref, b, rows, h, vals, interpret: bool, relaxed: bool, keep=None):
    """ref[b, rows[i], h, :] += vals[i] for every i (where keep[i], if given), in fp32.

    On the GPU one atomic add of the whole [block_q, D] tile; rows may repeat; the rows not kept
    are masked off (no memory traffic).  The interpreter's atomic add is a gather/set that drops
    repeated rows and takes no mask, so there it goes one row at a time, adding zeros for the
    rows not kept.
    """
    d = vals.shape[-1]
    if not interpret:
        cols = jnp.arange(d)
        idx = (b, rows[:, None], h, cols[None, :])
        mask = None if keep is None else jnp.broadcast_to(keep[:, None], vals.shape)
        if relaxed and _relaxed_atomic_add:
            _relaxed_atomic_add(ref, idx, vals, mask)
        else:
            plgpu.atomic_add(ref, idx, vals, mask=mask)
        return
    if keep is not None:
        vals = jnp.where(keep[:, None], vals, 0.0)

    def body(i, carry):
        plgpu.atomic_add(ref, (b, rows[i], h, pl.ds(0, d)), vals[i])
        return carry

    jax.lax.fori_loop(0, rows.shape[0], body, 0)


class _PointGradTiles:
    """The backward's location and weight gradients of a program gathered as a [block_q, L*P*2]
    and a [block_q, L*P] tile (`BlockSizes.tile_point_grads`), stored once at the end into the
    gradients viewed as [B, Lq, H, L*P*2] and [B, Lq, H, L*P].  On the GPU the tiles are padded
    to a power of two (Triton's block shapes), the padding columns masked off in the store; the
    interpreter takes the exact widths and a row slice."""

    def __init__(self, block_q: int, n_pts: int, interpret: bool):
        self.n_pts, self.interpret = n_pts, interpret
        width = (lambda n: n) if interpret else pl.next_power_of_2
        self.cols_loc = jnp.arange(width(2 * n_pts))
        self.cols_att = jnp.arange(width(n_pts))
        self.loc = jnp.zeros((block_q, self.cols_loc.shape[0]), jnp.float32)
        self.att = jnp.zeros((block_q, self.cols_att.shape[0]), jnp.float32)

    def put(self, k: int, gx, gy, gatt):
        """Point k (= level * P + point) of every query of the block."""
        cl, ca = self.cols_loc[None, :], self.cols_att[None, :]
        self.att = jnp.where(ca == k, gatt[:, None], self.att)
        self.loc = jnp.where(cl == 2 * k, gx[:, None],
                             jnp.where(cl == 2 * k + 1, gy[:, None], self.loc))

    def store(self, gloc_ref, gatt_ref, b, qs, h, qmask, q0, block_q: int, num_q: int):
        for ref, tile, cols, n in ((gloc_ref, self.loc, self.cols_loc, 2 * self.n_pts),
                                   (gatt_ref, self.att, self.cols_att, self.n_pts)):
            tile = tile.astype(ref.dtype)
            if self.interpret:
                plgpu.store(ref.at[b, qs, h, :], tile, mask=qmask[:, None])
                continue
            rows = jnp.minimum(q0 + jnp.arange(block_q), num_q - 1)[:, None]
            colc = jnp.minimum(cols, n - 1)[None, :]
            plgpu.store(ref.at[b, rows, h, colc], tile, mask=qmask[:, None] & (cols < n)[None, :])


def _msda_bwd_kernel(value_ref, loc_ref, att_ref, g_ref, gv_in_ref, gv_ref, gloc_ref, gatt_ref,
                     *, shapes: Shapes, n_points: int, num_q: int, block_q: int,
                     interpret: bool, relaxed: bool, order: str, skip: bool,
                     tile_grads: bool = False):
    del gv_in_ref  # aliased with gv_ref (zero-initialised fp32 buffer)
    b, h, qs, qmask = _this_block(order, block_q, num_q)
    g = plgpu.load(g_ref.at[b, qs, h, :], mask=qmask[:, None], other=0.0)
    g = g.astype(jnp.float32)  # [block_q, D], zero on masked queries
    tiles = _PointGradTiles(block_q, len(shapes) * n_points, interpret) if tile_grads else None
    for lvl, (start, (hl, wl)) in enumerate(zip(_level_starts(shapes), shapes)):
        for p in range(n_points):
            x, y, a = _load_point(loc_ref, att_ref, b, qs, h, lvl, p, qmask)
            fx, fy, corners = _corners(x, y, hl, wl)
            dots = []
            for idx, cw, valid in corners:
                keep = valid & qmask
                row = _gather_rows(value_ref, b, start + idx, h, keep, skip,
                                   interpret).astype(jnp.float32)
                # an out-of-map corner samples zero: its dot (and gradient) is zero
                dots.append(jnp.where(valid, jnp.sum(row * g, axis=1), 0.0))
                if gv_ref is not None:  # None: the "pull" kernel makes the value gradient
                    # fp32 accumulation: a bf16 scatter-add is ~8x slower and loses precision
                    _scatter_add_rows(gv_ref, b, start + idx, h, (a * cw)[:, None] * g,
                                      interpret, relaxed, keep if skip else None)
            d00, d01, d10, d11 = dots
            (_, w00, _), (_, w01, _), (_, w10, _), (_, w11, _) = corners
            gatt = w00 * d00 + w01 * d01 + w10 * d10 + w11 * d11
            # d(corner weight)/d(fx) etc.; pixel x = loc_x * w - 0.5, so d/dloc_x = w * d/dfx
            gx = a * wl * ((1.0 - fy) * (d01 - d00) + fy * (d11 - d10))
            gy = a * hl * ((1.0 - fx) * (d10 - d00) + fx * (d11 - d01))
            if tiles is not None:
                tiles.put(lvl * n_points + p, gx, gy, gatt)
                continue
            plgpu.store(gatt_ref.at[b, qs, h, _i(lvl), _i(p)], gatt.astype(gatt_ref.dtype), mask=qmask)
            plgpu.store(gloc_ref.at[b, qs, h, _i(lvl), _i(p), _i(0)], gx.astype(gloc_ref.dtype), mask=qmask)
            plgpu.store(gloc_ref.at[b, qs, h, _i(lvl), _i(p), _i(1)], gy.astype(gloc_ref.dtype), mask=qmask)
    if tiles is not None:
        tiles.store(gloc_ref, gatt_ref, b, qs, h, qmask, qs.start, block_q, num_q)


def _msda_bwd_no_value_kernel(value_ref, loc_ref, att_ref, g_ref, gloc_ref, gatt_ref, **kw):
    """The backward's location and attention-weight gradients only (value_grad="pull")."""
    _msda_bwd_kernel(value_ref, loc_ref, att_ref, g_ref, None, None, gloc_ref, gatt_ref, **kw)


# ---- value_grad="pull": the value gradient without atomics ----------------------------------
#
# Every sampling point whose bilinear footprint touches the map has a top-left corner cell
# (y0, x0) with y0 in [-1, h-1] and x0 in [-1, w-1]: a cell of the level's padded
# (h+1) x (w+1) grid.  The point adds a * w_corner * g[b, q, h] to the value rows
# (y0 + dy, x0 + dx) for its corners (dy, dx) inside the map.  So value row (y, x) receives
# exactly from the points of the four padded cells (y - dy, x - dx), through their corner
# (dy, dx).  Sorting the points by (b, h, padded cell) puts each cell's points in one run
# of the sorted order; `starts` gives where each run begins.


def _padded_starts(shapes: Shapes) -> list[int]:
    starts, acc = [], 0
    for h, w in shapes:
        starts.append(acc)
        acc += (h + 1) * (w + 1)
    return starts


def _per_level(values, dtype) -> jax.Array:
    """[L, 1] array of per-level constants, built from scalars (custom_partitioning traces the
    backward and allows no array constants in it)."""
    level = jax.lax.broadcasted_iota(jnp.int32, (len(values), 1), 0)
    out = jnp.zeros((len(values), 1), dtype)
    for i, v in enumerate(values):
        out = jnp.where(level == i, jnp.asarray(v, dtype), out)
    return out


def _sorted_points(loc, att, shapes: Shapes):
    """Sort the sampling points by (batch, head, padded top-left cell).

    loc [B, Lq, H, L, P, 2], att [B, Lq, H, L, P] (any float dtype) ->
      starts [B*H*Sp + 2] int32: the points of cell key k (= (b*H + h)*Sp + padded cell) are
        sorted entries starts[k] .. starts[k+1] - 1 (Sp = the padded cells of all levels);
      query [N] int32: the query of each sorted entry;
      coef [4, N] fp32: its attention weight times the bilinear weight of each corner, in the
        order (0, 0), (0, 1), (1, 0), (1, 1) of (dy, dx); corner-major, so that a run's
        consecutive entries of one corner share cache sectors.
    Points with no corner inside the map (and non-finite locations) sort last, under key
    B*H*Sp, and no value row reads them.  The corners are computed as `_corners` does.
    """
    bsz, num_q, n_heads, n_levels, n_points, _ = loc.shape
    sp = sum((h + 1) * (w + 1) for h, w in shapes)
    hs = _per_level([h for h, _ in shapes], jnp.float32)
    ws = _per_level([w for _, w in shapes], jnp.float32)
    pad0 = _per_level(_padded_starts(shapes), jnp.int32)
    x = loc[..., 0].astype(jnp.float32)
    y = loc[..., 1].astype(jnp.float32)
    px = jnp.clip(x * ws - 0.5, -2.0, ws + 1.0)
    py = jnp.clip(y * hs - 0.5, -2.0, hs + 1.0)
    fx0, fy0 = jnp.floor(px), jnp.floor(py)
    fx, fy = px - fx0, py - fy0
    touches = (fx0 >= -1) & (fx0 <= ws - 1) & (fy0 >= -1) & (fy0 <= hs - 1)
    cell = (pad0 + (fy0.astype(jnp.int32) + 1) * (ws.astype(jnp.int32) + 1)
            + fx0.astype(jnp.int32) + 1)
    bh = (jnp.arange(bsz, dtype=jnp.int32)[:, None, None, None, None] * n_heads
          + jnp.arange(n_heads, dtype=jnp.int32)[None, None, :, None, None])
    n_keys = bsz * n_heads * sp
    key = jnp.where(touches, bh * sp + cell, n_keys).reshape(-1)
    order = jnp.arange(key.shape[0], dtype=jnp.int32)
    # stable: within a run the points keep their (query-major) order, the same every run
    sorted_key, order = jax.lax.sort((key, order), num_keys=1, is_stable=True)
    starts = _run_starts(sorted_key, n_keys + 2)
    a = att.astype(jnp.float32).reshape(-1)[order]
    fx, fy = fx.reshape(-1)[order], fy.reshape(-1)[order]
    coef = jnp.stack([a * (1.0 - fy) * (1.0 - fx), a * (1.0 - fy) * fx,
                      a * fy * (1.0 - fx), a * fy * fx])
    query = order // (n_heads * n_levels * n_points) % num_q
    return starts, query, coef


def _run_starts(sorted_key, n_starts: int):
    """starts[k] = the number of entries with key < k, for k < n_starts, from keys sorted
    ascending (all below n_starts - 1).

    Each run's first entry writes its own index under its key (distinct keys: a scatter without
    collisions; the other entries aim past the end, each at its own place, and are dropped), and
    a reverse running minimum fills the keys with no entry from the next run.  A scatter-add of
    ones under the unsorted keys does the same in one line, but its ~5 to ~80 collisions a key
    made it 0.18 ms of pixdec_enc's backward (H100), more than the sort."""
    n = sorted_key.shape[0]
    i = jnp.arange(n, dtype=jnp.int32)
    first = jnp.concatenate([jnp.ones((1,), bool), sorted_key[1:] != sorted_key[:-1]])
    idx = jnp.where(first, sorted_key, n_starts + i)
    starts = jnp.full((n_starts,), n, jnp.int32).at[idx].set(i, mode="drop", unique_indices=True)
    return jax.lax.cummin(starts, reverse=True)


def _msda_pull_kernel(starts_ref, query_ref, coef_ref, g_ref, *gv_refs, shapes: Shapes,
                      n_heads: int, block_r: int, level_chunks: tuple[int, ...], relaxed: bool,
                      interpret: bool):
    """value gradient rows [block_r] of one (b, h): the sum over the four cells each row
    receives from of coef * g[b, query, h, :], in fp32.  With one chunk everywhere written once;
    else program c of a block whose rows' levels split their runs in up to n chunks (n the
    largest of `level_chunks` over the block's rows) takes the entries c, c + n, ... of every run
    (nothing when c >= n) and adds its partial sums into a zero-filled fp32 buffer
    (gv_refs = (aliased input, output))."""
    gv_ref = gv_refs[-1]
    n_rows, d = gv_ref.shape[1], gv_ref.shape[-1]
    # grid (B*H, row blocks[, chunks]), the first axis launched fastest; the row blocks from the
    # last: the coarse levels' rows have the longest runs, so the longest programs of every
    # (b, h) start first instead of forming the launch's tail
    bh, rb = pl.program_id(0), pl.cdiv(n_rows, block_r) - 1 - pl.program_id(1)
    b, h = bh // n_heads, bh % n_heads
    n_entries = query_ref.shape[0]
    sp = sum((hl + 1) * (wl + 1) for hl, wl in shapes)
    s = rb * block_r + jnp.arange(block_r)
    smask = s < n_rows
    base = jnp.zeros((block_r,), jnp.int32)  # padded cell of (y, x) itself: corner (0, 0)
    wp1 = jnp.zeros((block_r,), jnp.int32)
    row_chunks = jnp.ones((block_r,), jnp.int32)
    for start, pstart, (hl, wl), nc in zip(_level_starts(shapes), _padded_starts(shapes), shapes,
                                           level_chunks):
        inside = (s >= start) & (s < start + hl * wl)
        r = s - start
        base = jnp.where(inside, pstart + (r // wl + 1) * (wl + 1) + r % wl + 1, base)
        wp1 = jnp.where(inside, wl + 1, wp1)
        row_chunks = jnp.where(inside, nc, row_chunks)
    runs = []
    for c, (dy, dx) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        key = jnp.clip(bh * sp + base - dy * wp1 - dx, 0, starts_ref.shape[0] - 2)
        if interpret:
            lo = jnp.where(smask, starts_ref[key], 0)
            hi = jnp.where(smask, starts_ref[key + 1], 0)
        else:
            lo = plgpu.load(starts_ref.at[key], mask=smask, other=0)
            hi = plgpu.load(starts_ref.at[key + 1], mask=smask, other=0)
        runs.append((c, lo, hi - lo))
    n_max = jnp.max(jnp.maximum(jnp.maximum(runs[0][2], runs[1][2]),
                                jnp.maximum(runs[2][2], runs[3][2])))

    split = max(level_chunks) > 1
    if not split:
        chunk, chunks = 0, 1
    elif len(set(level_chunks)) == 1:
        chunk, chunks = pl.program_id(2), level_chunks[0]
    else:  # this block's own split: its rows' largest (a block may straddle two levels)
        chunk, chunks = pl.program_id(2), jnp.max(jnp.where(smask, row_chunks, 1))

    def body(i, acc):
        k = chunk + i * chunks
        for c, lo, n in runs:
            take = k < n
            e = jnp.clip(lo + k, 0, n_entries - 1)
            if interpret:  # no masked gathers in the interpreter: read, then zero
                q = query_ref[e]
                cf = jnp.where(take, coef_ref[_i(c), e], 0.0)
                rows = jnp.where(take[:, None], g_ref[b, q, h, :], 0)
            else:
                q = plgpu.load(query_ref.at[e], mask=take, other=0)
                cf = plgpu.load(coef_ref.at[_i(c), e], mask=take, other=0.0)
                rows = plgpu.load(g_ref.at[b, q, h, :], other=0.0,
                                  mask=jnp.broadcast_to(take[:, None], (block_r, d)))
            acc += cf[:, None] * rows.astype(jnp.float32)
        return acc

    # a program past its block's split (chunk >= chunks) runs no iteration and adds nothing
    n_iter = n_max if not split else jnp.maximum(n_max - chunk + chunks - 1, 0) // chunks
    acc = jax.lax.fori_loop(0, n_iter, body, jnp.zeros((block_r, d), jnp.float32))
    if not split:
        plgpu.store(gv_ref.at[b, pl.ds(rb * block_r, block_r), h, :], acc.astype(gv_ref.dtype),
                    mask=smask[:, None])
    else:  # rows are distinct within the program; the rows past S are masked off
        _scatter_add_rows(gv_ref, b, jnp.minimum(s, n_rows - 1), h, acc, interpret, relaxed,
                          keep=smask & (chunk < chunks))


def pull_level_chunks(shapes: Shapes, points_per_level: int, block_sizes: BlockSizes
                      ) -> tuple[int, ...]:
    """How many programs split each level's runs in the "pull" kernel: `chunks_pull` for every
    level, or with `pull_run_entries` = E > 0 each level's mean run (points_per_level = Lq * P
    points of a (b, h) over its (h + 1) * (w + 1) padded cells) over E, rounded up."""
    if block_sizes.pull_run_entries <= 0:
        return (block_sizes.chunks_pull,) * len(shapes)
    e = block_sizes.pull_run_entries
    return tuple(max(1, -(-points_per_level // ((hl + 1) * (wl + 1) * e))) for hl, wl in shapes)


def _pull_call(starts, query, coef, g, n_rows: int, out_dtype, *, shapes: Shapes,
               block_sizes: BlockSizes, points_per_level: int, interpret: bool,
               poison: bool = False):
    """d value [B, S, H, D] from the sorted points and g [B, Lq, H, D]: in out_dtype when no
    level's runs are split (`pull_level_chunks` all 1), else in fp32 (partial sums added into
    zeros)."""
    bsz, _, n_heads, d = g.shape
    block_r = block_sizes.block_rows_pull
    level_chunks = pull_level_chunks(shapes, points_per_level, block_sizes)
    chunks = max(level_chunks)
    kernel = functools.partial(_msda_pull_kernel, shapes=shapes, n_heads=n_heads,
                               block_r=block_r, level_chunks=level_chunks,
                               relaxed=block_sizes.relaxed_atomics, interpret=interpret)
    if chunks > 1:
        out_dtype = jnp.float32
    out_shape = jax.ShapeDtypeStruct((bsz, n_rows, n_heads, d), out_dtype)
    args, aliases = (starts, query, coef, g), {}
    if chunks > 1:  # poison cannot show here: every row is added to, none written
        args, aliases = args + (jnp.zeros(out_shape.shape, jnp.float32),), {4: 0}
    elif poison:
        kernel = _drop_poison_ref(kernel, 4)
        args, aliases = args + (jnp.full(out_shape.shape, jnp.nan, out_dtype),), {4: 0}
    grid = (bsz * n_heads, pl.cdiv(n_rows, block_r)) + ((chunks,) if chunks > 1 else ())
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=block_sizes.num_warps_pull,
                                             num_stages=block_sizes.num_stages_pull),
        interpret=interpret,
        name="msda_bwd_pull",
    )(*args)


def _drop_poison_ref(kernel, n_in: int):
    """Kernel taking one extra (aliased, NaN-filled) input ref after the n_in real inputs."""
    def wrapped(*refs):
        return kernel(*refs[:n_in], *refs[n_in + 1:])
    return wrapped


def _fwd_call(value, loc, att, *, shapes: Shapes, block_sizes: BlockSizes, interpret: bool,
              poison: bool = False):
    """[B, S, H, D], [B, Lq, H, L, P, 2], [B, Lq, H, L, P] -> [B, Lq, H, D].

    poison=True (tests) starts the output from NaN, so an unwritten element shows."""
    bsz, _, n_heads, d = value.shape
    num_q, n_points = loc.shape[1], loc.shape[4]
    block_q = block_sizes.block_q
    kernel = functools.partial(_msda_fwd_kernel, shapes=shapes, n_points=n_points, num_q=num_q,
                               block_q=block_q, order=block_sizes.grid_order,
                               skip=block_sizes.skip_outside, interpret=interpret)
    out_shape = jax.ShapeDtypeStruct((bsz, num_q, n_heads, d), value.dtype)
    args, aliases = (value, loc, att), {}
    if poison:
        kernel = _drop_poison_ref(kernel, 3)
        args, aliases = args + (jnp.full(out_shape.shape, jnp.nan, value.dtype),), {3: 0}
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=_grid(block_sizes.grid_order, dict(b=bsz, q=pl.cdiv(num_q, block_q), h=n_heads)),
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=block_sizes.num_warps,
                                             num_stages=block_sizes.num_stages),
        interpret=interpret,
        name="msda_fwd",
    )(*args)


def _bwd_call(value, loc, att, g, *, shapes: Shapes, block_sizes: BlockSizes, interpret: bool,
              poison: bool = False):
    """Gradients ([B, S, H, D], [B, Lq, H, L, P, 2], [B, Lq, H, L, P]) for g [B, Lq, H, D]; the
    value gradient in fp32 with value_grad="scatter" (and "pull" in chunks), in value's dtype
    with "pull" in one chunk.

    poison=True (tests) starts the location and weight gradients from NaN."""
    bsz, _, n_heads, _ = value.shape
    num_q, n_points = loc.shape[1], loc.shape[4]
    block_q = block_sizes.block_q_bwd or block_sizes.block_q
    pull = block_sizes.value_grad == "pull"
    tile = block_sizes.tile_point_grads
    kernel = functools.partial(_msda_bwd_no_value_kernel if pull else _msda_bwd_kernel,
                               shapes=shapes, n_points=n_points, num_q=num_q,
                               block_q=block_q, interpret=interpret,
                               relaxed=block_sizes.relaxed_atomics, order=block_sizes.grid_order,
                               skip=block_sizes.skips_bwd, tile_grads=tile)
    # with `tile`, the kernel writes a query's point gradients as one row of [B, Lq, H, L*P*2]
    # and [B, Lq, H, L*P] (the same memory as loc's and att's shapes)
    n_pts = loc.shape[3] * n_points
    gloc_shape = loc.shape[:3] + (2 * n_pts,) if tile else loc.shape
    gatt_shape = att.shape[:3] + (n_pts,) if tile else att.shape
    params = plgpu.CompilerParams(num_warps=block_sizes.num_warps_bwd or block_sizes.num_warps,
                                  num_stages=block_sizes.num_stages)
    grid = _grid(block_sizes.grid_order, dict(b=bsz, q=pl.cdiv(num_q, block_q), h=n_heads))
    if pull:
        args, aliases = (value, loc, att, g), {}
        if poison:
            args += (jnp.full(gloc_shape, jnp.nan, loc.dtype), jnp.full(gatt_shape, jnp.nan, att.dtype))
            aliases = {4: 0, 5: 1}
            inner = kernel

            def kernel(*refs):  # the two poison refs are aliased with the outputs
                return inner(*refs[:4], *refs[6:])
        gloc, gatt = pl.pallas_call(
            kernel,
            out_shape=(jax.ShapeDtypeStruct(gloc_shape, loc.dtype),
                       jax.ShapeDtypeStruct(gatt_shape, att.dtype)),
            grid=grid, input_output_aliases=aliases, compiler_params=params,
            interpret=interpret, name="msda_bwd_points",
        )(*args)
        gloc, gatt = gloc.reshape(loc.shape), gatt.reshape(att.shape)
        starts, query, coef = _sorted_points(loc, att, shapes)
        gv = _pull_call(starts, query, coef, g, value.shape[1], value.dtype, shapes=shapes,
                        block_sizes=block_sizes, points_per_level=num_q * n_points,
                        interpret=interpret, poison=poison)
        return gv, gloc, gatt
    gv0 = jnp.zeros(value.shape, jnp.float32)
    args, aliases = (value, loc, att, g, gv0), {4: 0}
    if poison:
        args += (jnp.full(gloc_shape, jnp.nan, loc.dtype), jnp.full(gatt_shape, jnp.nan, att.dtype))
        aliases = {4: 0, 5: 1, 6: 2}
        inner = kernel

        def kernel(*refs):  # the two poison refs are aliased with the outputs
            return inner(*refs[:5], *refs[7:])
    gv, gloc, gatt = pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct(value.shape, jnp.float32),
            jax.ShapeDtypeStruct(gloc_shape, loc.dtype),
            jax.ShapeDtypeStruct(gatt_shape, att.dtype),
        ),
        grid=grid,
        input_output_aliases=aliases,
        compiler_params=params,
        interpret=interpret,
        name="msda_bwd",
    )(*args)
    return gv, gloc.reshape(loc.shape), gatt.reshape(att.shape)


# ---- transformations: batch-sharded partitioning and vmap, both by the batch axis ----------

_FWD_RULE = "b s h d, b q h l p x, b q h l p -> b q h d"
_BWD_RULE = "b s h d, b q h l p x, b q h l p, b q h d -> b s h d, b q h l p x, b q h l p"
_NOT_SHARDED = ("s", "h", "d", "q", "l", "p", "x")  # in order of first appearance


@functools.lru_cache(maxsize=None)
def _ops(shapes: Shapes, block_sizes: BlockSizes, interpret: bool, poison: bool):
    def fwd(value, loc, att):
        return _fwd_call(value, loc, att, shapes=shapes, block_sizes=block_sizes,
                         interpret=interpret, poison=poison)

    def bwd(value, loc, att, g):
        return _bwd_call(value, loc, att, g, shapes=shapes, block_sizes=block_sizes,
                         interpret=interpret, poison=poison)

    return (batch_partitioned(fwd, 1, _FWD_RULE, _NOT_SHARDED),
            batch_partitioned(bwd, 3, _BWD_RULE, _NOT_SHARDED))


def msda_pallas_fwd(value, spatial_shapes: Sequence[tuple[int, int]], loc, att, *,
                    block_sizes: BlockSizes | None = None, interpret: bool = False,
                    poison: bool = False) -> jax.Array:
    """Forward kernel: [B, Lq, H, D] in value's dtype (no custom_vjp here; see msda.py)."""
    require("msda_fwd")
    shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
    bs = block_sizes or default_block_sizes(value.shape[-1], loc.shape[1])
    return per_batch_shard(_ops(shapes, bs, interpret, poison)[0], 1, value, loc, att)


def msda_pallas_bwd(value, spatial_shapes: Sequence[tuple[int, int]], loc, att, g, *,
                    block_sizes: BlockSizes | None = None, interpret: bool = False,
                    poison: bool = False):
    """Backward kernels: (d value, d loc, d att) for g = d out [B, Lq, H, D]; d value in fp32
    ("scatter") or value's dtype ("pull", summed in fp32): the caller casts."""
    require("msda_bwd")
    shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
    bs = block_sizes or default_block_sizes(value.shape[-1], loc.shape[1])
    return per_batch_shard(_ops(shapes, bs, interpret, poison)[1], 3, value, loc, att, g)
