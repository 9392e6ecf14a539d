"""SmoothQuant as a registered method: migrate activation outliers into the weights before W8A8 quantization.

For layers sharing an input, ``s_j = max|X_j|^α / max|W_{:,j}|^{1−α}``; weights become ``W·diag(s)`` (then RTN
in the stage's weight format) and inputs ``X·diag(1/s)`` through the layer's explicit input scale (exactly what
folding into the preceding LayerNorm computes). Activations are then quantized per the stage (static calibrated
or dynamic per token). Options: ``alpha``: ``"auto"`` (default: with dynamic activations chosen per group of layers
sharing an input on the calibration sample, no smoothing included, `smoothquant_math.alpha_search`; with static
ones the paper's 0.5) or a fixed value (≈0.75–0.85 for LLaMA-like models).

Example:
    >>> import lowbit
    >>> lowbit.get_preset("w8a8-smoothquant").stages[0].method
    'smoothquant'
"""

from __future__ import annotations

from torch import nn

from lowbit.calibration import estimate
from lowbit.calibration.collectors import ChannelStatsCollector
from lowbit.calibration.sequential import Collector, SequentialHooks, run_sequential
from lowbit.errors import RecipeError
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
        from lowbit.methods.ptq.smoothquant_math import ALPHAS, alpha_search, smooth_scales

        alpha = _alpha(ctx.options.get("alpha", "auto"))
        results: dict[str, QTensor] = {}
        assert ctx.swap is not None and ctx.data is not None

        def make_collector(p: LayerPlan) -> Collector:
            return ChannelStatsCollector(p.module, max_rows=SAMPLE_ROWS if alpha is None else 64)

        def quantize_group(group: list[LayerPlan], collectors: dict[str, Collector]) -> None:
            smoothable = [p for p in group if isinstance(p.module, nn.Linear) and p.activations is not None]
            scale = None
            if smoothable:
                first = smoothable[0]
                absmax = collectors[first.name].absmax  # type: ignore[attr-defined]
                weights = [p.module.weight.detach().float() for p in smoothable]
                if (
                    alpha is None
                    and first.weights is not None
                    and first.activations is not None
                    and first.activations.dynamic
                ):
                    x = collectors[first.name].sample()  # type: ignore[attr-defined]
                    scale, _, _ = alpha_search(x, absmax, weights, first.weights, first.activations)
                else:
                    scale = smooth_scales(absmax, weights, alpha=0.5 if alpha is None else alpha)
            for p in group:
                w = as_matrix(p.module.weight.detach().float())
                s = scale if (scale is not None and p in smoothable) else None
                qt = None if p.weights is None else rtn_quantize(w if s is None else w * s, p.weights)
                if qt is not None:
                    results[p.name] = qt
                ctx.swap(p, qt, None if s is None else 1.0 / s)

        def solve_flops(p: LayerPlan, tokens: int) -> tuple[float, float, float]:
            k, n = p.module.weight[0].numel(), p.module.weight.shape[0]
            dynamic = p.activations is not None and p.activations.dynamic
            if alpha is not None or p.weights is None or not isinstance(p.module, nn.Linear) or not dynamic:
                return estimate.rtn_flops(k, n)
            return estimate.awq_flops(k, n, tokens, grid=len(ALPHAS) + 1, clip_steps=0, n_tokens=SAMPLE_ROWS)

        hooks = SequentialHooks(make_collector, quantize_group, solve_flops)
        run_sequential(model, plan, ctx.data, hooks, progress=ctx.progress)
        return results


#: Calibration rows per layer group the α search compares outputs on.
SAMPLE_ROWS = 512


def _alpha(value: object) -> float | None:
    """The ``alpha`` option: None for ``"auto"``, else a number in [0, 1]."""
    if value == "auto":
        return None
    try:
        a = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        a = float("nan")
    if not 0.0 <= a <= 1.0:
        raise RecipeError(f"smoothquant option alpha must be 'auto' or a number in [0, 1], got {value!r}")
    return a
