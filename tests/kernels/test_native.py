"""Native kernels (`lowbit.kernels.native`): every kernel against a straightforward torch reference of its formula.

Integer kernels (w8a8, ternary, w1a1, w1a8) are compared with torch.equal (bit-exact), float ones with a
tolerance relative to |x|.|w| per output.
"""

import os
import pathlib
import platform
import shutil
import subprocess
import sys

import pytest
import torch

from lowbit.kernels import group_layout, native

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Only a machine without a C++ compiler may lack the native kernels; with one, a failed build is a test failure.
pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler: lowbit uses the reference kernels"
)


def test_native_kernels_build_where_a_compiler_exists():
    assert native.available(), native.unavailable_reason()


MS = [1, 3, 17]
THREADS = [1, 2]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def exact_dot(a, b):
    """Exact integer a @ b.T via float64 (all sums here are far below 2^53), returned as int64."""
    return (a.double() @ b.double().T).round().long()


def close(y, ref, scale, rtol=1e-4):
    """|y - ref| <= rtol * scale elementwise, scale = |x|.|w| style magnitude (M, N)."""
    err = (y.double() - ref.double()).abs()
    assert torch.all(err <= rtol * scale.double() + 1e-30), f"max rel err {(err / scale.double()).max():.3g}"


def rand_xq(M, K, g):
    xq = torch.randint(-127, 128, (M, K), generator=g, dtype=torch.int8)
    sx = torch.rand(M, generator=g) * 0.1 + 0.01
    return xq, sx


# ------------------------------------------------------------------------------------------------ int8


@pytest.mark.parametrize("K,N", [(64, 16), (100, 33), (4096, 7), (37, 5)])
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("threads", THREADS)
def test_w8a32(K, N, M, threads):
    g = gen(K * 1000 + N + M)
    q = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
    s = torch.rand(N, generator=g) + 0.1
    x = torch.randn(M, K, generator=g)
    p = native.prepare_w8(q, s)
    y = native.matmul_w8a32(x, p, threads)
    ref = s[None, :].double() * (x.double() @ q.double().T)
    close(y, ref, (x.double().abs() @ q.double().abs().T) * s.double())


