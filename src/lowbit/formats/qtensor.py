"""Quantize / dequantize any 2-D tensor to any `QuantSpec` — the pure-function core of every method.

`QTensor` holds integer codes, per-unit scales (and zero points) and the spec; it is what a quantized layer
stores, what `lowbit.save` writes and what a packed kernel reads. The elementwise functions `fit_params`,
`encode` and `decode` let methods such as GPTQ fit parameters on some columns and quantize column by column.

Example:
    >>> import torch
    >>> from lowbit.formats import QuantSpec, quantize, dequantize
    >>> w = torch.randn(8, 256)
    >>> qt = quantize(w, QuantSpec(kind="int", bits=4, symmetric=False, granularity="group", group_size=128))
    >>> tuple(qt.codes.shape), tuple(qt.scale.shape), qt.codes.dtype
    ((8, 256), (8, 2), torch.uint8)
    >>> bool((dequantize(qt) - w).abs().max() <= qt.scale.max() / 2 + 1e-6)
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats import binary, integer, lowfloat, ternary
from lowbit.formats.layout import from_units, to_units
from lowbit.formats.scales import SCALE_BITS_STORED
from lowbit.formats.spec import QuantSpec

Params = tuple[torch.Tensor, torch.Tensor | None]


@dataclass
class QTensor:
    """Codes + scales of a quantized 2-D tensor.

    Attributes:
        codes: integer codes, shape ``(rows, cols)``; int8 for signed grids, uint8 for unsigned ones and for
            low-bit float bit patterns.
        scale: fp32 (fp16-representable) scales, shape ``(rows, units)`` or ``(1, 1)``.
        zero: integer zero points of asymmetric integer formats (same shape as ``scale``), else None.
        spec: the format.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    spec: QuantSpec

    @property
    def shape(self) -> torch.Size:
        """Shape of the represented 2-D tensor."""
        return self.codes.shape

    def storage_bits(self) -> int:
        """Bits to store the codes at their bit width, fp16 scales, and zero points (`storage_bits`)."""
        return storage_bits(self.codes.numel(), self.scale, self.zero, self.spec)


def storage_bits(n_codes: int, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec) -> int:
    """Bits to store ``n_codes`` codes at their bit width, fp16 scales, and zero points: at the code width when they
    are integers (RTN, GPTQ, AWQ), at fp16 when an optimiser made them real numbers (HQQ). (The codes' count only:
    a packed layer need not unpack them to be measured.)"""
    n_scales = 0 if (spec.kind == "binary" and spec.scale_method == "none") else scale.numel()
    zero_bits = 0
    if zero is not None:
        integral = bool(torch.equal(zero, zero.round()))
        zero_bits = zero.numel() * (spec.bits if integral else SCALE_BITS_STORED)
    return n_codes * spec.bits + n_scales * SCALE_BITS_STORED + zero_bits


def code_dtype(spec: QuantSpec) -> torch.dtype:
    """Storage dtype of unpacked codes."""
    unsigned = (spec.kind == "int" and not spec.symmetric) or spec.kind == "fp"
    return torch.uint8 if unsigned else torch.int8


def fit_params(u: torch.Tensor, spec: QuantSpec, *, store: bool = True) -> Params:
    """Scale and zero point per unit of ``u`` (shape ``(R, G, n)``) → tensors of shape ``(R, G, 1)``."""
    if spec.kind == "int":
        return integer.fit(u, bits=spec.bits, symmetric=spec.symmetric, store=store)
    if spec.kind == "fp":
        return lowfloat.fit(u, name=str(spec.fp_format), store=store), None
    if spec.kind == "ternary":
        return ternary.fit(u, method=spec.scale_method or "absmean", store=store), None
    return binary.fit(u, method=spec.scale_method or "absmean", store=store), None


def encode(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """Codes of ``x`` under broadcastable parameters (float tensor of whole numbers / bit patterns)."""
    if spec.kind == "int":
        return integer.encode(x, scale, zero, bits=spec.bits, symmetric=spec.symmetric)
    if spec.kind == "fp":
        return lowfloat.encode(x, scale, name=str(spec.fp_format)).float()
    if spec.kind == "ternary":
        return ternary.encode(x, scale)
    return binary.encode(x, scale)


def decode(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """Real values of codes under broadcastable parameters."""
    if spec.kind == "int":
        return integer.decode(q.float(), scale, zero)
    if spec.kind == "fp":
        return lowfloat.decode(q, scale, name=str(spec.fp_format))
    if spec.kind == "ternary":
        return ternary.decode(q.float(), scale)
    return binary.decode(q.float(), scale)


def quantize(x: torch.Tensor, spec: QuantSpec, params: Params | None = None) -> QTensor:
    """Quantize a 2-D tensor (round to nearest) at the spec's granularity; ``params`` overrides the fit."""
    if x.dim() != 2:
        raise ValueError(f"quantize expects a 2-D tensor, got shape {tuple(x.shape)}")
    x = x.detach().float()
    u = to_units(x, spec.granularity, spec.group_size)
    scale, zero = params if params is not None else fit_params(u, spec)
    scale = scale.reshape(u.shape[0], u.shape[1], 1)
    zero = zero.reshape(u.shape[0], u.shape[1], 1) if zero is not None else None
    q = from_units(encode(u, scale, zero, spec), x.shape)
    return QTensor(
        codes=q.to(code_dtype(spec)),
        scale=scale.reshape(u.shape[0], u.shape[1]),
        zero=None if zero is None else zero.reshape(u.shape[0], u.shape[1]),
        spec=spec,
    )


def expand_params(qt: QTensor) -> Params:
    """Per-element scale (and zero) tensors of shape ``codes.shape``."""
    rows, cols = qt.codes.shape

    def expand(p: torch.Tensor) -> torch.Tensor:
        if p.shape == (1, 1):
            return p.expand(rows, cols)
        reps = cols if p.shape[1] == 1 else int(qt.spec.group_size or cols)
        return p.repeat_interleave(reps, dim=1)[:, :cols].expand(rows, cols)

    return expand(qt.scale), None if qt.zero is None else expand(qt.zero)


def dequantize(qt: QTensor) -> torch.Tensor:
    """Real-valued fp32 tensor represented by a `QTensor`."""
    scale, zero = expand_params(qt)
    return decode(qt.codes, scale, zero, qt.spec)


def fake_quantize(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``dequantize(quantize(x))`` for a tensor of any rank ≥ 1 viewed as ``(-1, last_dim)``.

    Scales are computed from ``x`` itself and kept in fp32 (run-time quantization, e.g. dynamic per-token
    activations); for ``granularity='channel'`` on a 2-D weight this equals RTN up to fp16 scale rounding.
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).float()
    u = to_units(x2, spec.granularity, spec.group_size)
    scale, zero = fit_params(u, spec, store=False)
    out = decode(encode(u, scale, zero, spec), scale, zero, spec)
    return from_units(out, x2.shape).reshape(shape).to(x.dtype)
