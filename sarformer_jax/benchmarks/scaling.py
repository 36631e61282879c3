"""`sarformer bench scaling`: the sharded train step over 1..N GPUs of one host.

Two questions, one run:

* **Weak scaling.**  For every device count n in `--devices` (default 1, 2, 4, ... up to all
  visible devices), the train step at `--batch-per-device` images per device (global batch
  b·n), data parallel over n devices (`--fsdp n`: parameters and optimiser state split over all n,
  the recipe for SARFormer-L).  Reported: median step time, images/s, peak memory per device,
  and the weak-scaling efficiency img/s(n) / (n · img/s(1)).
* **Equivalence.**  With the largest n, a fixed sequence of `--trajectory-steps` global batches
  of b·n images (seeded by step) is trained from the same initial parameters by
  (a) the n-device run,
  (b) one device at the same global batch (`exact`: the same computation, only the reduction order
      differs, so the trajectories agree to rounding), and
  (c) one device with gradient accumulation over n micro-batches of b (`accum`: what a user with
      one GPU runs; the micro-batches draw their own proposal placeholders, drop-path masks and
      loss points and normalise the mask losses by their own match counts, and BatchNorm sees b
      images at a time, so it agrees with (a) statistically, not to rounding).
  Reported per step: each run's loss, and the relative L2 distance of the final parameters.

Each run is a subprocess restricted to the first n devices.  All of them build and compile at the
same time (XLA compilation is on the host: 2-4 minutes for SARFormer-B on an H100), then wait for
each other and measure one at a time, so no run's timing shares the GPUs with another's compile
or steps.  Inputs are `benchmarks.train.random_batch` batches (cached-guidance proposals as the
loader sends them, bit-packed), resident on the devices while timed.

Example (2 GPUs): `sarformer bench scaling --model sarformer_b --out $OUT/scaling.json`.
When the compiles do not fit one call (SARFormer-L), run a subset per call (`--runs n2`, then
`--runs n1,n1_b4_accum2`, each with its own `--out`) and summarise them with `--merge A B`
(losses and step times merge; parameter distances need the runs in one call).
Results go to docs/benchmarks.md with command, device, date and jax version.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from sarformer_jax.benchmarks.timing import GcClock, measuring_turn, median_time, pipelined_time

MODELS = {
    "sarformer_b": "ade20k_sarformer_b",
    "sarformer_l": "ade20k_sarformer_l",
    "mask2former_b": "ade20k_mask2former_adapter_b",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="sarformer_b",
                        help=f"one of {', '.join(MODELS)} (cached guidance), or a config name "
                             "with --config")
    parser.add_argument("--config", default=None, help="config name/path instead of --model's")
    parser.add_argument("--devices", default=None,
                        help="comma list of device counts (default 1, 2, 4, ... all)")
    parser.add_argument("--fsdp", action="store_true",
                        help="split parameters and optimiser state over all n devices")
    parser.add_argument("--batch-per-device", type=int, default=2)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--windows", type=int, default=3,
                        help="pipelined windows of --steps steps each (the median is reported)")
    parser.add_argument("--trajectory-steps", type=int, default=8,
                        help="steps of the equivalence runs (0: no equivalence runs)")
    parser.add_argument("--references", default="exact,accum",
                        help="one-device references for the equivalence: exact, accum")
    parser.add_argument("--runs", default=None,
                        help="comma list: run only these of the planned runs (n1, n2, n1_b4, "
                             "n1_b4_accum2, ...), e.g. one per call when compiles are long")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="no runs: summarise the results of earlier --out files together "
                             "(parameter distances need the runs in one call)")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="after timing, trace 5 steps of each timed run into DIR/<run> and "
                             "print its kernel time per device by scope (NCCL collectives apart)")
    parser.add_argument("--schedule", action="store_true",
                        help="print where the compiled step's collectives sit in its schedule "
                             "(and how much compute lies between each async start and done)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default=None, help="results (json)")
    parser.add_argument("--log-dir", default=None, help="per-run logs")
    parser.add_argument("--timeout", type=float, default=None, help="seconds for the whole run")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)


# ----------------------------------------------------------------------------------------------
# The runs


def plan_runs(args, num_visible: int) -> list[dict]:
    counts = _device_counts(args.devices, num_visible)
    nmax = max(counts)
    b = args.batch_per_device
    runs = [dict(name=f"n{n}", devices=n, global_batch=b * n, accum=1,
                 fsdp=n if args.fsdp else 1, timing=True,
                 trajectory=(n == nmax and args.trajectory_steps > 0 and nmax > 1))
            for n in counts]
    if args.trajectory_steps > 0 and nmax > 1:
        refs = [r.strip() for r in args.references.split(",") if r.strip()]
        bad = [r for r in refs if r not in ("exact", "accum")]
        if bad:
            raise SystemExit(f"--references: unknown {bad}; choose from exact, accum")
        if "exact" in refs:
            runs.append(dict(name=f"n1_b{b * nmax}", devices=1, global_batch=b * nmax,
                             accum=1, fsdp=1, timing=True, trajectory=True))
        if "accum" in refs:
            runs.append(dict(name=f"n1_b{b * nmax}_accum{nmax}", devices=1,
                             global_batch=b * nmax, accum=nmax, fsdp=1, timing=True,
                             trajectory=True))
    return runs


def select_runs(runs: list[dict], spec: str | None) -> list[dict]:
    """The planned runs named in `spec` (comma list), in plan order; all when `spec` is None."""
    if not spec:
        return runs
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = sorted(set(names) - {r["name"] for r in runs})
    if unknown:
        raise SystemExit(f"--runs: {unknown} not planned; planned: {[r['name'] for r in runs]}")
    return [r for r in runs if r["name"] in names]


def _device_counts(spec: str | None, num_visible: int) -> list[int]:
    if spec:
        counts = sorted({int(s) for s in spec.split(",") if s.strip()})
    else:
        counts, n = [], 1
        while n <= num_visible:
            counts.append(n)
            n *= 2
    if not counts or counts[0] < 1 or counts[-1] > num_visible:
        raise SystemExit(f"--devices {spec!r}: {num_visible} device(s) visible")
    if 1 not in counts:
        counts.insert(0, 1)  # the efficiency is relative to one device
    return counts


def run_config(args, run: dict):
    from sarformer_jax.config import load_config

    name = args.config or MODELS.get(args.model)
    if name is None:
        raise SystemExit(f"unknown --model {args.model!r}; choose from {', '.join(MODELS)}")
    sets = [f"train.batch_size={run['global_batch']}", f"train.grad_accum={run['accum']}",
            f"train.compute_dtype={args.dtype}", f"train.mesh.fsdp={run['fsdp']}",
            "train.mesh.data=-1"]
    if args.config is None and args.model != "mask2former_b":
        sets.append("guidance.source=cached")
    return load_config(name, sets + list(args.set))


def trajectory_batch(cfg, step: int) -> dict[str, np.ndarray]:
    """Global batch number `step` of the equivalence runs (the same for every run), in the
    loader's format (`benchmarks.train.random_batch`)."""
    from sarformer_jax.benchmarks.train import random_batch

    return random_batch(cfg, seed=10_000 + step)


