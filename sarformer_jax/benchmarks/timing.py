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
