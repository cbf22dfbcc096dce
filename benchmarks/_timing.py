"""Interleaved timing: every repetition runs each candidate once, in turn, so that
machine noise hits all of them alike; results are medians."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved(candidates: dict[str, Callable[[], object]], reps: int, warmup: int = 2) -> dict[str, float]:
    """Median wall time in seconds of each candidate over ``reps`` interleaved rounds."""
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(reps):
        for name, fn in candidates.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}
