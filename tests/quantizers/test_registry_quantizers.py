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
@pytest.mark.parametrize("aq", [None, "int8_token", "xnor", "bnn", "bireal", "reste", "react", "biper"])
def test_export_reproduces_qat_forward(wq: str, aq: str | None) -> None:
    torch.manual_seed(1)
    layer = QATLinear.from_float(nn.Linear(32, 8), weight=wq, act=aq, weight_bits=4)
    layer.set_progress(1.0)
    x = torch.randn(5, 32).relu() + torch.rand(32)  # non-negative, channel means ≠ 0: the threshold matters
    layer(x)  # first batch sets binary thresholds
    if aq == "react":
        with torch.no_grad():
            layer.act_quant.center.add_(0.1 * torch.randn(32))  # a trained threshold
    with torch.no_grad():
        ref = layer(x)
        exported = layer.to_quant_layer()
        assert isinstance(exported, QuantLinear)
        out = exported(x)
    # fp16 storage of scales is the only difference
    assert torch.allclose(out, ref, rtol=2e-3, atol=2e-3 * ref.abs().max().item())


@pytest.mark.parametrize("wq", ["ternary", "xnor"])
@pytest.mark.parametrize("aq", ["int8_token", "xnor", "bnn", "react", "biper"])
@pytest.mark.parametrize(("stride", "dilation"), [(1, 1), (2, 1), (1, 2)])
def test_conv_export_reproduces_qat_forward(wq: str, aq: str, stride: int, dilation: int) -> None:
    """A QAT conv with per-token activations quantizes each patch (one scale per output position, padding
    included), as the deployed QuantConv2d does — binary ones in the factored form (signs, +1 padding, XNOR's K)
    when the conv is not dilated: the exported layer computes the trained function."""
    from lowbit.nn import QuantConv2d

    torch.manual_seed(4)
    conv = nn.Conv2d(6, 8, 3, padding=1, stride=stride, dilation=dilation)
    layer = QATConv2d.from_float(conv, weight=wq, act=aq)
    layer.set_progress(1.0)
    x = torch.randn(3, 6, 7, 7).relu() + 0.1
    layer(x)  # first batch sets binary thresholds
    with torch.no_grad():
        ref = layer(x)
        exported = layer.to_quant_layer()
        assert isinstance(exported, QuantConv2d) and exported.patch_tokens
        out = exported(x)
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


@pytest.mark.parametrize("aq", ["bnn", "xnor", "bireal", "reste", "react", "biper"])
def test_binary_activations_are_centred_on_the_channel_mean(aq: str) -> None:
    """sign(ReLU output) would be constant; the threshold starts at each channel's mean so both signs occur."""
    torch.manual_seed(2)
    layer = QATConv2d.from_float(nn.Conv2d(6, 4, 3, padding=1), weight="xnor", act=aq)
    x = torch.randn(8, 6, 5, 5).relu()
    layer(x)
    assert torch.allclose(layer.act_quant.center, x.mean(dim=(0, 2, 3)), atol=1e-6)
    b = layer.act_quant(x)
    assert (b > 0).any() and (b < 0).any()


def test_binary_conv_export_keeps_threshold_through_save_and_load(tmp_path) -> None:
    import lowbit

    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), QATConv2d.from_float(nn.Conv2d(8, 4, 3), weight="xnor", act="react")
    )
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        model(x)
        model[2].act_quant.center.add_(0.05)
        ref = model(x)
        model[2] = model[2].to_quant_layer()
        assert torch.allclose(model(x), ref, atol=1e-3 * ref.abs().max().item())
    lowbit.save(model, tmp_path / "ckpt")
    loaded = lowbit.load(tmp_path / "ckpt", nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
