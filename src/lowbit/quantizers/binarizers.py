"""Binarizers and ternarizers with their backward rules (methods.md §3), as autograd functions.

Every binarizer returns values in {-1, +1} forward; they differ in the gradient they pass back:

- ``bnn``: clipped STE, ``1_{|x| ≤ 1}`` (B1)
- ``approx_sign`` (Bi-Real): ``2 + 2x`` on [−1, 0), ``2 − 2x`` on [0, 1), 0 elsewhere (B2)
- ``reste`` (ReSTE): derivative of ``sign(x)|x|^{1/o}``: ``(1/o)|x|^{(1−o)/o}`` for 0.1 < |x| ≤ t, the secant slope
  ``0.1^{1/o}/0.1`` inside |x| ≤ 0.1, 0 beyond t (B4); ``o = 1`` gives the clipped STE with limit t
- ``biper`` (BiPer): forward ``sign(sin(ω₀x))``, backward ``ω₀·cos(ω₀x)`` (B3)
- ``polynomial`` / ``(2 − 2|x|)_+``: the activation rule used by BiPer and ReCU

Example:
    >>> import torch
    >>> from lowbit.quantizers.binarizers import approx_sign
    >>> x = torch.tensor([-0.5, 0.5, 2.0], requires_grad=True)
    >>> approx_sign(x).sum().backward()
    >>> x.grad.tolist()
    [1.0, 1.0, 0.0]
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lowbit.quantizers.ste import sign_pm1


class _SignWithGrad(torch.autograd.Function):
    """``sign`` forward; backward multiplies by ``rule(x)``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, rule: Any) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.rule = rule
        return sign_pm1(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        return g * ctx.rule(x), None


def approx_sign_grad(x: torch.Tensor) -> torch.Tensor:
    """Bi-Real's piecewise-linear derivative."""
    return torch.where((x >= -1) & (x < 0), 2 + 2 * x, torch.where((x >= 0) & (x < 1), 2 - 2 * x, torch.zeros_like(x)))


def triangle_grad(x: torch.Tensor) -> torch.Tensor:
    """``(2 − 2|x|)_+`` (BiPer / ReCU activations)."""
    return (2 - 2 * x.abs()).clamp_min(0)


def reste_grad(x: torch.Tensor, o: float, t: float = 1.5, inner: float = 0.1) -> torch.Tensor:
    """ReSTE's rectified power-function derivative."""
    a = x.abs()
    power = (1.0 / o) * a.clamp_min(inner).pow((1.0 - o) / o)
    secant = inner ** (1.0 / o) / inner
    return torch.where(a > t, torch.zeros_like(x), torch.where(a <= inner, torch.full_like(x, secant), power))


def bnn_sign(x: torch.Tensor) -> torch.Tensor:
    """BNN: sign with the clipped STE."""
    return _SignWithGrad.apply(x, lambda v: (v.abs() <= 1).to(v.dtype))


def approx_sign(x: torch.Tensor) -> torch.Tensor:
    """Bi-Real Net's ApproxSign."""
    return _SignWithGrad.apply(x, approx_sign_grad)


def triangle_sign(x: torch.Tensor) -> torch.Tensor:
    """Sign with the ``(2 − 2|x|)_+`` backward."""
    return _SignWithGrad.apply(x, triangle_grad)


def reste_sign(x: torch.Tensor, o: float = 1.0, t: float = 1.5) -> torch.Tensor:
    """ReSTE with exponent ``o`` (follow `reste_exponent` during training)."""
    return _SignWithGrad.apply(x, lambda v: reste_grad(v, o, t))


def reste_exponent(epoch: float, total_epochs: float, o_end: float = 3.0) -> float:
    """ReSTE's schedule ``o = 1 + (o_end − 1)(1 − cos(π/2 · epoch/E))``."""
    return 1.0 + (o_end - 1.0) * (1.0 - math.cos(math.pi / 2 * min(epoch / max(total_epochs, 1e-9), 1.0)))


class _BiPer(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, omega: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.omega = omega
        return sign_pm1(torch.sin(omega * x))

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        return g * ctx.omega * torch.cos(ctx.omega * x), None


def biper_sign(x: torch.Tensor, omega: float = 20.0) -> torch.Tensor:
    """BiPer stage 2: square wave ``sign(sin(ω₀x))`` forward, ``ω₀cos(ω₀x)`` backward."""
    return _BiPer.apply(x, omega)


def biper_continuous(x: torch.Tensor, omega: float = 20.0) -> torch.Tensor:
    """BiPer stage 1: the continuous ``sin(ω₀x)``."""
    return torch.sin(omega * x)


def rsign(x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """ReActNet RSign: ``sign(x − β_c)`` with a learnable per-channel threshold (ApproxSign backward)."""
    return approx_sign(x - beta)


def xnor_scale(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel ``α = ‖W_o‖₁/n``: the L2-optimal scale of ``α·sign(W)`` (XNOR-Net / BWN)."""
    return w.detach().abs().reshape(w.shape[0], -1).mean(dim=1).reshape(-1, *([1] * (w.dim() - 1)))


def two_plane_binarize(w: torch.Tensor, sign_fn: Any = bnn_sign) -> torch.Tensor:
    """BinaryDM-style residual binarizer ``σ₁ sign(W) + σ₂ sign(W − σ₁ sign(W))`` with per-channel closed-form σ."""
    b1 = sign_fn(w)
    s1 = xnor_scale(w)
    r = w - s1 * b1.detach()
    s2 = xnor_scale(r)
    return s1 * b1 + s2 * sign_fn(r)


def ternary_ste(w: torch.Tensor, method: str = "absmean", per_channel: bool = False) -> torch.Tensor:
    """BitNet b1.58 ternary weights (absmean / absmedian / tbt scale) with an identity STE."""
    a = w.detach().abs()
    flat = a.reshape(a.shape[0], -1) if per_channel else a.reshape(1, -1)
    if method == "absmean":
        g = flat.mean(dim=1)
    elif method == "absmedian":
        g = flat.median(dim=1).values
    elif method == "tbt":
        g = flat.mean(dim=1) * 4.0 / 3.0
    else:
        raise ValueError(f"unknown ternary method {method!r}")
    g = g.clamp_min(1e-8).reshape(-1, *([1] * (w.dim() - 1))) if per_channel else g.clamp_min(1e-8).reshape(())
    q = torch.clamp(torch.round(w / g), -1, 1) * g
    return w + (q - w).detach()


class RPReLU(torch.nn.Module):
    """ReActNet's RPReLU: ``PReLU(x − γ) + ζ`` with per-channel learnable shifts (channel dim 1)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = torch.nn.Parameter(torch.zeros(channels))
        self.zeta = torch.nn.Parameter(torch.zeros(channels))
        self.prelu = torch.nn.PReLU(channels, init=0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return self.prelu(x - self.gamma.view(shape)) + self.zeta.view(shape)
