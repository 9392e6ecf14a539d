"""SmoothQuant (Xiao et al., ICML 2023; methods.md G6): move activation outliers into the weights.

``s_j = max|X_j|^α / max_i max|W_i[:, j]|^{1−α}``; then ``X' = X·diag(1/s)`` and ``W' = W·diag(s)`` compute the same
product, with activations much easier to quantize per tensor or per token.

Example:
    >>> import torch
    >>> from lowbit.methods.ptq.smoothquant_math import smooth_scales
    >>> x, w = torch.randn(64, 8) * torch.tensor([50.0] + [1.0] * 7), torch.randn(4, 8)
    >>> s = smooth_scales(x.abs().amax(0), [w], alpha=0.5)
    >>> torch.allclose((x / s) @ (w * s).T, x @ w.T, atol=1e-3)
    True
"""

from __future__ import annotations

import torch


def smooth_scales(
    act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float = 0.5, eps: float = 1e-5
) -> torch.Tensor:
    """Per-input-channel smoothing factors for the linears in ``weights`` (all reading the same input)."""
    w_max = torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(dim=0).clamp_min(eps)
    a_max = act_absmax.detach().float().clamp_min(eps)
    s = a_max.pow(alpha) / w_max.pow(1.0 - alpha)
    return s.clamp(min=eps, max=1.0 / eps)
