"""`lowbit.kernels.layer.linear`: any leading dimensions, any input layout, fp32 output under any default dtype."""

from __future__ import annotations

import pytest
import torch

from lowbit.kernels import layer, native

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels unavailable on this machine")


@pytest.fixture()
def w8() -> layer.NativeLinear:
    torch.manual_seed(0)
    p = native.prepare_w8(torch.randint(-127, 128, (24, 40), dtype=torch.int8), torch.rand(24) + 0.5)
    return layer.describe(p, "int8", min_scale=2.0**-20)


def test_leading_dimensions_are_rows(w8: layer.NativeLinear) -> None:
    x = torch.randn(2, 3, 40)
    bias = torch.randn(24)
    y = layer.linear(w8, x, bias=bias)
    assert y.shape == (2, 3, 24)
    assert torch.equal(y.reshape(6, 24), layer.linear(w8, x.reshape(6, 40), bias=bias))


def test_non_contiguous_and_double_inputs(w8: layer.NativeLinear) -> None:
    x = torch.randn(40, 5).t()  # (5, 40), column-major
    ref = layer.linear(w8, x.contiguous())
    assert torch.equal(layer.linear(w8, x), ref)
    assert torch.equal(layer.linear(w8, x.contiguous().double()), ref)


def test_output_is_fp32_whatever_the_default_dtype(w8: layer.NativeLinear) -> None:
    x = torch.randn(3, 40)
    ref = layer.linear(w8, x)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        y = layer.linear(w8, x)
    finally:
        torch.set_default_dtype(old)
    assert y.dtype == torch.float32 and torch.equal(y, ref)


def test_wrong_width_is_refused(w8: layer.NativeLinear) -> None:
    with pytest.raises(ValueError, match=r"expects \(\.\.\., 40\)"):
        layer.linear(w8, torch.randn(3, 41))
    with pytest.raises(ValueError, match="expects"):
        layer.linear(w8, torch.tensor(1.0))


def test_other_c_entries_write_fp32_buffers_whatever_the_default_dtype() -> None:
    """The fp32 panels, attention and the one-value bias conversion allocate fp32 outputs under a float64 default
    (they wrote fp32 into a float64 buffer before: garbage)."""
    from lowbit.kernels import attention, panels

    if attention.sdpa is None:
        pytest.skip("no attention kernel")
    g = torch.Generator().manual_seed(0)
    p = panels.prepare_panels(torch.randint(-127, 128, (20, 64), generator=g), torch.rand(20, generator=g))
    x = torch.randn(5, 64, generator=g)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=g) for _ in range(3))
    ref_p, ref_a = panels.matmul_f32_panel(x, p), attention.sdpa(q, k, v)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        y_p, y_a = panels.matmul_f32_panel(x, p), attention.sdpa(q, k, v)
    finally:
        torch.set_default_dtype(old)
    assert y_p.dtype == y_a.dtype == torch.float32
    assert torch.equal(y_p, ref_p) and torch.equal(y_a, ref_a)


def test_a_one_value_bias_of_any_rank_is_broadcast(w8: layer.NativeLinear) -> None:
    x = torch.randn(3, 40)
    want = layer.linear(w8, x, bias=torch.full((24,), 0.5))
    for b in (torch.tensor(0.5), torch.tensor([0.5]), torch.tensor([[0.5]])):
        assert torch.equal(layer.linear(w8, x, bias=b), want)
    with pytest.raises(ValueError, match="bias of 5 values"):
        layer.linear(w8, x, bias=torch.zeros(5))
