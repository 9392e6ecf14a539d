"""The many-row W8A8 kernel (`lowbit.kernels.panels`): exact integer sums, the row kernels' bits, and its use by
whole layers (`lb_linear` from 4 rows on, W8A8 and ternary)."""

import os
import shutil

import pytest
import torch

from lowbit.kernels import group_layout, native, panels
from tests.kernels.test_native import exact_dot, gen, rand_xq

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler: lowbit uses the reference kernels"
)

SHAPES = [(64, 16), (100, 33), (9, 32), (576, 64), (37, 5), (1152, 130)]  # N not a multiple of 16; K not of 32


@pytest.mark.parametrize("K,N", SHAPES)
@pytest.mark.parametrize("M", [1, 4, 7, 50])  # whole 4-row blocks and remainders of 1-3 rows
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("nonneg", [False, True])  # codes all >= 0 take the kernel's sign-free product
def test_panel_kernel_is_exact_and_equals_the_row_kernel(K, N, M, threads, nonneg):
    g = gen(K * 7 + N + M)
    q = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
    q[0, :] = -128  # extreme codes
    s = torch.rand(N, generator=g) + 0.1
    xq, sx = rand_xq(M, K, g)
    if nonneg:
        xq = xq.abs()
        xq[0, : K // 2] = 127
    else:
        xq[0, : K // 2] = -127
    y = panels.matmul_w8a8_panel(xq, sx, panels.prepare_panels(q, s), threads)
    ref = (sx[:, None] * s[None, :]) * exact_dot(xq, q).to(torch.float32)
    assert torch.equal(y, ref)
    assert torch.equal(y, native.matmul_w8a8(xq, sx, native.prepare_w8(q, s), threads))


def test_one_negative_code_in_a_block_takes_the_signed_product():
    # The sign-free product reads codes as unsigned: a single negative code must switch the block to the sign trick.
    K, N = 64, 16
    g = gen(5)
    q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    xq = torch.randint(0, 128, (8, K), generator=g, dtype=torch.int8)
    xq[6, 63] = -1
    sx, s = torch.ones(8), torch.ones(N)
    y = panels.matmul_w8a8_panel(xq, sx, panels.prepare_panels(q, s))
    assert torch.equal(y, exact_dot(xq, q).to(torch.float32))


def test_ternary_codes_on_panels_match_the_ternary_kernel():
    g = gen(11)
    t = torch.randint(-1, 2, (70, 384), generator=g, dtype=torch.int8)
    xq, sx = rand_xq(9, 384, g)
    sw = torch.tensor(0.37)
    y = panels.matmul_w8a8_panel(xq, sx, panels.prepare_panels(t, sw))
    assert torch.equal(y, native.matmul_ternary(xq, sx, native.prepare_ternary(t, sw)))


def _packed(preset, k, n):
    from torch import nn

    import lowbit

    torch.manual_seed(0)
    return lowbit.pack(lowbit.compress(nn.Sequential(nn.Linear(k, n)), preset, progress=False))[0]


@pytest.mark.parametrize("preset,k,has_panels", [("w8a8", 200, True), ("ternary", 384, True), ("ternary", 1024, None)])
def test_layers_with_int8_activations_get_panels(preset, k, has_panels):
    from lowbit.kernels.routes import route_for

    vnni = native.build_info()["isa"] == "avx512vnni"
    if has_panels is None:  # long ternary rows: panels with AVX-512 VNNI only (the AVX2 2-bit kernel leads there)
        has_panels = vnni
    layer = _packed(preset, k, 40)
    prepared = route_for(layer).prepare(layer, panels=True)
    always = vnni and preset == "w8a8"  # W8A8 with VNNI: panels for every row count, and no row layout
    assert prepared.has_panels is has_panels and route_for(layer).prepare(layer).has_panels is always
    x = torch.randn(40, k)  # ternary layers run panels from 32 rows on, W8A8 layers from 4
    x[3] = x[3].abs()  # a row without negative codes next to signed ones
    from lowbit.kernels import layer as native_layer

    many = native_layer.linear(prepared, x)  # panels where the layer has them
    one_by_one = torch.cat([native_layer.linear(prepared, x[i : i + 1]) for i in range(40)])  # row kernels
    assert torch.equal(many, one_by_one)


@pytest.mark.parametrize("preset,many", [("w8a8", 4), ("ternary", 32)])
def test_dispatch_builds_panels_on_the_first_call_with_many_rows(preset, many):
    """A layer called on a few rows (decoding) keeps one copy of its weights; the first call with enough rows adds
    the panels, which later calls keep (whatever their rows), and the outputs do not depend on it."""
    from lowbit.kernels.dispatch import use_mode
    from lowbit.kernels.routes import panel_rows

    layer = _packed(preset, 384, 40)
    x = torch.randn(many, 384)
    with torch.no_grad(), use_mode("native"):
        few = layer(x[:1])
        if preset == "w8a8" and panel_rows("w8") == 1:  # VNNI builds: W8A8 panels from 1 row, the only layout
            assert layer._dispatch.state.has_panels and not layer._dispatch.state.desc.w
            assert torch.equal(layer(x)[:1], few)
            return
        assert not layer._dispatch.state.has_panels
        all_rows = layer(x)
        assert layer._dispatch.state.has_panels
        assert torch.equal(layer(x[:1]), few) and layer._dispatch.state.has_panels
    assert torch.equal(all_rows[:1], few)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("M", [1, 6, 20])
@pytest.mark.parametrize("nonneg", [False, True])
def test_group_panels_compute_the_group_sums_exactly(bits, group, M, nonneg):
    """Group-wise int2-4 weights on panels of q − z: each group's int32 sum is exact, so the output is the
    formula y = sx·Σ_g s_g·d_g up to fp32 rounding of the group sum, and the 4-bit kernel's within the same."""
    K, N = 384, 37
    G = K // group
    g = gen(bits * 100 + group + M)
    q = torch.randint(0, 2**bits, (N, K), generator=g, dtype=torch.uint8)
    s = torch.rand(N, G, generator=g) + 0.1
    z = torch.randint(0, 2**bits, (N, G), generator=g).float()
    xq, sx = rand_xq(M, K, g)
    if nonneg:
        xq = xq.abs()
    y = panels.matmul_wn_panel(xq, sx, panels.prepare_group_panels(q, s, z, group), 2)
    d = xq.double()[:, None, :] * (q.double() - z.repeat_interleave(group, 1).double())[None]
    exact = sx.double()[:, None] * (d.reshape(M, N, G, group).sum(-1) * s.double()[None]).sum(-1)
    tol = 1e-6 * float(exact.abs().max())
    assert float((y.double() - exact).abs().max()) <= tol
    ref = group_layout.matmul_wna8(xq, sx, group_layout.prepare_wn(q, s, z, bits, group))
    assert float((y - ref).abs().max()) <= 2 * tol


@pytest.mark.parametrize("zero", ["integer", "real"])  # real-valued zero points (HQQ): panels of q + s·z correction
def test_group_layers_use_panels_from_16_rows(zero):
    from torch import nn

    import lowbit
    from lowbit.kernels import layer as native_layer
    from lowbit.kernels.routes import route_for

    torch.manual_seed(0)
    recipe = "w4g128-hqq" if zero == "real" else "w4g128"
    layer = lowbit.pack(
        lowbit.compress(nn.Sequential(nn.Linear(256, 48)), recipe, progress=False), kernel_activations="int8"
    )[0]
    assert bool(torch.equal(layer.zero, layer.zero.round())) is (zero == "integer")
    route = route_for(layer)
    assert route.kernel == "w4a8" and route.panel_rows == 16
    with_panels, without = route.prepare(layer, panels=True), route.prepare(layer)
    assert with_panels.has_panels and not without.has_panels
    x = torch.randn(20, 256)
    x[2] = x[2].abs()
    a, b = native_layer.linear(with_panels, x), native_layer.linear(without, x)  # panels / the 4-bit kernel
    assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())


def test_panel_sums_are_the_column_sums_of_the_codes():
    """The VNNI tiles multiply x + 128 and subtract 128·Σ_k w: the sums kept with the panels must be exact."""
    g = gen(11)
    q = torch.randint(-128, 128, (37, 96), generator=g, dtype=torch.int8)
    p = panels.prepare_panels(q, torch.rand(37, generator=g))
    assert p.ws.dtype == torch.int32 and p.ws.shape == (48,)
    assert torch.equal(p.ws[:37], q.int().sum(1)) and not p.ws[37:].any()
    codes = torch.randint(0, 16, (20, 128), generator=g)
    z = torch.randint(0, 16, (20, 4), generator=g).float()
    gp = panels.prepare_group_panels(codes, torch.rand(20, 4, generator=g), z, 32)
    d = (codes - z.repeat_interleave(32, dim=1)).int()
    want = torch.zeros(32, 4, dtype=torch.int32)
    want[:20] = d.view(20, 4, 32).sum(-1)
    assert gp.ws.dtype == torch.int32 and torch.equal(gp.ws, want.view(2, 16, 4).permute(0, 2, 1))


def test_panel_rows_come_from_the_loaded_build():
    from lowbit.kernels.routes import panel_rows

    vnni = native.build_info()["isa"] == "avx512vnni"
    assert (panel_rows("w8"), panel_rows("wn"), panel_rows("ternary")) == (1, 16, 16) if vnni else (4, 16, 32)
    assert panel_rows("binary_inter") == 4 and panel_rows("binary_blocked") == (32 if native.amx() else 0)


def test_rows_longer_than_the_vnni_limit_are_still_exact():
    """Past K = 65536 the offset form could overflow int32: those rows take the AVX2 tiles (same sums)."""
    g = gen(3)
    K = 65536 + 64
    q = torch.randint(-127, 128, (17, K), generator=g, dtype=torch.int8)
    s = torch.rand(17, generator=g) + 0.1
    xq, sx = rand_xq(5, K, g)
    y = panels.matmul_w8a8_panel(xq, sx, panels.prepare_panels(q, s))
    assert torch.equal(y, (sx[:, None] * s[None, :]) * exact_dot(xq, q).float())


def test_binary_weights_with_int8_activations_run_on_panels_with_the_bit_kernels_bits():
    """W1A8 (binary weights, int8 rows): the panels hold the ±1 codes, so a batch's int32 sums and outputs are those
    of the bit kernel (`lb_w1a8`) run row by row."""
    from torch import nn

    import lowbit
    from lowbit.kernels import layer as native_layer
    from lowbit.kernels.routes import route_for

    torch.manual_seed(0)
    q = lowbit.compress(nn.Sequential(nn.Linear(300, 40)), "binary", progress=False)
    layer = lowbit.pack(q, kernel_activations="int8")[0]
    route = route_for(layer)
    assert route.kernel == "w1a8" and route.panel_rows == 4
    prepared = route.prepare(layer, panels=True)
    assert prepared.has_panels and not route.prepare(layer).has_panels
    x = torch.randn(21, 300)
    many = native_layer.linear(prepared, x)
    assert torch.equal(many, torch.cat([native_layer.linear(prepared, x[i : i + 1]) for i in range(21)]))


def test_w8a8_layers_keep_one_layout():
    """Where panels serve every row count (VNNI builds) a W8A8 layer holds no row layout: one int8 copy of its
    weights, and its outputs on 1-3 rows (row kernels elsewhere) are the same bits as row by row in a batch."""
    from lowbit.kernels import layer as native_layer
    from lowbit.kernels.routes import panel_rows, route_for

    layer = _packed("w8a8", 200, 40)
    prepared = route_for(layer).prepare(layer)
    if panel_rows("w8") == 1:
        assert prepared.has_panels and not prepared.desc.w
        assert prepared.nbytes < 1.2 * 48 * 224  # the panels (48 columns × 224 k) and their scales / sums
    else:
        assert not prepared.has_panels and prepared.desc.w
    x = torch.randn(7, 200)
    rows = [native_layer.linear(prepared, x[i : i + 1]) for i in range(7)]
    assert torch.equal(native_layer.linear(prepared, x), torch.cat(rows))
    assert torch.equal(native_layer.linear(prepared, x[:3]), torch.cat(rows[:3]))