@pytest.mark.parametrize("K,N", [(64, 16), (100, 33), (4096, 7), (37, 5), (9, 32), (96, 43)])  # K <= 96: row8 tiles
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("threads", THREADS)
def test_w8a8(K, N, M, threads):
    g = gen(K * 1000 + N + M + 1)
    q = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
    q[0, :] = -128  # extreme codes
    s = torch.rand(N, generator=g) + 0.1
    xq, sx = rand_xq(M, K, g)
    xq[0, : K // 2] = -127
    p = native.prepare_w8(q, s)
    y = native.matmul_w8a8(xq, sx, p, threads)
    ref = (sx[:, None] * s[None, :]) * exact_dot(xq, q).to(torch.float32)
    assert torch.equal(y, ref)


@pytest.mark.parametrize("K,N,M", [(64, 16, 1), (96, 43, 3), (100, 33, 5), (4096, 7, 2), (384, 37, 17)])
def test_int8_kernels_are_exact_on_the_code_minus_128(K, N, M):
    """Static zero-point activations give the code -128 (q = 0 shifted by 128), which the AVX2 sign trick cannot
    negate: every int8-activation kernel must still compute the exact integer sums (w8 rows / short-row tiles /
    panels with -128 weights too, group panels and rows, ternary, binary)."""
    from lowbit.kernels import panels

    g = gen(K + 7 * N + M)
    q = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
    q[0, :] = -128
    s = torch.rand(N, generator=g) + 0.1
    xq, sx = rand_xq(M, K, g)
    xq[torch.rand(M, K, generator=g) < 0.3] = -128
    xq[0, :] = -128
    ref = (sx[:, None] * s[None, :]) * exact_dot(xq, q).to(torch.float32)
    for threads in (1, 2):
        assert torch.equal(native.matmul_w8a8(xq, sx, native.prepare_w8(q, s), threads), ref)
        assert torch.equal(panels.matmul_w8a8_panel(xq, sx, panels.prepare_panels(q, s), threads), ref)
    t = torch.randint(-1, 2, (N, K), generator=g, dtype=torch.int8)
    want = (sx[:, None] * s[None, :]) * exact_dot(xq, t).to(torch.float32)
    assert torch.equal(native.matmul_ternary(xq, sx, native.prepare_ternary(t, s), 2), want)
    bw = torch.rand(N, K, generator=g) > 0.5
    s1 = exact_dot(xq, bw.to(torch.int8))
    want = (sx[:, None] * s[None, :]) * (2 * s1 - xq.long().sum(1, keepdim=True)).to(torch.float32)
    assert torch.equal(native.matmul_w1a8(xq, sx, native.prepare_binary(bw, s, layouts=("a8",)), 2), want)
    if K % 32 == 0:
        G = K // 32
        q4 = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
        sg, z = torch.rand(N, G, generator=g) + 0.1, torch.randint(0, 16, (N, G), generator=g).float()
        d = xq.double()[:, None, :] * (q4.double() - z.repeat_interleave(32, 1).double())[None]
        exact = sx.double()[:, None] * (d.reshape(M, N, G, 32).sum(-1) * sg.double()[None]).sum(-1)
        tol = 1e-6 * float(exact.abs().max())
        got = panels.matmul_wn_panel(xq, sx, panels.prepare_group_panels(q4, sg, z, 32), 2)
        assert float((got.double() - exact).abs().max()) <= tol
        got = group_layout.matmul_wna8(xq, sx, group_layout.prepare_wn(q4, sg, z, 4, 32), 2)
        assert float((got.double() - exact).abs().max()) <= tol


def quantize_rows_int8(x):
    return native.quantize_rows_symmetric(x, 127.0, 2.0**-20, 65504.0)


def test_quantize_rows_int8():
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5], [-3.0, 1.5, 0.0]])
    xq, sx = quantize_rows_int8(x)
    assert sx[0] == 2.0**-20 and torch.equal(xq[0], torch.zeros(3, dtype=torch.int8))
    assert torch.allclose(sx[1], torch.tensor(2.0 / 127)) and xq[1].tolist() == [64, -127, 32]  # 63.5 -> 64 (even)
    assert xq.dtype == torch.int8 and xq.abs().max() <= 127


# ------------------------------------------------------------------------------------------------ int2/3/4 groups


def wn_case(bits, group, K, N, M, seed):
    g = gen(seed)
    G = K // group
    q = torch.randint(0, 2**bits, (N, K), generator=g, dtype=torch.uint8)
    s = torch.rand(N, G, generator=g) * 0.1 + 0.01
    z = torch.randint(0, 2**bits, (N, G), generator=g).float()
    return q, s, z


def wn_weight(q, s, z, group):
    sk = s.repeat_interleave(group, dim=1).double()
    zk = z.repeat_interleave(group, dim=1).double()
    return (q.double() - zk) * sk


# (group, K, N); K = 1024 / 2048 / 4096: whole blocks of 8 groups (the VNNI pair loop), the others a partial one
WN_SHAPES = [
    (32, 64, 5),
    (32, 96, 9),
    (64, 320, 3),
    (128, 768, 6),
    (32, 1024, 4),
    (128, 128, 2),
    (64, 4096, 3),
    (128, 2048, 3),
]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group,K,N", WN_SHAPES)
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("threads", THREADS)
def test_wna32(bits, group, K, N, M, threads):
    q, s, z = wn_case(bits, group, K, N, M, bits * 7 + K + N + M)
    x = torch.randn(M, K, generator=gen(K + M))
    p = group_layout.prepare_wn(q, s, z, bits, group)
    y = group_layout.matmul_wna32(x, p, threads)
    w = wn_weight(q, s, z, group)
    ref = x.double() @ w.T
    scale = x.double().abs() @ w.abs().T + 1e-6
    close(y, ref, scale)


