"""FP8 layers with FP8 activations on many rows on AMX-BF16 tiles (`fp8_amx`): both sides' codes in bf16 (exact),
fp32 sums. The outputs equal the simulated layer's and the fp32 FP8 kernel's up to fp32 summation order. On a CPU
or OS without AMX both sides run the fp32 kernel and the comparisons still hold."""

import os
import shutil
import subprocess

import pytest
import torch
from torch import nn

import lowbit
from lowbit.formats import ACT_FORMATS, FORMATS, QuantSpec, lowfloat
from lowbit.kernels import native, panels
from lowbit.kernels.dispatch import layer_report, use_mode
from lowbit.recipe import Recipe, Stage
from tests.kernels.test_amx import both
from tests.kernels.test_small_conv import one_call_and_rows

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler: lowbit uses the reference kernels"
)

E5M2_TOKEN = QuantSpec(kind="fp", bits=8, fp_format="e5m2", symmetric=True, granularity="token", dynamic=True)


def _fp8(model: nn.Module, weights: str, acts: QuantSpec) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    stage = Stage(method="rtn", weights=FORMATS[weights], activations=acts, keep_first_last=False)
    simulated = lowbit.compress(model, Recipe(stages=(stage,)), progress=False)
    return simulated, lowbit.pack(simulated)


@pytest.fixture
def threads_state():
    """Restores torch's thread count a test changes."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _on_off(call) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """call() with the tiles on and off, on 1 and then 2 threads (the tiles left on)."""
    pairs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        pairs.append(both(call))
        native.amx(True)
    return pairs


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to fp32 summation order (the tolerance of every float kernel's parity test), NaN where NaN."""
    assert torch.equal(got.isnan(), want.isnan())
    g, w = got.nan_to_num(), want.nan_to_num()
    assert float((g - w).abs().max()) <= 2e-5 * float(w.abs().max())


def test_the_bf16_tiles_are_built_where_the_cpu_and_compiler_have_them(amx_state):
    cxx = os.environ.get("CXX", "g++")
    macros = subprocess.run(
        [cxx, "-march=native", "-dM", "-E", "-x", "c++", "-"], input="", capture_output=True, text=True
    ).stdout
    compiler = "__AMX_BF16__" in macros and "__AVX512BF16__" in macros
    native.amx(True)
    assert native.build_info()["amx_bf16"] == (native.amx() and compiler)
    native.amx(False)
    assert native.build_info()["amx_bf16"] is False


@pytest.mark.parametrize(("weights", "acts"), [("fp8_e4m3", ACT_FORMATS["fp8_token"]), ("fp8_e5m2", E5M2_TOKEN)])
# Kp: whole / padded tile steps; 1400 columns: panels decoded in three chunks (fp8_amx_run), split between threads
@pytest.mark.parametrize(("K", "N"), [(384, 96), (100, 33), (1000, 16), (9, 40), (384, 1400)])
# below and from the tiles' 10 rows, one row tile, partial second tiles, several blocks
@pytest.mark.parametrize("M", [9, 10, 16, 17, 31, 45, 200])
def test_fp8_layers_on_many_rows_match_the_simulated_layer_and_the_fp32_kernel(
    weights, acts, K, N, M, amx_state, threads_state
):
    simulated, packed = _fp8(nn.Sequential(nn.Linear(K, N)), weights, acts)
    x = torch.randn(M, K) * torch.exp(torch.randn(M, 1) * 3)  # rows of very different scales
    x[1, 0] = float("nan")  # a NaN input is the largest code, as the simulated quantizer's lookup gives it
    x[2] = 0.0
    with torch.no_grad(), use_mode("native"):
        want = simulated(x)
        for on, off in _on_off(lambda: packed(x)):
            _close(on, off)
            _close(on, want)
    assert layer_report(packed[0])[0]["path"] == "fp8a8"


