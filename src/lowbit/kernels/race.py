"""Timing calls against each other in alternation: the measurement behind dispatch's per-layer choice
(`lowbit.kernels.dispatch`) and the per-layer report of ``lowbit inspect --packed``.

Example:
    >>> from lowbit.kernels.race import race
    >>> fast, slow = race(lambda: None, lambda: sum(range(10000)))
    >>> fast < slow
    True
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

REPEATS = 3
MAX_ROUNDS = 200  # (tiny calls: within RACE_BUDGET_S; at 30 a 10-output head's 3 µs race went either way)
RACE_BUDGET_S = 0.005


def race(*fns: Callable[[], Any], budget_s: float = RACE_BUDGET_S, max_rounds: int = MAX_ROUNDS) -> list[float]:
    """Best time in ms of each of ``fns``, timed in alternation (one call of each per round, so a slow spell of a
    shared machine hits all of them alike) after two warm-up rounds (the second sets the number of rounds): at
    least ``REPEATS`` rounds, more for fast calls (up to ``max_rounds``, about ``budget_s`` in all), since a call of
    a few microseconds varies by tens of percent from one call to the next. Dispatch keeps the defaults (it races
    on a model's first call); a report can afford more."""
    for fn in fns:  # (a first call may prepare a kernel's weights: it says nothing of a call's time)
        fn()
    t0 = time.perf_counter()
    for fn in fns:
        fn()
    warm = time.perf_counter() - t0
    rounds = max(REPEATS, min(max_rounds, int(budget_s / max(warm, 1e-9))))
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return [b * 1e3 for b in best]
