"""`sarformer bench matcher`: the Hungarian matching of one train step, on the device vs scipy.

On a GPU both device solvers are timed in the same run: the XLA one and the Pallas kernel
(`kernels/hungarian_pallas.py`, one program per problem with the loops inside).

A SARFormer step matches every deep-supervision layer of every image: L x B cost matrices of
[Q queries, C classes] with the classes present in the image valid.  The device solver
(`matcher.hungarian_assign`, vmapped) runs nested `lax.while_loop`s; on a GPU each iteration's
condition can cost a round trip to the host, so this benchmark times it alone, with whatever
XLA_FLAGS the environment sets (run it twice to compare flags), next to the original's way
(scipy's linear_sum_assignment on the host, one call per matrix, transfer included).

  sarformer bench matcher                                  (the command's default XLA flags:
                                                           loops in CUDA-graph command buffers)
  SARFORMER_JAX_XLA_DEFAULTS=0 sarformer bench matcher     (XLA's own defaults)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import numpy as np

from sarformer_jax.benchmarks.timing import median_time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=10, help="deep-supervision layers")
    parser.add_argument("--batch", type=int, default=2, help="images per device")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--present", type=int, nargs=2, default=[8, 25],
                        help="range of classes present per image")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default=None, help="results json")


def _problems(args, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = args.layers * args.batch
    cost = rng.normal(size=(n, args.queries, args.classes)).astype(np.float32)
    present = np.zeros((n, args.classes), bool)
    for b in range(args.batch):
        k = int(rng.integers(args.present[0], args.present[1] + 1))
        cls = rng.choice(args.classes, k, replace=False)
        present[b :: args.batch, cls] = True  # every layer of image b sees its classes
    return cost, present


def run(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp
    from scipy.optimize import linear_sum_assignment

    from sarformer_jax.matcher import hungarian_assign

    cost, present = _problems(args)
    dev_cost, dev_present = jnp.asarray(cost), jnp.asarray(present)
    impls = ["xla", "pallas"] if jax.default_backend() == "gpu" else ["xla"]
    solvers, compile_s = {}, {}
    for impl in impls:
        solvers[impl] = jax.jit(jax.vmap(lambda c, p, impl=impl: hungarian_assign(c, None, p, implementation=impl)))
        t0 = time.perf_counter()
        jax.block_until_ready(solvers[impl](dev_cost, dev_present))
        compile_s[impl] = time.perf_counter() - t0

    def host():
        c = np.asarray(jax.device_get(dev_cost))
        p = np.asarray(jax.device_get(dev_present))
        out = []
        for ci, pi in zip(c, p):
            cols = np.flatnonzero(pi)
            out.append(linear_sum_assignment(ci[:, cols]))
        return out

    # same assignment (random costs: no ties)
    reference = host()
    for impl, solve in solvers.items():
        col4row, _ = jax.device_get(solve(dev_cost, dev_present))
        for i, (rows, cols) in enumerate(reference):
            got = np.flatnonzero(present[i])[cols]
            if not np.array_equal(np.asarray(col4row)[i][rows], got):
                raise AssertionError(f"problem {i}: the {impl} solver and scipy assignments differ")

    dev_ms = {impl: 1e3 * median_time(lambda s=solve: jax.block_until_ready(s(dev_cost, dev_present)),
                                      args.iters, 1)[0]
              for impl, solve in solvers.items()}
    host_ms = 1e3 * median_time(host, args.iters, 1)[0]
    res = dict(device_kind=jax.devices()[0].device_kind, jax=jax.__version__,
               date=datetime.date.today().isoformat(), xla_flags=os.environ.get("XLA_FLAGS", ""),
               problems=int(cost.shape[0]), queries=args.queries, classes=args.classes,
               present=list(args.present), compile_s=compile_s, device_ms=dev_ms,
               scipy_host_ms=host_ms)
    print(f"# sarformer bench matcher  {res['date']}  {res['device_kind']}  jax {res['jax']}  "
          f"XLA_FLAGS={res['xla_flags']!r}")
    print(f"{res['problems']} problems [{args.queries} x {args.classes}], "
          f"{args.present[0]}-{args.present[1]} classes present")
    names = {"xla": "XLA (vmapped while loops)", "pallas": "Pallas (one program per problem)"}
    for impl, ms in dev_ms.items():
        print(f"device, {names[impl]}: {ms:.3f} ms (compile {compile_s[impl]:.1f} s)")
    print(f"scipy on the host (transfer + {res['problems']} calls): {host_ms:.3f} ms")
    if "pallas" in dev_ms:
        print(f"XLA / Pallas: {dev_ms['xla'] / dev_ms['pallas']:.1f}x   scipy / Pallas: "
              f"{host_ms / dev_ms['pallas']:.1f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0
