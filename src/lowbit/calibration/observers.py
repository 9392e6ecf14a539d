"""Calibrators: estimate a static activation range from calibration batches (methods.md G2).

`MinMaxObserver` keeps running extremes; `PercentileObserver` clips at the p-th percentile of a bounded random
sample; `MSEObserver` searches a shrink factor of the min-max range that minimises the quantization error of the
sample (the grid includes 1.0, so its error is never above min-max's). Each returns ``(lo, hi)``.

Example:
    >>> import torch
    >>> from lowbit.calibration.observers import make_observer
    >>> obs = make_observer("minmax")
    >>> obs.update(torch.tensor([-1.0, 3.0])); obs.update(torch.tensor([5.0]))
    >>> obs.range()
    (-1.0, 5.0)
"""

from __future__ import annotations

import torch

from lowbit.errors import DataError
from lowbit.formats.qtensor import decode, encode, fit_params
from lowbit.formats.spec import QuantSpec

#: At most this many values are kept for percentile / MSE estimation.
MAX_SAMPLES = 1 << 20
PER_BATCH = 1 << 16


class Observer:
    """Accumulates activation statistics; `range` returns the clipping range ``(lo, hi)``."""

    def __init__(self) -> None:
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1)
        if x.numel() == 0:
            return
        if not torch.isfinite(x).all():
            raise DataError(
                "calibration activations contain NaN or Inf: check the model's weights and the calibration inputs"
            )
        self.count += x.numel()
        self._update(x)

    def _update(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def range(self) -> tuple[float, float]:
        if self.count == 0:
            raise DataError(
                "no activations were observed during calibration: the layer never ran on the calibration data"
            )
        return self._range()

    def _range(self) -> tuple[float, float]:
        raise NotImplementedError


class MinMaxObserver(Observer):
    """Running minimum and maximum (optionally an EMA with ``momentum``)."""

    def __init__(self, momentum: float | None = None) -> None:
        super().__init__()
        self.lo: float | None = None
        self.hi: float | None = None
        self.momentum = momentum

    def _update(self, x: torch.Tensor) -> None:
        lo, hi = x.min().item(), x.max().item()
        if self.lo is None or self.hi is None:
            self.lo, self.hi = lo, hi
        elif self.momentum is None:
            self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        else:
            m = self.momentum
            self.lo, self.hi = m * self.lo + (1 - m) * lo, m * self.hi + (1 - m) * hi

    def _range(self) -> tuple[float, float]:
        assert self.lo is not None and self.hi is not None
        return self.lo, self.hi


class _SampleObserver(Observer):
    """Keeps a bounded, seeded random sample of the observed values."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.samples: list[torch.Tensor] = []
        self.kept = 0
        self.gen = torch.Generator().manual_seed(seed)
        self.extremes = MinMaxObserver()

    def _update(self, x: torch.Tensor) -> None:
        self.extremes.update(x)
        if x.numel() > PER_BATCH:
            x = x[torch.randint(0, x.numel(), (PER_BATCH,), generator=self.gen)]
        if self.kept + x.numel() > MAX_SAMPLES:  # keep a uniform subsample of what we have
            keep = torch.cat(self.samples + [x])
            keep = keep[torch.randperm(keep.numel(), generator=self.gen)[: MAX_SAMPLES // 2]]
            self.samples, self.kept = [keep], keep.numel()
        else:
            self.samples.append(x)
            self.kept += x.numel()

    def sample(self) -> torch.Tensor:
        return torch.cat(self.samples)


class PercentileObserver(_SampleObserver):
    """Clip at the ``p``-th and ``(100 - p)``-th percentiles; ``p = 100`` equals min-max."""

    def __init__(self, percentile: float = 99.99, seed: int = 0) -> None:
        super().__init__(seed)
        self.percentile = percentile

    def _range(self) -> tuple[float, float]:
        if self.percentile >= 100.0:
            return self.extremes.range()
        x = self.sample()
        q = torch.tensor([1 - self.percentile / 100.0, self.percentile / 100.0], dtype=torch.float64)
        lo, hi = torch.quantile(x.double(), q).tolist()
        return float(lo), float(hi)


class MSEObserver(_SampleObserver):
    """Shrink the min-max range by ``c`` in ``linspace(min_ratio, 1, steps)`` minimising ``‖x − Q_c(x)‖²``."""

    def __init__(self, spec: QuantSpec, steps: int = 100, min_ratio: float = 0.2, seed: int = 0) -> None:
        super().__init__(seed)
        self.spec, self.steps, self.min_ratio = spec, steps, min_ratio

    def _range(self) -> tuple[float, float]:
        x = self.sample()
        lo, hi = self.extremes.range()
        best, best_err = (lo, hi), float("inf")
        for c in torch.linspace(self.min_ratio, 1.0, self.steps).tolist():
            err = quantization_error(x, lo * c, hi * c, self.spec)
            if err < best_err:
                best, best_err = (lo * c, hi * c), err
        return best


def range_to_params(lo: float, hi: float, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-tensor scale / zero of ``spec`` for a clipping range, zero kept exactly representable."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    u = torch.tensor([[[lo, hi]]], dtype=torch.float32)
    s, z = fit_params(u, spec)
    return s.reshape(()), None if z is None else z.reshape(())


def quantization_error(x: torch.Tensor, lo: float, hi: float, spec: QuantSpec) -> float:
    """Sum of squared errors of quantizing ``x`` with the range ``(lo, hi)``."""
    s, z = range_to_params(lo, hi, spec)
    return float(((decode(encode(x, s, z, spec), s, z, spec) - x) ** 2).sum())


def make_observer(name: str, spec: QuantSpec | None = None, percentile: float = 99.99) -> Observer:
    """Observer by calibrator name: ``minmax``, ``percentile`` or ``mse``."""
    if name == "minmax":
        return MinMaxObserver()
    if name == "percentile":
        return PercentileObserver(percentile)
    if name == "mse":
        if spec is None:
            raise ValueError("the mse calibrator needs the activation format")
        return MSEObserver(spec)
    raise ValueError(f"unknown calibrator {name!r}")
