"""LSQ (learned step size, methods.md Q2) and PACT (learned clipping, Q3) with their exact backward rules.

LSQ: ``v̂ = round(clip(v/s, −Q_N, Q_P))·s``; ``∂v̂/∂v = 1`` inside the range and 0 outside;
``∂v̂/∂s = −v/s + round(v/s)`` inside, ``−Q_N`` below, ``Q_P`` above; the step gradient is scaled by
``g = 1/sqrt(N·Q_P)``; init ``s = 2·mean|v|/sqrt(Q_P)``.
PACT: ``y = clip(x, 0, α)`` quantized to ``b`` bits; ``∂y_q/∂α = 1_{x ≥ α}``.

Example:
    >>> import torch
    >>> from lowbit.quantizers.lsq import lsq_init_step, lsq_quantize
    >>> v = torch.randn(1000)
    >>> s = torch.nn.Parameter(lsq_init_step(v, bits=4))
    >>> lsq_quantize(v, s, bits=4).unique().numel() <= 16
    True
"""

from __future__ import annotations

import math

import torch

from lowbit.quantizers.ste import round_ste


def lsq_range(bits: int, signed: bool = True) -> tuple[int, int]:
    """``(Q_N, Q_P)``: the magnitudes of the lowest and highest integer levels."""
    return (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def lsq_init_step(v: torch.Tensor, bits: int, signed: bool = True) -> torch.Tensor:
    """LSQ's initial step ``2·mean|v|/sqrt(Q_P)``."""
    _, qp = lsq_range(bits, signed)
    return (2 * v.detach().abs().mean() / math.sqrt(qp)).clamp_min(1e-8)


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward; gradient multiplied by ``scale`` backward."""
    return (x - x * scale).detach() + x * scale


def lsq_quantize(
    v: torch.Tensor, step: torch.Tensor, bits: int, signed: bool = True, grad_scale_factor: float | None = None
) -> torch.Tensor:
    """Fake-quantize ``v`` with a learnable ``step`` (scalar or broadcastable per channel)."""
    qn, qp = lsq_range(bits, signed)
    g = grad_scale_factor if grad_scale_factor is not None else 1.0 / math.sqrt(v.numel() / max(step.numel(), 1) * qp)
    s = grad_scale(step, g)
    q = round_ste(torch.clamp(v / s, -qn, qp))
    return q * s


def pact_quantize(x: torch.Tensor, alpha: torch.Tensor, bits: int) -> torch.Tensor:
    """PACT: ``clip(x, 0, α)`` quantized to ``2^b − 1`` levels; gradient to α where ``x ≥ α``."""
    y = torch.minimum(torch.relu(x), alpha)  # = 0.5(|x| − |x − α| + α) for x ≥ 0
    levels = 2**bits - 1
    scale = alpha / levels
    return round_ste(y / scale) * scale
