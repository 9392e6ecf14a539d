"""The many-row int8 panel kernels on AMX tiles (`lowbit_amx.h`): the same exact int32 sums, so the same output
bits as the VNNI / AVX2 tiles, for row-major layers, group panels and convolutions' maps. On a CPU or OS without
AMX both sides run the VNNI (or AVX2) tiles and the comparisons still check the exact formula."""

import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

import lowbit
from lowbit.formats import ACT_FORMATS, FORMATS
from lowbit.kernels import native, panels
from lowbit.kernels.dispatch import use_mode
from lowbit.recipe import Recipe, Stage
from tests.kernels.test_native import exact_dot, gen, rand_xq
from tests.kernels.test_small_conv import one_call_and_rows, packed

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler: lowbit uses the reference kernels"
)


def both(fn):
    """fn() with the AMX kernels on, then off."""
    native.amx(True)
    on = fn()
    native.amx(False)
    return on, fn()


def _cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx_int8" in line for line in f)
    except OSError:
        return False


def _compiler_has_amx() -> bool:
    """Whether the compiler defines __AMX_INT8__ for this CPU (GCC 11 on)."""
    cxx = os.environ.get("CXX", "g++")
    cmd = [cxx, "-march=native", "-dM", "-E", "-x", "c++", "-"]
    out = subprocess.run(cmd, input="", capture_output=True, text=True)
    return "__AMX_INT8__" in out.stdout


def test_amx_is_used_where_cpu_compiler_and_os_allow_it(amx_state):
    release = tuple(int(v) for v in platform.release().split(".")[:2] if v.isdigit())
    possible = (
        _cpu_has_amx()
        and native.build_info()["isa"] == "avx512vnni"
        and release >= (5, 16)  # Linux hands out the tile registers from 5.16 on
        and _compiler_has_amx()
    )
    env_off = os.environ.get("LOWBIT_AMX", "1").lower() in ("0", "off", "false", "no")
    assert native.amx() == (possible and not env_off)
    assert native.amx(False) is False and native.build_info()["amx"] is False
    assert native.amx(True) == possible  # (an explicit switch overrides the environment)


def test_lowbit_amx_off_in_the_environment_turns_the_tiles_off():
    code = "from lowbit.kernels import native; print(native.amx())"
    env = dict(os.environ, LOWBIT_AMX="off")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# K: whole 64-k tile steps, a last half step (Kp % 64 == 32) and padding; N: one panel, odd panel counts; M: one
