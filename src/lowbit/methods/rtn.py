"""Round-to-nearest (RTN): data-free quantization of each weight matrix on its own (methods.md G1).

Example:
    >>> import torch
    >>> from lowbit.formats import FORMATS
    >>> from lowbit.methods.rtn import rtn_quantize
    >>> qt = rtn_quantize(torch.randn(16, 64), FORMATS["int4"])
    >>> qt.codes.dtype
    torch.int8
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.formats.layout import as_matrix
from lowbit.formats.qtensor import QTensor, quantize
from lowbit.formats.spec import QuantSpec
from lowbit.methods.registry import LayerPlan, Method, MethodContext, register_method


def rtn_quantize(weight: torch.Tensor, spec: QuantSpec) -> QTensor:
    """Quantize a Linear or Conv weight (any rank, flattened to ``(out, in·kh·kw)``) by rounding to nearest."""
    return quantize(as_matrix(weight), spec)


@register_method("rtn")
class RTN(Method):
    """Round every selected weight to the nearest grid point of its format; no data needed."""

    needs_data = False

    def quantize_layers(self, model: nn.Module, plan: list[LayerPlan], ctx: MethodContext) -> dict[str, QTensor]:
        return {p.name: rtn_quantize(p.module.weight, p.weights) for p in plan if p.weights is not None}