# ----------------------------------------------------------------------------------------------
# Worker (one run, one subprocess)


def _peak_bytes(devices) -> int | None:
    peaks = []
    for d in devices:
        stats = d.memory_stats() if hasattr(d, "memory_stats") else None
        if stats and stats.get("peak_bytes_in_use"):
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def worker(args, run: dict, rundir: str, names: list[str]) -> dict:
    import jax

    from sarformer_jax.train import create_trainer, device_batch

    tag = f"[{run['name']}]"
    devices = jax.devices()[:run["devices"]]
    cfg = run_config(args, run)
    res = dict(run, device_kind=devices[0].device_kind, jax=jax.__version__,
               date=datetime.date.today().isoformat(), config=cfg.name)
    t0 = time.perf_counter()
    trainer, state = create_trainer(cfg, devices=devices)
    jax.block_until_ready(state)
    res["init_s"] = time.perf_counter() - t0
    print(f"{tag} built in {res['init_s']:.0f} s; compiling the step", flush=True)
    batch = device_batch(trajectory_batch(cfg, -1), trainer.mesh)
    t0 = time.perf_counter()
    compiled = trainer.train_step.lower(state, batch, trainer.guide).compile()
    res["compile_s"] = time.perf_counter() - t0
    print(f"{tag} step compiled in {res['compile_s']:.0f} s on {len(devices)} device(s); "
          "waiting for the other runs", flush=True)
    if getattr(args, "schedule", False):
        from sarformer_jax.benchmarks import profile as prof

        try:  # a diagnostic: its failure must not cost the run its timings
            rows = prof.collective_schedule(compiled.as_text())
            res["collective_schedule"] = rows
            prof.print_collective_schedule(rows, run["name"])
        except Exception as e:  # noqa: BLE001
            print(f"{tag} collective schedule not read: {type(e).__name__}: {e}", flush=True)
    traj_batches = ([trajectory_batch(cfg, s) for s in range(args.trajectory_steps)]
                    if run["trajectory"] else [])
    # one run on the GPUs at a time
    with measuring_turn(rundir, run["name"], names, timeout=args.timeout or 3600):
        holder = {"state": state}
        if traj_batches:
            losses = []
            for hb in traj_batches:
                gb = device_batch(hb, trainer.mesh)
                holder["state"], m = compiled(holder["state"], gb, trainer.guide)
                losses.append(float(m["loss"]))
            res["losses"] = losses
            flat = np.concatenate([np.asarray(x, np.float32).ravel() for x in
                                   jax.tree_util.tree_leaves(jax.device_get(
                                       trainer.params_tree(holder["state"]["params"])))])
            res["params_file"] = os.path.join(rundir, f"params.{run['name']}.npy")
            np.save(res["params_file"], flat)
            print(f"{tag} trajectory losses {' '.join(f'{v:.4f}' for v in losses)}", flush=True)

        def step():
            holder["state"], metrics = compiled(holder["state"], batch, trainer.guide)
            jax.block_until_ready((holder["state"], metrics))

        if cfg.train.get("freeze_gc", True):  # as the training loop does after its first step
            from sarformer_jax.train import freeze_heap

            step()
            res["gc_frozen_objects"] = freeze_heap()
        with GcClock() as gc_clock:
            sec, times = median_time(step, args.steps, args.warmup)
        res["blocking_gc"] = gc_clock.snapshot()
        # as the training loop runs: dispatched back to back, one wait at the end, so the host's
        # dispatch of step n+1 overlaps the devices' step n
        def dispatch():
            holder["state"], holder["metrics"] = compiled(holder["state"], batch, trainer.guide)

        gc_windows = []
        with GcClock() as gc_clock:
            start_gc = gc_clock.snapshot()
            pipelined, windows = pipelined_time(
                dispatch, lambda: jax.block_until_ready((holder["state"], holder["metrics"])),
                args.steps, windows=getattr(args, "windows", 3),
                after_window=lambda: gc_windows.append(gc_clock.snapshot()))
        # host time in the garbage collector per window (oldest generation apart)
        prev = start_gc
        res["pipelined_windows_gc"] = []
        for snap in gc_windows:
            res["pipelined_windows_gc"].append(dict(
                seconds=sum(snap["seconds"]) - sum(prev["seconds"]),
                gen2=snap["counts"][2] - prev["counts"][2]))
            prev = snap
        print(f"{tag} pipelined windows (ms per step): "
              + ", ".join(f"{w * 1e3:.1f} (gc {g['seconds'] * 1e3:.0f} ms, {g['gen2']} gen-2)"
                          for w, g in zip(windows, res["pipelined_windows_gc"])), flush=True)
        res.update(pipelined_step_s=pipelined, pipelined_windows_s=windows,
                   pipelined_images_per_s=run["global_batch"] / pipelined)
        res.update(step_s=sec, step_times_s=times, images_per_s=run["global_batch"] / sec,
                   peak_bytes=_peak_bytes(devices))
        print(f"{tag} step median {sec * 1e3:.1f} ms (pipelined {pipelined * 1e3:.1f}), "
              f"{res['images_per_s']:.2f} img/s, peak "
              f"{(res['peak_bytes'] or 0) / 2**30:.1f} GiB per device; slowest blocking step "
              f"{max(times) * 1e3:.1f} ms (step {int(np.argmax(times))}), "
              f"{sum(res['blocking_gc']['seconds']) * 1e3:.0f} ms in the garbage collector "
              f"({res['blocking_gc']['counts'][2]} gen-2)", flush=True)
        if args.profile:
            res["profile"] = _profile(args.profile, run["name"], step, compiled, sec)
        holder.clear()
    return res


