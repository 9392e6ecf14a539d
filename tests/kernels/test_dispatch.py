"""Packed layers on native kernels: parity with the simulated layer for every format, dispatch, fallback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

import lowbit
from lowbit.formats import ACT_FORMATS, FORMATS
from lowbit.kernels import dispatch, native
from lowbit.kernels import layer as native_layer
from lowbit.kernels.dispatch import bucket, layer_report, use_mode
from lowbit.kernels.routes import route_for
from lowbit.recipe import Recipe, Stage

needs_native = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler: lowbit uses the reference kernels"
)

# Weight × activation formats; the route each must take (None: the dense reference path).
CASES = [
    ("int8", None, "w8a32"),
    ("int8", "int8_token", "w8a8"),
    ("int4_g32", None, "w4a32"),
    ("int4_g128", None, "w4a32"),
    ("int4_g128", "int8_token", "w4a8"),
    ("int3_g64", None, "w3a32"),
    ("int2_g64", None, "w2a32"),
    ("int2_g64", "int8_token", "w2a8"),
    ("ternary_absmean", "int8_token", "ternary"),
    ("ternary_absmean", None, "w2a32"),
    ("binary", None, "w1a32"),
    ("binary", "int8_token", "w1a8"),
    ("binary", "binary_token", "w1a1"),
    ("binary_sign", "binary_token", "w1a1"),
    ("fp8_e4m3", None, "fp8a32"),  # panels of its bytes, decoded in the kernel
    ("fp8_e5m2", None, "fp8a32"),
    ("fp8_e4m3", "fp8_token", "fp8a8"),  # activations fake-quantized to FP8 per row in the same call
    ("fp6_e3m2", None, None),
    ("fp4_e2m1", None, "fp4a32"),  # panels of 2 × its values
    ("int6", None, None),
]


def packed_layer(weights: str, acts: str | None, k: int = 384, n: int = 96) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(k, n))
    recipe = Recipe(stages=(Stage(method="rtn", weights=FORMATS[weights], activations=acts and ACT_FORMATS[acts]),))
    q = lowbit.compress(model, recipe, progress=False)
    return q, lowbit.pack(q)


def test_every_registered_format_is_covered() -> None:
    assert {w for w, _, _ in CASES} | {"int8_asym", "int8_tensor", "int4", "int4_sym_g128", "int2"} >= {
        f for f in FORMATS if FORMATS[f].kind in ("int", "ternary", "binary")
    } - {"ternary_absmedian", "ternary_tbt", "fp6_e2m3"}


@pytest.mark.parametrize(("weights", "acts", "kernel"), CASES)
def test_route_per_format(weights: str, acts: str | None, kernel: str | None) -> None:
    _, p = packed_layer(weights, acts)
    route = route_for(p[0])
    assert (route.kernel if route else None) == kernel


@needs_native
@pytest.mark.parametrize("weights", ["int2_g64", "ternary_absmean"])
def test_int2_weight_only_rows_take_bit_planes_on_avx512(weights: str) -> None:
    """int2 codes (and ternary codes + 1) with fp32 inputs are stored as bit planes where the build has AVX-512
    (the masked-add kernel), as 2-bit chunks elsewhere; the outputs are checked per format above."""
    from lowbit.kernels import group_layout

    _, p = packed_layer(weights, None)
    state = route_for(p[0]).prepare(p[0])
    want = group_layout.W2_PLANES_BITS if native.build_info()["isa"] == "avx512vnni" else 2
    assert state.desc.bits == want


@needs_native
@pytest.mark.parametrize(("weights", "acts", "kernel"), [c for c in CASES if c[2]])
@pytest.mark.parametrize("rows", [1, 7])
def test_native_output_matches_simulated(weights: str, acts: str | None, kernel: str, rows: int) -> None:
    q, p = packed_layer(weights, acts)
    x = torch.randn(rows, 384)
    with torch.no_grad(), use_mode("native"):
        got = p(x)
    want = q(x).detach()
    assert layer_report(p[0])[0]["path"] == kernel
    # Integer kernels agree up to the final float rescale, float kernels up to fp32 summation order.
    assert float((got - want).abs().max()) <= 2e-5 * float(want.abs().max())


def packed_conv(weights: str, acts: str | None, groups: int = 1) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 16, 3, stride=(1, 2), padding=(1, 2), dilation=(2, 1), groups=groups))
    recipe = Recipe(stages=(Stage(method="rtn", weights=FORMATS[weights], activations=acts and ACT_FORMATS[acts]),))
    q = lowbit.compress(model, recipe, progress=False)
    return q, lowbit.pack(q)


CONV_CASES = [
    ("int8", "int8_token", "w8a8"),
    ("ternary_absmean", "int8_token", "ternary"),
    ("binary", "binary_token", "w1a1"),
    ("int4_g32", "int8_token", "w4a8"),  # 32·9 patch columns: nine groups of 32
    ("fp8_e4m3", "fp8_token", "fp8a8"),
]


def native_conv_parity(
    weights: str, acts: str | None, kernel: str, channels_last: bool
) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A packed conv run in native mode on its patches: its route and report name ``kernel``, its output equals the
    simulated layer's within fp32 rounding. Returns (simulated, packed, input, simulated output, native output)."""
    q, p = packed_conv(weights, acts)
    x = torch.randn(3, 32, 9, 10)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    want = q(x).detach()
    with torch.no_grad(), use_mode("native"):
        got = p(x)
    assert route_for(p[0]).kernel == kernel and layer_report(p[0])[0]["path"] == kernel
    assert got.shape == want.shape and got.is_contiguous()
    assert float((got - want).abs().max()) <= 2e-5 * float(want.abs().max())
    return q, p, x, want, got


