"""Convolutions with tiny patches (lb_conv's lane-per-output-position path): bit for bit the patch path's output."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from torch import nn

import lowbit
from lowbit.formats import ACT_FORMATS, FORMATS
from lowbit.kernels import native
from lowbit.kernels.dispatch import use_mode
from lowbit.recipe import Recipe, Stage

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler: lowbit uses the reference kernels"
)


def packed(conv: nn.Conv2d, weights: str, acts: str | None, x: torch.Tensor) -> nn.Module:
    torch.manual_seed(1)
    act_format = ACT_FORMATS[acts] if acts else None
    recipe = Recipe(stages=(Stage(method="rtn", weights=FORMATS[weights], activations=act_format),))
    return lowbit.pack(lowbit.compress(nn.Sequential(conv), recipe, data=[x], progress=False))[0]


def one_call_and_rows(layer: nn.Module, x: torch.Tensor, threads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """lb_conv's output (what a decided call runs) and the patch path's: patches cut in C, the kernel on their rows
    (``lb_linear``), then the map."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            with use_mode("native"):
                rows_then_map = layer(x)
            state = layer._dispatch.state
            cut = layer._im2col[(x.shape, x.stride())]
            direct = torch.empty(cut.map_shape)
            bias = 0 if layer.bias is None else layer.bias.data_ptr()
            rc = native._need().lb_conv(
                state.addr, x.data_ptr(), cut.geometry, direct.data_ptr(), threads, bias or None
            )
    finally:
        torch.set_num_threads(old)
    assert rc == 0
    return direct, rows_then_map


