"""SmoothQuant as a registered method: migrate activation outliers into the weights before W8A8 quantization.

For layers sharing an input, ``s_j = max|X_j|^α / max|W_{:,j}|^{1−α}``; weights become ``W·diag(s)`` (then RTN
in the stage's weight format) and inputs ``X·diag(1/s)`` through the layer's explicit input scale (exactly what
folding into the preceding LayerNorm computes). Activations are then quantized per the stage (static calibrated
or dynamic per token). Options: ``alpha`` (0.5; ≈0.75–0.85 for LLaMA-like models).

Example:
    >>> import lowbit
    >>> lowbit.get_preset("w8a8-smoothquant").stages[0].method
    'smoothquant'
"""

from __future__ import annotations

from torch import nn

from lowbit.calibration.collectors import ChannelStatsCollector
from lowbit.calibration.sequential import Collector, SequentialHooks, run_sequential
from lowbit.formats.layout import as_matrix
from lowbit.formats.qtensor import QTensor
from lowbit.methods.registry import LayerPlan, Method, MethodContext, register_method
from lowbit.methods.rtn import rtn_quantize


@register_method("smoothquant")
class SmoothQuant(Method):
    """Per-channel smoothing of activation outliers (Xiao et al., 2023)."""

    needs_data = True
    option_names = ("alpha",)

    def quantize_layers(self, model: nn.Module, plan: list[LayerPlan], ctx: MethodContext) -> dict[str, QTensor]:
        from lowbit.methods.ptq.smoothquant_math import smooth_scales

        alpha = float(ctx.options.get("alpha", 0.5))
        results: dict[str, QTensor] = {}
        assert ctx.swap is not None and ctx.data is not None

        def make_collector(p: LayerPlan) -> Collector:
            return ChannelStatsCollector(p.module, max_rows=64)

        def quantize_group(group: list[LayerPlan], collectors: dict[str, Collector]) -> None:
            smoothable = [p for p in group if isinstance(p.module, nn.Linear) and p.activations is not None]
            scale = None
            if smoothable:
                absmax = collectors[smoothable[0].name].absmax  # type: ignore[attr-defined]
                scale = smooth_scales(absmax, [p.module.weight.detach().float() for p in smoothable], alpha=alpha)
            for p in group:
                w = as_matrix(p.module.weight.detach().float())
                s = scale if (scale is not None and p in smoothable) else None
                qt = None if p.weights is None else rtn_quantize(w if s is None else w * s, p.weights)
                if qt is not None:
                    results[p.name] = qt
                ctx.swap(p, qt, None if s is None else 1.0 / s)

        run_sequential(model, plan, ctx.data, SequentialHooks(make_collector, quantize_group), progress=ctx.progress)
        return results
