"""A user model and data module for the `module:function` workload test."""

from __future__ import annotations

import torch
from torch import nn


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def data() -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g)
    return {"calibration": [x[:20]], "eval": [(x[20:], torch.randint(0, 3, (20,), generator=g))]}
