"""Straight-through estimators (methods.md Q1): forward quantizes, backward passes (masked) gradients.

Example:
    >>> import torch
    >>> from lowbit.quantizers.ste import round_ste, clipped_sign
    >>> x = torch.tensor([0.4, 1.6], requires_grad=True)
    >>> round_ste(x).sum().backward(); x.grad.tolist()
    [1.0, 1.0]
    >>> y = torch.tensor([-2.0, 0.5], requires_grad=True)
    >>> clipped_sign(y).sum().backward(); y.grad.tolist()
    [0.0, 1.0]
"""

from __future__ import annotations

import torch


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward (the "round_pass" form)."""
    return x + (torch.round(x) - x).detach()


def sign_pm1(x: torch.Tensor) -> torch.Tensor:
    """Sign with ``sign(0) = +1`` (every element binary)."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


def identity_sign(x: torch.Tensor) -> torch.Tensor:
    """``sign(x)`` forward, identity backward."""
    return x + (sign_pm1(x) - x).detach()


def clipped_sign(x: torch.Tensor, limit: float = 1.0) -> torch.Tensor:
    """``sign(x)`` forward, gradient ``1_{|x| ≤ limit}`` backward (BNN's clipped STE)."""
    clipped = x.clamp(-limit, limit)
    return clipped + (sign_pm1(x) - clipped).detach()


def clipped_round(x: torch.Tensor, qmin: float, qmax: float) -> torch.Tensor:
    """``clip(round(x), qmin, qmax)`` forward, gradient ``1_{qmin ≤ x ≤ qmax}`` backward."""
    clipped = x.clamp(qmin, qmax)
    return clipped + (torch.round(clipped) - clipped).detach()


def lambda_blend(x: torch.Tensor, q: torch.Tensor, lam: float) -> torch.Tensor:
    """Gradual quantization ``x + λ·(q − x).detach()`` (λ = 1: plain STE, λ = 0: float)."""
    return x + lam * (q - x).detach()
