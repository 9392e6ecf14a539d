"""AWQ, SmoothQuant and HQQ: the properties methods.md and issue 3 name."""

from __future__ import annotations

import pytest
import torch

from lowbit.formats import ACT_FORMATS, FORMATS, QuantSpec, dequantize, fake_quantize, quantize
from lowbit.formats.layout import to_units
from lowbit.kernels.dispatch import use_mode
from lowbit.methods.ptq.awq_math import awq_clip_search, awq_scale_search
from lowbit.methods.ptq.hqq_math import hqq_quantize, is_flat
from lowbit.methods.ptq.smoothquant_math import smooth_scales


def _outlier_inputs(n: int = 1024, d: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, :4] *= 30.0  # a few large-magnitude channels, as in transformer activations
    return x


@pytest.mark.parametrize("name", ["int4_g32", "int3_g64", "int2_g64"])
def test_awq_not_worse_than_rtn_and_better_with_outliers(name: str) -> None:
    torch.manual_seed(0)
    x, w = _outlier_inputs(), torch.randn(64, 128)
    s, qts, errors = awq_scale_search([w], x, FORMATS[name])
    assert errors["best"] <= errors["rtn"]
    out_awq = (x / s) @ dequantize(qts[0]).T
    out_rtn = x @ dequantize(quantize(w, FORMATS[name])).T
    ref = x @ w.T
    assert ((out_awq - ref) ** 2).mean() < ((out_rtn - ref) ** 2).mean()


def test_awq_scaling_is_exact_in_float() -> None:
    x, w = _outlier_inputs(), torch.randn(64, 128)
    s, _, _ = awq_scale_search([w], x, FORMATS["int4_g32"])
    assert torch.allclose((x / s) @ (w * s).T, x @ w.T, rtol=1e-4, atol=1e-3)


def test_awq_clip_not_worse_than_rtn() -> None:
    x, w = _outlier_inputs(), torch.randn(64, 128)
    spec = FORMATS["int3_g64"]
    qt = awq_clip_search(w, x, spec)
    ref = x @ w.T
    assert ((x @ dequantize(qt).T - ref) ** 2).mean() <= ((x @ dequantize(quantize(w, spec)).T - ref) ** 2).mean()


def test_smoothquant_invariance_and_balance() -> None:
    x, w = _outlier_inputs(), torch.randn(64, 128)
    s = smooth_scales(x.abs().amax(0), [w], alpha=0.5)
    assert torch.allclose((x / s) @ (w * s).T, x @ w.T, rtol=1e-4, atol=1e-2)
    assert torch.allclose((x / s).abs().amax(0), (w * s).abs().amax(0), rtol=1e-4)


def test_smoothquant_lowers_w8a8_error_with_outlier_channels() -> None:
    x, w = _outlier_inputs(), torch.randn(64, 128) * 0.1
    act = QuantSpec(kind="int", bits=8, symmetric=True, granularity="tensor", dynamic=True)
    ref = x @ w.T

    def w8a8(xx: torch.Tensor, ww: torch.Tensor) -> torch.Tensor:
        return fake_quantize(xx, act) @ dequantize(quantize(ww, FORMATS["int8"])).T

    s = smooth_scales(x.abs().amax(0), [w], alpha=0.5)
    assert ((w8a8(x / s, w * s) - ref) ** 2).mean() < ((w8a8(x, w) - ref) ** 2).mean() / 2


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_hqq_weight_error_not_worse_than_rtn(bits: int) -> None:
    w = torch.randn(64, 256) * 0.02
    w[::7, ::11] *= 8  # heavy tails
    spec = QuantSpec(kind="int", bits=bits, symmetric=False, granularity="group", group_size=64)
    err = {
        k: float(((dequantize(q) - w) ** 2).sum())
        for k, q in (("hqq", hqq_quantize(w, spec)), ("rtn", quantize(w, spec)))
    }
    assert err["hqq"] <= err["rtn"]
    with pytest.raises(ValueError):
        hqq_quantize(w, FORMATS["int4"])


def test_hqq_real_zero_points_lower_error_than_integer_ones_and_pack_exactly() -> None:
    import lowbit
    from lowbit.nn.packed import zero_format_of

    torch.manual_seed(0)
    w = torch.randn(32, 128) * 0.05
    spec = FORMATS["int3_g64"]
    err = {
        flag: float((dequantize(hqq_quantize(w, spec, integer_zero=flag)) - w).abs().pow(2.4).sum())
        for flag in (True, False)
    }
    assert err[False] < err[True]
    m = torch.nn.Sequential(torch.nn.Linear(128, 32))
    q = lowbit.compress(m, "w3g64-hqq", progress=False)
    assert zero_format_of(q[0]) == "fp16"  # real-valued zero points survive packing at fp16
    x = torch.randn(4, 128)
    with use_mode("reference"):  # exactness of the packed storage; auto dispatch may pick the native kernel by timing
        assert torch.equal(lowbit.pack(q)(x), q(x))


