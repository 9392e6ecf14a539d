"""Each backward rule equals its closed form (autograd vs formula; finite differences for LSQ's step)."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.quantizers import binarizers as B
from lowbit.quantizers.lsq import lsq_init_step, lsq_quantize, pact_quantize
from lowbit.quantizers.ste import clipped_round, clipped_sign, round_ste

X = torch.linspace(-2.5, 2.5, 1001, dtype=torch.float64)


def _grad(fn, x: torch.Tensor = X) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    fn(x).sum().backward()
    return x.grad


def test_ste_family() -> None:
    assert torch.equal(_grad(round_ste), torch.ones_like(X))
    assert torch.equal(_grad(clipped_sign), (X.abs() <= 1).double())
    assert torch.equal(_grad(lambda x: clipped_round(x, -2, 1)), ((X >= -2) & (X <= 1)).double())


@pytest.mark.parametrize(
    "fn", [B.bnn_sign, B.approx_sign, B.triangle_sign, lambda x: B.reste_sign(x, 2.0), lambda x: B.biper_sign(x, 20.0)]
)
def test_binarizers_output_pm1(fn) -> None:
    assert set(fn(X).unique().tolist()) == {-1.0, 1.0}


def test_approx_sign_closed_form() -> None:
    expected = torch.where((X >= -1) & (X < 0), 2 + 2 * X, torch.where((X >= 0) & (X < 1), 2 - 2 * X, 0 * X))
    assert torch.allclose(_grad(B.approx_sign), expected)
    g = _grad(B.approx_sign, torch.tensor([-0.5, 0.5], dtype=torch.float64))
    assert g.tolist() == [1.0, 1.0]


def test_reste_exponent_one_is_clipped_ste() -> None:
    assert torch.allclose(_grad(lambda x: B.reste_sign(x, 1.0, t=1.5)), (X.abs() <= 1.5).double())


def test_reste_power_rule_finite_and_monotone() -> None:
    o = 3.0
    g = _grad(lambda x: B.reste_sign(x, o))
    assert torch.isfinite(g).all()
    a = X.abs()
    mid = (a > 0.1) & (a <= 1.5)
    assert torch.allclose(g[mid], (1 / o) * a[mid] ** ((1 - o) / o))
    assert torch.allclose(g[a <= 0.1], torch.full_like(g[a <= 0.1], 0.1 ** (1 / o) / 0.1))
    pos = X[mid & (X > 0)]
    gp = g[mid & (X > 0)]
    assert torch.all(gp[1:] <= gp[:-1] + 1e-12) and pos.numel() > 10  # decreasing in |x| for o > 1
    assert B.reste_exponent(0, 10) == 1.0 and math.isclose(B.reste_exponent(10, 10), 3.0)


def test_biper_periodic_and_gradient() -> None:
    w0 = 20.0
    x = torch.rand(500, dtype=torch.float64) * 2 - 1
    assert torch.equal(B.biper_sign(x, w0), B.biper_sign(x + 2 * math.pi / w0, w0)) or (
        (B.biper_sign(x, w0) != B.biper_sign(x + 2 * math.pi / w0, w0)).float().mean() < 0.01
    )
    assert torch.allclose(_grad(lambda v: B.biper_sign(v, w0), x), w0 * torch.cos(w0 * x))
    assert not torch.equal(B.biper_sign(x, w0), torch.sign(x))  # unlike sign(), both signs map to both values


def test_xnor_scale_is_l2_optimal() -> None:
    w = torch.randn(6, 40, dtype=torch.float64)
    a = B.xnor_scale(w)
    s = torch.sign(w)
    for factor in (0.9, 0.99, 1.01, 1.1):
        assert ((w - a * s) ** 2).sum() < ((w - a * factor * s) ** 2).sum()


def test_two_plane_error_below_single_plane() -> None:
    w = torch.randn(16, 64)
    single = B.xnor_scale(w) * torch.sign(w)
    two = B.two_plane_binarize(w)
    assert ((w - two) ** 2).sum() < ((w - single) ** 2).sum()


def test_ternary_values_and_ste() -> None:
    w = torch.randn(8, 32, requires_grad=True)
    q = B.ternary_ste(w)
    g = q.detach().abs().max()
    assert set((q.detach() / g).round().unique().tolist()) <= {-1.0, 0.0, 1.0}
    q.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_lsq_step_gradient_matches_finite_differences() -> None:
    torch.manual_seed(0)
    v = torch.randn(200, dtype=torch.float64) * 2
    s = torch.tensor(0.31, dtype=torch.float64, requires_grad=True)
    lsq_quantize(v, s, bits=3, grad_scale_factor=1.0).sum().backward()
    qn, qp = 4, 3
    r = v / s.detach()
    expected = torch.where(
        r < -qn, -qn * torch.ones_like(v), torch.where(r > qp, qp * torch.ones_like(v), -r + torch.round(r))
    ).sum()
    assert torch.isclose(s.grad, expected)
    # Finite differences of the STE surrogate s·clip(v/s) + s·c, with the rounding residual c frozen at s0:
    # its exact derivative is what LSQ's backward rule claims.
    r0 = (v / 0.31).clamp(-qn, qp)
    c = torch.round(r0) - r0
    eps = 1e-6

    def surrogate(st: float) -> torch.Tensor:
        return (st * (v / st).clamp(-qn, qp) + st * c).sum()

    fd = (surrogate(0.31 + eps) - surrogate(0.31 - eps)) / (2 * eps)
    assert torch.isclose(fd, s.grad, rtol=1e-5)


def test_lsq_init_and_gradient_scale() -> None:
    v = torch.randn(4096)
    s0 = lsq_init_step(v, bits=4)
    assert torch.isclose(s0, 2 * v.abs().mean() / math.sqrt(7))
    s1 = s0.clone().requires_grad_(True)
    s2 = s0.clone().requires_grad_(True)
    lsq_quantize(v, s1, bits=4).sum().backward()
    lsq_quantize(v, s2, bits=4, grad_scale_factor=1.0).sum().backward()
    assert torch.isclose(s1.grad, s2.grad / math.sqrt(4096 * 7))  # scaled exactly once


def test_pact_alpha_gradient() -> None:
    x = torch.linspace(-1, 3, 101, dtype=torch.float64)
    alpha = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    y = pact_quantize(x, alpha, bits=8)
    assert y.min() >= 0 and y.max() <= 2.0
    y.sum().backward()
    # d/dα of clip: 1 where x ≥ α; plus the (STE) term of the scale, zero on average for fine grids
    assert abs(alpha.grad.item() - (x >= 2.0).sum().item()) < 1.0
