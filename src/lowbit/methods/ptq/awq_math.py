"""AWQ (Lin et al., MLSys 2024; methods.md G5): activation-aware scaling and clipping for weight-only quantization.

Scale search: for ``α`` in ``{0, 1/grid, …}``, ``s = mean_tokens|x|^α`` normalised by ``sqrt(max s · min s)``;
quantize ``W·diag(s)`` and keep the ``α`` that minimises the summed output error of every linear reading ``x``:
``‖x Wᵀ − (x/s)·Q(W·diag(s))ᵀ‖²``. ``α = 0`` (s = 1) is plain RTN, so the result is never worse than RTN on the
search data. Clip search: per output row and group, shrink the weight range by up to ``max_shrink`` in ``steps``
and keep the ratio with the smallest output error of that group.

Example:
    >>> import torch
    >>> from lowbit.formats import FORMATS
    >>> from lowbit.methods.ptq.awq_math import awq_scale_search
    >>> x = torch.randn(256, 64); x[:, :4] *= 20
    >>> s, qts, errors = awq_scale_search([torch.randn(32, 64)], x, FORMATS["int3_g64"])
    >>> errors["best"] <= errors["rtn"]
    True
"""

from __future__ import annotations

import torch

from lowbit.formats import integer
from lowbit.formats.layout import to_units
from lowbit.formats.qtensor import QTensor, dequantize, quantize
from lowbit.formats.spec import QuantSpec


def _subsample(x: torch.Tensor, n_tokens: int) -> torch.Tensor:
    if x.shape[0] <= n_tokens:
        return x.float()
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:n_tokens]
    return x[idx].float()


def awq_scale_search(
    weights: list[torch.Tensor], x: torch.Tensor, spec: QuantSpec, *, grid: int = 20, n_tokens: int = 512
) -> tuple[torch.Tensor, list[QTensor], dict[str, float]]:
    """Best per-input-channel scale for linears sharing input ``x``; returns ``(s, [Q(W·diag(s))], errors)``."""
    x = _subsample(x, n_tokens)
    mean_abs = x.abs().mean(dim=0).clamp_min(1e-8)
    refs = [x @ w.float().T for w in weights]
    best_err, best_s, errors = float("inf"), torch.ones_like(mean_abs), {}
    for i in range(grid):
        alpha = i / grid
        s = mean_abs.pow(alpha)
        s = (s / torch.sqrt(s.max() * s.min())).clamp_min(1e-4)
        err = 0.0
        for w, ref in zip(weights, refs, strict=True):
            wq = dequantize(quantize(w.float() * s, spec)) / s
            err += float(((x @ wq.T - ref) ** 2).mean())
        errors[f"alpha={alpha:.2f}"] = err
        if err < best_err:
            best_err, best_s = err, s
    errors["best"], errors["rtn"] = best_err, errors["alpha=0.00"]
    return best_s, [quantize(w.float() * best_s, spec) for w in weights], errors


def awq_clip_search(
    weight: torch.Tensor,
    x: torch.Tensor,
    spec: QuantSpec,
    *,
    steps: int = 20,
    max_shrink: float = 0.5,
    n_tokens: int = 512,
) -> QTensor:
    """Per (row, group) range shrink minimising that group's output error; integer formats only (else RTN)."""
    if spec.kind != "int":
        return quantize(weight, spec)
    w = weight.float()
    x = _subsample(x, n_tokens)
    rows, cols = w.shape
    u = to_units(w, spec.granularity if spec.granularity != "tensor" else "channel", spec.group_size)
    g = u.shape[2]
    xu = to_units(x, spec.granularity if spec.granularity != "tensor" else "channel", spec.group_size)  # (T, G, g)
    best_err = torch.full(u.shape[:2], float("inf"))
    best_s = torch.zeros(u.shape[:2])
    best_z = torch.zeros(u.shape[:2]) if spec.has_zero_point else None
    for k in range(int(max_shrink * steps)):
        ratio = 1.0 - k / steps
        s, z = integer.fit(u, bits=spec.bits, symmetric=spec.symmetric, clip_ratio=ratio)
        wq = integer.decode(integer.encode(u, s, z, bits=spec.bits, symmetric=spec.symmetric), s, z)
        diff = u - wq  # (R, G, g)
        # output error of each (row, group): sum over tokens of (x_g · diff_rg)²
        out = torch.einsum("tgk,rgk->trg", xu, diff)
        err = (out**2).mean(dim=0)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s.squeeze(-1), best_s)
        if best_z is not None and z is not None:
            best_z = torch.where(better, z.squeeze(-1), best_z)
    if spec.granularity == "tensor":  # one scale for the whole tensor: keep RTN's
        return quantize(w, spec)
    del g, rows, cols
    return quantize(w, spec, params=(best_s, best_z))
