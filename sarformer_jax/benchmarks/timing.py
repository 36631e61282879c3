"""The one timing loop of the benchmarks."""

from __future__ import annotations

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
                   windows: int = 3) -> tuple[float, list[float]]:
    """Seconds per step as a training loop runs: `steps` calls of `dispatch` back to back (it
    must not block), then one `wait`; the median over `windows` such windows of the per-step
    time, and every window's.  One slow step (a command-buffer re-recording, a host hiccup)
    moves one window, not the figure."""
    per_step = []
    for _ in range(windows):
        t = time.perf_counter()
        for _ in range(steps):
            dispatch()
        wait()
        per_step.append((time.perf_counter() - t) / steps)
    return float(np.median(per_step)), per_step
