"""HQQ-style data-free optimisation of an asymmetric quantizer's scales and zero points (Badri & Shaji, 2023).

Two steps, both without calibration data:

1. **Grid**: where a layer's weight groups are bell-shaped (the median group kurtosis is nearer a Gaussian's than a
   uniform distribution's; trained transformers such as MiniLM), each group's range is shrunk by the factor
   (1, 0.99, …, 1 − ``max_shrink``) minimising ``Σ|w − ŵ|^p`` of its own weights, ``p = error_norm`` (2.4, as GPTQ's
   MSE quantizer; `integer.fit_mse`), from the integer-zero grid that keeps 0.0 exact (where such weights peak).
   Where they are flat (near-uniform: small models barely moved from their uniform initialisation, such as the digits
   ViT) the grid is the paper's: min-max with a real zero point, extremes exact. ``range_search`` forces either grid.
2. **Zero point**: half-quadratic splitting of ``min_z ‖W − Q⁻¹(Q(W; s, z))‖_q`` with ``q = lp_norm < 1``: alternate
   (a) the residual ``W_e = shrink_q(W − Ŵ, β)``, a generalised soft threshold ``sign(r)·relu(|r| − |r|^{q−1}/β)``
   that lets a few large errors stand, and (b) the closed-form ``z = mean_group(Q(W) − (W − W_e)/s)``; β grows by κ.
   As in the paper, zero points are real numbers (stored at fp16: 16 bits per group instead of ``b``); with
   ``integer_zero`` each update is rounded to the integer grid instead. Per group the iterate with the lowest
   ``Σ|w − ŵ|^p`` is kept, so in that error the result is never worse than step 1's grid; the range search's grid
   is never worse than RTN's (its shrink grid contains 1).

Why the grid depends on the shape (fidelity to fp32, whole model, throw-away runs in session 16): the range search
lowers every layer's weight error on the digits ViT too, yet its output error rises (logit cosine W3 g64 0.9790,
W4 g128 0.9958 against RTN's 0.9835 / 0.9968), while the paper's min-max real-zero grid gives 0.9922 / 0.9975; on
MiniLM the same min-max grid loses to RTN (query cosine W3 g64 0.850 vs 0.885, W2 g64 0.255 vs 0.461: zero is not on
the grid where most weights sit) and the range search wins (0.907, 0.680). On that 2-block ViT, dithering RTN's
rounding by ±0.1 step spreads 1 − cosine over 0.011–0.023 at W3 g64 (std 0.004): single comparisons there are coarse.

Measured with the automatic grid (RTN → HQQ, `lowbit demo --workloads digits-cnn digits-vit minilm --recipes w4g128
w4g128-hqq w3g64 w3g64-hqq w2g64 w2g64-hqq`): MiniLM query cosine W4 g128 0.963 → 0.968, W3 g64 0.885 → 0.907, W2 g64
0.461 → 0.680 (every layer bell-shaped); digits-vit logit cosine W4 g128 0.9968 → 0.9975, W3 g64 0.9835 → 0.9922,
W2 g64 0.873 → 0.908 (every layer flat); digits-cnn W4 / W3 / W2 0.99990 / 0.99963 / 0.99684 → 0.99991 / 0.99976 /
0.99814.

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
#: Kurtosis of a uniform distribution (a Gaussian's is 3).
UNIFORM_KURTOSIS = 1.8


def group_kurtosis(u: torch.Tensor) -> torch.Tensor:
    """Sample kurtosis ``m4 / m2²`` of each group over the last axis of ``u`` (1.8 uniform, 3 Gaussian), in float64;
    NaN for a constant group (no spread to measure)."""
    c = u.double() - u.double().mean(dim=-1, keepdim=True)
    m2 = c.pow(2).mean(dim=-1)
    k = c.pow(4).mean(dim=-1) / m2.pow(2)
    return torch.where(m2 > 0, k, torch.full_like(k, float("nan")))


def is_flat(u: torch.Tensor) -> bool:
    """True where the median group kurtosis of ``u`` (``(R, G, n)``) is nearer a uniform distribution's than a
    Gaussian sample's (``3(n − 1)/(n + 1)``): near-uniform weights, which get the min-max real-zero grid. Constant
    groups (pruned or padded rows) are left out; a layer of nothing else is not flat."""
    n = u.shape[-1]
    gaussian = 3.0 * (n - 1) / (n + 1)
    k = group_kurtosis(u).flatten()
    k = k[~k.isnan()]
    return k.numel() > 0 and float(k.median()) < (UNIFORM_KURTOSIS + gaussian) / 2


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
    range_search: bool | str = "auto",
    integer_zero: bool = False,
    error_norm: float = ERROR_NORM,
    max_shrink: float = 0.8,
) -> QTensor:
    """Optimise scales and zero points of an asymmetric integer ``spec`` (group or channel) without data.

    ``range_search``: ``"auto"`` (a clipping search from the integer-zero grid unless the weights are flat, see
    `is_flat`), True (always) or False (the paper's min-max grid, real zero point unless ``integer_zero``).
    """
    if spec.kind != "int" or spec.symmetric or spec.granularity == "tensor":
        raise ValueError("HQQ optimises asymmetric integer formats with per-channel or per-group parameters")
    w = weight.detach().float()
    u = to_units(w, spec.granularity, spec.group_size)  # (R, G, g)
    qmin, qmax = integer.qrange(spec.bits, False)
    if range_search not in (True, False, "auto"):
        raise ValueError(f"HQQ range_search must be 'auto', true or false, got {range_search!r}")
    if range_search == "auto":
        range_search = not is_flat(u)
    if range_search:
        s, z = integer.fit_mse(u, bits=spec.bits, symmetric=False, norm=error_norm, max_shrink=max_shrink)
    else:
        s, z = integer.fit(u, bits=spec.bits, symmetric=False, integer_zero=integer_zero)
    assert z is not None

    def sq_err(zz: torch.Tensor) -> torch.Tensor:
        q = integer.encode(u, s, zz, bits=spec.bits, symmetric=False)
        return (integer.decode(q, s, zz) - u).abs().pow(error_norm).sum(dim=-1, keepdim=True)

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
