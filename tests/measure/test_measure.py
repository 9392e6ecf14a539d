"""Size, MACs/BitOPs, latency statistics and quality metrics."""

from __future__ import annotations

import math

import torch
from torch import nn

import lowbit
from lowbit.measure.latency import compare_latency
from lowbit.measure.ops import count_ops
from lowbit.measure.quality import accuracy, agreement, mean_cosine, perplexity, recall_at_k
from lowbit.measure.size import model_size


def test_size_of_float_and_quantized_layers() -> None:
    lin = nn.Linear(256, 64)
    assert model_size(lin).total_bytes == (256 * 64 + 64) * 4
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256), nn.Linear(256, 8))
    q = lowbit.compress(model, {"stages": [{"method": "rtn", "weights": "int4_g128", "keep_first_last": False}]})
    r = model_size(q)
    # 4-bit codes + one fp16 scale and one 4-bit zero point per 128 weights
    assert math.isclose(r.bits_per_weight, 4 + (16 + 4) / 128, rel_tol=1e-9)
    assert r.total_bytes < model_size(model).total_bytes / 6


def test_macs_and_bitops() -> None:
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8))
    r = count_ops(conv, lambda: conv(torch.randn(2, 3, 5, 5)))
    assert r.layer_macs == 2 * 8 * 25 * 3 * 9 + 2 * 8 * 25 * 1 * 9
    assert r.total_bitops == r.total_macs * 32 * 32
    mlp = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4))
    q = lowbit.compress(mlp, "w4g128")  # middle layer int4 weights, edge layers kept at int8; float activations
    ops = count_ops(q, lambda: q(torch.randn(5, 16)))
    assert ops.other_macs == 0 and ops.total_macs == 5 * (16 * 32 + 32 * 32 + 32 * 4)
    assert ops.total_bitops == 5 * (16 * 32 * 8 * 32 + 32 * 32 * 4 * 32 + 32 * 4 * 8 * 32)


def test_attention_matmuls_are_counted_separately() -> None:
    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q = self.q(x)
            return q @ q.transpose(-1, -2)

    m = Attn()
    r = count_ops(m, lambda: m(torch.randn(1, 6, 8)))
    assert r.layer_macs == 6 * 8 * 8 and r.other_macs == 6 * 6 * 8


def test_latency_stats_and_threads_restored() -> None:
    before = torch.get_num_threads()
    order: list[str] = []
    r = compare_latency({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, warmup=1, repeats=4)
    assert order[2:] == ["a", "b"] * 4  # alternation after the warm-up
    for s in r.values():
        assert s.n == 4 and 0 <= s.p10_ms <= s.median_ms <= s.p90_ms
    assert torch.get_num_threads() == before


def test_quality_metrics_closed_forms() -> None:
    x = torch.randn(10, 4)
    assert recall_at_k(x, x, 1) == 1.0 and mean_cosine(x, 2 * x) > 0.9999
    assert math.isclose(accuracy(torch.eye(3), torch.tensor([0, 1, 1])), 2 / 3, rel_tol=1e-6)
    assert agreement(torch.eye(3), torch.eye(3)) == 1.0
    assert math.isclose(perplexity(torch.zeros(3, 4, 11), torch.zeros(3, 4, dtype=torch.long)), 11.0, rel_tol=1e-5)


def test_cpu_model_names_its_generation_where_the_name_does_not() -> None:
    from lowbit.measure.envinfo import parse_cpuinfo

    vm = "processor : 0\ncpu family : 25\nmodel : 1\nmodel name : AMD EPYC\nflags : fpu fma avx2 sha_ni\n"
    assert parse_cpuinfo(vm + "processor : 1\ncpu family : 23\nmodel : 49\n") == (
        "AMD EPYC (family 25, model 1)",  # the first processor's, not the second's
        ["avx2", "fma"],
    )
    xeon = "cpu family : 6\nmodel : 85\nmodel name : Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz\nflags : avx2 avx512f"
    assert parse_cpuinfo(xeon)[0] == "Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz"
    arm = "processor : 0\nFeatures : fp asimd\nCPU part : 0xd0c\n"
    assert parse_cpuinfo(arm, "aarch64") == ("aarch64", ["asimd"])
