"""Ternary weights {-1, 0, +1}·γ (BitNet b1.58 and variants, methods.md B5, B6, B8).

``γ`` per unit is ``mean|w|`` (absmean, BitNet b1.58), ``median|w|`` (absmedian, b1.58 Reloaded) or
``4/3·mean|w|`` (tbt, Ternary-Binary Transformer; thresholds at 2/3·mean|w|, close to TWN's 0.7).
Codes ``q = clip(round(w/γ), -1, 1)``; on N(0, 1) weights the zero fraction is P(|w| < γ/2): 0.310 for absmean
and 0.264 for absmedian.

Example:
    >>> import torch
    >>> from lowbit.formats import ternary
    >>> u = torch.tensor([[[-2.0, -0.1, 0.1, 2.0]]])
    >>> g = ternary.fit(u, method="absmean")
    >>> ternary.encode(u, g).tolist()
    [[[-1.0, 0.0, 0.0, 1.0]]]
"""

from __future__ import annotations

import torch

from lowbit.formats.scales import runtime_scale, stored_scale


def fit(u: torch.Tensor, *, method: str = "absmean", store: bool = True) -> torch.Tensor:
    """Scale γ per unit over the last axis of ``u`` → shape ``(R, G, 1)``."""
    a = u.abs()
    if method == "absmean":
        g = a.mean(dim=-1, keepdim=True)
    elif method == "absmedian":
        g = a.median(dim=-1, keepdim=True).values
    elif method == "tbt":
        g = a.mean(dim=-1, keepdim=True) * (4.0 / 3.0)
    else:
        raise ValueError(f"unknown ternary scale method {method!r}")
    return (stored_scale if store else runtime_scale)(g)


def encode(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Codes in {-1, 0, 1} (float tensor)."""
    return torch.clamp(torch.round(x / g), -1, 1) + 0.0  # + 0.0 turns -0.0 into 0.0


def decode(q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Real values of ternary codes."""
    return q * g
