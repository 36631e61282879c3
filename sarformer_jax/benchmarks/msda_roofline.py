"""Roofline probes for the MSDA backward (`sarformer bench msda --roofline`).

The backward kernel does three things per sampling point: gather the four corner rows of value
(as the forward does), take four dots with the output gradient, and scatter-add four scaled
copies of the output gradient into the fp32 value gradient with atomics.  These probes time the
parts alone, on the same grid, with the same loads of locations and weights and the same
corner arithmetic, so that the full backward can be compared with what its parts cost:

- `scatter`: only the value-gradient atomics, at the real (data-dependent) rows;
- `scatter_seq`: the same number of atomics, but at consecutive positions within a program
  (one head's rows, so D elements each, H * D apart in memory), shifted by a fixed stride
  between points: data-independent rows that no two programs of a step share;
- `store`: plain (non-atomic) stores of the same tiles at the real rows -- the write traffic
  without the read-modify-write; its result is garbage (rows race) and is thrown away.

The gathers alone are the forward kernel, which the main table already times.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sarformer_jax.kernels import msda_pallas as mp
from sarformer_jax.kernels.triton_backend import plgpu

PROBES = ("scatter", "scatter_seq", "store")


def _probe_kernel(loc_ref, att_ref, g_ref, gv_in_ref, gv_ref, *, probe: str, shapes, n_points: int,
                  num_q: int, block_q: int, interpret: bool):
    del gv_in_ref  # aliased with gv_ref
    b, qb, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    q0 = qb * block_q
    qs = pl.ds(q0, block_q)
    qmask = q0 + jnp.arange(block_q) < num_q
    g = plgpu.load(g_ref.at[b, qs, h, :], mask=qmask[:, None], other=0.0).astype(jnp.float32)
    d = g.shape[-1]
    cols = jnp.arange(d)
    total = sum(hh * ww for hh, ww in shapes)
    k = 0
    for lvl, (start, (hl, wl)) in enumerate(zip(mp._level_starts(shapes), shapes)):
        for p in range(n_points):
            x = plgpu.load(loc_ref.at[b, qs, h, mp._i(lvl), mp._i(p), mp._i(0)], mask=qmask,
                           other=0.0)
            y = plgpu.load(loc_ref.at[b, qs, h, mp._i(lvl), mp._i(p), mp._i(1)], mask=qmask,
                           other=0.0)
            a = plgpu.load(att_ref.at[b, qs, h, mp._i(lvl), mp._i(p)], mask=qmask,
                           other=0.0).astype(jnp.float32)
            _, _, corners = mp._corners(x.astype(jnp.float32), y.astype(jnp.float32), hl, wl)
            for idx, cw, _ in corners:
                vals = (a * cw)[:, None] * g
                if probe == "scatter_seq":
                    rows = (q0 + jnp.arange(block_q) + 97 * k) % total
                else:
                    rows = start + idx
                k += 1
                if probe == "store":
                    plgpu.store(gv_ref.at[b, rows[:, None], h, cols[None, :]], vals)
                else:
                    # the kernel's own scatter (one tile atomic on the GPU, rows in turn when
                    # interpreted)
                    mp._scatter_add_rows(gv_ref, b, rows, h, vals, interpret, relaxed=True)


@functools.lru_cache(maxsize=None)
def probe_fn(probe: str, shapes, block_q: int, num_warps: int, interpret: bool = False):
    """jit(loc, att, g) -> fp32 [B, S, H, D] buffer, for the probe named.  `scatter` returns the
    value gradient of the backward (the test checks it against the reference)."""
    if probe not in PROBES:
        raise ValueError(f"unknown roofline probe {probe!r}; known: {', '.join(PROBES)}")
    total = sum(h * w for h, w in shapes)

    @jax.jit
    def run(loc, att, g):
        bsz, num_q, n_heads, _, n_points, _ = loc.shape
        d = g.shape[-1]
        kernel = functools.partial(_probe_kernel, probe=probe, shapes=shapes, n_points=n_points,
                                   num_q=num_q, block_q=block_q, interpret=interpret)
        gv0 = jnp.zeros((bsz, total, n_heads, d), jnp.float32)
        return pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct(gv0.shape, jnp.float32),
            grid=(bsz, pl.cdiv(num_q, block_q), n_heads),
            input_output_aliases={3: 0},
            compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
            interpret=interpret,
            name=f"msda_probe_{probe}",
        )(loc, att, g, gv0)

    return run


def atomic_count(case_dims) -> int:
    """fp32 adds of the value gradient: B * Lq * H * L * P * 4 corners * D."""
    b, q, shapes, n, p, d = case_dims
    return b * q * n * len(shapes) * p * 4 * d