@pytest.mark.parametrize("group,K,N", WN_SHAPES)
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("threads", THREADS)
def test_wna32_int2_bit_planes(group, K, N, M, threads):
    """int2 codes as bit planes (AVX-512: masked adds under the planes; other builds decode them): the dense
    product within fp32 summation order, as the chunk layout; every code and zero point 0-3 occurs."""
    q, s, z = wn_case(2, group, K, N, M, 14 + K + N + M)
    x = torch.randn(M, K, generator=gen(K + M))
    p = group_layout.prepare_wn(q, s, z, 2, group, planes=True)
    assert p.bits == group_layout.W2_PLANES_BITS and p.nbytes == group_layout.prepare_wn(q, s, z, 2, group).nbytes
    y = group_layout.matmul_wna32(x, p, threads)
    w = wn_weight(q, s, z, group)
    close(y, x.double() @ w.T, x.double().abs() @ w.abs().T + 1e-6)


def test_int2_bit_planes_hold_each_codes_two_bits():
    """Unit r of a chunk (codes 32r .. 32r + 31 of its 128): their bits 0 as a little-endian uint32, then bits 1."""
    q = torch.randint(0, 4, (3, 256), dtype=torch.uint8, generator=gen(5))
    p = group_layout.prepare_wn(q, torch.ones(3, 4), torch.zeros(3, 4), 2, 64, planes=True)
    blob = p.blob.numpy()
    for n in range(3):
        for u in range(8):  # 8 units of 32 codes; the row's one block holds 4 groups of 64 (chunks 0, 1)
            words = blob[n, 8 * u : 8 * u + 8].view("<u4")
            codes = q[n, 32 * u : 32 * u + 32].long()
            assert int(words[0]) == sum(int(c & 1) << i for i, c in enumerate(codes))
            assert int(words[1]) == sum(int(c >> 1) << i for i, c in enumerate(codes))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group,K,N", WN_SHAPES)
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("threads", THREADS)
def test_wna8(bits, group, K, N, M, threads):
    q, s, z = wn_case(bits, group, K, N, M, bits * 11 + K + N + M)
    xq, sx = rand_xq(M, K, gen(K + M + 5))
    p = group_layout.prepare_wn(q, s, z, bits, group)
    y = group_layout.matmul_wna8(xq, sx, p, threads)
    # reference: exact int per-group sums d (M, N, G), then the float formula
    G = K // group
    xg = xq.long().reshape(M, G, group)
    qg = q.long().reshape(N, G, group)
    d = torch.einsum("mgk,ngk->mng", xg, qg) - z.long()[None] * xg.sum(-1)[:, None, :]
    ref = sx.double()[:, None] * (d.double() * s.double()[None]).sum(-1)
    scale = sx.double()[:, None] * (d.double().abs() * s.double()[None]).sum(-1) + 1e-6
    close(y, ref, scale)


