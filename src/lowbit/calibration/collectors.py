"""Collectors that turn a layer's calibration inputs into what a method needs.

All of them see a layer's input as a 2-D ``(tokens, in_features)`` matrix: Linear inputs are flattened over
leading dimensions, Conv2d inputs are unfolded into patches (im2col), so a column of the matrix matches a
column of the flattened weight ``(out, in·kh·kw)``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lowbit.calibration.collectors import HessianCollector
    >>> c = HessianCollector(nn.Linear(3, 2))
    >>> c.update(torch.eye(3))
    >>> c.hessian().diag().tolist()
    [0.6666666666666666, 0.6666666666666666, 0.6666666666666666]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import DataError


def layer_input_matrix(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer's input as ``(tokens, columns of the flattened weight)`` in float64."""
    if not torch.isfinite(x).all():
        raise DataError("calibration activations contain NaN or Inf: check the model weights and inputs")
    if hasattr(module, "kernel_size") and x.dim() == 4:
        if getattr(module, "groups", 1) != 1:
            raise ValueError("grouped convolutions have one Hessian per group")
        padding = module.padding
        if isinstance(padding, str):
            raise ValueError("string padding is not supported for calibration")
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1]).double()
    return x.reshape(-1, x.shape[-1]).double()


class HessianCollector:
    """Running ``H = 2/n · Σ xᵀx`` over the n input rows seen so far (GPTQ, methods.md G4)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.h: torch.Tensor | None = None
        self.n = 0

    def update(self, x: torch.Tensor) -> None:
        m = layer_input_matrix(self.module, x)
        if self.h is None:
            self.h = torch.zeros(m.shape[1], m.shape[1], dtype=torch.float64)
        total = self.n + m.shape[0]
        self.h.mul_(self.n / total).addmm_(m.T, m, alpha=2.0 / total)
        self.n = total

    def hessian(self) -> torch.Tensor:
        if self.h is None or self.n == 0:
            raise DataError("a layer saw no calibration inputs")
        return self.h


class ChannelStatsCollector:
    """Per input column: maximum and mean of ``|x|`` (SmoothQuant, AWQ), plus a bounded sample of input rows."""

    def __init__(self, module: nn.Module, max_rows: int = 4096, seed: int = 0) -> None:
        self.module = module
        self.absmax: torch.Tensor | None = None
        self.abssum: torch.Tensor | None = None
        self.n = 0
        self.max_rows = max_rows
        self.rows: list[torch.Tensor] = []
        self.kept = 0
        self.gen = torch.Generator().manual_seed(seed)

    def update(self, x: torch.Tensor) -> None:
        m = layer_input_matrix(self.module, x).float()
        a = m.abs()
        amax, asum = a.amax(dim=0), a.sum(dim=0)
        self.absmax = amax if self.absmax is None else torch.maximum(self.absmax, amax)
        self.abssum = asum if self.abssum is None else self.abssum + asum
        self.n += m.shape[0]
        take = min(m.shape[0], max(self.max_rows // 4, 1))
        idx = torch.randperm(m.shape[0], generator=self.gen)[:take]
        self.rows.append(m[idx])
        self.kept += take
        if self.kept > self.max_rows:
            allrows = torch.cat(self.rows)
            keep = torch.randperm(allrows.shape[0], generator=self.gen)[: self.max_rows]
            self.rows, self.kept = [allrows[keep]], self.max_rows

    def mean_abs(self) -> torch.Tensor:
        if self.abssum is None:
            raise DataError("a layer saw no calibration inputs")
        return self.abssum / self.n

    def sample(self) -> torch.Tensor:
        if not self.rows:
            raise DataError("a layer saw no calibration inputs")
        return torch.cat(self.rows)
