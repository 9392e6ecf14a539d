"""HQQ-style data-free optimisation of an asymmetric quantizer's scales and zero points (Badri & Shaji, 2023).

Two steps, both without calibration data:

1. **Scale**: each group's range is shrunk by the factor (1, 0.99, …, 0.2) minimising ``Σ|w − ŵ|^2.4`` of its own
   weights (`integer.fit_mse`), zero points staying integers so that 0.0 stays exactly representable.
2. **Zero point**: half-quadratic splitting of ``min_z ‖W − Q⁻¹(Q(W; s, z))‖_p`` with ``p < 1``: alternate (a) the
   residual ``W_e = shrink_p(W − Ŵ, β)``, a generalised soft threshold ``sign(r)·relu(|r| − |r|^{p−1}/β)`` that
   lets a few large errors stand, and (b) the closed-form ``z = mean_group(Q(W) − (W − W_e)/s)``; β grows by κ.
   With ``integer_zero`` (default) each update is rounded to the integer grid; otherwise zero points become real
   numbers (stored at fp16). Per group the iterate with the lowest ``Σ|w − ŵ|^2.4`` is kept, so in that error the
   result is never worse than step 1, which is never worse than RTN (its shrink grid contains 1).

On MiniLM (query cosine to fp32) the gain over RTN comes almost entirely from step 1 (W2 g64 0.690 vs 0.461, W3 g64
0.906 vs 0.885, W4 g128 0.966 vs 0.963); real-valued zero points from step 2 lower the weight error but not the
output error there (W2 g64 0.456), which is why integer zero points are the default.

Example:
    >>> import torch
    >>> from lowbit.formats import FORMATS, dequantize, quantize
    >>> from lowbit.methods.ptq.hqq_math import hqq_quantize
    >>> w = torch.randn(32, 128)
    >>> err = lambda qt: float((dequantize(qt) - w).abs().pow(2.4).sum())
    >>> err(hqq_quantize(w, FORMATS["int3_g64"])) <= err(quantize(w, FORMATS["int3_g64"]))
    True
"""

from __future__ import annotations

import torch

from lowbit.formats import integer
from lowbit.formats.layout import to_units
from lowbit.formats.qtensor import QTensor, quantize
from lowbit.formats.spec import QuantSpec

#: Norm of the weight error both steps minimise (GPTQ's quantizer uses the same).
ERROR_NORM = 2.4


def shrink_lp(r: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalised soft-thresholding operator for the l_p norm (p < 1)."""
    return torch.sign(r) * torch.relu(r.abs() - (1.0 / beta) * r.abs().clamp_min(1e-12).pow(p - 1))


def hqq_quantize(
    weight: torch.Tensor,
    spec: QuantSpec,
    *,
    iters: int = 20,
    lp_norm: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    range_search: bool = True,
    integer_zero: bool = True,
) -> QTensor:
    """Optimise scales and zero points of an asymmetric integer ``spec`` (group or channel) without data."""
    if spec.kind != "int" or spec.symmetric or spec.granularity == "tensor":
        raise ValueError("HQQ optimises asymmetric integer formats with per-channel or per-group parameters")
    w = weight.detach().float()
    u = to_units(w, spec.granularity, spec.group_size)  # (R, G, g)
    qmin, qmax = integer.qrange(spec.bits, False)
    if range_search:
        s, z = integer.fit_mse(u, bits=spec.bits, symmetric=False)
    else:
        s, z = integer.fit(u, bits=spec.bits, symmetric=False)
    assert z is not None

    def sq_err(zz: torch.Tensor) -> torch.Tensor:
        q = integer.encode(u, s, zz, bits=spec.bits, symmetric=False)
        return (integer.decode(q, s, zz) - u).abs().pow(ERROR_NORM).sum(dim=-1, keepdim=True)

    best_z, best_err = z.clone(), sq_err(z)
    for _ in range(iters):
        q = torch.clamp(torch.round(u / s + z), qmin, qmax)
        w_e = shrink_lp(u - (q - z) * s, beta, lp_norm)
        z = (q - (u - w_e) / s).mean(dim=-1, keepdim=True)
        z = z.round().clamp(qmin, qmax) if integer_zero else z.to(torch.float16).to(torch.float32)
        err = sq_err(z)
        better = err < best_err
        best_z, best_err = torch.where(better, z, best_z), torch.where(better, err, best_err)
        beta *= kappa
    return quantize(w, spec, params=(s.squeeze(-1), best_z.squeeze(-1)))