def test_fp8_layers_with_an_input_scale_run_on_the_tiles(amx_state):
    """AWQ / SmoothQuant leave a per-input-channel scale on a layer when nothing absorbs it: the C call scales the
    rows before it takes their codes, as the simulated layer does."""
    simulated, packed = _fp8(nn.Sequential(nn.Linear(64, 48)), "fp8_e4m3", ACT_FORMATS["fp8_token"])
    s = torch.rand(64, generator=torch.Generator().manual_seed(5)) + 0.5
    simulated[0].set_input_scale(s)
    packed[0].set_input_scale(s)
    x = torch.randn(40, 64)
    with torch.no_grad(), use_mode("native"):
        on, off = both(lambda: packed(x))
        _close(on, off)
        _close(on, simulated(x))


@pytest.mark.parametrize("weights", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize(("hw", "batch"), [((12, 12), 3), ((7, 9), 5), ((4, 4), 4), ((5, 6), 2)])
def test_fp8_convolutions_write_their_maps_from_the_tiles(weights, hw, batch, amx_state, threads_state):
    """The one C call of a decided FP8 convolution (lb_conv): each image's map written from the tiles by the
    transposed store, images whose patches do not start on a whole tile (63, 16, 30 patches), images split between
    threads -- against the patch path's rows (lb_linear) and the simulated layer, tiles on and off."""
    acts = ACT_FORMATS["fp8_token"] if weights == "fp8_e4m3" else E5M2_TOKEN
    simulated, packed = _fp8(nn.Sequential(nn.Conv2d(16, 40, 3, padding=1)), weights, acts)
    x = torch.randn(batch, 16, *hw)
    want = simulated(x).detach()
    for threads in (1, 2):
        for on in (True, False):
            native.amx(on)
            direct, rows = one_call_and_rows(packed[0], x, threads)
            _close(direct, rows)
            _close(direct, want)


# Weight-only layers with fp32 inputs: the panels' codes times three bf16 parts of each input (f32_amx).
WEIGHT_ONLY = [
    "int8",
    "int4_g128",
    "int4_g32",
    "int3_g64",
    "int2_g64",
    "binary",
    "ternary_absmean",
    "fp4_e2m1",
    "fp8_e4m3",
    "fp8_e5m2",
]


def _close_rows(got: torch.Tensor, want: torch.Tensor) -> None:
    """Row by row within 2e-5 of the row's own largest output (a row 10^9 smaller than another is checked too)."""
    err = (got - want).abs().amax(1)
    assert bool((err <= 2e-5 * want.abs().amax(1)).all()), float((err / want.abs().amax(1)).max())


@pytest.mark.parametrize("weights", WEIGHT_ONLY)
@pytest.mark.parametrize(
    ("K", "N", "M"),
    # (384, 1400): the panels decoded in three chunks per call, split between threads; 600 rows: two row chunks
    [(384, 96, 16), (256, 33, 17), (640, 16, 45), (128, 200, 70), (64, 40, 600), (256, 48, 300), (384, 1400, 40)],
)
def test_weight_only_layers_on_many_rows_run_fp32_inputs_as_three_bf16_parts(
    weights, K, N, M, amx_state, threads_state
):
    """An fp32 input row, scaled by a power of two, is the exact sum of three bf16 parts and every panel code is
    exact in bf16, so the tiles' products are exact and their fp32 sums agree with the fp32 kernel's and the
    simulated layer's, row by row, for rows 10^±4 apart (600 rows: two chunks)."""
    torch.manual_seed(0)
    stage = Stage(method="rtn", weights=FORMATS[weights], activations=None, keep_first_last=False)
    simulated = lowbit.compress(nn.Sequential(nn.Linear(K, N, bias=False)), Recipe(stages=(stage,)), progress=False)
    packed = lowbit.pack(simulated)
    x = torch.randn(M, K) * torch.exp(torch.randn(M, 1) * 3)
    with torch.no_grad(), use_mode("native"):
        want = simulated(x)
        for on, off in _on_off(lambda: packed(x)):
            _close_rows(on, off)
            _close_rows(on, want)
            if native.build_info()["amx_bf16"]:
                assert not torch.equal(on, off)  # the tiles ran (their sums in another order)


@pytest.mark.parametrize("kind", ["int8", "int4_g64", "fp8_e4m3", "fp8_e5m2"], ids=["int8", "group", "e4m3", "e5m2"])
@pytest.mark.parametrize("K", [100, 1152, 8192])
def test_f32_panels_on_the_tiles_hold_tiny_and_huge_rows(kind, K, amx_state):
    """Rows from fp32 subnormals to 1e30 (and largest E5M2 codes: unscaled sums that would pass 2^128 without the
    rows' power-of-two scaling): every output within fp32 rounding of a K-term dot product of the float64 one."""

    def within_fp32(y: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
        """|y - ref| <= K·eps·Σ|x||w| per output, with no absolute slack: tiny rows are held to their own scale
        (plus half the smallest subnormal where an output is itself subnormal)."""
        slack = 2.0**-150 if native.build_info()["amx_bf16"] else 1e-30  # (no tiles: the fp32 kernel's bound)
        bound = x.shape[1] * 2.0**-23 * (x.abs().double() @ w.abs().double().T) + slack
        assert bool(((y.double() - ref).abs() <= bound).all()), float(((y.double() - ref).abs() / bound).max())

    g = torch.Generator().manual_seed(K)
    N = 40
    if kind == "int8":
        q = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
        s = torch.rand(N, generator=g) + 0.1
        prepared, w = panels.prepare_panels(q, s), q.float() * s[:, None]
    elif kind == "int4_g64":
        q = torch.randint(0, 16, (N, K // 64 * 64), generator=g)
        sg = torch.rand(N, K // 64, generator=g) + 0.05
        z = torch.randint(0, 16, (N, K // 64), generator=g).float()
        prepared = panels.prepare_group_panels(q, sg, z, 64)
        w = (q.float() - z.repeat_interleave(64, 1)) * sg.repeat_interleave(64, 1)
        K = w.shape[1]
    else:
        fmt = kind.split("_")[1]
        values = lowfloat.grid(fmt)
        codes = lowfloat.encode(values[torch.randint(0, len(values), (N, K), generator=g)], torch.ones(1), name=fmt)
        codes[0] = lowfloat.encode(values.max().reshape(1, 1), torch.ones(1), name=fmt)  # the largest code
        s = torch.full((N,), 2.0**-16)
        prepared = panels.prepare_fp8_panels(codes, s, lowfloat.layout(fmt).exp_bits)
        w = lowfloat.decode(codes, s[:, None], name=fmt)
    scales = torch.tensor([1e-39, 2.0**-125, 2.0**-112, 1e-20, 1.0, 1e20, 1e30])
    x = torch.randn(28, K, generator=g) * scales.repeat(4)[:, None]
    x[27] = 0.0
    native.amx(True)
    # (the fp32 kernel rounds each product on the subnormal grid for the smallest rows: held to test_f32_panels'
    # bound, with an absolute slack, where there are no tiles)
    within_fp32(panels.matmul_f32_panel(x, prepared), x.double() @ w.double().T, x, w)


@pytest.mark.parametrize("bad", [float("inf"), -float("inf"), float("nan")])
@pytest.mark.parametrize(("M", "row"), [(20, 4), (600, 550)])  # the bad value in the first or a later chunk
def test_weight_only_inputs_with_non_finite_values_take_the_fp32_kernel(bad, M, row, amx_state):
    """A non-finite input sends the whole call to the fp32 kernel, before anything is written: its NaN / inf
    results, the same bits as with the tiles off."""
    torch.manual_seed(0)
    stage = Stage(method="rtn", weights=FORMATS["int4_g128"], activations=None, keep_first_last=False)
    packed = lowbit.pack(lowbit.compress(nn.Sequential(nn.Linear(256, 48)), Recipe(stages=(stage,)), progress=False))
    x = torch.randn(M, 256)
    x[row, 9] = bad
    with torch.no_grad(), use_mode("native"):
        on, off = both(lambda: packed(x))
    assert torch.equal(on.isnan(), off.isnan()) and torch.equal(on.nan_to_num(), off.nan_to_num())
