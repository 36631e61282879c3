"""The one timing loop of the benchmarks."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable

import numpy as np


def median_time(fn: Callable[[], object], steps: int, warmup: int) -> tuple[float, list[float]]:
    """(median seconds per call, every timed call's seconds) of `fn` after `warmup` untimed
    calls; `fn` must block until its result is ready."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), times


def pipelined_time(dispatch: Callable[[], object], wait: Callable[[], object], steps: int,
                   windows: int = 3, after_window: Callable[[], object] | None = None
                   ) -> tuple[float, list[float]]:
    """Seconds per step as a training loop runs: `steps` calls of `dispatch` back to back (it
    must not block), then one `wait`; the median over `windows` such windows of the per-step
    time, and every window's.  One slow step (a command-buffer re-recording, a host hiccup)
    moves one window, not the figure.  `after_window`, if given, is called (untimed) after
    each window, e.g. to read a diagnostic counter."""
    per_step = []
    for _ in range(windows):
        t = time.perf_counter()
        for _ in range(steps):
            dispatch()
        wait()
        per_step.append((time.perf_counter() - t) / steps)
        if after_window is not None:
            after_window()
    return float(np.median(per_step)), per_step


class GcClock:
    """Wall time the host spends in Python's garbage collector, by generation, while entered
    (through `gc.callbacks`): a collection of the oldest generation walks every live object,
    and a process holding a large model holds many."""

    def __init__(self):
        self.seconds = [0.0, 0.0, 0.0]
        self.counts = [0, 0, 0]
        self._start = None

    def _callback(self, phase, info):
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            g = info.get("generation", 2)
            self.seconds[g] += time.perf_counter() - self._start
            self.counts[g] += 1
            self._start = None

    def snapshot(self) -> dict:
        return dict(seconds=list(self.seconds), counts=list(self.counts))

    def __enter__(self):
        import gc

        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc):
        import gc

        gc.callbacks.remove(self._callback)
        return False


def wait_for_all(sync_dir: str, names: list[str], timeout: float) -> None:
    """Waits until every run in `names` has written `ready.<name>` or its driver
    `failed.<name>` in `sync_dir`."""
    t0 = time.time()
    while True:
        done = [n for n in names if os.path.exists(os.path.join(sync_dir, f"ready.{n}"))
                or os.path.exists(os.path.join(sync_dir, f"failed.{n}"))]
        if len(done) == len(names):
            return
        if time.time() - t0 > timeout:
            raise TimeoutError(f"runs {sorted(set(names) - set(done))} never became ready")
        time.sleep(0.5)


MEASURE_LOCK_ENV = "SARFORMER_MEASURE_LOCK"


class _Turn:
    """Held measuring locks; `close()` (or leaving the `with` block) releases them."""

    def __init__(self, files):
        self._files = files

    def close(self) -> None:
        for f in reversed(self._files):
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def measuring_turn(sync_dir: str, name: str, names: list[str], timeout: float) -> _Turn:
    """For runs that compile at once and measure one at a time: marks `name` ready, waits for
    all `names` (`wait_for_all`), then takes the exclusive measuring lock.  When the
    environment names a file in SARFORMER_MEASURE_LOCK, that lock is taken too, so that
    benches started side by side (say the scaling bench of two models) never time their runs
    at the same time.  Returns the held turn: closing it (or the process ending) gives the
    turn to the next run."""
    open(os.path.join(sync_dir, f"ready.{name}"), "w").close()
    wait_for_all(sync_dir, names, timeout)
    files = []
    for path in (os.path.join(sync_dir, "lock"), os.environ.get(MEASURE_LOCK_ENV)):
        if path:
            f = open(path, "a")
            fcntl.flock(f, fcntl.LOCK_EX)
            files.append(f)
    return _Turn(files)


def add_launch_arguments(parser) -> None:
    """The Pallas launch-setting sweep of the kernel benchmarks (comma lists; `int_list` parses)."""
    parser.add_argument("--block-l", default="64", help="comma list of image tokens per program")
    parser.add_argument("--num-warps", default="4", help="comma list of warps per program")
    parser.add_argument("--num-stages", default="1", help="comma list of pipeline stages")


def int_list(s: str) -> list[int]:
    """A comma list of integers ("32,64," -> [32, 64])."""
    return [int(a) for a in s.split(",") if a.strip()]


def torch_cuda_peer():
    """`(torch, triton.testing.do_bench)` for timing a PyTorch peer on the GPU, or the reason
    there is none ("torch/triton not installed", "no CUDA") as a string for the table's row."""
    try:
        import torch
        from triton.testing import do_bench
    except ImportError:
        return "torch/triton not installed"
    if not torch.cuda.is_available():
        return "no CUDA"
    return torch, do_bench