def _profile(root: str, name: str, step, compiled, step_s: float) -> dict:
    import jax

    from sarformer_jax.benchmarks import profile as prof

    trace_dir = os.path.join(root, name)
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    for _ in range(5):
        step()
    jax.profiler.stop_trace()
    summary = prof.summarize(trace_dir, compiled.as_text(), steps=5)
    if "gpu_kernel_ms_per_step" in summary:
        summary["idle_ms_per_step"] = step_s * 1e3 - summary["gpu_busy_ms_per_step"]
    prof.print_summary(summary, name)
    return summary


# ----------------------------------------------------------------------------------------------
# Driver


def summarize(results: list[dict]) -> dict:
    """Weak-scaling efficiencies and the equivalence distances (from the workers' results)."""
    ok = {r["name"]: r for r in results if not r.get("failed")}
    timing = sorted((r for r in ok.values() if r["name"] == f"n{r['devices']}"),
                    key=lambda r: r["devices"])
    one = next((r for r in timing if r["devices"] == 1), None)
    for r in timing:
        r["efficiency"] = (r["images_per_s"] / (r["devices"] * one["images_per_s"])
                           if one and "images_per_s" in r and "images_per_s" in one else None)
        r["pipelined_efficiency"] = (
            r["pipelined_images_per_s"] / (r["devices"] * one["pipelined_images_per_s"])
            if one and "pipelined_images_per_s" in r and "pipelined_images_per_s" in one
            else None)
    traj = [r for r in ok.values() if r.get("losses")]
    ref = max(traj, key=lambda r: r["devices"], default=None)
    equiv = []

    def params(r):
        f = r.get("params_file")
        return np.load(f) if f and os.path.exists(f) else None

    if ref is not None:
        p_ref = params(ref)
        for r in traj:
            if r is ref:
                continue
            p = params(r)
            a, b = np.asarray(ref["losses"]), np.asarray(r["losses"])
            dist = (float(np.linalg.norm(p - p_ref) / np.linalg.norm(p_ref))
                    if p is not None and p_ref is not None else None)
            equiv.append(dict(run=r["name"], reference=ref["name"],
                              max_abs_loss_diff=float(np.max(np.abs(a - b))),
                              max_rel_loss_diff=float(np.max(np.abs(a - b) / np.abs(a))),
                              params_rel_l2=dist))
    return dict(weak_scaling=[dict(devices=r["devices"], global_batch=r["global_batch"],
                                   step_ms=r["step_s"] * 1e3, images_per_s=r["images_per_s"],
                                   efficiency=r["efficiency"], peak_bytes=r.get("peak_bytes"),
                                   pipelined_step_ms=(r["pipelined_step_s"] * 1e3
                                                      if "pipelined_step_s" in r else None),
                                   pipelined_efficiency=r.get("pipelined_efficiency"))
                              for r in timing if "step_s" in r],
                equivalence=equiv, reference=ref["name"] if ref else None,
                trajectories={r["name"]: r["losses"] for r in traj})


