"""GPTQ's defining properties (methods.md G4)."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import DataError
from lowbit.formats import FORMATS, QuantSpec, dequantize, quantize
from lowbit.methods.ptq.gptq_math import gptq_quantize, reconstruction_error


def _correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d // 4, generator=g)
    mix = torch.randn(d // 4, d, generator=g)
    return base @ mix + 0.1 * torch.randn(n, d, generator=g)


@pytest.mark.parametrize(
    "name", ["int4", "int4_g32", "int3_g64", "int2_g64", "int8", "ternary_tbt", "binary", "fp4_e2m1"]
)
def test_identity_hessian_equals_rtn(name: str) -> None:
    w = torch.randn(16, 128)
    spec = FORMATS[name]
    qt, rtn = gptq_quantize(w, torch.eye(128), spec), quantize(w, spec)
    assert torch.equal(qt.codes, rtn.codes)
    assert torch.equal(qt.scale, rtn.scale)


@pytest.mark.parametrize("name", ["int4", "int4_g32", "int3_g64", "int2_g64"])
@pytest.mark.parametrize("act_order", [False, True])
def test_error_below_rtn_on_correlated_inputs(name: str, act_order: bool) -> None:
    torch.manual_seed(0)
    x = _correlated_inputs(2048, 128)
    w = torch.randn(32, 128)
    h = 2 * x.double().T @ x.double() / x.shape[0]
    spec = FORMATS[name]
    err_gptq = reconstruction_error(w, dequantize(gptq_quantize(w, h, spec, act_order=act_order, block_size=32)), x)
    err_rtn = reconstruction_error(w, dequantize(quantize(w, spec)), x)
    assert err_gptq < err_rtn


def test_act_order_permutation_is_undone() -> None:
    # A near-lossless grid: weights already on the int8 grid of their rows, so any correct sweep reproduces them.
    torch.manual_seed(1)
    spec = FORMATS["int8"]
    w = dequantize(quantize(torch.randn(8, 64), spec))
    x = _correlated_inputs(512, 64)
    h = 2 * x.double().T @ x.double() / 512
    a = gptq_quantize(w, h, spec, act_order=True)
    b = gptq_quantize(w, h, spec, act_order=False)
    assert torch.equal(a.codes, b.codes)
    assert torch.allclose(dequantize(a), w, atol=1e-6)


def test_static_groups_with_act_order_and_group_scales_in_place() -> None:
    torch.manual_seed(2)
    spec = QuantSpec(kind="int", bits=4, symmetric=False, granularity="group", group_size=16)
    x = _correlated_inputs(512, 64)
    h = 2 * x.double().T @ x.double() / 512
    w = torch.randn(8, 64)
    qt = gptq_quantize(w, h, spec, act_order=True)
    assert torch.equal(qt.scale, quantize(w, spec).scale)  # static groups = RTN's group params
    assert reconstruction_error(w, dequantize(qt), x) < reconstruction_error(w, dequantize(quantize(w, spec)), x)


def test_dead_columns_and_degenerate_hessians() -> None:
    x = _correlated_inputs(256, 32)
    x[:, 5] = 0.0  # a dead input
    h = 2 * x.double().T @ x.double() / 256
    qt = gptq_quantize(torch.randn(4, 32), h, FORMATS["int4"])
    assert torch.isfinite(dequantize(qt)).all() and torch.all(dequantize(qt)[:, 5] == 0)
    rank1 = torch.ones(32, 32, dtype=torch.float64)  # singular: handled by damping
    assert torch.isfinite(dequantize(gptq_quantize(torch.randn(4, 32), rank1, FORMATS["int4"]))).all()
    with pytest.raises(DataError, match="NaN"):
        gptq_quantize(torch.randn(4, 32), torch.full((32, 32), float("nan"), dtype=torch.float64), FORMATS["int4"])


@pytest.mark.parametrize(("name", "act_order"), [("int3_g64", True), ("int2_g64", True), ("int4", False)])
def test_mse_range_search_applies_to_parameters_fitted_up_front(name: str, act_order: bool) -> None:
    """Regression: static-group and per-channel fits must honour ``mse`` too (they once ignored it)."""
    from lowbit.formats import integer
    from lowbit.formats.layout import to_units

    torch.manual_seed(3)
    w = torch.randn(16, 128)
    spec = FORMATS[name]
    s, z = integer.fit_mse(to_units(w, spec.granularity, spec.group_size), bits=spec.bits, symmetric=spec.symmetric)
    qt = gptq_quantize(w, torch.eye(128), spec, act_order=act_order, mse=True)  # H = I: no error feedback
    assert torch.equal(qt.scale, s.squeeze(-1))
    assert not torch.equal(qt.scale, quantize(w, spec).scale)
