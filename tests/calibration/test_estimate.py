"""The time estimate sequential calibration prints before it starts (`lowbit.calibration.estimate`)."""

from __future__ import annotations

import pytest
import torch

from lowbit.calibration import estimate
from lowbit.calibration.collectors import HessianCollector
from lowbit.calibration.sequential import SequentialHooks, run_sequential
from lowbit.compress import swap_layer
from lowbit.formats import FORMATS
from lowbit.methods.registry import LayerPlan
from lowbit.methods.rtn import rtn_quantize
from lowbit.recipe import Stage
from tests.calibration.test_sequential import Tiny


def test_estimate_adds_passes_and_solves_at_the_measured_rates() -> None:
    base = dict(blocks=4, passes=3, forward_s=0.5, forward_flops=1e9, elementwise_per_s=1e8, call_s=1e-5)
    assert estimate.estimate_seconds(solve=[], **base) == pytest.approx(4 * 3 * 0.5)
    # 1e9 flops at 2e9 flops/s, 1e8 element-wise operations at 1e8/s, 1e4 calls of 10 µs: 0.5 + 1 + 0.1 per block
    assert estimate.estimate_seconds(solve=[(1e9, 1e8, 1e4)], **base) == pytest.approx(4 * (1.5 + 1.6))


def test_method_costs_grow_with_what_they_do() -> None:
    plain = estimate.gptq_flops(384, 1536, 2000, mse=False, group=128)
    searched = estimate.gptq_flops(384, 1536, 2000, mse=True, group=64)
    assert searched[0] == plain[0] and searched[1] > 50 * plain[1] and searched[2] > plain[2]
    assert estimate.gptq_flops(768, 768, 2000, mse=False, group=None)[0] > plain[0]  # K³ and K²·N
    capped = estimate.awq_flops(384, 384, 10_000, grid=20, clip_steps=20, n_tokens=512)
    assert capped == estimate.awq_flops(384, 384, 512, grid=20, clip_steps=20, n_tokens=512)  # sampled tokens
    assert estimate.elementwise_rate(1 << 12) > 0 and 0 < estimate.call_overhead(10) < 1


ALL_LAYERS = [f"layers.{i}.{n}" for i in range(2) for n in ("q", "k", "v", "o", "fc1", "fc2")]


def _calibrate(solve_flops, names: list[str] = ALL_LAYERS) -> tuple[dict[str, float], list[str]]:
    """Sequential RTN of ``names`` in the tiny two-block model: the engine's result and the lines it logged."""
    torch.manual_seed(0)
    model = Tiny().eval()
    plan = [LayerPlan(n, model.get_submodule(n), FORMATS["int4"], None) for n in names]
    stage = Stage(method="rtn", weights=FORMATS["int4"])

    def quantize_group(group: list[LayerPlan], collectors: dict) -> None:
        for p in group:
            swap_layer(model, p, rtn_quantize(p.module.weight, p.weights), stage)

    lines: list[str] = []
    hooks = SequentialHooks(lambda p: HessianCollector(p.module), quantize_group, solve_flops)
    out = run_sequential(model, plan, [torch.randn(2, 5, 8)], hooks, progress=False, log=lines.append)
    return out, lines


def test_the_estimate_is_printed_before_starting_and_counts_the_methods_solves() -> None:
    cheap, lines = _calibrate(None)
    assert "time ≈" in lines[0] and "estimated peak memory" in lines[0]  # before the first block
    assert f"estimate {cheap['estimated_seconds']:.1f} s" in lines[-1]
    costly, _ = _calibrate(lambda p, tokens: (0.0, 0.0, 1e5))  # 10⁵ tensor-operation calls per layer
    assert costly["estimated_seconds"] > cheap["estimated_seconds"] + 12 * 1e5 * 1e-7  # ≥ 0.1 µs a call


def test_no_estimate_when_the_first_block_has_nothing_to_time() -> None:
    out, lines = _calibrate(None, ["layers.1.q", "layers.1.fc1"])  # block 0 stays in float
    assert "time ≈ ?" in lines[0] and out["estimated_seconds"] != out["estimated_seconds"]  # NaN: not a guess