GEOMETRIES = [  # (in channels, out channels, kernel, stride, padding, dilation, input H x W): C·KH·KW <= 32
    (1, 32, 3, 1, 1, 1, (8, 8)),  # digits-cnn's first conv
    (1, 16, 3, 1, 1, 1, (9, 13)),  # output rows of 13: a partial block of lanes
    (3, 24, 3, 1, 1, 1, (11, 20)),  # RGB, 27-value patches
    (1, 8, 5, (2, 1), 2, 1, (12, 9)),  # vertical stride 2
    (2, 8, (3, 2), 1, (0, 1), (2, 3), (10, 17)),  # dilation, uneven padding
    (32, 8, 1, 1, 0, 1, (5, 7)),  # 1x1 on 32 channels: the largest patch
    (1, 5, 2, 1, 0, 1, (3, 3)),  # a 2x2 output: lanes mostly idle
]


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize(
    ("weights", "acts"),
    [("int8", "int8_token"), ("ternary_absmean", "int8_token"), ("binary", "int8_token"), ("int8", "int8_static")],
)
def test_tiny_patch_conv_equals_the_patch_path_bit_for_bit(geometry, weights: str, acts: str) -> None:
    c, o, k, stride, pad, dil, (h, w) = geometry
    torch.manual_seed(0)
    x = torch.randn(3, c, h, w)
    layer = packed(nn.Conv2d(c, o, k, stride=stride, padding=pad, dilation=dil), weights, acts, x)
    x[1, 0, h // 2, w // 2] = float("nan")  # NaN patches: NaN in every channel where a patch reads it
    x[2, c - 1, 1, 2] = float("inf")  # (dynamic: the largest scale; static: a clamped code)
    for threads in (1, 2):
        direct, rows = one_call_and_rows(layer, x, threads)
        assert bool(direct.isnan().any()) and not bool(direct[0].isnan().any())
        torch.testing.assert_close(direct, rows, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("weights", ["fp8_e4m3", "fp8_e5m2"])
def test_tiny_patch_fp8_conv_equals_the_patch_path_up_to_summation_order(geometry, weights: str) -> None:
    """FP8 weights with per-patch FP8 activations: each patch's codes on the E4M3 grid (a NaN input is the largest
    code: finite outputs, as on the patch path and in the simulated layer) times the weights' FP8 values, summed in
    fp32 in another order than the patch path's kernel."""
    c, o, k, stride, pad, dil, (h, w) = geometry
    torch.manual_seed(0)
    x = torch.randn(3, c, h, w) * torch.exp(torch.randn(3, 1, 1, 1) * 4)
    conv = nn.Conv2d(c, o, k, stride=stride, padding=pad, dilation=dil)
    layer = packed(conv, weights, "fp8_token", x)
    x[1, 0, h // 2, w // 2] = float("nan")
    x[2, c - 1, 1, 2] = float("inf")
    for threads in (1, 2):
        direct, rows = one_call_and_rows(layer, x, threads)
        assert not bool(direct.isnan().any())
        for n in range(3):  # image by image: image 2's infinite input makes huge outputs where it lies
            assert float((direct[n] - rows[n]).abs().max()) <= 2e-5 * float(rows[n].abs().max())


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("weights", ["int8", "binary", "fp8_e4m3"])
def test_tiny_patch_weight_only_conv_equals_the_patch_path_up_to_summation_order(geometry, weights: str) -> None:
    """Weight-only layers (fp32 inputs) take the lane-per-position loop with their patches' values as they are:
    the fp32 patch path's output up to summation order; a NaN input gives NaN where a patch reads it and an infinite
    one infinite (or NaN) outputs, as on the patch path."""
    c, o, k, stride, pad, dil, (h, w) = geometry
    torch.manual_seed(0)
    x = torch.randn(3, c, h, w) * torch.exp(torch.randn(3, 1, 1, 1) * 4)
    layer = packed(nn.Conv2d(c, o, k, stride=stride, padding=pad, dilation=dil), weights, None, x)
    x[1, 0, h // 2, w // 2] = float("nan")
    x[2, c - 1, 1, 2] = float("inf")
    for threads in (1, 2):
        direct, rows = one_call_and_rows(layer, x, threads)
        assert bool(direct[1].isnan().any()) and not bool(direct[0].isnan().any())
        assert torch.equal(direct.isnan(), rows.isnan()) and torch.equal(direct.isinf(), rows.isinf())
        for n in range(3):
            finite, inf = direct[n].isfinite(), direct[n].isinf()
            assert torch.equal(direct[n][inf], rows[n][inf])  # (same signs)
            if finite.any():  # (image 2 of a 2x2 output may have none)
                scale = float(rows[n][finite].abs().max())
                assert float((direct[n][finite] - rows[n][finite]).abs().max()) <= 2e-5 * scale


def test_tiny_patch_fp8_conv_decodes_subnormal_weights() -> None:
    """Weights far below their channel's largest one are E4M3 subnormals: with the largest ones on an input channel
    that is all zeros, the output is theirs alone, and equals the simulated layer's."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight[:, 0] = 1.0  # the channels' largest weights: scale 1 / 448
        conv.weight[:, 1] = torch.rand(4, 3, 3) * 2.0**-6 / 448 * torch.tensor([1.0, -1.0]).repeat(18)[:9].view(3, 3)
    x = torch.randn(3, 2, 8, 8)
    x[:, 0] = 0.0
    recipe = Recipe(stages=(Stage(method="rtn", weights=FORMATS["fp8_e4m3"], activations=ACT_FORMATS["fp8_token"]),))
    simulated = lowbit.compress(nn.Sequential(conv), recipe, progress=False)
    layer = lowbit.pack(simulated)[0]
    direct, _ = one_call_and_rows(layer, x, 1)
    want = simulated(x).detach()
    assert float(want.abs().max()) > 0
    assert float((direct - want).abs().max()) <= 2e-5 * float(want.abs().max())


def test_tiny_patch_conv_reads_any_input_layout_and_no_bias() -> None:
    """Channels-last and sliced inputs are read through their strides; a conv without bias adds none."""
    torch.manual_seed(0)
    base = torch.randn(4, 3, 12, 16)
    layer = packed(nn.Conv2d(3, 16, 3, padding=1, bias=False), "int8", "int8_token", base)
    for x in (base.to(memory_format=torch.channels_last), base[:, :, 1:11, 2:15]):
        direct, rows = one_call_and_rows(layer, x, 1)
        torch.testing.assert_close(direct, rows, rtol=0, atol=0)
        want = torch.nn.functional.conv2d(x, layer.weight, None, padding=1)  # the dequantized weight in fp32
        assert float((direct - want).abs().max()) <= 0.05 * float(want.abs().max())  # int8 activation rounding


@pytest.mark.usefixtures("auto_mode")
def test_tiny_patch_conv_is_the_decided_call() -> None:
    """In auto mode a conv decided native runs lb_conv: the same output as the patch path, bit for bit."""
    torch.manual_seed(0)
    x = torch.randn(32, 1, 8, 8)
    layer = packed(nn.Conv2d(1, 32, 3, padding=1), "int8", "int8_token", x)
    direct, rows = one_call_and_rows(layer, x, 1)
    with torch.no_grad():
        layer(x)
        disp = layer._dispatch
        disp.decided = dict.fromkeys(disp.decided, True)
        disp.state = disp.state or disp.route.prepare(layer)
        assert disp.hot_conv(layer, x, layer._im2col[(x.shape, x.stride())]) is not None
        assert torch.equal(layer(x), direct) and torch.equal(direct, rows)
