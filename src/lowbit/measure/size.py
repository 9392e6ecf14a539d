"""Model size: bytes on disk-equivalent and effective bits per weight (scales and zero points counted).

Layers that implement the lowbit measurement protocol (``lowbit_storage_bits`` …) report their own storage;
every other module's direct parameters and persistent float buffers count at their dtype's size.

Example:
    >>> from torch import nn
    >>> from lowbit.measure.size import model_size
    >>> r = model_size(nn.Linear(64, 32))
    >>> r.total_bytes, r.bits_per_weight
    (8320, 32.0)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass
class LayerSize:
    name: str
    numel: int
    storage_bits: int

    @property
    def bits_per_weight(self) -> float:
        return self.storage_bits / max(self.numel, 1)


@dataclass
class SizeReport:
    """``total_bytes`` of the whole model; ``bits_per_weight`` over Linear/Conv weights only."""

    total_bytes: int
    weight_bits: int
    weight_numel: int
    other_bytes: int
    per_layer: list[LayerSize] = field(default_factory=list)

    @property
    def bits_per_weight(self) -> float:
        return self.weight_bits / max(self.weight_numel, 1)


def _is_protocol(m: nn.Module) -> bool:
    return hasattr(m, "lowbit_storage_bits") and hasattr(m, "lowbit_weight_numel")


def model_size(model: nn.Module) -> SizeReport:
    """Size of ``model`` as lowbit would store it."""
    weight_bits = weight_numel = other_bits = 0
    per_layer: list[LayerSize] = []
    skip: set[int] = set()
    for name, m in model.named_modules():
        if id(m) in skip:
            continue
        if _is_protocol(m):
            bits, numel = int(m.lowbit_storage_bits()), int(m.lowbit_weight_numel())
            bias = getattr(m, "bias", None)
            other_bits += 0 if bias is None else bias.numel() * bias.element_size() * 8
            weight_bits += bits
            weight_numel += numel
            per_layer.append(LayerSize(name, numel, bits))
            skip.update(id(c) for c in m.modules())
            continue
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            w = m.weight
            bits = w.numel() * w.element_size() * 8
            weight_bits += bits
            weight_numel += w.numel()
            per_layer.append(LayerSize(name, w.numel(), bits))
            for pname, p in m.named_parameters(recurse=False):
                if pname != "weight":
                    other_bits += p.numel() * p.element_size() * 8
            continue
        for p in m.parameters(recurse=False):
            other_bits += p.numel() * p.element_size() * 8
        for bname, b in m.named_buffers(recurse=False):
            if b.is_floating_point() and bname not in m._non_persistent_buffers_set:
                other_bits += b.numel() * b.element_size() * 8
    total_bits = weight_bits + other_bits
    return SizeReport((total_bits + 7) // 8, weight_bits, weight_numel, (other_bits + 7) // 8, per_layer)
