"""One linear layer computing several that read the same input: ``concat_linears([q, k, v])(x)`` equals
``torch.cat([q(x), k(x), v(x)], -1)``, with one weight matrix (one kernel call instead of three).

Float layers (``nn.Linear``) concatenate their weights. Quantized layers (`QuantLinear`, packed or not) concatenate
codes, scales, zero points and biases, which is exact when their weight quantization is per output channel or per
group of one output row (each row keeps its own scales) and their input is quantized the same way: the same
format, the same activation quantizer state (a dynamic per-token quantizer has none; static scales must be equal)
and the same input scale / shift. Anything else returns None: the caller keeps the separate layers.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lowbit.nn.concat import concat_linears
    >>> a, b = nn.Linear(8, 3), nn.Linear(8, 5)
    >>> x = torch.randn(2, 8)
    >>> bool(torch.allclose(concat_linears([a, b])(x), torch.cat([a(x), b(x)], -1)))
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lowbit.nn.packed import PackedLinear
from lowbit.nn.qlayers import QuantLinear


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(torch.equal(a, b))


def _float_concat(layers: Sequence[nn.Linear]) -> nn.Linear | None:
    first = layers[0]
    if any(type(m) is not nn.Linear for m in layers) or any(m.in_features != first.in_features for m in layers):
        return None
    if len({m.bias is None for m in layers}) != 1 or len({(m.weight.dtype, m.weight.device) for m in layers}) != 1:
        return None
    w = first.weight
    out = nn.Linear(first.in_features, sum(m.out_features for m in layers), first.bias is not None)
    out = out.to(dtype=w.dtype, device=w.device).requires_grad_(False)
    with torch.no_grad():
        out.weight.copy_(torch.cat([m.weight for m in layers]))
        if out.bias is not None:
            out.bias.copy_(torch.cat([m.bias for m in layers]))  # type: ignore[misc]
    return out.train(first.training)


def _per_row_units(layer: QuantLinear) -> bool:
    rows = layer._matrix_shape[0]
    return layer.scale.numel() % rows == 0 and layer.scale.numel() >= rows


def _quant_concat(layers: Sequence[QuantLinear]) -> QuantLinear | None:
    first = layers[0]
    packed = isinstance(first, PackedLinear)
    if any(type(m) is not type(first) for m in layers) or first.weight_spec is None:
        return None
    if first.weight_spec.granularity == "tensor" or not all(_per_row_units(m) for m in layers):
        return None
    for m in layers[1:]:
        if m.in_features != first.in_features or m.weight_spec != first.weight_spec or m.act_spec != first.act_spec:
            return None
        if (m.bias is None) != (first.bias is None) or (m.zero is None) != (first.zero is None):
            return None
        if not (_same(m.input_scale, first.input_scale) and _same(m.input_shift, first.input_shift)):
            return None
        if first.act is not None:
            sa, sb = first.act.state_dict(), m.act.state_dict()  # type: ignore[union-attr]
            if sa.keys() != sb.keys() or not all(_same(sa[k], sb[k]) for k in sa):
                return None
            if (m.act.calibrator, m.act.percentile) != (first.act.calibrator, first.act.percentile):  # type: ignore[union-attr]
                return None
    act_opts = {"calibrator": first.act.calibrator, "percentile": first.act.percentile} if first.act else {}
    out = QuantLinear(
        first.in_features,
        sum(m.out_features for m in layers),
        first.bias is not None,
        first.weight_spec,
        first.act_spec,
        **act_opts,
    )
    with torch.no_grad():
        out.codes.copy_(torch.cat([m.codes for m in layers]))
        out.scale.copy_(torch.cat([m.scale for m in layers]))
        if out.zero is not None:
            out.zero.copy_(torch.cat([m.zero for m in layers]))  # type: ignore[misc]
        if out.bias is not None:
            out.bias.copy_(torch.cat([m.bias for m in layers]))  # type: ignore[misc]
        if out.act is not None:
            out.act.load_state_dict(first.act.state_dict())  # type: ignore[union-attr]
    if first.input_scale is not None:
        out.set_input_scale(first.input_scale)
    if first.input_shift is not None:
        out.set_input_shift(first.input_shift)
    out = out.to(first.codes.device).train(first.training).requires_grad_(False)
    if not packed:
        return out
    from lowbit.pack import pack_layer

    fused = pack_layer(out)
    fused.kernel_activations = first.kernel_activations  # type: ignore[union-attr]
    return fused.train(first.training).requires_grad_(False)


def concat_linears(layers: Sequence[nn.Module]) -> nn.Module | None:
    """A layer whose output is the concatenation of ``layers``' outputs on the same input, or None where that
    cannot be exact (see the module docstring). The result shares nothing with the inputs: later changes to
    ``layers`` do not reach it."""
    if len(layers) < 2:
        return None
    if all(isinstance(m, QuantLinear) for m in layers):
        return _quant_concat(layers)  # type: ignore[arg-type]
    if all(isinstance(m, nn.Linear) for m in layers):
        return _float_concat(layers)  # type: ignore[arg-type]
    return None
