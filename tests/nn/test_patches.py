"""Convolutions as patch matrices: the pure functions against F.conv2d, per-patch activation quantization against
XNOR-Net's closed form and against a linear layer on the same patches, and the C patch cutter against PyTorch."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.formats import ACT_FORMATS, FORMATS
from lowbit.formats.qtensor import quantize
from lowbit.kernels import native
from lowbit.kernels.im2col import Im2col
from lowbit.nn.patches import conv_output_size, conv_padding, conv_patches, patch_linear, patches_to_map
from lowbit.nn.qlayers import QuantConv2d, QuantLinear

#: (in, out, kernel, stride, padding, dilation, groups, input H×W)
GEOMETRIES = [
    (3, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, (7, 6)),
    (4, 6, (2, 3), (2, 1), (0, 2), (1, 2), 2, (9, 9)),
    (2, 4, (3, 3), (1, 1), "same", (2, 1), 1, (8, 8)),
    (5, 5, (2, 2), (1, 1), "same", (1, 1), 5, (6, 6)),  # depthwise, even kernel: 'same' pads one more at the end
    (3, 4, (1, 1), (2, 2), "valid", (1, 1), 1, (5, 5)),
]


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_patch_matmul_is_the_convolution(geometry, channels_last: bool) -> None:
    cin, cout, k, s, p, d, g, size = geometry
    torch.manual_seed(0)
    x, w, b = torch.randn(2, cin, *size), torch.randn(cout, cin // g, *k), torch.randn(cout)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    u, (oh, ow) = conv_patches(x, k, s, p, d)
    y = patches_to_map(patch_linear(u, w.reshape(cout, -1), b, g), oh, ow)
    ref = F.conv2d(x, w, b, s, p, d, g)
    assert y.shape == ref.shape and y.is_contiguous()
    assert torch.allclose(y, ref, atol=1e-5)


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable: " + native.unavailable_reason())
@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_c_patches_equal_pytorch_patches(geometry, channels_last: bool) -> None:
    cin, _, k, s, p, d, _, size = geometry
    x = torch.randn(3, cin, *size)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    pads = conv_padding(size, k, d, p)
    cut = Im2col(x.shape, x.stride(), k, s, pads, d, conv_output_size(size, k, s, pads, d))
    assert torch.equal(cut(x), conv_patches(x, k, s, p, d)[0])
    assert torch.equal(copy.deepcopy(cut)(x), cut(x))  # a copy rebuilds its own C geometry
    with pytest.raises(ValueError, match="cuts fp32 maps of shape"):
        cut(torch.randn(1, cin, *size))


def test_a_kernel_larger_than_the_input_is_refused() -> None:
    with pytest.raises(ValueError, match="smaller than the kernel"):
        conv_patches(torch.randn(1, 1, 2, 2), (3, 3), (1, 1), (0, 0), (1, 1))


def _conv(weights: str, acts: str, padding=(1, 1), stride=(1, 1)) -> tuple[nn.Conv2d, QuantConv2d]:
    torch.manual_seed(1)
    conv = nn.Conv2d(6, 5, 3, stride=stride, padding=padding)
    qt = quantize(conv.weight.detach().reshape(5, -1), FORMATS[weights])
    return conv, QuantConv2d.from_float(conv, qt, ACT_FORMATS[acts])


@pytest.mark.parametrize("stride", [(1, 1), (2, 2)])
def test_binary_per_patch_activations_are_xnor_nets_k(stride) -> None:
    """XNOR-Net: a binary conv ≈ (sign(x) ⊛ sign(W)) ⊙ K·α with K the mean |x| over each output's receptive field
    (the channel mean of |x| box-filtered with zero padding). lowbit's per-token binary activations of a conv are
    exactly that, with the padding read as +1 by sign."""
    _, q = _conv("binary", "binary_token", stride=stride)
    x = torch.randn(2, 6, 7, 7)
    a = q.scale.reshape(1, -1, 1, 1)  # α: per-channel mean |w|
    signs = torch.where(x >= 0, 1.0, -1.0)
    pm1 = F.conv2d(F.pad(signs, (1, 1, 1, 1), value=1.0), torch.sign(q.weight), None, stride)
    k = F.avg_pool2d(x.abs().mean(1, keepdim=True), 3, stride, padding=1, count_include_pad=True)
    expected = pm1 * k * a + q.bias.reshape(1, -1, 1, 1)
    with torch.no_grad():
        assert torch.allclose(q(x), expected, atol=1e-5)


@pytest.mark.parametrize("acts", ["int8_token", "binary_token", "fp8_token"])
def test_per_token_conv_is_the_per_token_linear_layer_on_its_patches(acts: str) -> None:
    conv, q = _conv("int8", acts, padding="same")
    lin = QuantLinear.from_float(nn.Linear(54, 5), q.qweight(), ACT_FORMATS[acts])
    with torch.no_grad():
        lin.bias.copy_(conv.bias)
        x = torch.randn(3, 6, 5, 5)
        u, (oh, ow) = conv_patches(x, (3, 3), (1, 1), "same", (1, 1))
        assert torch.equal(q(x), patches_to_map(lin(u), oh, ow))


def test_per_tensor_activations_keep_the_plain_convolution() -> None:
    """Only per-token (dynamic) activation scales change meaning for a conv; weight-only layers are F.conv2d."""
    conv, q = _conv("int8", "int8_token")
    q.act = None
    x = torch.randn(2, 6, 7, 7)
    with torch.no_grad():
        assert not q.patch_tokens
        assert torch.equal(q(x), F.conv2d(x, q.weight, q.bias, padding=1))