@pytest.mark.usefixtures("auto_mode")
@needs_native
@pytest.mark.parametrize(("weights", "acts", "kernel"), CONV_CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_with_per_patch_activations_runs_the_linear_kernel_on_its_patches(
    weights: str, acts: str, kernel: str, channels_last: bool
) -> None:
    """A conv whose activations are quantized per patch is a linear layer over its patches (cut in C): same kernel
    routes, same parity with the simulated layer; a decided call takes the short path with the same output."""
    q, p, x, want, got = native_conv_parity(weights, acts, kernel, channels_last)
    with torch.no_grad():
        first = p(x)  # auto: measured once for these rows, then decided
        disp = p[0]._dispatch
        assert disp.decided and torch.equal(p(x), first)
        # decided native (as where the kernel wins): the whole conv is one C call (lb_conv), same values
        disp.decided = dict.fromkeys(disp.decided, True)
        disp.state = disp.state or disp.route.prepare(p[0])
        assert disp.hot_conv(p[0], x, p[0]._im2col[(x.shape, x.stride())]) is not None
        assert torch.equal(p(x), got)
    with torch.no_grad(), use_mode("reference"):
        assert torch.equal(p(x), want)  # the reference path is the simulated layer, bit for bit


@pytest.mark.usefixtures("auto_mode")
@needs_native
@pytest.mark.parametrize(("weights", "acts"), [("int8", "int8_token"), ("int8", "int8_static")])
@pytest.mark.parametrize("scaled", [False, True])  # an input scale (AWQ / SmoothQuant) applied before the cut
def test_conv_dispatch_races_the_whole_calls(monkeypatch, weights: str, acts: str, scaled: bool) -> None:
    """A conv on its patches is decided by racing what each choice then runs for the whole call: the one C call
    (patches, kernel, output map) against the patches, their dense product and the map (or, static, the map conv).
    Racing the patches' products alone left the cutting and the map out (a 1-channel conv went dense, 0.57× fp32)."""
    torch.manual_seed(0)
    x = torch.randn(2, 32, 9, 10)
    recipe = Recipe(stages=(Stage(method="rtn", weights=FORMATS[weights], activations=ACT_FORMATS[acts]),))
    q = lowbit.compress(nn.Sequential(nn.Conv2d(32, 16, 3, padding=1)), recipe, data=[x], progress=False)
    p = lowbit.pack(q)
    if scaled:
        for layer in (q[0], p[0]):
            layer.set_input_scale(torch.rand(32) + 0.5)
        p[0].input_scale.copy_(q[0].input_scale)
    raced: list[list] = []

    def record(*fns):
        raced.append([fn() for fn in fns])
        return [1.0, 2.0, 3.0]  # native "faster"

    monkeypatch.setattr(dispatch, "race", record)
    with torch.no_grad():
        want = q(x)
        p(x)
        native_out, dense_out, _ = raced[0]
        for out in (native_out, dense_out):
            assert out.shape == want.shape  # whole output maps, not the patches' rows
            assert float((out - want).abs().max()) <= 2e-5 * float(want.abs().max())
        assert torch.equal(p(x), native_out)  # decided native: the one C call that was raced


@needs_native
def test_per_patch_conv_applies_its_input_scale_and_shift_before_cutting_patches() -> None:
    """AWQ / SmoothQuant input scales and binary thresholds act per channel on the map, before its patches are cut
    (so padding stays 0): packed (native) and simulated layers agree, and the decided one-call path too."""
    q, p = packed_conv("binary", "binary_token")
    scale, shift = torch.rand(32) + 0.5, torch.randn(32) * 0.1
    for layer in (q[0], p[0]):
        layer.set_input_scale(scale)
        layer.set_input_shift(shift)
    x = torch.randn(2, 32, 9, 10)
    with torch.no_grad():
        want = q(x)
        with use_mode("native"):
            assert float((p(x) - want).abs().max()) <= 2e-5 * float(want.abs().max())
        p(x)
        disp = p[0]._dispatch
        disp.decided = dict.fromkeys(disp.decided, True)
        disp.state = disp.state or disp.route.prepare(p[0])
        assert float((p(x) - want).abs().max()) <= 2e-5 * float(want.abs().max())


@pytest.mark.usefixtures("auto_mode")
@needs_native
@pytest.mark.parametrize("acts", ["int8_token", None])  # None: weight-only, fp32 patches
def test_one_call_conv_works_in_chunks_of_whole_images(acts: str | None) -> None:
    """lb_conv cuts the patches of ~8 MiB of images at a time (here 12 images of 0.9 MiB of patches each: chunks of
    9 and 3), so its scratch memory is bounded; the output is the same as one pass."""
    q, p = packed_conv("int8", acts)
    x = torch.randn(12, 32, 40, 40)
    with torch.no_grad():
        with use_mode("native"):
            whole = p(x)  # patches cut in one pass, kernel on all rows (not lb_conv)
        p(x)
        disp = p[0]._dispatch
        disp.decided = dict.fromkeys(disp.decided, True)
        disp.state = disp.state or disp.prepare(p[0], True)
        cut = p[0]._im2col[(x.shape, x.stride())]
        chunked = disp.hot_conv(p[0], x, cut)
    assert chunked is not None
    if acts is not None:  # integer sums: the same bits
        assert torch.equal(chunked, whole)
    else:  # fp32 sums: a chunk's last partial block of tile rows sums in another order
        assert float((chunked - whole).abs().max()) <= 1e-6 * float(whole.abs().max())


@needs_native
@pytest.mark.parametrize("weights", ["int8", "ternary_absmean"])
@pytest.mark.parametrize("threads", [1, 2])
def test_one_call_conv_writes_the_map_from_the_panels(weights: str, threads: int) -> None:
    """W8A8 and ternary convs write their (N, O, OH, OW) map straight from the panel kernel (4-row tiles stored
    transposed; 42 patches per image: a partial last block), then the bias and the NaN rows: the same bits as the
    kernel on the patch rows followed by the move into the map."""
    q, p = packed_conv(weights, "int8_token")
    x = torch.randn(3, 32, 9, 10)
    x[1, 5, 4, 4] = float("nan")  # NaN patches: NaN outputs in every channel at those positions
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            with use_mode("native"):
                rows_then_map = p(x)  # patches cut in C, the kernel on their rows, then the map
            state = p[0]._dispatch.state
            assert state.desc.wp  # the layer has panels
            cut = p[0]._im2col[(x.shape, x.stride())]
            direct = torch.empty(cut.map_shape)
            rc = native._need().lb_conv(  # what a decided call runs (hot_conv), in any kernel mode
                state.addr, x.data_ptr(), cut.geometry, direct.data_ptr(), threads, p[0].bias.data_ptr()
            )
    finally:
        torch.set_num_threads(old)
    assert rc == 0 and bool(direct.isnan().any()) and not bool(direct[0].isnan().any())
    torch.testing.assert_close(direct, rows_then_map, rtol=0, atol=0, equal_nan=True)


def test_grouped_convs_have_no_kernel_route() -> None:
    for acts in ("int8_token", None):
        assert route_for(packed_conv("int8", acts, groups=4)[1][0]) is None
        q, p = packed_conv("int8", acts, groups=4)
        x = torch.randn(2, 32, 9, 10)
        with torch.no_grad():
            assert torch.equal(p(x), q(x)) and torch.equal(p(x), q(x))


WEIGHT_ONLY_CONV_CASES = [
    ("int8", "w8a32"),
    ("binary", "w1a32"),
    ("int4_g32", "w4a32"),  # 32·9 patch columns: nine groups of 32
    ("ternary_absmean", "w2a32"),  # codes + 1 as 2-bit with zero 1
    ("fp4_e2m1", "fp4a32"),
    ("fp8_e4m3", "fp8a32"),
]


@needs_native
@pytest.mark.usefixtures("auto_mode")
@pytest.mark.parametrize(("weights", "kernel"), WEIGHT_ONLY_CONV_CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_weight_only_conv_runs_the_fp32_input_kernel_on_its_patches(
    weights: str, kernel: str, channels_last: bool
) -> None:
    """A weight-only conv is a linear layer over its fp32 patches: the weights' fp32-input kernel, the simulated
    layer's output up to summation order, on the patch path (native mode) and in the decided one C call (lb_conv:
    patches cut whole, the kernel, the map: the same bits); the reference path is the simulated layer bit for bit.
    In auto mode it is raced against the conv on the cached weight, and a call decided dense is that conv."""
    _, p, x, want, got = native_conv_parity(weights, None, kernel, channels_last)
    with torch.no_grad():
        p(x)  # auto: raced for these patches, then decided
        disp = p[0]._dispatch
        cut = p[0]._im2col[(x.shape, x.stride())]
        disp.decided = dict.fromkeys(disp.decided, True)
        disp.state = disp.state or disp.prepare(p[0], True)
        assert disp.hot_conv(p[0], x, cut) is not None
        assert torch.equal(p(x), got)
        disp.decided = dict.fromkeys(disp.decided, False)
        assert torch.equal(p(x), want) and torch.equal(p(x), want)  # (the second call: the cached 4-D weight)
    with torch.no_grad(), use_mode("reference"):
        assert torch.equal(p(x), want)


@needs_native
def test_weight_only_convs_keep_fp32_patches_when_linear_layers_take_int8_inputs() -> None:
    """``kernel_activations="int8"`` gives weight-only linear layers the ``…a8`` kernel; a weight-only conv keeps its
    fp32-input kernel, since its dense path (the conv on the map) would not round its input."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 16, 3, padding=1), nn.Flatten(), nn.Linear(16 * 81, 8))
    recipe = Recipe(stages=(Stage(method="rtn", weights=FORMATS["int8"]),))
    p = lowbit.pack(lowbit.compress(model, recipe, progress=False), kernel_activations="int8")
    assert route_for(p[0]).kernel == "w8a32" and route_for(p[2]).kernel == "w8a8"


@needs_native
@pytest.mark.parametrize(("weights", "acts", "kernel"), [c for c in CASES if c[1] is not None])
def test_a_nan_input_row_gives_a_nan_output_row_as_in_the_simulated_layer(weights: str, acts: str, kernel) -> None:
    """int8 codes would hide a NaN (its code is 0): the kernels give NaN rows where the input row held one, as the
    simulated layer (whose fake-quantized input keeps the NaN) does; binary activations read NaN as −1 with the
    guarded scale in both; the other rows are untouched."""
    q, p = packed_layer(weights, acts)
    x = torch.randn(4, 384)
    x[2, 7] = float("nan")
    with torch.no_grad(), use_mode("native"):
        got = p(x)
    want = q(x).detach()
    assert got.isnan().any(-1).tolist() == want.isnan().all(-1).tolist() == [False, False, acts == "int8_token", False]
    keep = ~want.isnan().any(-1)
    assert float((got[keep] - want[keep]).abs().max()) <= 2e-5 * float(want[keep].abs().max())


@needs_native
@pytest.mark.parametrize(("weights", "acts"), [("int8", "int8_token"), ("ternary_absmean", "int8_token")])
@pytest.mark.parametrize("k", [4096, 64])  # 64: short rows (8-row tiles; ternary on the int8 layout)
def test_integer_accumulation_is_exact(weights: str, acts: str, k: int) -> None:
    q, p = packed_layer(weights, acts, k=k, n=44)
    x = torch.randn(3, k) * 3
    xq, sx = native.quantize_rows_symmetric(x, 127.0, 2.0**-20, 65504.0)
    exact = xq.long() @ q[0].codes.long().T  # int64 reference sums
    scale = q[0].scale.reshape(-1).float()
    with torch.no_grad(), use_mode("native"):
        y = p(x) - q[0].bias
    assert torch.equal(torch.round(y / (sx[:, None] * scale)).long(), exact)


@needs_native
def test_xnor_popcount_is_exact() -> None:
    q, p = packed_layer("binary", "binary_token", k=1000, n=64)
    x = torch.randn(5, 1000)
    _, bx = native.sign_rows(x, 2.0**-20, 65504.0)
    sx, sw = (x >= 0).float() * 2 - 1, (q[0].codes > 0).float() * 2 - 1
    exact = (sx @ sw.T).long()
    with torch.no_grad(), use_mode("native"):
        y = p(x) - q[0].bias
    a = q[0].scale.reshape(-1).float()
    assert torch.equal(torch.round(y / (bx[:, None] * a)).long(), exact)


@pytest.mark.usefixtures("auto_mode")
@needs_native
def test_auto_dispatch_measures_once_and_picks_the_faster_path() -> None:
    _, p = packed_layer("int4_g128", None, k=1024, n=1024)
    with torch.no_grad():
        p(torch.randn(1, 1024))
        p(torch.randn(1, 1024))
        p(torch.randn(3, 1024))
    report = layer_report(p[0])
    assert [r["rows"] for r in report] == [1, 4]
    for r in report:
        assert r["path"] == ("w4a32" if r["native_ms"] < r["dense_ms"] else "reference")
    if all(r["path"] == "reference" for r in report):  # memory: only what the chosen paths need stays
        assert p[0]._dispatch.state is None
    if report[-1]["path"] == "w4a32":
        assert p[0]._cache is None


def test_reference_mode_is_bit_exact_and_gradients_use_reference() -> None:
    q, p = packed_layer("int4_g128", "int8_token")
    x = torch.randn(4, 384)
    with use_mode("reference"):
        assert torch.equal(p(x), q(x))
    xg = x.clone().requires_grad_(True)
    p(xg).sum().backward()  # a differentiable input takes the reference path
    assert xg.grad is not None
    assert bucket(1) == 1 and bucket(3) == 4 and bucket(10_000) == 4096


def test_forced_fallback_warns_once_and_matches(tmp_path) -> None:
    code = (
        "import warnings, torch, lowbit; from torch import nn\n"
        "torch.manual_seed(0); m = nn.Sequential(nn.Linear(256, 64))\n"
        "q = lowbit.compress(m, 'w1a1', progress=False); p = lowbit.pack(q); x = torch.randn(2, 256)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    with torch.no_grad(): ok = all(torch.equal(p(x), q(x)) for _ in range(3))\n"
        "from lowbit.kernels import native\n"
        "print(ok, native.available(), sum('reference kernel' in str(i.message) for i in w))\n"
    )
    # No compiler: the native library cannot be built, lowbit says so once and runs the reference kernel.
    env = {**os.environ, "CXX": "/nonexistent/g++", "LOWBIT_KERNELS": "auto", "LOWBIT_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["True", "False", "1"], out.stderr


@needs_native
@pytest.mark.parametrize(("weights", "kernel"), [("int4_g128", "w4a8"), ("int2_g64", "w2a8"), ("binary", "w1a8")])
def test_int8_kernel_activations_equal_the_int8_activation_model(weights: str, kernel: str) -> None:
    q_weight_only, _ = packed_layer(weights, None)
    q_w_a8, _ = packed_layer(weights, "int8_token")
    fast = lowbit.pack(q_weight_only, kernel_activations="int8")
    assert route_for(fast[0]).kernel == kernel
    x = torch.randn(5, 384)
    with torch.no_grad(), use_mode("native"):
        got = fast(x)
    want = q_w_a8(x).detach()  # same weights, int8 per-token activations in the simulated model
    assert float((got - want).abs().max()) <= 2e-5 * float(want.abs().max())
    with pytest.raises(ValueError, match="kernel_activations"):
        lowbit.pack(q_weight_only, kernel_activations="int4")


@needs_native
@pytest.mark.parametrize("k", [1000, 9, 13, 27, 5])  # whole vectors, rows ending in a masked tail, a tail alone
def test_c_activation_quantizer_is_bit_identical_to_the_simulated_one(k: int) -> None:
    from lowbit.formats.layout import to_units
    from lowbit.formats.qtensor import encode, fit_params

    spec = ACT_FORMATS["int8_token"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, k, generator=g) * torch.logspace(-8, 6, 64)[:, None]
    x[3] = 0.0
    ties = torch.tensor([0.5, -0.5, 1.5, 2.5, -2.5, 127.5, -127.5]) * float(x[5].abs().max()) / 127.5
    x[5, : min(k, 7)] = ties[:k]
    x[9, k - 1] = float("nan")  # a NaN in the last (masked) lane
    x[7, 0] = float("inf")
    u = to_units(x, "token", None)
    s, _ = fit_params(u, spec, store=False)
    want_q, want_s = encode(u, s, None, spec).reshape(x.shape).to(torch.int8), s.reshape(-1)
    got_q, got_s = native.quantize_rows_symmetric(x, 127.0, 2.0**-20, 65504.0)
    assert torch.equal(got_s, want_s)
    assert torch.equal(got_q, want_q)
    y = torch.randn(9, 1000, generator=g)
    bits, scale = native.sign_rows(y, 2.0**-20, 65504.0)
    assert torch.equal(bits, native.pack_signs(y >= 0))
    torch.testing.assert_close(scale, y.abs().mean(-1), rtol=1e-6, atol=0)


def test_bad_mode_is_refused(monkeypatch) -> None:
    from lowbit.kernels import dispatch
    from lowbit.kernels.dispatch import mode

    monkeypatch.setattr(dispatch, "_env_mode", None)  # read LOWBIT_KERNELS afresh
    monkeypatch.setenv("LOWBIT_KERNELS", "fast")
    with pytest.raises(ValueError, match="LOWBIT_KERNELS"):
        mode()


@needs_native
@pytest.mark.parametrize("kernel_activations", ["exact", "int8"])
def test_real_valued_zero_points_run_natively(kernel_activations: str) -> None:
    # HQQ stores real (fp16) zero points: the kernel runs with zero points 0 and subtracts Σ_g s·z·Σ_g x.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(384, 96))
    q = lowbit.compress(model, "w4g128-hqq", progress=False)
    assert not torch.equal(q[0].zero, q[0].zero.round())
    p = lowbit.pack(q, kernel_activations=kernel_activations)
    assert p[0].zero_format == "fp16"
    kernel = "w4a32" if kernel_activations == "exact" else "w4a8"
    assert route_for(p[0]).kernel == kernel
    x = torch.randn(5, 384)
    with torch.no_grad(), use_mode("native"):
        got = p(x)
    if kernel_activations == "int8":  # the simulated reference: same weights, int8 per-token inputs
        xq, sx = native.quantize_rows_symmetric(x, 127.0, 2.0**-20, 65504.0)
        x = xq.float() * sx[:, None]
    w = (q[0].codes.float() - q[0].zero.repeat_interleave(128, dim=1)) * q[0].scale.repeat_interleave(128, dim=1)
    want = (x @ w.T + q[0].bias).detach()
    assert float((got - want).abs().max()) <= 2e-5 * float(want.abs().max())


@needs_native
def test_native_linear_checks_its_input() -> None:
    _, p = packed_layer("int8", "int8_token")
    with torch.no_grad(), use_mode("native"):
        p(torch.randn(1, 384))
    with pytest.raises(ValueError, match="384"):
        native_layer.linear(p[0]._dispatch.state, torch.randn(2, 100))


@needs_native
@pytest.mark.parametrize(("weights", "shape"), [("int8", (3, 384)), ("ternary_absmean", (2, 5, 384))])
def test_dense_fallback_quantizes_inputs_in_c_bit_identically(weights: str, shape: tuple[int, ...]) -> None:
    # The chosen-dense path of an int8-activation layer: one C pass instead of the torch quantizer, same bits.
    _, p = packed_layer(weights, "int8_token")
    x = torch.randn(*shape) * torch.logspace(-3, 3, shape[-1])
    x.view(-1, 384)[0, :4] = torch.tensor([float("inf"), 1.0, -2.0, 0.5])
    with torch.no_grad(), use_mode("reference"):
        want = p(x)
    with torch.no_grad():
        p(x)  # auto: builds the dispatch state
        p[0].weight_matrix()  # the dequantized weight the dense path uses (freed when native won)
        got = p[0]._dispatch.dense(p[0], x, p[0]._scale_shift_input(x), lambda: None)
    assert torch.equal(got, want)
    fq = native.fake_quantize_rows_symmetric(torch.tensor([[float("nan"), 1.0, 3.0]]), 127.0, 2.0**-20, 65504.0)
    assert torch.isnan(fq[0, 0]) and bool(torch.isfinite(fq[0, 1:]).all())  # NaN stays visible, as in torch


@needs_native
def test_int8_kernel_activations_do_not_depend_on_the_chosen_path() -> None:
    # kernel_activations="int8": the dense path quantizes the input too, so dispatch's choice cannot change outputs.
    q, _ = packed_layer("int4_g128", None)
    fast = lowbit.pack(q, kernel_activations="int8")
    x = torch.randn(6, 384)
    with torch.no_grad(), use_mode("native"):
        native_y = fast(x)
    with torch.no_grad():
        dense_y = fast[0]._dispatch.dense(fast[0], x, x, lambda: None)
    assert float((native_y - dense_y).abs().max()) <= 2e-5 * float(dense_y.abs().max())
    with torch.no_grad():
        assert float((q(x) - dense_y).abs().max()) > 1e-6  # the int8 rounding is really there


@needs_native
def test_copies_and_pickles_of_a_used_packed_model_derive_their_own_kernels() -> None:
    import copy
    import gc
    import io

    _, p = packed_layer("binary", "binary_token")
    x = torch.randn(2, 384)
    with torch.no_grad(), use_mode("native"):
        want = p(x)
        twin = copy.deepcopy(p)  # the original's kernel state holds raw pointers: the copy must not share them
        buf = io.BytesIO()
        torch.save(p, buf)
        del p
        gc.collect()
        assert twin[0]._dispatch is False
        assert torch.equal(twin(x), want)
        buf.seek(0)
        assert torch.equal(torch.load(buf, weights_only=False)(x), want)
    with pytest.raises(TypeError, match="raw pointers"):
        copy.deepcopy(twin[0]._dispatch.state)


def _small_packed(preset: str) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.LayerNorm(256), nn.Linear(256, 64))
    return lowbit.pack(lowbit.compress(m, preset, progress=False))


@needs_native
@pytest.mark.slow
def test_torch_compile_keeps_the_native_kernels() -> None:
    """A compiled packed model is one graph (fullgraph) whose linear layers run the native kernels at run time."""
    q = _small_packed("w8a8")
    x = torch.randn(5, 256)
    with use_mode("native"), torch.no_grad():
        compiled = torch.compile(q, fullgraph=True)
        y = compiled(x)
        assert [layer_report(q[i])[0]["path"] for i in (0, 3)] == ["w8a8", "w8a8"]  # run only by the compiled graph
        ref = q(x)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)  # same kernels; GELU / LayerNorm fused by inductor
    with use_mode("reference"), torch.no_grad():
        assert (y - q(x)).abs().max() < 1e-3  # and the simulated model's output up to the kernels' rounding


@needs_native
@pytest.mark.slow
def test_torch_compile_keeps_the_native_kernels_of_per_patch_convolutions() -> None:
    """Inside a compiled graph a per-patch conv is one opaque ``lowbit::packed_conv`` call, which runs the eager
    conv (patches cut in C, the linear kernel); export records the plain reference path."""
    q, p = packed_conv("int8", "int8_token")
    x = torch.randn(2, 32, 9, 10)
    with use_mode("native"), torch.no_grad():
        y = torch.compile(p, fullgraph=True)(x)
        assert layer_report(p[0])[0]["path"] == "w8a8"
        torch.testing.assert_close(y, p(x), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        ep = torch.export.export(p, (x,))
        assert not any("lowbit" in str(n.target) for n in ep.graph.nodes if n.op == "call_function")
        torch.testing.assert_close(ep.module()(x), q(x))


@needs_native
def test_torch_export_records_the_reference_path() -> None:
    """An exported program is self-contained: no lowbit op in its graph, same output as the reference kernels."""
    q = _small_packed("w4g128")
    x = torch.randn(3, 256)
    with torch.no_grad():
        ep = torch.export.export(q, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("lowbit" in t for t in targets) and "aten.linear.default" in targets
    with use_mode("reference"), torch.no_grad():
        torch.testing.assert_close(ep.module()(x), q(x))


@pytest.mark.usefixtures("auto_mode")
@needs_native
@pytest.mark.parametrize("native_path", [True, False])
def test_decided_layers_take_the_short_path_with_the_same_output(monkeypatch, native_path: bool) -> None:
    """Once dispatch has decided a (rows, threads), a call runs only the chosen kernel (`LayerDispatch.hot`), with
    the output the full dispatch gives; anything unusual (another mode, a new shape; for the kernel also autograd
    or a strided input) still goes through the full path."""
    import lowbit.nn.packed as packed_mod

    _, p = packed_layer("int4_g128", None)
    layer = p[0]
    x = torch.randn(2, 5, 384)
    threads = torch.get_num_threads()
    with torch.no_grad():
        with use_mode("native" if native_path else "reference"):
            want = p(x)
        p(x)  # auto: measures and decides (10 rows)
        layer._dispatch.decided[(10, threads)] = native_path  # pin the decision under test (timing is not)
        if native_path:
            layer._dispatch.state = layer._dispatch.state or layer._dispatch.route.prepare(layer)
        elif layer._cache is None:
            layer._cache = layer.weight_matrix()
        full_path_calls: list[int] = []
        real = packed_mod.dispatch_linear

        def counting(*args, **kwargs):
            full_path_calls.append(1)
            return real(*args, **kwargs)

        monkeypatch.setattr(packed_mod, "dispatch_linear", counting)
        torch.testing.assert_close(p(x), want, rtol=0, atol=0 if not native_path else 1e-5)
        assert full_path_calls == []
        layer.bias = nn.Parameter(layer.bias + 1.0)  # a replaced parameter is seen at once
        torch.testing.assert_close(p(x), want + 1.0, rtol=0, atol=1e-5)
        assert full_path_calls == []
        p(torch.randn(3, 384))  # rows not decided yet
        with use_mode("reference"):
            p(x)
        p(x.transpose(0, 1).contiguous().transpose(0, 1))  # strided: the kernel needs the full path's copy
    xg = x.clone().requires_grad_(True)
    p(xg).sum().backward()  # autograd: the reference path (for a plain dense layer that is the same F.linear)
    assert xg.grad is not None
    assert len(full_path_calls) == (4 if native_path else 2)


def test_race_alternates_and_gives_fast_calls_more_rounds() -> None:
    import time

    from lowbit.kernels import dispatch

    calls: list[str] = []
    fast = lambda: calls.append("f")  # noqa: E731
    slow = lambda: (calls.append("s"), time.sleep(0.004))  # noqa: E731
    f_ms, s_ms = dispatch.race(fast, slow)
    assert s_ms >= 4.0 > f_ms
    assert calls[:4] == ["f", "s", "f", "s"]  # in alternation, from the warm-up on
    assert len(calls) == 2 * (2 + dispatch.REPEATS)  # a round of ≥ the budget: the minimum number of rounds
    calls.clear()
    dispatch.race(fast)
    assert len(calls) == 2 + dispatch.MAX_ROUNDS


def test_race_counts_rounds_from_the_second_warm_up_round() -> None:
    """A first call that is slow once (preparing a kernel's weights) does not cut the race to its minimum rounds."""
    import time

    from lowbit.kernels import dispatch

    calls: list[int] = []

    def first_slow() -> None:
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.01)  # twice the race's budget

    dispatch.race(first_slow)
    assert len(calls) == 2 + dispatch.MAX_ROUNDS


@needs_native
def test_the_race_times_the_bare_c_call_a_decided_layer_makes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The native side of a race is the C call a decided layer makes (`LayerDispatch._call`), not `native` with its
    checks (~0.5 µs more: a 10-output head's race read its kernel slower than ``F.linear`` while in steady state it
    was faster); an input the bare call cannot take (strided, autograd) races `native` itself."""
    _, p = packed_layer("int8", None, k=128, n=10)
    layer = p[0]
    x = torch.randn(1, 128)
    with torch.no_grad(), use_mode("native"):
        want = layer(x)
    disp = layer._dispatch
    native_calls: list[int] = []
    real_native = disp.native
    monkeypatch.setattr(disp, "native", lambda *a: (native_calls.append(1), real_native(*a))[1])
    with torch.no_grad():
        bare = disp._native_call(layer, x, 1)
        assert len(native_calls) == 1  # preparing the weights
        assert torch.equal(bare(), want) and len(native_calls) == 1
        strided = torch.randn(1, 256)[:, ::2]
        disp._native_call(layer, strided, 1)()
        assert len(native_calls) == 3
    xg = x.clone().requires_grad_(True)
    disp._native_call(layer, xg, 1)()
    assert len(native_calls) == 5


@needs_native
def test_a_plain_layer_races_its_two_decided_forwards(monkeypatch: pytest.MonkeyPatch) -> None:
    """A weight-only layer's race runs `hot` as a decided call would, once as native and once as dense (their
    checks differ by ~0.3 µs, which decides a 10-output head's race)."""
    if dispatch.mode() != "auto":
        pytest.skip("dispatch decides only in auto mode")
    _, p = packed_layer("int8", None, k=128, n=10)
    layer = p[0]
    x = torch.randn(1, 128)
    with torch.no_grad(), use_mode("native"):
        want_native = layer(x)  # (builds the layer's dispatch; auto mode has not raced yet)
    disp = layer._dispatch
    hot_calls: list[bool | None] = []
    real_hot = disp.hot
    monkeypatch.setattr(disp, "hot", lambda lay, xx: (hot_calls.append(disp.decided.get((1, 1))), real_hot(lay, xx))[1])
    raced: list[tuple[list, list]] = []
    real_race = dispatch.race

    def spy_race(*fns, **kw):
        hot_calls.clear()
        raced.append(([fn() for fn in fns[:2]], list(hot_calls)))
        return real_race(*fns, **kw)

    monkeypatch.setattr(dispatch, "race", spy_race)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            layer(x)
    finally:
        torch.set_num_threads(threads)
    (native_out, dense_out), calls = raced[0]
    assert calls == [True, False]  # each through `hot`, decided as it races
    assert torch.equal(native_out, want_native)
    assert torch.equal(dense_out, nn.functional.linear(x, layer.weight_matrix(), layer.bias))


@needs_native
def test_a_race_that_raises_leaves_no_decision_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    """The race of a plain layer sets its decision key while it runs the decided forwards: an exception in the race
    (an interrupt) must not leave that key set, or later calls would take a path nothing measured."""
    if dispatch.mode() != "auto":
        pytest.skip("dispatch decides only in auto mode")
    _, p = packed_layer("int8", None, k=128, n=10)
    x = torch.randn(1, 128)

    def interrupted(*fns, **kw):
        for fn in fns:
            fn()
        raise KeyboardInterrupt

    monkeypatch.setattr(dispatch, "race", interrupted)
    with torch.no_grad(), pytest.raises(KeyboardInterrupt):
        p(x)
    assert p[0]._dispatch.decided == {}
    monkeypatch.undo()
    with torch.no_grad():
        p(x)  # raced now
    assert p[0]._dispatch.decided


@pytest.mark.parametrize("conv", [False, True])
def test_an_empty_batch_gives_an_empty_output(conv: bool) -> None:
    """Zero rows (an empty batch) pass through quantized activations, the packed paths and the patch cutter."""
    q, p = packed_conv("int8", "int8_token") if conv else packed_layer("int8", "int8_token")
    x = torch.randn(0, 32, 9, 10) if conv else torch.randn(0, 384)
    with torch.no_grad():
        want = q(x)
        assert want.shape[0] == 0 and torch.equal(p(x), want)


@pytest.mark.usefixtures("auto_mode")
@pytest.mark.parametrize(("weights", "acts"), [("fp6_e3m2", "fp8_token"), ("int6", None), ("int6", "int8_token")])
def test_layers_without_a_route_take_the_short_reference_path_with_the_same_output(monkeypatch, weights, acts) -> None:
    """A packed layer with no native kernel (FP8, int6) runs its reference forward as the activation quantizer's C
    pass and one F.linear on the cached weight (`dispatch.dense_hot`), bit for bit the simulated layer's; anything
    outside that (reference mode, autograd, an input scale) takes the full path."""
    import lowbit.nn.packed as packed_mod

    q, p = packed_layer(weights, acts)
    x = torch.randn(2, 5, 384)
    with torch.no_grad():
        want = q(x)
        assert torch.equal(p(x), want)  # the first call finds no route
        assert p[0]._dispatch is None
        full: list[int] = []
        real = packed_mod.dispatch_linear
        monkeypatch.setattr(packed_mod, "dispatch_linear", lambda *a, **k: full.append(1) or real(*a, **k))
        assert torch.equal(p(x), want) and full == []
        with use_mode("reference"):
            assert torch.equal(p(x), want)
        assert full == [1]
        p[0].set_input_scale(torch.full((384,), 2.0))
        p(x)
        assert len(full) == 2
    xg = x.clone().requires_grad_(True)
    p(xg).sum().backward()
    assert xg.grad is not None and len(full) == 3


@needs_native
@pytest.mark.parametrize(
    ("weights", "acts"),
    [("int8", "int8_token"), ("int4_g128", None), ("int4_g128", "int8_token"), ("binary", "binary_token"),
     ("fp8_e4m3", "fp8_token"), ("ternary_absmean", "int8_token")],
)  # fmt: skip
@pytest.mark.parametrize("rows", [1, 40])
@pytest.mark.usefixtures("auto_mode")
def test_the_kernel_applies_a_linear_layers_input_scale(weights: str, acts: str | None, rows: int) -> None:
    """An explicit input scale (AWQ / SmoothQuant) goes to the C call, which multiplies before quantizing: the same
    codes as the simulated layer's ``x * scale``, in every activation mode, on the call's and the decided path."""
    q, p = packed_layer(weights, acts)
    s = torch.rand(384, generator=torch.Generator().manual_seed(5)) + 0.5
    q[0].set_input_scale(s)
    p[0].set_input_scale(s)
    x = torch.randn(rows, 384)
    want = q(x).detach()
    with torch.no_grad():
        with use_mode("native"):
            got = p(x)
        disp = p[0]._dispatch
        assert disp.kernel_scales
        assert disp.state.desc.xs == p[0].input_scale.data_ptr()  # the layer's own vector, read in place
        assert float((got - want).abs().max()) <= 2e-5 * float(want.abs().max())
        disp.decided[(rows, torch.get_num_threads())] = True  # the hot path of a layer decided native
        hot = disp.hot(p[0], x)
        assert torch.equal(hot, got)


def test_input_vectors_are_the_layers_own() -> None:
    """A layer keeps a copy of the input scale / shift it is given: a vector shared with another layer (a
    concatenated query / key / value layer and its sources) would be written through it."""
    q, _ = packed_layer("int4_g128", None)
    s = torch.rand(384)
    q[0].set_input_scale(s)
    q[0].set_input_shift(s)
    assert q[0].input_scale.data_ptr() != s.data_ptr() and q[0].input_shift.data_ptr() != s.data_ptr()
    s.zero_()
    assert bool((q[0].input_scale > 0).any())


@needs_native
def test_report_marks_the_layers_that_ran_on_panels() -> None:
    """Layers without a row layout (FP8) run their panels at any row count; a weight-only int8 layer called on one
    row runs its row kernel."""
    for weights, acts, rows, want in (("fp8_e4m3", "fp8_token", 1, True), ("int8", None, 1, False)):
        _, p = packed_layer(weights, acts)
        with torch.no_grad(), use_mode("native"):
            p(torch.randn(rows, 384))
        assert layer_report(p[0])[0]["panels"] is want, weights


@needs_native
def test_the_raced_kernel_call_is_the_decided_forwards_call() -> None:
    """`LayerDispatch.native` (what dispatch races against the dense path) makes the decided forward's own C call
    on an fp32, contiguous input, and the checked `layer.linear` otherwise (other dtypes, strided inputs, a bias of
    another dtype); every way gives the same values."""
    from lowbit.kernels import layer as native_layer

    _, p = packed_layer("int8", "int8_token", k=64, n=24)
    layer = p[0]
    with torch.no_grad():
        x = torch.randn(3, 64)
        p(x)  # builds the layer's dispatch
        disp = layer._dispatch
        disp.state = disp.state or disp.route.prepare(layer)
        want = native_layer.linear(disp.state, x, 1, layer.bias)
        calls: list[int] = []
        real = disp._lb_linear
        disp._lb_linear = lambda *a: calls.append(1) or real(*a)
        try:
            assert torch.equal(disp.native(layer, x, 1), want) and calls == [1]
            assert torch.equal(disp.native(layer, x.double(), 1), want) and calls == [1]  # the checked call
            xt = torch.randn(64, 3).T  # strided
            assert torch.equal(
                disp.native(layer, xt, 1), native_layer.linear(disp.state, xt.contiguous(), 1, layer.bias)
            )
            assert calls == [1]
            layer.bias.data = layer.bias.data.double()
            assert torch.allclose(disp.native(layer, x, 1), want) and calls == [1]
        finally:
            disp._lb_linear = real


@needs_native
def test_a_strided_or_broadcast_bias_gives_the_simulated_values_on_every_path() -> None:
    """A bias the C entries cannot read as is (strided, or one value broadcast) takes the checked path,
    which converts it: decided calls (`hot`), native mode and the race agree with the simulated layer."""
    q, p = packed_layer("int8", "int8_token", k=64, n=24)
    x = torch.randn(3, 64)
    for bias in (torch.randn(24, 2)[:, 0], torch.tensor([0.5])):
        for m in (q[0], p[0]):
            del m.bias
            m.bias = bias  # a plain attribute, as on a layer built without bias and given one later
        with torch.no_grad():
            with use_mode("reference"):
                want = q(x)
            for _ in range(3):  # the race, then decided calls
                assert torch.allclose(p(x), want, atol=1e-5), bias.shape
            with use_mode("native"):
                assert torch.allclose(p(x), want, atol=1e-5)
    p[0].bias = torch.randn(5)
    with torch.no_grad(), use_mode("native"), pytest.raises(ValueError, match="bias of 5 values"):
        p(x)
