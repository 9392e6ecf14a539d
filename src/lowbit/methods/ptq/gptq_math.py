"""GPTQ (Frantar et al., ICLR 2023; methods.md G4): quantize a weight matrix column by column, spreading each
column's rounding error over the columns not yet quantized through the Cholesky factor of the inverse Hessian.

``H = 2/n Σ xᵀx`` over calibration inputs. Dead inputs (``H_ii = 0``) get ``H_ii = 1`` and zero weights; damping
adds ``damp·mean(diag H)`` to the diagonal (multiplied by 10 until Cholesky succeeds). Columns are swept in lazy
blocks of ``block_size``; group parameters are fitted on the error-updated weights when the sweep reaches a group,
or all at once from the original weights (``static_groups``). ``act_order`` processes columns by decreasing
``H_ii``; the permutation is undone, so codes and scales come back in the original column order. Because stored
groups are consecutive original columns, act-order with groups uses static groups.

Example:
    >>> import torch
    >>> from lowbit.formats import FORMATS, quantize
    >>> from lowbit.methods.ptq.gptq_math import gptq_quantize
    >>> w = torch.randn(8, 64)
    >>> qt = gptq_quantize(w, torch.eye(64), FORMATS["int4"])   # H = I: exactly RTN
    >>> torch.equal(qt.codes, quantize(w, FORMATS["int4"]).codes)
    True
"""

from __future__ import annotations

import torch

from lowbit.errors import DataError
from lowbit.formats import integer
from lowbit.formats.qtensor import QTensor, code_dtype, decode, encode, fit_params
from lowbit.formats.spec import QuantSpec

Params = tuple[torch.Tensor, torch.Tensor | None]


def _fit_rows(w: torch.Tensor, spec: QuantSpec, mse: bool = False) -> Params:
    """Per-row parameters ``(rows, 1)`` of a column slice (range shrink searched when ``mse``, integers only)."""
    u = w.float().unsqueeze(1)
    if mse and spec.kind == "int":
        s, z = integer.fit_mse(u, bits=spec.bits, symmetric=spec.symmetric)
    else:
        s, z = fit_params(u, spec)
    return s.reshape(-1, 1), None if z is None else z.reshape(-1, 1)


def inverse_hessian_factor(h: torch.Tensor, damp: float, retries: int = 6) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)^{-1}``, raising the damping ×10 until it is positive definite."""
    n = h.shape[0]
    base = float(torch.diag(h).mean())
    if not torch.isfinite(h).all():
        raise DataError("the layer's Hessian contains NaN or Inf: the calibration activations are not finite")
    lam = damp * (base if base > 0 else 1.0)
    eye = torch.eye(n, dtype=h.dtype)
    for _ in range(retries):
        try:
            lower = torch.linalg.cholesky(h + lam * eye)
            hinv = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(hinv, upper=True)
        except torch.linalg.LinAlgError:
            lam *= 10.0
    raise DataError(
        "GPTQ could not factor the layer's Hessian even with strong damping: the calibration data is "
        "degenerate; use more (or more varied) calibration samples"
    )


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    mse: bool = False,
) -> QTensor:
    """Quantize ``weight`` ``(out, in)`` with Hessian ``(in, in)``; returns codes/scales in original column order.

    ``mse`` fits each row's / group's range by GPTQ's shrink search (``integer.fit_mse``) instead of min-max."""
    w = weight.detach().float().clone()
    h = hessian.detach().double().clone()
    rows, cols = w.shape
    if h.shape != (cols, cols):
        raise ValueError(f"Hessian of shape {tuple(h.shape)} does not match a weight with {cols} columns")
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    grouped = spec.granularity == "group" and int(spec.group_size or cols) < cols
    g = int(spec.group_size) if grouped else cols
    n_groups = -(-cols // g)
    static = static_groups or (act_order and grouped)

    # Parameters fitted up front: per tensor, per channel, or every group (static).
    fixed: list[Params] | None = None
    if spec.granularity == "tensor":
        s, z = fit_params(w.reshape(1, 1, -1), spec)
        fixed = [(s.reshape(1, 1).expand(rows, 1), None if z is None else z.reshape(1, 1).expand(rows, 1))]
    elif not grouped:
        fixed = [_fit_rows(w, spec, mse)]
    elif static:
        fixed = [_fit_rows(w[:, k * g : (k + 1) * g], spec, mse) for k in range(n_groups)]

    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(cols)
    w = w[:, perm]
    h = h[perm][:, perm]
    u = inverse_hessian_factor(h, damp).float()

    codes = torch.zeros(rows, cols)
    scales = torch.zeros(rows, n_groups if grouped else 1)
    zeros = torch.zeros_like(scales) if spec.has_zero_point else None
    current: Params | None = fixed[0] if fixed is not None and not grouped else None
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            orig = int(perm[col])
            if grouped:
                k = orig // g
                if static:
                    current = fixed[k]  # type: ignore[index]
                elif col % g == 0:  # sweep reaches a new group: fit on its error-updated columns
                    end = min(col + g, cols)
                    span = torch.cat([w1[:, i:], w[:, i2:end]], dim=1) if end > i2 else w1[:, i : i + (end - col)]
                    current = _fit_rows(span, spec, mse)
                assert current is not None
                scales[:, k] = current[0].reshape(-1)
                if zeros is not None and current[1] is not None:
                    zeros[:, k] = current[1].reshape(-1)
            assert current is not None
            s, z = current
            col_w = w1[:, i : i + 1]
            q = encode(col_w, s, z, spec)
            codes[:, col] = q.reshape(-1)
            e = (col_w - decode(q, s, z, spec)) / u1[i, i]
            w1[:, i:] -= e @ u1[i : i + 1, i:]
            err1[:, i] = e.reshape(-1)
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    if not grouped and current is not None:
        scales[:, 0] = current[0].reshape(-1)
        if zeros is not None and current[1] is not None:
            zeros[:, 0] = current[1].reshape(-1)
    out_codes = torch.empty_like(codes)
    out_codes[:, perm] = codes
    if spec.granularity == "tensor":
        scales, zeros = scales[:1, :1], None if zeros is None else zeros[:1, :1]
    return QTensor(out_codes.to(code_dtype(spec)), scales, zeros, spec)


def reconstruction_error(weight: torch.Tensor, approx: torch.Tensor, x: torch.Tensor) -> float:
    """``‖x Wᵀ − x Ŵᵀ‖²`` for inputs ``x`` of shape ``(tokens, in)``."""
    return float(((x.float() @ (weight.float() - approx.float()).T) ** 2).sum())
