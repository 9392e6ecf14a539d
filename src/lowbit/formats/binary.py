"""Binary values {-1, +1}·α (BWN / XNOR-Net scaling, methods.md B1).

``α = mean|w|`` per unit is the closed-form minimiser of ``‖w - α·sign(w)‖²``; ``scale_method='none'`` gives
plain BNN signs (α = 1). ``sign(0)`` is +1 so every element has a code.

Example:
    >>> import torch
    >>> from lowbit.formats import binary
    >>> u = torch.tensor([[[-3.0, 1.0, 0.0, 2.0]]])
    >>> a = binary.fit(u)
    >>> binary.decode(binary.encode(u, a), a).tolist()
    [[[-1.5, 1.5, 1.5, 1.5]]]
"""

from __future__ import annotations

import torch

from lowbit.formats.scales import runtime_scale, stored_scale


def fit(u: torch.Tensor, *, method: str = "absmean", store: bool = True) -> torch.Tensor:
    """Scale α per unit over the last axis of ``u`` → shape ``(R, G, 1)``."""
    if method == "none":
        return torch.ones(u.shape[:-1] + (1,), dtype=torch.float32)
    if method != "absmean":
        raise ValueError(f"unknown binary scale method {method!r}")
    return (stored_scale if store else runtime_scale)(u.abs().mean(dim=-1, keepdim=True))


def encode(x: torch.Tensor, a: torch.Tensor | None = None) -> torch.Tensor:
    """Codes in {-1, +1} (float tensor); zero maps to +1."""
    return torch.where(x >= 0, 1.0, -1.0)


def decode(q: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Real values of binary codes."""
    return q * a