# and two row tiles, partial tiles
@pytest.mark.parametrize("K,N", [(64, 16), (9, 32), (96, 5), (100, 33), (384, 100), (1000, 48)])
@pytest.mark.parametrize("M", [16, 17, 33, 50, 200])
@pytest.mark.parametrize("threads", [1, 2])
def test_w8a8_panels_give_the_same_bits_on_tiles(K, N, M, threads, amx_state):
    g = gen(K * 3 + N + M)
    q = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
    s = torch.rand(N, generator=g) + 0.1
    xq, sx = rand_xq(M, K, g)
    xq[1, : K // 2] = -128  # static zero-point activations reach -128: signed x signed tiles need no special form
    p = panels.prepare_panels(q, s)
    on, off = both(lambda: panels.matmul_w8a8_panel(xq, sx, p, threads))
    assert torch.equal(on, off)
    assert torch.equal(on, (sx[:, None] * s[None, :]) * exact_dot(xq, q).to(torch.float32))


@pytest.mark.parametrize("group", [32, 64, 128])  # 32: half a tile step, kept on the VNNI tiles
@pytest.mark.parametrize("M", [16, 40])
@pytest.mark.parametrize("N", [16, 37])
def test_group_panels_give_the_same_bits_on_tiles(group, M, N, amx_state):
    K = 768
    g = gen(group + M + N)
    q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    s = torch.rand(N, K // group, generator=g) + 0.1
    z = torch.randint(0, 16, (N, K // group), generator=g).float()
    xq, sx = rand_xq(M, K, g)
    p = panels.prepare_group_panels(q, s, z, group)
    on, off = both(lambda: panels.matmul_wn_panel(xq, sx, p, 2))
    assert torch.equal(on, off)


@pytest.mark.parametrize(
    ("weights", "acts"),
    [("int8", "int8_token"), ("int8", "int8_static"), ("ternary_absmean", "int8_token"), ("binary", "int8_token")],
)
def test_convolution_maps_give_the_same_bits_on_tiles(weights, acts, amx_state):
    """lb_conv writes each image's (O, OH*OW) map straight from the panel kernel: the tiles' transposed store. The
    same bits with the tiles on and off, and as the patch path's rows (lb_linear, row-major store)."""
    x = torch.randn(3, 16, 16, 16)
    x[0, 2, 5, 5] = float("nan")  # a NaN patch gives NaN outputs on every path
    layer = packed(nn.Conv2d(16, 40, 3), weights, acts, x.nan_to_num())
    for threads in (1, 2):
        (d_on, r_on), (d_off, r_off) = both(lambda threads=threads: one_call_and_rows(layer, x, threads))
        for a, b in ((d_on, d_off), (r_on, r_off), (d_on, r_on)):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(
    ("weights", "acts"),
    [
        ("int8", "int8_token"),
        ("ternary_absmean", "int8_token"),
        ("binary", "int8_token"),
        ("int4_g128", "int8_token"),
        ("binary", "binary_token"),  # W1A1: ±1 panels on the tiles against the XNOR-popcount kernel
    ],
)
def test_packed_linear_layers_give_the_same_bits_on_tiles(weights, acts, amx_state):
    torch.manual_seed(0)
    stage = Stage(method="rtn", weights=FORMATS[weights], activations=ACT_FORMATS[acts], keep_first_last=False)
    layer = lowbit.pack(lowbit.compress(nn.Sequential(nn.Linear(384, 96)), Recipe(stages=(stage,)), progress=False))
    x = torch.randn(45, 384)
    x[3, :200] = 0.0  # zeros: a sign the kernels must agree on
    with torch.no_grad(), use_mode("native"):
        on, off = both(lambda: layer(x))
        row_by_row = torch.cat([layer(x[i : i + 1]) for i in range(45)])  # the row kernels
    assert torch.equal(on, off)
    if weights != "int4_g128":  # (the 4-bit row kernel sums its groups in another fp32 order than the panels)
        assert torch.equal(on, row_by_row)


@pytest.mark.parametrize("k", [384, 100, 1000])  # K: whole tile steps, a half step, padding past whole words
def test_w1a1_layers_and_convolutions_run_on_tiles_with_the_popcount_bits(k, amx_state):
    """W1A1 on many rows: where the tiles are on the layer gets ±1 panels and the tiles' sums; the outputs are the
    XNOR-popcount kernel's bit for bit (the bias added as that kernel adds it)."""
    torch.manual_seed(0)
    stage = Stage(
        method="rtn", weights=FORMATS["binary"], activations=ACT_FORMATS["binary_token"], keep_first_last=False
    )
    model = nn.Sequential(nn.Conv2d(8, 24, 3), nn.Flatten(), nn.Linear(24 * 6 * 6, k), nn.Linear(k, 50))
    packed_model = lowbit.pack(lowbit.compress(model, Recipe(stages=(stage,)), progress=False))
    x = torch.randn(40, 8, 8, 8)
    with torch.no_grad(), use_mode("native"):
        on, off = both(lambda: packed_model(x))
        native.amx(True)
        for layer in (packed_model[2], packed_model[3]):  # W1A1 linear layers on 40 rows
            assert "weights=binary" in repr(layer)
            assert layer._dispatch.state.has_panels is native.amx()  # built on the first call with many rows
    assert torch.equal(on, off)