@pytest.mark.parametrize("group,K,N", [(32, 64, 5), (32, 4096, 3), (64, 320, 3), (128, 768, 6)])
@pytest.mark.parametrize("M", MS)
def test_e2m1_rows(group, K, N, M):
    """FP4 E2M1 codes in the int4 layout, read through the table of their values × 2 (every code, negative zero
    included), times the halved group scales: the dense product within fp32 summation order."""
    g = gen(K + N + M)
    table = torch.tensor(group_layout.E2M1_X2, dtype=torch.float32)
    v2 = table[torch.randint(0, 16, (N, K), generator=g)]
    half = torch.rand(N, K // group, generator=g) * 0.05 + 0.01
    x = torch.randn(M, K, generator=g)
    y = group_layout.matmul_wna32(x, group_layout.prepare_e2m1(v2, half, group), 1)
    w = v2.double() * half.double().repeat_interleave(group, dim=1)
    close(y, x.double() @ w.T, x.double().abs() @ w.abs().T + 1e-6)


@pytest.mark.parametrize("bad", [5.0, 1.4, float("nan")])
def test_e2m1_rows_refuse_other_values(bad):
    with pytest.raises(ValueError, match="E2M1 values times 2"):
        group_layout.prepare_e2m1(torch.full((2, 32), bad), torch.ones(2, 1), 32)


def test_wn_rejects_bad_group():
    with pytest.raises(AssertionError):
        group_layout.prepare_wn(torch.zeros(2, 96, dtype=torch.uint8), torch.ones(2, 1), torch.zeros(2, 1), 4, 64)


# ------------------------------------------------------------------------------------------------ ternary


@pytest.mark.parametrize("K,N", [(64, 8), (100, 13), (4096, 5), (130, 3), (384, 64)])
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("per_row", [False, True])
def test_ternary(K, N, M, threads, per_row):
    g = gen(K + N * 3 + M)
    t = torch.randint(-1, 2, (N, K), generator=g, dtype=torch.int8)
    sw = torch.rand(N, generator=g) + 0.5 if per_row else torch.tensor(0.37)
    xq, sx = rand_xq(M, K, g)
    p = native.prepare_ternary(t, sw)
    y = native.matmul_ternary(xq, sx, p, threads)
    swn = sw if per_row else sw.expand(N)
    ref = (sx[:, None] * swn[None, :]) * exact_dot(xq, t).to(torch.float32)
    assert torch.equal(y, ref)


# ------------------------------------------------------------------------------------------------ binary

BIN_SHAPES = [(8, 5), (64, 16), (100, 9), (256, 7), (300, 33), (4096, 6), (8200, 3)]  # 8200: > 31 popcount steps


def sign_pm(b):
    return b.double() * 2 - 1


@pytest.mark.parametrize("K,N", BIN_SHAPES)
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("prepacked", [False, True])
def test_w1a1(K, N, M, threads, prepacked):
    g = gen(K * 5 + N + M)
    bw = torch.rand(N, K, generator=g) > 0.5
    bxb = torch.rand(M, K, generator=g) > 0.5
    a = torch.rand(N, generator=g) + 0.1
    bx = torch.rand(M, generator=g) + 0.1
    p = native.prepare_binary(bw, a, layouts=("a1",))
    xin = native.pack_signs(bxb) if prepacked else bxb
    y = native.matmul_w1a1(xin, bx, p, threads)
    pop = (bxb[:, None, :] ^ bw[None, :, :]).sum(-1)  # (M, N) popcount of XOR
    ref = (bx[:, None] * a[None, :]) * (K - 2 * pop).to(torch.float32)
    assert torch.equal(y, ref)
    # the XNOR identity equals the +-1 dot product
    assert torch.equal((K - 2 * pop).double(), sign_pm(bxb) @ sign_pm(bw).T)


@pytest.mark.parametrize("K,N,M", [(8200, 70, 9), (384, 130, 300), (40, 1, 2)])
def test_w1a1_bias_and_several_table_blocks(K, N, M):
    """The kernel adds the bias itself; K = 8200 keeps 6 rows' tables per block (M = 9 spans two), M = 300 at
    K = 384 also; N = 70 / 130 leave a partly used 64-row weight block."""
    g = gen(K + N + M)
    bw = torch.rand(N, K, generator=g) > 0.5
    bxb = torch.rand(M, K, generator=g) > 0.5
    a, bx, bias = torch.rand(N, generator=g) + 0.1, torch.rand(M, generator=g) + 0.1, torch.randn(N, generator=g)
    p = native.prepare_binary(bw, a, layouts=("a1",))
    assert p.blocked.shape == ((N + 63) // 64, (K + 255) // 256 * 32, 64)
    pop = (bxb[:, None, :] ^ bw[None, :, :]).sum(-1)
    ref = (bx[:, None] * a[None, :]) * (K - 2 * pop).to(torch.float32) + bias
    for threads in (1, 2):
        assert torch.equal(native.matmul_w1a1(bxb, bx, p, threads, bias), ref)


def test_pack_signs_layout():
    b = torch.zeros(2, 70, dtype=torch.bool)
    b[0, 0] = b[0, 63] = b[1, 64] = b[1, 69] = True
    w = native.pack_signs(b)
    assert w.shape == (2, 4) and w.dtype == torch.int64
    assert w[0, 0].item() == (1 | -(1 << 63)) and w[0, 1:].eq(0).all()
    assert w[1, 0].item() == 0 and w[1, 1].item() == (1 | 1 << 5)


@pytest.mark.parametrize("K,N", BIN_SHAPES)
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("threads", THREADS)
def test_w1a8(K, N, M, threads):
    g = gen(K * 7 + N + M)
    bw = torch.rand(N, K, generator=g) > 0.5
    a = torch.rand(N, generator=g) + 0.1
    xq, sx = rand_xq(M, K, g)
    p = native.prepare_binary(bw, a, layouts=("a8",))
    y = native.matmul_w1a8(xq, sx, p, threads)
    s1 = exact_dot(xq, bw.to(torch.int8))
    ref = (sx[:, None] * a[None, :]) * (2 * s1 - xq.long().sum(1, keepdim=True)).to(torch.float32)
    assert torch.equal(y, ref)


@pytest.mark.parametrize("K,N", BIN_SHAPES)
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("threads", THREADS)
def test_w1a32(K, N, M, threads):
    g = gen(K * 9 + N + M)
    bw = torch.rand(N, K, generator=g) > 0.5
    a = torch.rand(N, generator=g) + 0.1
    x = torch.randn(M, K, generator=g)
    p = native.prepare_binary(bw, a, layouts=("a32",))
    y = native.matmul_w1a32(x, p, threads)
    ref = a[None, :].double() * (x.double() @ sign_pm(bw).T)
    scale = a[None, :].double() * x.double().abs().sum(1, keepdim=True)
    close(y, ref, scale)


# ------------------------------------------------------------------------------------------------ large M tiles


@pytest.mark.parametrize("M", [64, 70, 131])
def test_large_m_all(M):
    """Crosses the 64-row M-block boundary for every kernel."""
    g = gen(M)
    K, N = 256, 12
    x = torch.randn(M, K, generator=g)
    xq, sx = quantize_rows_int8(x)
    q8 = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
    s8 = torch.rand(N, generator=g) + 0.1
    p8 = native.prepare_w8(q8, s8)
    assert torch.equal(native.matmul_w8a8(xq, sx, p8, 2), (sx[:, None] * s8) * exact_dot(xq, q8).float())
    close(
        native.matmul_w8a32(x, p8, 2),
        (x.double() @ q8.double().T) * s8.double(),
        (x.double().abs() @ q8.double().abs().T) * s8.double(),
    )
    q, s, z = wn_case(4, 64, K, N, M, 3)
    pw = group_layout.prepare_wn(q, s, z, 4, 64)
    w = wn_weight(q, s, z, 64)
    close(group_layout.matmul_wna32(x, pw, 2), x.double() @ w.T, x.double().abs() @ w.abs().T)
    bw = torch.rand(N, K, generator=g) > 0.5
    a = torch.rand(N, generator=g)
    pb = native.prepare_binary(bw, a, layouts=("a1", "a8"))
    bxb = x > 0
    pop = (bxb[:, None, :] ^ bw[None, :, :]).sum(-1)
    assert torch.equal(native.matmul_w1a1(bxb, sx, pb, 2), (sx[:, None] * a) * (K - 2 * pop).float())
    s1 = exact_dot(xq, bw.to(torch.int8))
    assert torch.equal(
        native.matmul_w1a8(xq, sx, pb, 2), (sx[:, None] * a) * (2 * s1 - xq.long().sum(1, keepdim=True)).float()
    )


# ------------------------------------------------------------------------------------------------ build / fallback


def _run_py(code, **env):
    e = dict(os.environ, **env)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=e, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_build_info():
    info = native.build_info()
    assert info["path"] and pathlib.Path(info["path"]).exists()
    assert info["isa"] in ("avx512vnni", "avx2", "scalar")
    root = os.environ.get("LOWBIT_CACHE_DIR")
    base = pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "lowbit"
    assert pathlib.Path(info["path"]).parent == base / "kernels"


def test_an_avx2_cpu_gets_the_native_build():
    """On an x86-64 CPU with AVX2 (and a compiler: the module's mark) the -march=native build compiles: a source
    that does not would leave every kernel test running the portable fallback, and passing."""
    flags = pathlib.Path("/proc/cpuinfo").read_text() if pathlib.Path("/proc/cpuinfo").exists() else ""
    if platform.machine() not in ("x86_64", "AMD64") or " avx2" not in flags:
        pytest.skip("no AVX2 on this CPU")
    if os.environ.get("LOWBIT_KERNELS", "auto").strip().lower() == "portable":
        pytest.skip("LOWBIT_KERNELS=portable asks for the portable build")
    info = native.build_info()
    assert info["isa"] in ("avx512vnni", "avx2"), info["reason"]


def test_second_import_uses_cache():
    code = "from lowbit.kernels import native; i = native.build_info(); print(i['cached'], i['seconds'], i['path'])"
    cached, seconds, path = _run_py(code).split()
    assert cached == "True" and float(seconds) == 0.0 and path == native.build_info()["path"]


def test_open_cached_builds_a_missing_or_damaged_file_once(tmp_path) -> None:
    path = tmp_path / "lib.so"
    builds: list[int] = []

    def build() -> None:
        builds.append(1)
        path.write_text("good")

    def load(p: str) -> str:
        text = pathlib.Path(p).read_text()
        if text != "good":
            raise OSError(f"{p}: file too short")
        return text

    assert native.open_cached(path, build, load) == ("good", True) and len(builds) == 1  # missing
    assert native.open_cached(path, build, load) == ("good", False) and len(builds) == 1  # cached
    path.write_text("bad")
    assert native.open_cached(path, build, load) == ("good", True) and len(builds) == 2  # damaged: built again
    path.write_text("bad")
    with pytest.raises(OSError, match="too short"):  # a build that still does not load: the error, once
        native.open_cached(path, lambda: builds.append(1), load)
    assert len(builds) == 3

    def missing_dependency(p: str) -> str:
        raise OSError("libgomp.so.1: cannot open shared object file: No such file or directory")

    with pytest.raises(OSError, match="libgomp"):  # not a damaged file: no build (every process would pay it)
        native.open_cached(path, build, missing_dependency)
    assert len(builds) == 3


def test_forced_reference_fallback():
    code = (
        "from lowbit.kernels import native; import torch\n"
        "assert not native.available()\n"
        "print(native.unavailable_reason())\n"
        "p = native.prepare_w8(torch.zeros(2, 8, dtype=torch.int8), torch.ones(2))\n"
        "try:\n    native.matmul_w8a32(torch.zeros(1, 8), p)\nexcept RuntimeError as e:\n    print('raised')\n"
        "b = native.pack_signs(torch.tensor([[True, False, True]]))\n"
        "assert b[0, 0].item() == 5\n"
    )
    out = _run_py(code, LOWBIT_KERNELS="reference")
    assert "LOWBIT_KERNELS=reference" in out and "raised" in out


#: Kernels and whole layers checked in another build of the library (a subprocess with its own LOWBIT_KERNELS).
OTHER_BUILD_CHECKS = (
    # auto mode, as a CPU with that build runs (LOWBIT_KERNELS=portable reads as native mode; the auto_mode fixture's
    # setting: some checks below are of decided calls)
    "from lowbit.kernels import dispatch as kd\n"
    "auto = kd.environment_mode('auto')\n"  # (held: a dropped generator would restore the mode at once)
    "auto.__enter__()\n"
    "from tests.kernels import test_native as t\n"
    "for K, N, M in ((96, 43, 3), (100, 33, 5), (384, 37, 17)):\n"  # the code -128 in the AVX2 sign-trick tiles
    "    t.test_int8_kernels_are_exact_on_the_code_minus_128(K, N, M)\n"
    "for M in (1, 5):\n"
    "    t.test_w8a8(100, 9, M, 2); t.test_w8a32(100, 9, M, 1); t.test_ternary(130, 3, M, 2, True)\n"
    "    t.test_w1a1(300, 9, M, 2, False); t.test_w1a8(300, 9, M, 1); t.test_w1a32(300, 9, M, 2)\n"
    "    for b in (2, 3, 4):\n"
    "        t.test_wna8(b, 32, 96, 9, M, 2); t.test_wna32(b, 128, 768, 6, M, 1)\n"
    "    t.test_wna32_int2_bit_planes(64, 320, 3, M, 2)\n"
    "    t.test_e2m1_rows(32, 64, 5, M)\n"
    "from tests.kernels import test_panels as tp\n"
    "for nonneg in (False, True):\n"
    "    tp.test_panel_kernel_is_exact_and_equals_the_row_kernel(100, 33, 7, 2, nonneg)\n"
    "    tp.test_group_panels_compute_the_group_sums_exactly(4, 32, 6, nonneg)\n"
    "tp.test_binary_weights_with_int8_activations_run_on_panels_with_the_bit_kernels_bits()\n"
    "tp.test_rows_longer_than_the_vnni_limit_are_still_exact()\n"
    "from tests.kernels import test_dispatch as d\n"  # whole layers through lb_linear
    "for w, a, k in d.CASES[:13]:\n"
    "    d.test_native_output_matches_simulated(w, a, k, 3)\n"
    "d.test_native_output_matches_simulated('fp4_e2m1', None, 'fp4a32', 3)\n"  # FP4's row kernel
    "d.test_real_valued_zero_points_run_natively('int8')\n"
    "d.test_one_call_conv_writes_the_map_from_the_panels('int8', 2)\n"
    "from tests.kernels import test_static_route as ts\n"  # static zero-point activations: codes made in lb_linear
    "for w, k in ts.CASES:\n"
    "    ts.test_native_output_matches_simulated(w, k, 40)\n"
    "ts.test_symmetric_static_activations_take_the_route_too(100); ts.test_a_nan_row_gives_a_nan_output_row_only(7)\n"
    "ts.test_a_static_conv_runs_the_linear_kernel_on_its_patches('int8', 'w8a8-static')\n"
    "from tests.kernels import test_f32_panels as tf\n"  # the fp32 panel tiles of this build (3 rows on AVX2)
    "for M in (3, 9, 50):\n"
    "    tf.test_f32_panels_compute_the_dense_product(100, 33, M)\n"
    "tf.test_f32_panels_apply_the_group_scales_and_zero_points(4, 32)\n"
    "tf.test_weight_only_layers_run_f32_panels_from_their_row_count('int4_g128', None, 'w4a32')\n"
    "for fmt in ('e4m3', 'e5m2'):\n"  # FP8 bytes decoded in the fp32 tiles and in registers (2-row tiles on AVX2)
    "    for rows in (70, 1, 3):\n"
    "        tf.test_fp8_panels_decode_every_finite_code_exactly(fmt, rows)\n"
    "    for M in (1, 5, 12):\n"
    "        tf.test_fp8_panels_compute_the_dense_product(M, fmt, 1.0)\n"
    "from tests.kernels import test_fakequant as tq\n"  # the FP8 fake quantizer's vector body and masked tail
    "for k in (9, 203):\n"
    "    tq.test_fast_path_is_bit_identical('fp8_e4m3', k)\n"
    "d.test_the_kernel_applies_a_linear_layers_input_scale('fp8_e4m3', 'fp8_token', 40)\n"
    "d.test_the_kernel_applies_a_linear_layers_input_scale('int8', 'int8_token', 3)\n"
    "from tests.kernels import test_attention as ta\n"  # lb_attention's vector code in this build
    "for shape in ta.SHAPES:\n"
    "    for kind in ('none', 'bool', 'causal'):\n"
    "        ta.test_matches_pytorch_sdpa(shape, kind)\n"
    "from tests.kernels import test_elementwise as te\n"  # the GELU and add + LayerNorm loops of this build
    "for approx in ('none', 'tanh'):\n"
    "    te.test_gelu_matches_float64_to_float_rounding(approx)\n"
    "for dim in (384, 50):\n"
    "    te.test_add_layer_norm_equals_layer_norm_of_the_sum(dim, True)\n"
    "from tests.nn import test_fused_native as tb\n"  # whole encoder blocks in one C call (lb_encoder_block)
    "tb.check_one_call('bert', 'w8a8'); tb.check_one_call('vit', tb.W4G32, 'int8')\n"
    "print('ok')\n"
)


def test_scalar_path_matches(tmp_path):
    """Build the portable path (no -march=native => no AVX2 on x86-64) and check a few kernels with it."""
    if os.uname().machine not in ("x86_64", "AMD64"):
        pytest.skip("scalar build check is for x86-64")
    code = (
        "from lowbit.kernels import native\n"
        "assert native.build_info()['isa'] == 'scalar', native.build_info()\n" + OTHER_BUILD_CHECKS
    )
    assert _run_py(code, LOWBIT_CACHE_DIR=str(tmp_path), LOWBIT_KERNELS="portable").endswith("ok")


def test_avx2_build_on_an_avx512_cpu_matches(tmp_path):
    """LOWBIT_KERNELS=avx2 builds without AVX-512: on a CPU with AVX-512 VNNI this runs the AVX2 tiles the
    default build replaces (elsewhere it is the default build again); the same checks must hold."""
    if native.build_info()["isa"] not in ("avx512vnni", "avx2"):
        pytest.skip("no AVX2 on this CPU")
    code = (
        "from lowbit.kernels import native\n"
        "assert native.build_info()['isa'] == 'avx2', native.build_info()\n" + OTHER_BUILD_CHECKS
    )
    assert _run_py(code, LOWBIT_CACHE_DIR=str(tmp_path), LOWBIT_KERNELS="avx2").endswith("ok")


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("sign", [1, -1])
def test_wna8_extreme_codes_do_not_wrap(bits, group, sign):
    """All codes at their maximum against activations at ±127: the int16 group sums (folded two groups at a time in
    partial blocks) must stay exact. K = 3 groups (a pair and a single) and 11 groups (a block of 8 and 3)."""
    for K in (3 * group, 11 * group):
        M, N, G = 4, 5, K // group
        q = torch.full((N, K), 2**bits - 1, dtype=torch.uint8)
        s = torch.ones(N, G)
        z = torch.zeros(N, G)
        xq = torch.full((M, K), 127 * sign, dtype=torch.int8)
        sx = torch.ones(M)
        y = group_layout.matmul_wna8(xq, sx, group_layout.prepare_wn(q, s, z, bits, group), 1)
        assert torch.equal(y, torch.full((M, N), float(sign * 127 * (2**bits - 1) * K)))


@pytest.mark.parametrize(
    ("weights", "acts"),
    [("int8", "int8_token"), ("int8", "int8_static"), ("binary", "binary_token"), ("fp8_e4m3", "fp8_token")],
)
def test_many_rows_quantized_by_two_threads_give_one_threads_bits(weights, acts):
    """lb_linear splits a many-row call's activation quantization between the threads (disjoint rows): the codes,
    scales and NaN rows, so the outputs, are those of one thread."""
    from torch import nn

    import lowbit
    from lowbit.formats import ACT_FORMATS, FORMATS
    from lowbit.kernels.dispatch import use_mode
    from lowbit.recipe import Recipe, Stage

    torch.manual_seed(0)
    x = torch.randn(301, 384)
    x[7] = float("nan")
    stage = Stage(method="rtn", weights=FORMATS[weights], activations=ACT_FORMATS[acts], keep_first_last=False)
    model = nn.Sequential(nn.Linear(384, 96))
    layer = lowbit.pack(lowbit.compress(model, Recipe(stages=(stage,)), data=[x.nan_to_num()], progress=False))
    old = torch.get_num_threads()
    try:
        with torch.no_grad(), use_mode("native"):
            torch.set_num_threads(1)
            one = layer(x)
            torch.set_num_threads(2)
            two = layer(x)
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(one, two, rtol=0, atol=0, equal_nan=True)
    assert bool(one[7].isnan().all()) or not acts.startswith("int8")  # (int8 rows: NaN in, NaN out)
