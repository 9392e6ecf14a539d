"""HQQ as a registered method: data-free choice of each layer's grid (a clipping search for bell-shaped weights,
min-max with a real zero point for flat ones) and of its zero points (half-quadratic proximal updates); see
`lowbit.methods.ptq.hqq_math`.

Asymmetric integer formats are optimised; other formats fall back to RTN (there is nothing to optimise in a
symmetric absmax or ternary/binary scale without data). Options: ``iters`` (20), ``lp_norm`` (0.7), ``beta``
(10.0), ``kappa`` (1.01), ``range_search`` ("auto"; true / false force the clipping search or the min-max grid),
``integer_zero`` (False: real zero points stored at fp16, as in the paper), ``error_norm`` (2.4) and ``max_shrink``
(0.8) of the range search.

Example:
    >>> import torch
    >>> from torch import nn
    >>> import lowbit
    >>> m = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 8))
    >>> q = lowbit.compress(m, "w3g64-hqq", progress=False)
    >>> q[1].weight_spec.bits
    3
"""

from __future__ import annotations

from torch import nn

from lowbit.formats.layout import as_matrix
from lowbit.formats.qtensor import QTensor
from lowbit.methods.registry import LayerPlan, Method, MethodContext, register_method
from lowbit.methods.rtn import rtn_quantize


@register_method("hqq")
class HQQ(Method):
    """Half-Quadratic Quantization (Badri & Shaji, 2023): no calibration data."""

    needs_data = False
    option_names = ("iters", "lp_norm", "beta", "kappa", "range_search", "integer_zero", "error_norm", "max_shrink")

    def quantize_layers(self, model: nn.Module, plan: list[LayerPlan], ctx: MethodContext) -> dict[str, QTensor]:
        from lowbit.methods.ptq.hqq_math import hqq_quantize

        out: dict[str, QTensor] = {}
        for p in plan:
            if p.weights is None:
                continue
            w = as_matrix(p.module.weight.detach().float())
            if p.weights.kind == "int" and not p.weights.symmetric:
                out[p.name] = hqq_quantize(w, p.weights, **ctx.options)
            else:
                out[p.name] = rtn_quantize(w, p.weights)
        return out
