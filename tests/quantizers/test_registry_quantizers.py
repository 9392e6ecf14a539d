"""Generated from the QAT quantizer registries: every quantizer trains (finite gradients) and, where a stored
format can reproduce it, exports to a QuantLinear computing the same function."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.bench.lowbit_suite import CELLS, suite_recipes
from lowbit.nn import QuantLinear
from lowbit.nn.qat import QATConv2d, QATLinear
from lowbit.quantizers.registry import ACT_QUANTIZERS, WEIGHT_QUANTIZERS


@pytest.mark.parametrize("wq", sorted(WEIGHT_QUANTIZERS))
@pytest.mark.parametrize("aq", [None, *sorted(ACT_QUANTIZERS)])
def test_qat_linear_forward_backward(wq: str, aq: str | None) -> None:
    torch.manual_seed(0)
    layer = QATLinear.from_float(nn.Linear(16, 8), weight=wq, act=aq, weight_bits=4, act_bits=4)
    layer.set_progress(0.7)
    x = torch.randn(4, 16, requires_grad=True)
    layer(x).pow(2).sum().backward()
    assert torch.isfinite(layer.weight.grad).all() and layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("wq", ["lsq", "ternary", "ternary_absmedian", "ternary_tbt", "xnor", "bnn", "reste", "biper"])
@pytest.mark.parametrize("aq", [None, "int8_token", "xnor", "bnn"])
def test_export_reproduces_qat_forward(wq: str, aq: str | None) -> None:
    torch.manual_seed(1)
    layer = QATLinear.from_float(nn.Linear(32, 8), weight=wq, act=aq, weight_bits=4)
    layer.set_progress(1.0)
    x = torch.randn(5, 32)
    with torch.no_grad():
        ref = layer(x)
        exported = layer.to_quant_layer()
        assert isinstance(exported, QuantLinear)
        out = exported(x)
    # fp16 storage of scales is the only difference
    assert torch.allclose(out, ref, rtol=2e-3, atol=2e-3 * ref.abs().max().item())


def test_conv_qat_layer() -> None:
    conv = QATConv2d(nn.Conv2d(3, 4, 3, padding=1), weight="xnor", act="react")
    y = conv(torch.randn(2, 3, 6, 6))
    y.sum().backward()
    assert y.shape == (2, 4, 6, 6) and torch.isfinite(conv.weight.grad).all()


def test_suite_cells_are_valid_recipes() -> None:
    recipes = suite_recipes(epochs=1)
    assert len(recipes) == len(CELLS)
    settings = {name.rsplit("-", 1)[1] for name in recipes}
    assert {"W1A32", "W1A1", "W1.58A8", "W2A2", "W4A4"} <= settings
