"""The C activation fake-quantizers equal the PyTorch path bit for bit, and ActQuantizer uses them."""

from __future__ import annotations

import pytest
import torch

from lowbit.formats import ACT_FORMATS, QuantSpec
from lowbit.formats.qtensor import fake_quantize
from lowbit.kernels import native
from lowbit.kernels.dispatch import use_mode
from lowbit.kernels.fakequant import fake_quantize_fast
from lowbit.nn.act import ActQuantizer

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels unavailable on this machine")


def _token(kind: str, bits: int, fp: str | None = None) -> QuantSpec:
    return QuantSpec(kind=kind, bits=bits, fp_format=fp, symmetric=True, granularity="token", dynamic=True)


SPECS = {
    "fp8_e4m3": ACT_FORMATS["fp8_token"],
    "fp8_e5m2": _token("fp", 8, "e5m2"),
    "fp6_e3m2": _token("fp", 6, "e3m2"),
    "fp6_e2m3": _token("fp", 6, "e2m3"),
    "fp4_e2m1": _token("fp", 4, "e2m1"),
    "int8": ACT_FORMATS["int8_token"],
    "int4": ACT_FORMATS["int4_token"],
}


def _hard_rows(k: int, seed: int) -> torch.Tensor:
    """Rows that stress the rounding: wide magnitudes, values just below powers of two, zeros, subnormals, ±inf,
    NaN, all-negative rows; k not a multiple of the 8-lane vector width."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, k, generator=g) * torch.exp(torch.randn(8, 1, generator=g) * 8)
    x[0] = torch.ldexp(torch.ones(k), torch.randint(-30, 30, (k,), generator=g))
    x[0] *= 1 - torch.randint(0, 3, (k,), generator=g) * 2.0**-24
    x[1, : k // 2] = 0
    x[2, 0] = float("nan")  # a row with a NaN gets the smallest scale: its large values' quotients overflow
    x[2, 1 : min(k, 5)] = torch.tensor([-1e35, 3e38, -3e38, 1e30])[: max(0, min(k, 5) - 1)]
    x[3, -1] = float("inf")
    x[4, 0] = -float("inf")
    x[5] = torch.randn(k, generator=g) * 1e-39
    x[6] = -x[6].abs()
    x[7] = 0
    return x


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a.view(torch.int32) == b.view(torch.int32)) | (a.isnan() & b.isnan())).all())


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("k", [1, 7, 9, 64, 203])
def test_fast_path_is_bit_identical(name: str, k: int) -> None:
    spec = SPECS[name]
    for seed in range(3):
        x = _hard_rows(k, seed)
        fast = fake_quantize_fast(x, spec)
        assert fast is not None
        assert _same_bits(fast, fake_quantize(x, spec)), (name, k, seed)


@pytest.mark.parametrize("name", [n for n in SPECS if SPECS[n].kind == "fp"])
def test_exact_ties_round_half_to_even_as_the_torch_path(name: str) -> None:
    """Every midpoint between neighbouring grid values (and values one ulp either side), in a row whose scale is
    exactly 1 and one scaled by a power of two: the C rounding (one add of a signed power of two) picks the same
    grid value as the torch path's rint, ties to even."""
    from lowbit.formats.lowfloat import grid

    g = grid(SPECS[name].fp_format)
    mids = (g[1:] + g[:-1]) / 2  # exact: neighbouring values differ by one step
    near = torch.cat([mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1), g])
    row = torch.cat([g.abs().max().reshape(1), near])  # amax == max value: scale 1
    x = torch.stack([row, row * 2.0**-12, -row])
    fast = fake_quantize_fast(x, SPECS[name])
    assert fast is not None and _same_bits(fast, fake_quantize(x, SPECS[name]))


