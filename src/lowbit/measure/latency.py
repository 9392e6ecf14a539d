"""CPU latency with warm-up, a fixed thread count, median and spread; candidates timed in alternation.

Example:
    >>> import torch
    >>> from lowbit.measure.latency import compare_latency
    >>> r = compare_latency({"a": lambda: torch.randn(64, 64) @ torch.randn(64, 64)}, repeats=5)
    >>> r["a"].n
    5
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class LatencyStats:
    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    n: int
    threads: int

    @property
    def spread_ms(self) -> float:
        return self.p90_ms - self.p10_ms


def _stats(samples: list[float], threads: int) -> LatencyStats:
    s = sorted(samples)

    def pct(p: float) -> float:
        k = (len(s) - 1) * p
        lo, hi = int(k), min(int(k) + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (k - lo)

    return LatencyStats(statistics.median(s), pct(0.1), pct(0.9), statistics.fmean(s), len(s), threads)


def compare_latency(
    fns: dict[str, Callable[[], Any]],
    *,
    warmup: int = 3,
    repeats: int = 20,
    threads: int = 1,
    pause_s: float = 0.0,
) -> dict[str, LatencyStats]:
    """Time every candidate ``repeats`` times round-robin (so drift hits all alike) on ``threads`` threads.

    ``pause_s`` sleeps (untimed) before each run, so that worker threads one runtime leaves spinning (PyTorch,
    ONNX Runtime, OpenMP) do not steal cores from the next candidate."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    samples: dict[str, list[float]] = {k: [] for k in fns}
    try:
        with torch.no_grad():
            for fn in fns.values():
                for _ in range(warmup):
                    fn()
            for _ in range(repeats):
                for name, fn in fns.items():
                    if pause_s:
                        time.sleep(pause_s)
                    t0 = time.perf_counter()
                    fn()
                    samples[name].append((time.perf_counter() - t0) * 1e3)
    finally:
        torch.set_num_threads(old)
    return {k: _stats(v, threads) for k, v in samples.items()}


def measure_latency(fn: Callable[[], Any], *, warmup: int = 3, repeats: int = 20, threads: int = 1) -> LatencyStats:
    """Latency of one callable."""
    return compare_latency({"fn": fn}, warmup=warmup, repeats=repeats, threads=threads)["fn"]
