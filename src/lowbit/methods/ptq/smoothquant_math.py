"""SmoothQuant (Xiao et al., ICML 2023; methods.md G6): move activation outliers into the weights.

``s_j = max|X_j|^α / max_i max|W_i[:, j]|^{1−α}``; then ``X' = X·diag(1/s)`` and ``W' = W·diag(s)`` compute the same
product, with activations much easier to quantize per tensor or per token.

`alpha_search` picks α per group of layers sharing an input on a calibration sample: each α of a grid (0.05 … 0.95,
the paper's 0.5 included) and no smoothing at all are tried, and the one whose W8A8 outputs (the stage's weight and
activation formats) are closest to the float outputs on the sample wins — as later SmoothQuant implementations tune
α automatically (Intel Neural Compressor's ``alpha="auto"``). Where no α helps (a ReLU CNN without outlier
channels) the group is left unsmoothed, so its sample error is never above plain W8A8's. Only for dynamic
activations: a static spec's range is calibrated after smoothing, on all the data, and emulating it on the sample
(its 0.01 / 99.99 percentiles) picked α of 0.75–0.95 that lost end to end (MiniLM W8A8-static query cosine 0.9912
against 0.9935 at α = 0.5 and 0.9924 unsmoothed; throw-away runs, session 16), so static stages keep α = 0.5.

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

from lowbit.formats.qtensor import dequantize, fake_quantize, quantize
from lowbit.formats.spec import QuantSpec

#: The α tried by `alpha_search` (besides no smoothing).
ALPHAS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))


def smooth_scales(
    act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float = 0.5, eps: float = 1e-5
) -> torch.Tensor:
    """Per-input-channel smoothing factors for the linears in ``weights`` (all reading the same input)."""
    w_max = torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(dim=0).clamp_min(eps)
    a_max = act_absmax.detach().float().clamp_min(eps)
    s = a_max.pow(alpha) / w_max.pow(1.0 - alpha)
    return s.clamp(min=eps, max=1.0 / eps)


def alpha_search(
    x: torch.Tensor,
    act_absmax: torch.Tensor,
    weights: list[torch.Tensor],
    weight_spec: QuantSpec,
    act_spec: QuantSpec,
    alphas: tuple[float, ...] = ALPHAS,
) -> tuple[torch.Tensor | None, float | None, dict[str, float]]:
    """The smoothing of the layers ``weights`` (all reading ``x``, rows of calibration inputs) whose quantized
    outputs are closest to the float ones: ``(scales or None, α or None, {"none": error, "best": error})``, the
    squared error summed over the layers. Activations are quantized as ``act_spec`` (dynamic: scales from the
    sample itself)."""
    if not act_spec.dynamic:
        raise ValueError("alpha_search compares dynamically quantized activations; a static spec's range comes later")
    x = x.float()
    refs = [x @ w.float().T for w in weights]

    def error(s: torch.Tensor | None) -> float:
        xq = fake_quantize(x if s is None else x / s, act_spec)
        total = 0.0
        for w, ref in zip(weights, refs, strict=True):
            wq = dequantize(quantize(w.float() if s is None else w.float() * s, weight_spec))
            total += float(((xq @ wq.T - ref) ** 2).sum())
        return total

    none = error(None)
    best: tuple[float, torch.Tensor | None, float | None] = (none, None, None)
    for a in alphas:
        s = smooth_scales(act_absmax, weights, alpha=a)
        e = error(s)
        if e < best[0]:
            best = (e, s, a)
    return best[1], best[2], {"none": none, "best": best[0]}