def print_summary(summary: dict, results: list[dict]) -> None:
    r0 = next((r for r in results if not r.get("failed")), None)
    if r0:
        print(f"\n{r0['config']} on {r0['device_kind']}, jax {r0['jax']}, {r0['date']}")
    print("\n| devices | global batch | step ms (blocking) | img/s | weak-scaling efficiency "
          "| pipelined step ms | pipelined efficiency | peak GiB/device |")
    print("|---|---|---|---|---|---|---|---|")
    pct = lambda x: "-" if x is None else f"{100 * x:.1f} %"  # noqa: E731
    for w in summary["weak_scaling"]:
        peak = "-" if not w["peak_bytes"] else f"{w['peak_bytes'] / 2**30:.1f}"
        pms = w.get("pipelined_step_ms")
        print(f"| {w['devices']} | {w['global_batch']} | {w['step_ms']:.1f} | "
              f"{w['images_per_s']:.2f} | {pct(w['efficiency'])} | "
              f"{'-' if pms is None else format(pms, '.1f')} | "
              f"{pct(w.get('pipelined_efficiency'))} | {peak} |")
    others = [r for r in results if not r.get("failed") and "step_s" in r
              and r["name"] != f"n{r['devices']}"]
    for r in others:
        peak = "-" if not r.get("peak_bytes") else f"{r['peak_bytes'] / 2**30:.1f}"
        pms = r.get("pipelined_step_s")
        print(f"| 1 ({r['name']}) | {r['global_batch']} | {r['step_s'] * 1e3:.1f} | "
              f"{r['images_per_s']:.2f} | - | {'-' if pms is None else format(pms * 1e3, '.1f')} "
              f"| - | {peak} |")
    if summary["trajectories"]:
        names = list(summary["trajectories"])
        print(f"\nloss trajectory (same {len(summary['trajectories'][names[0]])} global batches, "
              "same initial parameters)")
        print("| step | " + " | ".join(names) + " |")
        print("|---" * (len(names) + 1) + "|")
        for i in range(len(summary["trajectories"][names[0]])):
            print(f"| {i} | " + " | ".join(f"{summary['trajectories'][n][i]:.5f}"
                                            for n in names) + " |")
        for e in summary["equivalence"]:
            dist = ("not available (runs from different calls)" if e["params_rel_l2"] is None
                    else f"{e['params_rel_l2']:.2e}")
            print(f"{e['run']} vs {e['reference']}: max |Δloss| {e['max_abs_loss_diff']:.2e} "
                  f"(relative {e['max_rel_loss_diff']:.2e}), final parameters relative L2 "
                  f"distance {dist}")
    for r in results:
        if r.get("failed"):
            print(f"run {r['name']} FAILED (rc {r.get('returncode')}): {r.get('error')}")


