"""Static per-tensor int8 activations (calibrated scale and zero point) on the native kernels: the codes are made in
the kernel's C call from the quantizer's own range, shifted to signed bytes, and the zero point's constant term is
added back per output (`routes.route_for`, `layer.with_static_activations`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.formats import ACT_FORMATS, FORMATS
from lowbit.formats.spec import QuantSpec
from lowbit.kernels.dispatch import layer_report, use_mode
from lowbit.kernels.routes import route_for, static_weight_sums
from lowbit.recipe import Recipe, Stage

STATIC_SYMMETRIC = QuantSpec(kind="int", bits=8, symmetric=True, granularity="tensor")

CASES = [
    ("int8", "w8a8-static"),
    ("int4_g32", "w4a8-static"),
    ("int2_g64", "w2a8-static"),
    ("ternary_absmean", "ternary-static"),
    ("binary", "w1a8-static"),
]


def static_layer(weights: str, act: QuantSpec, k: int = 384, n: int = 96) -> tuple[nn.Module, nn.Module]:
    """A linear layer after a GELU (a skewed input: the zero point is far from 128), calibrated on inputs half as
    large as the test inputs, so codes clamp at both ends."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.GELU(), nn.Linear(k, n))
    recipe = Recipe(stages=(Stage(method="rtn", weights=FORMATS[weights], activations=act),))
    data = [torch.randn(16, k) * 0.5 for _ in range(2)]
    q = lowbit.compress(model, recipe, data=data, progress=False)
    return q, lowbit.pack(q)


def test_a_static_range_is_calibrated_and_asymmetric() -> None:
    q, _ = static_layer("int8", ACT_FORMATS["int8_static"])
    z = float(q[1].act.zero)
    assert 0 < z < 255 and z == round(z) and abs(z - 128) > 20  # a GELU's range: most codes on one side


@pytest.mark.parametrize(("weights", "kernel"), CASES)
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_native_output_matches_simulated(weights: str, kernel: str, rows: int) -> None:
    q, p = static_layer(weights, ACT_FORMATS["int8_static"])
    assert route_for(p[1]).kernel == kernel
    x = torch.randn(2, rows, 384)
    with torch.no_grad(), use_mode("native"):
        got = p(x)
    want = q(x).detach()
    assert layer_report(p[1])[0]["path"] == kernel
    assert float((got - want).abs().max()) <= 2e-5 * float(want.abs().max())


@pytest.mark.parametrize("k", [384, 100])  # 100: a row tail past the 8-lane quantizer loop
def test_symmetric_static_activations_take_the_route_too(k: int) -> None:
    q, p = static_layer("int8", STATIC_SYMMETRIC, k=k)
    assert q[1].act.zero is None and route_for(p[1]).kernel == "w8a8-static"
    x = torch.randn(5, k)
    with torch.no_grad(), use_mode("native"):
        got = p(x)
    want = q(x).detach()
    assert float((got - want).abs().max()) <= 2e-5 * float(want.abs().max())


@pytest.mark.parametrize("col", [7, 99])  # in the vector loop / in the row tail
def test_a_nan_row_gives_a_nan_output_row_only(col: int) -> None:
    q, p = static_layer("int8", ACT_FORMATS["int8_static"], k=100)
    x = torch.randn(3, 100)
    x[1, col] = float("nan")
    with torch.no_grad(), use_mode("native"):
        got = p(x)
    want = q(x).detach()
    assert bool(got[1].isnan().all()) and bool(want[1].isnan().all())
    keep = torch.tensor([0, 2])
    assert float((got[keep] - want[keep]).abs().max()) <= 2e-5 * float(want[keep].abs().max())


def test_a_range_calibrated_again_in_place_takes_effect() -> None:
    """The kernel reads the quantizer's scale and zero point on every call (not a copy made when it was prepared)."""
    q, p = static_layer("int8", ACT_FORMATS["int8_static"])
    x = torch.randn(4, 384)
    with torch.no_grad(), use_mode("native"):
        before = p(x)
        for m in (q, p):
            m[1].act.set_range(m[1].act.scale * 2, m[1].act.zero - 3)
        got = p(x)
    want = q(x).detach()
    assert not torch.allclose(before, got)
    assert float((got - want).abs().max()) <= 2e-5 * float(want.abs().max())