def test_hqq_grid_follows_the_shape_of_the_weights() -> None:
    g = torch.Generator().manual_seed(0)
    flat = torch.rand(64, 256, generator=g) - 0.5  # a uniform initialisation, barely trained
    bell = torch.randn(64, 256, generator=g)
    heavy = torch.distributions.Laplace(0.0, 1.0).sample((64, 256))
    assert is_flat(to_units(flat, "group", 64))
    assert not is_flat(to_units(bell, "group", 64)) and not is_flat(to_units(heavy, "group", 64))
    spec = FORMATS["int3_g64"]
    for w, search in ((flat, False), (bell, True)):
        assert torch.equal(dequantize(hqq_quantize(w, spec)), dequantize(hqq_quantize(w, spec, range_search=search)))
    with pytest.raises(ValueError, match="range_search"):
        hqq_quantize(flat, spec, range_search="sometimes")


def test_hqq_flat_grid_is_min_max_with_a_real_zero_point_and_iterations_only_lower_its_error() -> None:
    torch.manual_seed(0)
    w = torch.rand(16, 128) - 0.3
    spec = FORMATS["int3_g64"]
    u = to_units(w, "group", 64)
    step = (u.amax(-1) - u.amin(-1)) / 7

    def extremes_off(qt: object) -> torch.Tensor:
        v = to_units(dequantize(qt), "group", 64)
        return torch.maximum((v.amax(-1) - u.amax(-1)).abs(), (v.amin(-1) - u.amin(-1)).abs()) / step

    start = hqq_quantize(w, spec, range_search=False, iters=0)
    assert extremes_off(start).max() < 0.01  # both ends of every group on the grid (fp16 scale / zero rounding)
    assert extremes_off(quantize(w, spec)).max() > 0.1  # RTN's integer zero moves one end off it
    err = lambda qt: float((dequantize(qt) - w).abs().pow(2.4).sum())  # noqa: E731
    assert err(hqq_quantize(w, spec)) <= err(start)


def test_smoothquant_alpha_search_never_loses_to_no_smoothing_and_finds_the_outliers() -> None:
    from lowbit.methods.ptq.smoothquant_math import alpha_search

    torch.manual_seed(0)
    w = torch.randn(64, 128)
    act = ACT_FORMATS["int8_token"]
    x = _outlier_inputs(512, 128)
    s, alpha, err = alpha_search(x, x.abs().amax(0), [w], FORMATS["int8"], act)
    assert s is not None and alpha is not None and err["best"] < err["none"] / 2  # outlier channels: smoothing wins
    fixed = smooth_scales(x.abs().amax(0), [w], alpha=0.5)
    xq = fake_quantize(x / fixed, act)
    err_half = float(((xq @ dequantize(quantize(w * fixed, FORMATS["int8"])).T - x @ w.T) ** 2).sum())
    assert err["best"] <= err_half  # the paper's α = 0.5 is in the grid
    plain = torch.rand(512, 128)  # post-ReLU-like inputs, no outliers
    s2, _, err2 = alpha_search(plain, plain.abs().amax(0), [w], FORMATS["int8"], act)
    assert err2["best"] <= err2["none"] and (s2 is None) == (err2["best"] == err2["none"])


def test_smoothquant_alpha_option_is_checked() -> None:
    import lowbit
    from lowbit.errors import RecipeError

    m = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 32), torch.nn.Linear(32, 8))
    recipe = {"stages": [{"method": "smoothquant", "weights": "int8", "activations": "int8_token", "options": {}}]}
    data = [torch.randn(8, 32)]
    for bad in ("sometimes", 1.5):
        recipe["stages"][0]["options"] = {"alpha": bad}
        with pytest.raises(RecipeError, match="alpha"):
            lowbit.compress(m, recipe, data=data, progress=False)


def test_smoothquant_auto_keeps_the_papers_alpha_for_static_activations() -> None:
    import lowbit
    from lowbit.methods.ptq.smoothquant_math import alpha_search

    with pytest.raises(ValueError, match="static"):
        x = _outlier_inputs(64, 32)
        alpha_search(x, x.abs().amax(0), [torch.randn(8, 32)], FORMATS["int8"], ACT_FORMATS["int8_static"])
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 32), torch.nn.Linear(32, 8))
    data = [_outlier_inputs(16, 32, seed=s) for s in range(2)]
    stage = {"method": "smoothquant", "weights": "int8", "activations": "int8_static", "keep_first_last": False}
    auto = lowbit.compress(m, {"stages": [stage]}, data=data, progress=False)
    half = lowbit.compress(m, {"stages": [{**stage, "options": {"alpha": 0.5}}]}, data=data, progress=False)
    assert auto[0].input_scale is not None and torch.equal(auto[0].input_scale, half[0].input_scale)


def test_hqq_flatness_ignores_constant_groups() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=g)
    w[:48] = 0.0  # three quarters of the rows pruned: their groups have no spread to measure
    assert not is_flat(to_units(w, "group", 64))
    assert not is_flat(to_units(torch.zeros(8, 64), "group", 64))
    tiny = (torch.rand(64, 256, generator=g) - 0.5) * 1e-9  # flat, with a variance below fp32's squared range
    assert is_flat(to_units(tiny, "group", 64))
