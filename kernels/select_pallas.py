"""Pallas (Triton backend) kernel: the indices of the k smallest entries of each row, as a set.

The loss's importance sampling (Mask2Former's uncertainty-based point sampling) keeps, for every
matched slot, the k = 3/4 * P most uncertain of n = 3 * P candidate points: 9408 of 37632 for
SARFormer's 112² points, for L x B x slots rows a step.  `lax.top_k` of that size is a full
segmented radix sort of (key, index) pairs on a GPU (the loss's "sort" kernels, 1.6 ms a
SARFormer-B step in train run 27), although the loss only needs the set: it averages over the
points, so their order is irrelevant.

One program per row, three phases over the row's keys in chunks of `chunk` (read through
L1/L2; a row is 147 KB at n = 37632):
1. keys: the float32 values as int32 in the same order (the bit pattern, with the value bits
   of negative numbers flipped: -0.0 just below +0.0, NaN patterns beyond the infinities on
   their sign's side); the row is padded to a multiple of the chunk with INT32_MAX, which no
   real key exceeds.
2. the k-th smallest key t, `radix_bits` bits per pass over the row from the top: with the
   bits found so far as prefix p, each pass counts the keys below p | d << shift for all
   2^radix_bits digits d at once (a [2^radix_bits, chunk] compare), and t's digit is the
   largest d with fewer than k keys below.  32 / radix_bits passes.
3. one pass in index order: a key is chosen if key < t, or key == t and fewer than
   k - count(key < t) equal keys came before it -- ties go to the lower index, as in
   `lax.top_k`, so the set is the one `lax.top_k` picks.  Chosen indices are written to
   positions [0, k) in index order and the others to [k, n): a stable partition in which every
   output position is written exactly once (no masks, so the interpreter runs it as the GPU
   does).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sarformer_jax.kernels.triton_backend import plgpu, require

_KEY_MAX = 2**31 - 1  # the padding: no real key is above it
_KEY_MIN = -(2**31)


def _passes(radix_bits: int) -> list[tuple[int, int]]:
    """(shift, width) of the search's passes: `radix_bits` bits of the key per pass, from the top
    (the last pass takes what is left)."""
    out, hi = [], 32
    while hi > 0:
        w = min(radix_bits, hi)
        out.append((hi - w, w))
        hi -= w
    return out


def _kernel(key_ref, out_ref, *, k: int, chunk: int, radix_bits: int):
    row = pl.program_id(0)
    n_chunks = key_ref.shape[1] // chunk
    lane = jnp.arange(chunk, dtype=jnp.int32)
    sign = jnp.int32(_KEY_MIN)

    def load(c):
        return key_ref[row, pl.ds(c * chunk, chunk)]

    def count_below(thr):  # thr [m]: the number of keys < thr[j] in the row, [m]
        def body(c, acc):
            return acc + (load(c)[None, :] < thr[:, None]).astype(jnp.int32)

        acc = jax.lax.fori_loop(0, n_chunks, body, jnp.zeros((thr.shape[0], chunk), jnp.int32))
        return jnp.sum(acc, axis=1)

    # The k-th smallest key t, digit by digit from the top, in the unsigned order of the keys
    # (key ^ sign): with the prefix p found so far, digit d is possible iff fewer than k keys
    # lie below p | d << shift, so t's digit is the number of such d beyond d = 0.
    prefix = jnp.int32(0)
    for shift, width in _passes(radix_bits):
        digits = jnp.arange(1 << width, dtype=jnp.int32)
        thr = (prefix | jax.lax.shift_left(digits, jnp.int32(shift))) ^ sign
        digit = jnp.sum((count_below(thr) < k).astype(jnp.int32)) - 1
        prefix = prefix | jax.lax.shift_left(digit, jnp.int32(shift))
    t = prefix ^ sign
    need = k - count_below(jnp.full((1,), t, jnp.int32))[0]  # keys equal to t to choose, >= 1

    def partition(c, carry):
        chosen_before, ties_before = carry
        key = load(c)
        tie = (key == t).astype(jnp.int32)
        tie_rank = ties_before + jnp.cumsum(tie) - tie
        chosen = ((key < t) | ((tie == 1) & (tie_rank < need))).astype(jnp.int32)
        rank = chosen_before + jnp.cumsum(chosen) - chosen  # chosen keys before this one
        index = c * chunk + lane
        out_ref[row, jnp.where(chosen == 1, rank, k + index - rank)] = index
        return chosen_before + jnp.sum(chosen), ties_before + jnp.sum(tie)

    jax.lax.fori_loop(0, n_chunks, partition, (jnp.int32(0), jnp.int32(0)))


@functools.partial(jax.jit, static_argnames=("k", "chunk", "radix_bits", "num_warps", "interpret",
                                             "poison"))
def smallest_k_pallas(x: jax.Array, k: int, *, chunk: int = 1024, radix_bits: int = 2,
                      num_warps: int = 4, interpret: bool = False,
                      poison: bool = False) -> jax.Array:
    """Indices [..., k] (int32, ascending) of the k smallest entries along the last axis of x
    (float32 or narrower; the loss passes |logits|), ties to the lower index: for x without NaN
    the set of `lax.top_k(-x, k)[1]`, in index order.  `chunk` (a power of two) keys are read at
    a time, `radix_bits` (1-5) of t found per pass; one program per row of x's leading axes.
    The defaults are the fastest of five settings at the loss's shape on an H100: 0.77 ms for 640
    rows of 37632 against `lax.top_k`'s 1.89 ms (docs/benchmarks.md, point selection run 1).
    poison=True (tests) starts the output from -1, so a position left unwritten shows."""
    require("smallest_k (smallest_k_pallas)")
    n = x.shape[-1]
    if not 0 < k <= n:
        raise ValueError(f"smallest_k_pallas: k = {k} must be in [1, {n}] (x {tuple(x.shape)})")
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"smallest_k_pallas: chunk = {chunk} must be a power of two >= 16")
    if not 1 <= radix_bits <= 5:
        raise ValueError(f"smallest_k_pallas: radix_bits = {radix_bits} must be in 1..5")
    lead = x.shape[:-1]
    rows = 1
    for s in lead:
        rows *= s
    chunk = min(chunk, max(16, pl.next_power_of_2(n)))
    n_pad = pl.cdiv(n, chunk) * chunk
    x = x.astype(jnp.float32).reshape(rows, n)
    x = jnp.where(x == 0, jnp.float32(0), x)  # -0.0 ties with +0.0, as in a comparison
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    keys = jnp.where(bits < 0, bits ^ jnp.int32(_KEY_MAX), bits)  # float order as int order
    keys = jnp.pad(keys, ((0, 0), (0, n_pad - n)), constant_values=_KEY_MAX)
    kernel = functools.partial(_kernel, k=k, chunk=chunk, radix_bits=radix_bits)
    args, aliases = (keys,), {}
    if poison:
        def kernel(key_ref, _, out_ref, inner=kernel):
            inner(key_ref, out_ref)

        args, aliases = (keys, jnp.full((rows, n_pad), -1, jnp.int32)), {1: 0}
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((rows, n_pad), jnp.int32),
        grid=(rows,),
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="smallest_k",
    )(*args)
    if poison:  # the whole partition, so that every position's write is checked
        return out[:, :n].reshape(*lead, n)
    return out[:, :k].reshape(*lead, k)