def test_the_kernel_applies_an_input_scale_before_the_static_quantizer() -> None:
    """SmoothQuant with static activations: ``x * scale`` then the calibrated range, in the same C call."""
    q, p = static_layer("int8", ACT_FORMATS["int8_static"])
    s = torch.rand(384, generator=torch.Generator().manual_seed(5)) + 0.5
    q[1].set_input_scale(s)
    p[1].set_input_scale(s)
    x = torch.randn(40, 384)
    want = q(x).detach()
    with torch.no_grad(), use_mode("native"):
        got = p(x)
    assert p[1]._dispatch.kernel_scales
    assert float((got - want).abs().max()) <= 2e-5 * float(want.abs().max())


def test_weight_sums_are_the_dequantized_rows_sums() -> None:
    w = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]])
    assert torch.equal(static_weight_sums(w), torch.tensor([-0.5, 0.0]))


@pytest.mark.usefixtures("auto_mode")
def test_static_presets_run_every_layer_natively_and_fast_paths_agree() -> None:
    """The ``w8a8-static`` preset on a small MLP: every linear layer routed, the decided (hot) call and the full
    path give the same output."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    data = [torch.randn(8, 64) for _ in range(3)]
    q = lowbit.compress(model, "w8a8-static", data=data, progress=False)
    p = lowbit.pack(q)
    assert all(route_for(p[i]).kernel == "w8a8-static" for i in (0, 2, 4))
    x = torch.randn(6, 64)
    want = q(x).detach()
    with torch.no_grad(), use_mode("native"):
        got = p(x)
    assert float((got - want).abs().max()) <= 2e-5 * float(want.abs().max())
    with torch.no_grad():
        for layer in (p[0], p[2], p[4]):
            layer._dispatch.decided[(6, torch.get_num_threads())] = True
        hot = p(x)
    assert torch.equal(hot, got)


CONV_CASES = [("int8", "w8a8-static"), ("ternary_absmean", "ternary-static"), ("int4_g32", "w4a8-static")]


def static_conv(weights: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.GELU(), nn.Conv2d(32, 16, 3, stride=(1, 2), padding=(1, 2), dilation=(2, 1)))
    recipe = Recipe(stages=(Stage(method="rtn", weights=FORMATS[weights], activations=ACT_FORMATS["int8_static"]),))
    q = lowbit.compress(model, recipe, data=[torch.randn(2, 32, 9, 10) * 0.5], progress=False)
    return q, lowbit.pack(q)


@pytest.mark.usefixtures("auto_mode")
@pytest.mark.parametrize(("weights", "kernel"), CONV_CASES)
def test_a_static_conv_runs_the_linear_kernel_on_its_patches(weights: str, kernel: str) -> None:
    """A static per-tensor range codes each patch as it codes the map (an integer zero point codes the padding's 0
    exactly): the conv runs its weights' kernel on its patches, equal to the simulated conv within fp32 rounding,
    one C call once decided; its reference path stays the simulated conv, bit for bit."""
    q, p = static_conv(weights)
    assert p[1].patch_kernel and not p[1].patch_tokens
    x = torch.randn(3, 32, 9, 10)
    x[2, 5, 0, 0] = float("nan")  # NaN outputs exactly where the conv reads it
    want = q(x).detach()
    with torch.no_grad(), use_mode("native"):
        got = p(x)
    assert route_for(p[1]).kernel == kernel and layer_report(p[1])[0]["path"] == kernel
    assert torch.equal(got.isnan(), want.isnan()) and bool(want[2].isnan().any()) and not bool(want[:2].isnan().any())
    ok = ~want.isnan()
    assert float((got[ok] - want[ok]).abs().max()) <= 2e-5 * float(want[ok].abs().max())
    with torch.no_grad():
        p(x)
        disp = p[1]._dispatch
        disp.decided = dict.fromkeys(disp.decided, True)
        disp.state = disp.state or disp.route.prepare(p[1])
        u = p[0](x)  # the conv's input
        hot = disp.hot_conv(p[1], u, p[1]._im2col[(u.shape, u.stride())])
        assert hot is not None and torch.equal(hot.isnan(), got.isnan()) and torch.equal(hot[ok], got[ok])
    with torch.no_grad(), use_mode("reference"):
        assert torch.equal(p(x).isnan(), want.isnan()) and torch.equal(p(x)[ok], want[ok])


@pytest.mark.usefixtures("auto_mode")
def test_a_static_conv_without_a_kernel_runs_the_map_conv_bit_for_bit() -> None:
    """Static convs go to their patches only for a native kernel: int6 weights (no route) keep the simulated conv,
    and a conv whose patches dispatch decided dense runs the map conv too (what dispatch races the kernel against)."""
    q, p = static_conv("int6")
    x = torch.randn(3, 32, 9, 10)
    want = q(x).detach()
    with torch.no_grad():
        assert route_for(p[1]) is None and torch.equal(p(x), want) and not p[1]._im2col
    q, p = static_conv("int8")
    with torch.no_grad():
        p(x)  # auto: measured once, then decided
        disp = p[1]._dispatch
        disp.decided = dict.fromkeys(disp.decided, False)
        assert torch.equal(p(x), q(x))
        with use_mode("native"):
            assert not torch.equal(p(x), q(x))  # (the kernel: equal within fp32 rounding only)


def test_the_kernel_follows_the_range_through_moves_and_loads() -> None:
    """The kernel reads a copy of the range the quantizer keeps in step, not the quantizer's buffers: moving them
    to shared memory or replacing them by a state-dict load leaves the kernel right."""
    q, p = static_layer("int8", ACT_FORMATS["int8_static"])
    x = torch.randn(4, 384)
    with torch.no_grad(), use_mode("native"):
        p(x)
        p.share_memory()
        torch.randn(1 << 16)  # allocations that would reuse freed memory
        want = q(x)
        assert float((p(x) - want).abs().max()) <= 2e-5 * float(want.abs().max())
        state = {"scale": q[1].act.scale * 1.5, "zero": q[1].act.zero + 2}
        for m in (q, p):
            m[1].act.load_state_dict(state, assign=True)
        want = q(x)
        assert float((p(x) - want).abs().max()) <= 2e-5 * float(want.abs().max())


def test_a_layer_calibrated_after_its_first_call_gets_its_route() -> None:
    _, p = static_layer("int8", ACT_FORMATS["int8_static"])
    scale, zero = p[1].act.scale.clone(), p[1].act.zero.clone()
    p[1].act.scale.fill_(float("nan"))  # as before calibration
    x = torch.randn(2, 384)
    with torch.no_grad(), use_mode("native"):
        with pytest.raises(lowbit.errors.ModelError, match="before calibration"):
            p(x)
        p[1].act.set_range(scale, zero)
        p(x)
    assert layer_report(p[1])[0]["path"] == "w8a8-static"


def test_a_static_zero_point_is_an_integer_code() -> None:
    q, _ = static_layer("int8", ACT_FORMATS["int8_static"])
    for bad in (q[1].act.zero + 0.4, torch.tensor(256.0), torch.tensor(-1.0)):
        with pytest.raises(lowbit.errors.ModelError, match="integer in \\[0, 255\\]"):
            q[1].act.set_range(q[1].act.scale, bad)
        with pytest.raises(lowbit.errors.ModelError, match="integer in \\[0, 255\\]"):  # a tampered checkpoint
            q[1].act.load_state_dict({"scale": q[1].act.scale, "zero": bad})


def test_kernel_copies_of_a_range_go_with_their_kernels() -> None:
    import gc

    from lowbit.nn.act import _KERNEL_RANGES

    q, _ = static_layer("int8", ACT_FORMATS["int8_static"])
    act = q[1].act
    copies = [act.kernel_range() for _ in range(3)]
    assert all(float(c[0]) == float(act.scale) and float(c[1]) == float(act.zero) for c in copies)
    del copies
    gc.collect()
    assert len(_KERNEL_RANGES[act]) == 0
