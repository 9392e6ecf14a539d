"""Integer formats of 2–8 bits, symmetric or asymmetric (methods.md G1).

Symmetric: ``s = max|x| / (2^(b-1) - 1)``, ``q = clip(round(x/s), -2^(b-1), 2^(b-1) - 1)``, ``x̂ = q·s``.
Asymmetric: the range is widened to include 0, ``s = (max - min) / (2^b - 1)``, ``z = round(-min/s)`` (an integer
in ``[0, 2^b - 1]``, stored at ``b`` bits like ONNX ``MatMulNBits`` / GPTQ zero points), ``q = clip(round(x/s + z),
0, 2^b - 1)``, ``x̂ = (q - z)·s``. Keeping 0.0 exactly on the grid matters: weights peak at zero (on MiniLM, int4 g128
RTN reaches a query cosine of 0.963 to fp32 this way against 0.948 with a free float zero point).
``integer_zero=False`` gives the float zero point (``z = -min/s``, range not widened) for experiments.

Example:
    >>> import torch
    >>> from lowbit.formats import integer
    >>> x = torch.tensor([[[-1.75, 0.0, 0.6, 1.75]]])
    >>> s, z = integer.fit(x, bits=4, symmetric=True)
    >>> s.item(), integer.decode(integer.encode(x, s, z, bits=4, symmetric=True), s, z).tolist()
    (0.25, [[[-1.75, 0.0, 0.5, 1.75]]])
"""

from __future__ import annotations

import torch

from lowbit.formats.scales import runtime_scale, stored_scale


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer code range ``(qmin, qmax)``: signed for symmetric grids, unsigned for asymmetric ones."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def fit(
    u: torch.Tensor,
    *,
    bits: int,
    symmetric: bool,
    store: bool = True,
    integer_zero: bool = True,
    clip_ratio: torch.Tensor | float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point) per unit over the last axis of ``u`` (shape ``(R, G, n)``) → ``(R, G, 1)``.

    ``clip_ratio`` shrinks the range (used by MSE/clip searches); 1.0 is plain min-max.
    """
    guard = stored_scale if store else runtime_scale
    qmin, qmax = qrange(bits, symmetric)
    if symmetric:
        s = guard(u.abs().amax(dim=-1, keepdim=True) * clip_ratio / qmax)
        return s, None
    lo = u.amin(dim=-1, keepdim=True) * clip_ratio
    hi = u.amax(dim=-1, keepdim=True) * clip_ratio
    if integer_zero:  # keep 0.0 exactly representable
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    else:  # a constant unit (hi == lo) gets a range reaching zero, so its value is representable
        flat = hi - lo <= 1e-12 * torch.maximum(hi.abs(), lo.abs()).clamp_min(1e-30)
        lo, hi = torch.where(flat, lo.clamp(max=0.0), lo), torch.where(flat, hi.clamp(min=0.0), hi)
    s = guard((hi - lo) / (qmax - qmin))
    z = -lo / s
    z = z.round().clamp(qmin, qmax) if integer_zero else z
    if store:
        z = z.to(torch.float16).to(torch.float32)
    return s, z


def encode(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, *, bits: int, symmetric: bool) -> torch.Tensor:
    """Integer codes (as float tensor of whole numbers) for ``x`` under broadcastable ``s``/``z``."""
    qmin, qmax = qrange(bits, symmetric)
    v = x / s if z is None else x / s + z
    return torch.clamp(torch.round(v), qmin, qmax)


def decode(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
    """Real values of integer codes."""
    return q * s if z is None else (q - z) * s


def fit_mse(
    u: torch.Tensor, *, bits: int, symmetric: bool, grid: int = 100, max_shrink: float = 0.8, norm: float = 2.4
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Parameters per unit whose range is shrunk by the factor in ``1, 1 − 1/grid, …, 1 − max_shrink`` that
    minimises ``Σ|x − x̂|^norm`` (GPTQ's MSE quantizer). The grid starts at 1, so it never loses to min-max."""
    best_s, best_z = fit(u, bits=bits, symmetric=symmetric)
    best_err = (decode(encode(u, best_s, best_z, bits=bits, symmetric=symmetric), best_s, best_z) - u).abs()
    best_err = best_err.pow(norm).sum(dim=-1, keepdim=True)
    for i in range(1, int(max_shrink * grid) + 1):
        s, z = fit(u, bits=bits, symmetric=symmetric, clip_ratio=1 - i / grid)
        err = (decode(encode(u, s, z, bits=bits, symmetric=symmetric), s, z) - u).abs().pow(norm).sum(-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        if z is not None and best_z is not None:
            best_z = torch.where(better, z, best_z)
    return best_s, best_z
