"""GPTQ as a registered method: sequential calibration feeding each layer's Hessian to `gptq_quantize`.

Options (recipe ``options:``): ``block_size`` (lazy column block, 128), ``damp`` (fraction of mean diag H added,
0.01), ``act_order`` (process columns by decreasing H_ii, True), ``static_groups`` (fit all group scales before
the sweep, False; forced with act_order and groups), ``mse`` (fit each group's range by a shrink search
minimising the |error|^2.4 of its weights, as GPTQ's reference quantizer does; ``auto`` = only at ≤ 3 bits, where
it lifts MiniLM W2 g64 a long way while at W4 it costs retrieval recall).

Example:
    >>> import lowbit
    >>> r = lowbit.get_preset("w4g128-gptq")
    >>> r.stages[0].method
    'gptq'
"""

from __future__ import annotations

from torch import nn

from lowbit.calibration import estimate
from lowbit.calibration.collectors import HessianCollector
from lowbit.calibration.sequential import Collector, SequentialHooks, run_sequential
from lowbit.formats.layout import as_matrix
from lowbit.formats.qtensor import QTensor
from lowbit.methods.registry import LayerPlan, Method, MethodContext, register_method
from lowbit.methods.rtn import rtn_quantize


def _grouped(module: nn.Module) -> bool:
    return getattr(module, "groups", 1) != 1


@register_method("gptq")
class GPTQ(Method):
    """Hessian-aware column-by-column rounding with error feedback (Frantar et al., 2023)."""

    needs_data = True
    option_names = ("block_size", "damp", "act_order", "static_groups", "mse")

    def quantize_layers(self, model: nn.Module, plan: list[LayerPlan], ctx: MethodContext) -> dict[str, QTensor]:
        from lowbit.methods.ptq.gptq_math import gptq_quantize

        opts = {
            "block_size": 128,
            "damp": 0.01,
            "act_order": True,
            "static_groups": False,
            "mse": "auto",
            **ctx.options,
        }
        results: dict[str, QTensor] = {}
        assert ctx.swap is not None and ctx.data is not None

        def make_collector(p: LayerPlan) -> Collector:
            return _NullCollector() if p.weights is None or _grouped(p.module) else HessianCollector(p.module)

        def quantize_group(group: list[LayerPlan], collectors: dict[str, Collector]) -> None:
            for p in group:
                qt = None
                if p.weights is not None:
                    c = collectors[p.name]
                    if isinstance(c, HessianCollector):
                        mse = opts["mse"] if isinstance(opts["mse"], bool) else p.weights.bits <= 3
                        qt = gptq_quantize(
                            as_matrix(p.module.weight.detach()), c.hessian(), p.weights, **{**opts, "mse": mse}
                        )
                    else:  # grouped / depthwise conv: one tiny Hessian per group, RTN is as good there
                        qt = rtn_quantize(p.module.weight, p.weights)
                    results[p.name] = qt
                ctx.swap(p, qt, None)

        def solve_flops(p: LayerPlan, tokens: int) -> tuple[float, float, float]:
            k, n = p.module.weight[0].numel(), p.module.weight.shape[0]
            if p.weights is None or _grouped(p.module):
                return estimate.rtn_flops(k, n)
            mse = opts["mse"] if isinstance(opts["mse"], bool) else p.weights.bits <= 3
            return estimate.gptq_flops(k, n, tokens, mse=bool(mse), group=p.weights.group_size)

        hooks = SequentialHooks(make_collector, quantize_group, solve_flops)
        run_sequential(model, plan, ctx.data, hooks, progress=ctx.progress)
        return results


class _NullCollector:
    def update(self, x: object) -> None:  # noqa: D102
        pass
