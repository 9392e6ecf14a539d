"""Property tests generated from the format registry: every named format gets all of them."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.formats import FORMATS, QuantSpec, dequantize, expand_params, fake_quantize, quantize
from lowbit.formats.lowfloat import grid, layout, round_to_format

torch.manual_seed(0)
NAMES = sorted(FORMATS)


def _weights(rows: int = 16, cols: int = 200, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[0, :] = 0.0  # an all-zero row / group must not produce NaN
    w[1, :] = 0.02  # a constant row
    return w


@pytest.mark.parametrize("name", NAMES)
def test_roundtrip_is_finite_and_shapes_hold(name: str) -> None:
    spec = FORMATS[name]
    w = _weights()
    qt = quantize(w, spec)
    w_hat = dequantize(qt)
    assert w_hat.shape == w.shape
    assert torch.isfinite(w_hat).all()
    assert torch.all(w_hat[0] == 0) or spec.kind == "binary"  # zero row stays zero except sign-only binary
    assert qt.storage_bits() >= w.numel() * spec.bits


@pytest.mark.parametrize("name", [n for n in NAMES if FORMATS[n].kind == "int"])
def test_int_roundtrip_within_half_step(name: str) -> None:
    spec = FORMATS[name]
    w = _weights()
    qt = quantize(w, spec)
    scale, zero = expand_params(qt)
    err = (dequantize(qt) - w).abs()
    # Inside the representable range the error is at most half a step (plus float rounding).
    qmin, qmax = (-(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1) if spec.symmetric else (0, 2**spec.bits - 1)
    z = zero if zero is not None else torch.zeros_like(scale)
    lo, hi = (qmin - z) * scale, (qmax - z) * scale
    inside = (w >= lo - scale / 2) & (w <= hi + scale / 2)
    assert inside.float().mean() > 0.99
    assert torch.all(err[inside] <= scale[inside] / 2 + 1e-6)
    if spec.symmetric:
        assert torch.equal(dequantize(quantize(torch.zeros(3, 64), spec)), torch.zeros(3, 64))
        w2 = w.clone()
        w2[5, ::3] = 0.0
        assert torch.all(dequantize(quantize(w2, spec))[5, ::3] == 0)


@pytest.mark.parametrize("name", [n for n in NAMES if FORMATS[n].kind == "int"])
def test_int_codes_in_range(name: str) -> None:
    spec = FORMATS[name]
    qt = quantize(_weights() * 7, spec)
    c = qt.codes.long()
    if spec.symmetric:
        assert c.min() >= -(2 ** (spec.bits - 1)) and c.max() <= 2 ** (spec.bits - 1) - 1
    else:
        assert c.min() >= 0 and c.max() <= 2**spec.bits - 1


def test_granularity_mse_ordering_on_heavy_tailed_weights() -> None:
    w = torch.distributions.StudentT(3.0).sample((64, 512))
    mse = {}
    for gran, g in (("tensor", None), ("channel", None), ("group", 64)):
        spec = QuantSpec(kind="int", bits=4, symmetric=True, granularity=gran, group_size=g)
        mse[gran] = ((dequantize(quantize(w, spec)) - w) ** 2).mean().item()
    assert mse["group"] < mse["channel"] < mse["tensor"]


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "e3m2", "e2m3", "e2m1"])
def test_fp_rounding_is_nearest_grid_value(fmt: str) -> None:
    g = grid(fmt)
    v = (torch.rand(5000) * 2 - 1) * g.max() * 1.2
    r = round_to_format(v, fmt)
    dist = (v[:, None].clamp(g.min(), g.max()) - g[None, :]).abs()
    best = dist.min(dim=1).values
    assert torch.allclose((r - v.clamp(g.min(), g.max())).abs(), best, atol=1e-6)
    assert set(r.unique().tolist()) <= set(g.tolist())


def test_fp_known_grids() -> None:
    assert layout("e4m3").max_value == 448.0
    assert layout("e5m2").max_value == 57344.0
    assert layout("e3m2").max_value == 28.0
    assert layout("e2m3").max_value == 7.5
    assert layout("e2m1").max_value == 6.0
    assert len(grid("e2m1")) == 15  # ±{0.5..6} and a single zero


@pytest.mark.parametrize(("fmt", "dtype"), [("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)])
def test_fp8_matches_torch_cast(fmt: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    m = layout(fmt).max_value
    v = torch.cat(
        [
            torch.randn(20000, generator=g) * 3,
            (torch.rand(2000, generator=g) * 2 - 1) * m,
            torch.randn(2000, generator=g) * 1e-3,
        ]
    )
    assert torch.equal(round_to_format(v, fmt), v.to(dtype).float())


@pytest.mark.parametrize(
    ("method", "dist", "expected"),
    [
        ("absmean", "normal", 0.310),
        ("absmedian", "normal", 0.264),
        ("absmean", "laplace", 1 - math.exp(-0.5)),
        ("absmedian", "laplace", 1 - math.exp(-0.5 * math.log(2))),
    ],
)
def test_ternary_zero_fraction_closed_form(method: str, dist: str, expected: float) -> None:
    gen = torch.Generator().manual_seed(3)
    if dist == "normal":
        w = torch.randn(1000, 1000, generator=gen)
    else:
        u = torch.rand(1000, 1000, generator=gen) - 0.5
        w = -torch.sign(u) * torch.log1p(-2 * u.abs())
    qt = quantize(w, QuantSpec(kind="ternary", bits=2, scale_method=method, granularity="tensor"))
    assert set(qt.codes.unique().tolist()) <= {-1, 0, 1}
    assert abs((qt.codes == 0).float().mean().item() - expected) < 0.003


def test_binary_scale_is_l2_optimal() -> None:
    w = torch.randn(8, 300)
    qt = quantize(w, FORMATS["binary"])
    assert set(qt.codes.unique().tolist()) == {-1, 1}
    for r in range(8):
        a = qt.scale[r, 0]
        b = torch.where(w[r] >= 0, 1.0, -1.0)
        grid_a = torch.linspace(0.5, 1.5, 201) * a
        errs = ((w[r][None, :] - grid_a[:, None] * b[None, :]) ** 2).sum(1)
        assert errs.argmin().item() == 100  # the analytic scale is the best on the grid (a·1.0)


def test_fake_quantize_per_token_matches_rowwise_quantize() -> None:
    x = torch.randn(2, 5, 32)
    spec = QuantSpec(kind="int", bits=8, symmetric=True, granularity="token", dynamic=True)
    y = fake_quantize(x, spec)
    assert ((y - x).abs().reshape(-1, 32).max(1).values <= x.reshape(-1, 32).abs().max(1).values / 254 + 1e-6).all()


def test_group_padding_does_not_change_results() -> None:
    w = torch.randn(4, 100)
    spec = QuantSpec(kind="int", bits=4, symmetric=False, granularity="group", group_size=64)
    qt = quantize(w, spec)
    assert qt.scale.shape == (4, 2)
    # the second (partial) group equals quantizing those 36 columns alone
    alone = quantize(w[:, 64:], QuantSpec(kind="int", bits=4, symmetric=False, granularity="channel"))
    assert torch.equal(dequantize(qt)[:, 64:], dequantize(alone))
