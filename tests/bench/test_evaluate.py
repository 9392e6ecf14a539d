"""Latency in results rows is measured on what would be deployed: the packed model."""

from __future__ import annotations

import torch
from torch import nn

import lowbit
from lowbit.bench.evaluate import deployed
from lowbit.nn.packed import PackedLinear


def test_quantized_models_are_timed_packed_and_compute_the_same() -> None:
    torch.manual_seed(0)
    q = lowbit.compress(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)), "w4g128", progress=False)
    runtime, kind = deployed(q)
    assert kind == "packed" and isinstance(runtime[0], PackedLinear)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert float((runtime(x) - q(x)).abs().max()) <= 1e-5
    fp32 = nn.Sequential(nn.Linear(8, 8))
    assert deployed(fp32) == (fp32, "fp32")
