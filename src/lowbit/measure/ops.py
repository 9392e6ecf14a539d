"""MACs and BitOPs per layer and in total, counted on a real forward pass with hooks.

Linear/Conv layers (float or quantized) are hooked: MACs from their output shape, BitOPs = MACs × weight bits ×
activation bits (32 × 32 for float layers). Everything else that multiplies (attention matmuls, ...) is counted by
``torch.utils.flop_counter`` and reported as ``other_macs`` at 32 × 32 bits.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lowbit.measure.ops import count_ops
    >>> m = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> r = count_ops(m, lambda: m(torch.randn(3, 8)))
    >>> r.total_macs, r.other_macs
    (120, 0)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class LayerOps:
    name: str
    type: str
    macs: int
    weight_bits: float
    act_bits: float

    @property
    def bitops(self) -> int:
        return int(self.macs * self.weight_bits * self.act_bits)


@dataclass
class OpsReport:
    layer_macs: int
    other_macs: int
    per_layer: list[LayerOps] = field(default_factory=list)

    @property
    def total_macs(self) -> int:
        return self.layer_macs + self.other_macs

    @property
    def total_bitops(self) -> int:
        return sum(layer.bitops for layer in self.per_layer) + self.other_macs * 32 * 32


def _is_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) or (hasattr(m, "in_channels") and hasattr(m, "kernel_size"))


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (hasattr(m, "in_features") and hasattr(m, "out_features"))


def _macs(m: nn.Module, out: torch.Tensor) -> int:
    if _is_conv(m):
        kh, kw = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size, m.kernel_size)
        return int(out.numel() * (m.in_channels // m.groups) * kh * kw)
    return int(out.numel() // m.out_features * m.in_features * m.out_features)


def count_ops(model: nn.Module, run: Callable[[], Any]) -> OpsReport:
    """Run ``run()`` once and count MACs / BitOPs of ``model``'s layers."""
    per_layer: list[LayerOps] = []
    handles = []
    for name, m in model.named_modules():
        if not (_is_conv(m) or _is_linear(m)):
            continue
        wbits = float(m.lowbit_weight_bits()) if hasattr(m, "lowbit_weight_bits") else 32.0
        abits = float(m.lowbit_act_bits()) if hasattr(m, "lowbit_act_bits") else 32.0

        def hook(mod: nn.Module, _inp: Any, out: Any, name: str = name, w: float = wbits, a: float = abits) -> None:
            t = out[0] if isinstance(out, (tuple, list)) else out
            per_layer.append(LayerOps(name, type(mod).__name__, _macs(mod, t), w, a))

        handles.append(m.register_forward_hook(hook))
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            run()
    finally:
        for h in handles:
            h.remove()
    layer_macs = sum(layer.macs for layer in per_layer)
    other = max(int(counter.get_total_flops() // 2) - layer_macs, 0)
    return OpsReport(layer_macs, other, per_layer)
