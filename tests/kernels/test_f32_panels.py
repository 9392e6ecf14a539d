"""Weight-only layers with fp32 inputs on many rows (`panels.matmul_f32_panel`): the int8 panels of every format,
dequantized a panel pair at a time into an fp32 register-tile GEMM. Not bit-exact (a different fp32 sum order from
the dense path), so the tests bound the error against a float64 reference and check what must be exact: the same
bits for any thread count, zero output for zero input, the layer's simulated output within fp32 rounding."""

import os
import shutil

import pytest
import torch
from torch import nn

import lowbit
from lowbit.formats import FORMATS
from lowbit.kernels import layer as native_layer
from lowbit.kernels import panels
from lowbit.kernels.dispatch import use_mode
from lowbit.kernels.routes import f32_panel_rows, route_for
from lowbit.recipe import Recipe, Stage
from tests.kernels.test_native import gen

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler: lowbit uses the reference kernels"
)

SHAPES = [(64, 16), (100, 33), (9, 32), (576, 64), (37, 5), (1152, 130)]  # N not a multiple of 32; K not of 32


def _close(y: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """|y - ref| within fp32 rounding of a K-term dot product: K·eps·Σ|x||w| per output."""
    bound = x.shape[1] * 2.0**-23 * (x.abs().double() @ w.abs().double().T) + 1e-30
    assert bool(((y.double() - ref).abs() <= bound).all()), float(((y.double() - ref).abs() / bound).max())


@pytest.mark.parametrize("K,N", SHAPES)
@pytest.mark.parametrize("M", [1, 3, 8, 9, 50])  # whole 8-row tiles and remainders
def test_f32_panels_compute_the_dense_product(K, N, M):
    g = gen(K * 5 + N + M)
    q = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
    q[0] = -128  # extreme codes
    s = torch.rand(N, generator=g) + 0.1
    x = torch.randn(M, K, generator=g)
    w = q.float() * s[:, None]
    y = panels.matmul_f32_panel(x, panels.prepare_panels(q, s))
    _close(y, x.double() @ w.double().T, x, w)
    assert torch.equal(y, panels.matmul_f32_panel(x, panels.prepare_panels(q, s), threads=2))


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_f32_panels_apply_the_group_scales_and_zero_points(bits, group):
    g = gen(bits * 100 + group)
    N, K, M = 45, 2 * group, 20
    q = torch.randint(0, 2**bits, (N, K), generator=g)
    s = torch.rand(N, K // group, generator=g) + 0.05
    z = torch.randint(0, 2**bits, (N, K // group), generator=g).float()
    x = torch.randn(M, K, generator=g)
    w = (q.float() - z.repeat_interleave(group, 1)) * s.repeat_interleave(group, 1)
    y = panels.matmul_f32_panel(x, panels.prepare_group_panels(q, s, z, group))
    _close(y, x.double() @ w.double().T, x, w)


def test_zero_rows_give_zero_outputs():
    q = torch.randint(-127, 128, (40, 64), dtype=torch.int8)
    y = panels.matmul_f32_panel(torch.zeros(12, 64), panels.prepare_panels(q, torch.rand(40)))
    assert bool((y == 0).all())


def _weight_only(fmt: str, k: int, n: int, recipe: str | None = None) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(k, n))
    if recipe is None:
        recipe = Recipe(stages=[Stage(method="rtn", weights=FORMATS[fmt], keep_first_last=False)])
    return lowbit.pack(lowbit.compress(model, recipe, progress=False))[0]


@pytest.mark.parametrize(
    "fmt,recipe,kernel",
    [
        ("int8", None, "w8a32"),
        ("int4_g128", None, "w4a32"),
        ("int2_g64", None, "w2a32"),
        (None, "w4g128-hqq", "w4a32"),  # real-valued zero points: panels of q and the s·z correction
        ("ternary_absmean", None, "w2a32"),
        ("binary", None, "w1a32"),
        ("fp4_e2m1", None, "fp4a32"),  # rows: the 4-bit codes through a table; panels: 2 × its values
    ],
)
def test_weight_only_layers_run_f32_panels_from_their_row_count(fmt, recipe, kernel):
    layer = _weight_only(fmt, 256, 70, recipe)
    route = route_for(layer)
    assert route.kernel == kernel and route.panel_rows == f32_panel_rows() > 1
    with_panels, without = route.prepare(layer, panels=True), route.prepare(layer)
    assert with_panels.has_panels and not without.has_panels
    x = torch.randn(f32_panel_rows() + 5, 256)
    a, b = native_layer.linear(with_panels, x, bias=layer.bias), native_layer.linear(without, x, bias=layer.bias)
    with torch.no_grad(), use_mode("reference"):
        ref = layer(x)
    scale = float(ref.abs().max())
    assert float((a - ref).abs().max()) <= 1e-5 * scale  # the simulated layer's output
    assert float((a - b).abs().max()) <= 1e-5 * scale  # and the row kernels'
    # Fewer rows than the panels' count: the row kernels, whatever the layer holds.
    few = x[: f32_panel_rows() - 1]
    assert torch.equal(native_layer.linear(with_panels, few), native_layer.linear(without, few))


def test_dispatch_gives_weight_only_layers_panels_on_the_first_call_with_many_rows():
    layer = _weight_only("int4_g128", 384, 96)
    with torch.no_grad():
        layer(torch.randn(2, 384))
        st = layer._dispatch.state
        assert st is None or not st.has_panels
        layer(torch.randn(1, 30, 384))
    st = layer._dispatch.state
    decided_native = layer._dispatch.decided.get((30, torch.get_num_threads()))
    assert decided_native is False or st.has_panels


def test_fp4_layers_run_rows_of_codes_and_panels_of_twice_their_values():
    """FP4 (E2M1) values × 2 are integers ≤ 12: with halved group scales both layouts hold the dequantized weights
    exactly (an identity input reads them back bit for bit): the row kernel's 4-bit codes read through a table, for
    a few rows, and the fp32 panels from the route's row count on."""
    torch.manual_seed(0)
    layer = lowbit.pack(lowbit.compress(nn.Sequential(nn.Linear(256, 70)), "fp4", progress=False))[0]
    route = route_for(layer)
    assert route.kernel == "fp4a32" and route.panel_rows == f32_panel_rows()
    rows_only, both = route.prepare(layer), route.prepare(layer, panels=True)
    assert rows_only.desc.w and not rows_only.has_panels and both.has_panels
    w = layer.weight_matrix()
    eye = torch.eye(256)
    assert torch.equal(native_layer.linear(both, eye), w.T)  # 256 rows: the panels
    few = f32_panel_rows() - 1
    by_rows = torch.cat([native_layer.linear(rows_only, eye[i : i + few]) for i in range(0, 256, few)])
    assert torch.equal(by_rows, w.T)  # the row kernel
    for rows in (1, 3, 20):
        x = torch.randn(rows, 256)
        with torch.no_grad(), use_mode("reference"):
            ref = layer(x)
        y = native_layer.linear(both, x, bias=layer.bias)
        assert float((y - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
        x[0, 5] = float("inf")  # inf and NaN outputs where the dense product has them (no 0 · inf from zero points)
        with torch.no_grad(), use_mode("reference"):
            ref = layer(x)
        y = native_layer.linear(both, x, bias=layer.bias)
        assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isinf(), ref.isinf())


@pytest.mark.parametrize("rows", [70, 1, 3, 8])
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_panels_decode_every_finite_code_exactly(fmt, rows):
    """FP8 bytes are decoded in the kernel (normal, subnormal, ±0): an identity input returns every weight
    code·scale bit for bit, the values of `lowfloat.decode_table` -- in registers (fewer rows than
    ``FP8_REGISTER_ROWS``: 12 on AVX2, through half precision; 128 on AVX-512, by shifts into bf16 patterns of the
    codes' values times 2^8 / 2^16, exponent-0 codes from a table), in a decoded block (70 rows at a time on AVX2)
    or on the AMX tiles (from 16 rows, the same shift decode)."""
    from lowbit.formats import lowfloat

    table = lowfloat.decode_table(fmt)
    finite = torch.tensor(sorted(lowfloat._code_table(fmt)[1]), dtype=torch.uint8)  # every code encode can give
    assert finite.numel() == {"e4m3": 253, "e5m2": 247}[fmt]  # one zero (+0), no NaN / inf
    N, K = 40, 70  # N·K > 256 codes: each finite one at least once (K not a multiple of 32: padding)
    codes = finite.repeat(N * K // finite.numel() + 1)[: N * K].reshape(N, K)
    s = torch.rand(N, generator=gen(3)) + 0.5
    p = panels.prepare_fp8_panels(codes, s, lowfloat.layout(fmt).exp_bits)
    eye = torch.eye(K)
    y = torch.cat([panels.matmul_f32_panel(eye[i : i + rows], p) for i in range(0, K, rows)])  # y[k, n] = w[n, k]
    assert torch.equal(y.T, table[codes.long()] * s[:, None])


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("M", [1, 2, 5, 8, 9, 11, 12, 33, 130])
@pytest.mark.parametrize("xscale", [1.0, 1e-15, 1e15, 1e30])
def test_fp8_panels_compute_the_dense_product(M, fmt, xscale, N=100, K=201):
    """Any row count (registers below ``FP8_REGISTER_ROWS`` -- 12 on AVX2, 128 on AVX-512, 8 rows a decode there --
    then a decoded block; the AMX tiles from 16 rows where they are on), K not a multiple of 4, N of 16; inputs
    whose rows lie inside [2^-40, 2^40] (the register rows then scale the sums, not each weight) and outside."""
    from lowbit.formats import lowfloat

    g = gen(M)
    codes = torch.randint(0, 256, (N, K), generator=g, dtype=torch.uint8)
    if fmt == "e4m3":
        codes[(codes & 0x7F) == 0x7F] = 0  # E4M3's NaN patterns are never encoded
    else:
        codes[(codes & 0x7C) == 0x7C] = 0  # nor E5M2's inf / NaN ones
    s = torch.rand(N, generator=g)
    w = lowfloat.decode_table(fmt)[codes.long()] * s[:, None]
    x = torch.randn(M, K, generator=g) * xscale
    for threads in (1, 2):
        y = panels.matmul_f32_panel(x, panels.prepare_fp8_panels(codes, s, lowfloat.layout(fmt).exp_bits), threads)
        _close(y, x.double() @ w.double().T, x, w)
    x[0, 7] = float("nan")  # a NaN input row stays NaN, the other rows are unaffected
    y = panels.matmul_f32_panel(x, panels.prepare_fp8_panels(codes, s, lowfloat.layout(fmt).exp_bits))
    assert bool(y[0].isnan().all()) and not bool(y[1:].isnan().any())


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("M", [4, 16])  # the register rows; from 16 the AMX-BF16 tiles where they are on
def test_fp8_terms_of_tiny_inputs_and_the_smallest_codes_keep_their_bits(fmt, M):
    """Rows whose largest input meets a zero weight and whose other inputs (2^-110) meet the smallest subnormal code:
    the output (2^-113 / 2^-120) is the sum of those terms to fp32 rounding. The decoded values the kernels multiply
    are the codes' times 2^8 / 2^16, so no product of a term whose true value is a normal fp32 falls below fp32's
    normal range (decoded as the codes' times 2^-16, E5M2's terms were flushed to 0 on the tiles and lost bits in the
    register rows)."""
    from lowbit.formats import lowfloat

    K, N = 64, 16
    smallest = lowfloat.encode(torch.tensor([[2.0 ** {"e4m3": -9, "e5m2": -16}[fmt]]]), torch.ones(1), name=fmt)
    codes = smallest.expand(N, K).clone()
    codes[:, 0] = 0
    s = torch.ones(N)
    w = lowfloat.decode_table(fmt)[codes.long()] * s[:, None]
    assert float(w[0, 1]) == 2.0 ** {"e4m3": -9, "e5m2": -16}[fmt]
    x = torch.full((M, K), 1.2345678 * 2.0**-110)
    x[:, 0] = 1.0
    y = panels.matmul_f32_panel(x, panels.prepare_fp8_panels(codes, s, lowfloat.layout(fmt).exp_bits))
    ref = x.double() @ w.double().T
    bound = K * 2.0**-23 * (x.abs().double() @ w.abs().double().T)  # (`_close`'s, without its absolute 1e-30)
    assert bool((ref > 0).all()) and bool(((y.double() - ref).abs() <= bound).all())


@pytest.mark.parametrize(("M", "N"), [(1, 1000), (3, 300)])
def test_fp8_register_rows_split_between_threads(M, N):
    """Enough work (M·N·K ≥ 2^20) for the few-row FP8 path to split its panels between threads."""
    assert M * N * 1200 >= 1 << 20
    test_fp8_panels_compute_the_dense_product(M, "e4m3", 1.0, N=N, K=1200)


def test_fp8_terms_are_the_block_paths_and_huge_scales_take_the_block_path():
    """Each decoded weight times its scale, then summed, on either path: a sum of scaled terms well inside fp32's range
    stays finite though the unscaled one would overflow, and scales from 2^100 on run the block path."""
    from lowbit.formats import lowfloat

    codes = torch.full((16, 4), 0x7B, dtype=torch.uint8)  # E5M2 57344
    s = torch.full((16,), 2.0**-20)
    x = torch.full((1, 4), 1e34)
    p = panels.prepare_fp8_panels(codes, s, 5)
    few, many = panels.matmul_f32_panel(x, p), panels.matmul_f32_panel(x.expand(12, 4), p)
    assert torch.isfinite(few).all() and torch.equal(few[0], many[0])
    codes = torch.tensor([[0x00, 0x01, 0x30, 0x38]] * 16, dtype=torch.uint8)  # E4M3 0, 2^-9, 0.5, 1
    s = torch.full((16,), 3e38)
    p = panels.prepare_fp8_panels(codes, s, 4)
    x = torch.tensor([[1.0, 2.0**-20, 0.5, 0.25]])
    y = panels.matmul_f32_panel(x, p)
    ref = (x.double() @ (lowfloat.decode_table("e4m3")[codes.long()].double() * 3e38).T).float()
    assert torch.isfinite(y).all() and torch.allclose(y, ref, rtol=1e-6)


@pytest.mark.parametrize(("exp_bits", "code"), [(4, 0x7F), (4, 0xFF), (5, 0x7C), (5, 0xFE)])
def test_fp8_nan_and_inf_patterns_read_as_the_reference_decodes_them(exp_bits, code):
    """Bytes the encoder never writes (a corrupt checkpoint) give the reference path's values (0) at any row count."""
    from lowbit.formats import lowfloat

    fmt = "e4m3" if exp_bits == 4 else "e5m2"
    codes = torch.full((4, 8), 0x38, dtype=torch.uint8)
    codes[2, 3] = code
    w = lowfloat.decode_table(fmt)[codes.long()]
    assert w[2, 3] == 0
    p = panels.prepare_fp8_panels(codes, torch.ones(4), exp_bits)
    for rows in (1, 12):
        x = torch.ones(rows, 8)
        assert torch.equal(panels.matmul_f32_panel(x, p), x @ w.T)