def test_int8_codes_near_ties_equal_torch_division_and_rounding() -> None:
    """The C row quantizer divides by a reciprocal and one correction (no division instruction). Rows built from the
    values a few ulps around the ties (k + 1/2) * s of their scale s where the uncorrected x * (1 / s) rounds to
    another code than x / s: the C codes are torch's round(x / s), ties to even, on every one of them."""
    g = torch.Generator().manual_seed(3)
    rows = []
    for _ in range(300):
        amax = (torch.rand(1, generator=g) + 1) * 2.0 ** torch.randint(-12, 22, (1,), generator=g).float()
        s = amax / 127  # the row's scale, as the quantizer computes it
        ties = (torch.arange(-127, 127, dtype=torch.float32) + 0.5) * s  # |ties| < amax
        near, up, down = [ties], ties, ties
        for _ in range(6):
            up, down = torch.nextafter(up, up * 2), torch.nextafter(down, down / 2)
            near += [up, down]
        x = torch.cat(near)
        traps = x[torch.round(x / s) != torch.round(x * (1 / s))]
        if 0 < len(traps) <= 8:
            rows.append(torch.cat([amax, traps, torch.zeros(8 - len(traps))]))
    assert len(rows) >= 10  # enough values where the naive reciprocal product gets the code wrong
    x = torch.stack(rows)
    codes, scales = native.quantize_rows_symmetric(x, 127.0, 2.0**-20, 65504.0)
    assert torch.equal(scales, x.abs().amax(1) / 127)
    assert torch.equal(codes, torch.round(x / scales[:, None]).clamp(-128, 127).to(torch.int8))
    # a row with a NaN: the smallest scale, so large values' quotients overflow to +-inf, then the extreme codes
    x = torch.tensor([[float("nan"), -1e35, 3e38, 1e30, -2.0, 0.5]])
    codes, scales = native.quantize_rows_symmetric(x, 127.0, 2.0**-20, 65504.0)
    assert scales.item() == 2.0**-20 and codes[0, 1:].tolist() == [-128, 127, 127, -128, 127]


def test_fp8_values_lie_on_the_grid_and_nan_maps_like_the_torch_path() -> None:
    from lowbit.formats.lowfloat import grid

    x = torch.randn(5, 96)
    x[0, 3] = float("nan")
    y = fake_quantize_fast(x, SPECS["fp8_e4m3"])
    s = x.abs().amax(dim=1, keepdim=True) / 448
    s[0] = 2.0**-20  # a row holding NaN gets the smallest run-time scale
    codes = (y / s).reshape(-1, 1)
    nearest = (codes - grid("e4m3")).abs().min(dim=1).values
    assert bool((nearest <= 1e-5 * codes.abs().squeeze(1).clamp_min(1e-3)).all())
    assert y[0, 3].item() == 448 * 2.0**-20  # NaN → the largest code, as encode's lookup does


def test_any_rank_and_non_contiguous_inputs() -> None:
    x = torch.randn(3, 5, 40).transpose(0, 1)
    for spec in (SPECS["fp8_e4m3"], SPECS["int8"]):
        fast = fake_quantize_fast(x, spec)
        assert fast is not None and fast.shape == x.shape
        assert torch.equal(fast, fake_quantize(x, spec))


@pytest.mark.parametrize(
    "spec",
    [
        ACT_FORMATS["binary_token"],
        QuantSpec(kind="int", bits=8, symmetric=True, granularity="tensor", dynamic=True),
        QuantSpec(kind="int", bits=8, symmetric=False, granularity="token", dynamic=True),
    ],
    ids=["binary", "per-tensor", "asymmetric"],
)
def test_other_specs_are_left_to_the_torch_path(spec: QuantSpec) -> None:
    assert fake_quantize_fast(torch.randn(2, 16), spec) is None


def test_reference_mode_and_other_dtypes_use_the_torch_path() -> None:
    x = torch.randn(2, 16)
    with use_mode("reference"):
        assert fake_quantize_fast(x, SPECS["int8"]) is None
    assert fake_quantize_fast(x.double(), SPECS["int8"]) is None
    assert fake_quantize_fast(torch.empty(0, 16), SPECS["int8"]) is None


def test_act_quantizer_takes_the_fast_path_without_grad_and_keeps_gradients_with_it(monkeypatch) -> None:
    q = ActQuantizer(SPECS["fp8_e4m3"])
    x = torch.randn(4, 32)
    calls = []
    real = native._need().lb_fake_quant_rows_fp

    class Spy:
        def __call__(self, *args):
            calls.append(args)
            return real(*args)

    monkeypatch.setattr(native, "_need", lambda: type("L", (), {"lb_fake_quant_rows_fp": Spy()})())
    with torch.no_grad():
        y = q(x)
    assert len(calls) == 1 and torch.equal(y, fake_quantize(x, q.spec))
    xg = x.clone().requires_grad_(True)
    q(xg).sum().backward()  # the torch path (straight-through rounding) keeps autograd working
    assert len(calls) == 1 and xg.grad is not None


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_traced_models_record_the_torch_path() -> None:
    """torch.jit.trace cannot see the C pass: a traced simulated or packed model must still depend on its input."""
    import lowbit

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    for m in (
        lowbit.compress(model, "w8a8", progress=False),
        lowbit.pack(lowbit.compress(model, "w8a8", progress=False)),
    ):
        with torch.no_grad():
            m(torch.randn(3, 32))  # a packed model has decided its kernels before tracing
            traced = torch.jit.trace(m, torch.randn(3, 32), check_trace=False)
            x = torch.randn(3, 32)
            assert torch.allclose(traced(x), m(x), rtol=1e-5, atol=1e-6)