def _spawn(args, run: dict, rundir: str, names: list[str], argv_tail: list[str]):
    spec = json.dumps(dict(run=run, rundir=rundir, names=names))
    env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_PYTHON_CLIENT_PREALLOCATE="false")
    env.setdefault("NCCL_NVLS_ENABLE", "0")  # the device hosts require NVLink multicast off
    log = open(os.path.join(args.log_dir, f"scaling_{run['name']}.log"), "w") \
        if args.log_dir else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-m", "sarformer_jax.cli", "bench", "scaling",
                             *argv_tail, "--worker", spec],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env=env)
    return proc, log


def run(args: argparse.Namespace) -> int:
    if args.worker:
        spec = json.loads(args.worker)
        run_ = spec["run"]
        try:
            res = worker(args, run_, spec["rundir"], spec["names"])
        except BaseException:
            open(os.path.join(spec["rundir"], f"failed.{run_['name']}"), "w").close()
            raise
        with open(os.path.join(spec["rundir"], f"result.{run_['name']}.json"), "w") as f:
            json.dump(res, f)
        return 0

    if args.merge:
        results = []
        for path in args.merge:
            with open(path) as f:
                results += json.load(f)["results"]
        summary = summarize(results)
        print_summary(summary, results)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(dict(results=results, summary=summary), f, indent=1)
        return 0 if all(not r.get("failed") for r in results) else 1

    import jax

    runs = select_runs(plan_runs(args, len(jax.devices())), args.runs)
    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)
    argv_tail = _argv_tail(args)
    print(f"# sarformer bench scaling  {datetime.date.today()}  {args.config or args.model}  "
          f"batch/device {args.batch_per_device}  fsdp {args.fsdp}  {args.dtype}  runs "
          f"{[r['name'] for r in runs]}", flush=True)
    names = [r["name"] for r in runs]
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="scaling.") as rundir:
        procs = [(r, *_spawn(args, r, rundir, names, argv_tail)) for r in runs]
        tails = {r["name"]: [] for r in runs}
        import selectors

        sel = selectors.DefaultSelector()
        for r, p, log in procs:
            sel.register(p.stdout, selectors.EVENT_READ, (r, p, log))
        open_streams = len(procs)
        while open_streams:
            if args.timeout and time.time() - t_start > args.timeout:
                for _, p, _ in procs:
                    p.kill()
                print(f"timeout after {args.timeout:.0f} s: runs killed", flush=True)
                break
            for key, _ in sel.select(timeout=1.0):
                r, p, log = key.data
                line = key.fileobj.readline()
                if not line:
                    sel.unregister(key.fileobj)
                    open_streams -= 1
                    continue
                if log is not subprocess.DEVNULL:
                    log.write(line)
                    log.flush()
                if line.startswith(f"[{r['name']}]"):
                    print(line, end="", flush=True)
                tails[r["name"]] = (tails[r["name"]] + [line.rstrip()])[-30:]
        results = []
        for r, p, log in procs:
            rc = p.wait()
            if log is not subprocess.DEVNULL:
                log.close()
            path = os.path.join(rundir, f"result.{r['name']}.json")
            if rc == 0 and os.path.exists(path):
                with open(path) as f:
                    results.append(json.load(f))
            else:
                tail = tails[r["name"]]
                err = next((ln for ln in reversed(tail) if "Error" in ln or "error" in ln),
                           tail[-1] if tail else None)
                results.append(dict(r, failed=True, returncode=rc, error=err, tail=tail[-12:]))
        summary = summarize(results)
    print_summary(summary, results)
    print(f"\nwall time {time.time() - t_start:.0f} s", flush=True)
    if args.out:
        for r in results:
            r.pop("params_file", None)
        with open(args.out, "w") as f:
            json.dump(dict(results=results, summary=summary), f, indent=1)
    return 0 if all(not r.get("failed") for r in results) else 1


def _argv_tail(args) -> list[str]:
    tail = ["--model", args.model, "--batch-per-device", str(args.batch_per_device),
            "--dtype", args.dtype, "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--windows", str(args.windows),
            "--trajectory-steps", str(args.trajectory_steps), "--references", args.references]
    if args.config:
        tail += ["--config", args.config]
    if args.fsdp:
        tail.append("--fsdp")
    if args.timeout:
        tail += ["--timeout", str(args.timeout)]
    if args.profile:
        tail += ["--profile", args.profile]
    if args.schedule:
        tail.append("--schedule")
    for s in args.set:
        tail += ["--set", s]
    return tail
