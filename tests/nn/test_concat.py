"""One layer for several on the same input: exact concatenation for every preset's format, refusals otherwise."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.kernels.dispatch import use_mode
from lowbit.nn.concat import concat_linears
from lowbit.nn.packed import PackedLinear


class Three(nn.Module):
    """Three linear layers reading the same input, as an attention block's query / key / value."""

    def __init__(self, d: int = 64, outs: tuple[int, int, int] = (64, 32, 64)) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(d, o) for o in outs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], -1)


def model() -> nn.Sequential:
    """`Three` between two other layers (presets keep a model's first and last layer at 8 bits)."""
    return nn.Sequential(nn.Linear(64, 64), Three(), nn.Linear(160, 10))


def calib() -> list[torch.Tensor]:
    return [torch.randn(16, 64, generator=torch.Generator().manual_seed(i)) for i in range(4)]


def test_float_layers_concatenate_weights_and_biases():
    torch.manual_seed(0)
    m = Three()
    x = torch.randn(5, 64)
    cat = concat_linears([m.q, m.k, m.v])
    assert isinstance(cat, nn.Linear) and cat.out_features == 160
    torch.testing.assert_close(cat(x), m(x), rtol=0, atol=1e-6)
    assert concat_linears([m.q]) is None  # nothing to concatenate
    assert concat_linears([m.q, nn.Linear(32, 8)]) is None  # another input size


@pytest.mark.parametrize("preset", ["w8a8", "w8a8-static", "w8", "w4g128", "w3g64", "w2g64", "fp4", "ternary", "w1a1"])
@pytest.mark.parametrize("packed", [False, True])
def test_quantized_layers_concatenate_exactly(preset, packed):
    torch.manual_seed(1)
    q = lowbit.compress(model(), preset, data=calib(), progress=False)[1]
    if packed:
        q = lowbit.pack(q)
    x = torch.randn(7, 64)
    layers = [q.q, q.k, q.v]
    assert layers[0].weight_spec == layers[1].weight_spec == layers[2].weight_spec
    cat = concat_linears(layers)
    if preset == "w8a8-static" and not torch.equal(q.q.act.scale, q.k.act.scale):
        assert cat is None  # static input scales differ: separate layers
        return
    if preset == "ternary":
        assert cat is None  # one absmean scale per tensor (BitNet b1.58): the rows of three tensors have three
        return
    assert cat is not None and isinstance(cat, PackedLinear) == packed
    with torch.no_grad(), use_mode("reference"):
        torch.testing.assert_close(cat(x), q(x), rtol=0, atol=1e-5)
    if packed:
        with torch.no_grad(), use_mode("native"):  # the kernels on the one concatenated layer
            torch.testing.assert_close(cat(x), q(x), rtol=1e-4, atol=1e-4)


def test_layers_that_cannot_be_exact_are_refused():
    torch.manual_seed(2)
    a = lowbit.compress(model(), "w8a8", progress=False)[1]
    b = lowbit.compress(model(), "w4g128", progress=False)[1]
    assert concat_linears([a.q, b.k]) is None  # different formats
    a.k.set_input_scale(torch.rand(64) + 0.5)
    assert concat_linears([a.q, a.k, a.v]) is None  # different input scales
    assert concat_linears([a.q, nn.Linear(64, 4)]) is None  # quantized and float
