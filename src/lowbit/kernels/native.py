"""Native CPU kernels for low-bit linear layers (ctypes wrapper around lowbit_kernels.cpp; lowbit_attention.cpp, in
the same library, serves `lowbit.kernels.attention`, lowbit_elementwise.cpp `lowbit.kernels.elementwise`).

The C++ sources next to this file are compiled once per (source, flags, compiler, CPU) into a cache
directory (``$LOWBIT_CACHE_DIR/kernels`` or ``~/.cache/lowbit/kernels``) and loaded with ctypes.

Public API (all matmuls return a new fp32 tensor (M, N), bias NOT included; ``threads`` <= 0 means
"OpenMP default"):

    available() -> bool, unavailable_reason() -> str, build_info() -> dict
    quantize_rows_symmetric(x, qmax, min_scale, max_scale) -> (xq int8 (M,K), sx fp32 (M,))
    sign_rows(x, min_scale=None) -> (packed signs, mean|x| scales or None)
    pack_signs(b bool (R,K)) -> int64 tensor (R, ceil(K/256)*4) of packed sign bits (plain layout)

    prepare_w8(q, s)                  -> PreparedW8      ; matmul_w8a32(x, p, threads), matmul_w8a8(xq, sx, p, threads)
    (group-wise int2 / int3 / int4 and FP4 codes: `lowbit.kernels.group_layout`)
    prepare_ternary(t, sw)            -> PreparedTernary ; matmul_ternary(xq, sx, p, threads)
    prepare_binary(b, a, layouts)     -> PreparedBinary  ; matmul_w1a1(xbits, bx, p, threads),
                                                           matmul_w1a8(xq, sx, p, threads), matmul_w1a32(x, p, threads)

Exact final expressions of the integer kernels (so a caller can match them bit for bit):
    w8a8   : y = (sx[m] * s[n]) * float32(sum_k xq*q)                        (xq must be in [-127, 127])
    ternary: y = (sx[m] * sw[n]) * float32(sum_k xq*t)
    w1a1   : y = (bx[m] * a[n]) * float32(K - 2*popcount(bw ^ bx))
    w1a8   : y = (sx[m] * a[n]) * float32(2*sum_{bit=1} xq - sum_k xq)
    wna8   : exact int32 per-group sums d_g, then y = sx[m] * sum_g s_g*float32(d_g) in fp32 (order unspecified)
Float kernels (w8a32, wna32, w1a32) accumulate in fp32 in an unspecified order.

A packed layer's forward uses none of the matmul_* wrappers: `lowbit.kernels.layer` binds prepared weights and the
activation quantizer into one ``lb_linear`` call (the ``lb_layer`` struct, `LayerDesc`, is declared in
`lowbit.kernels.abi` and re-exported here; the loader checks its size and the ABI version against the library's).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch

from lowbit.kernels.abi import ABI_VERSION, AKINDS, ISA_NAMES, WKINDS, BlockDesc, LayerDesc

# re-exported: the C side as Python sees it
__all__ = ["ABI_VERSION", "AKINDS", "ISA_NAMES", "WKINDS", "BlockDesc", "LayerDesc"]

#: The C++ sources, compiled together into one library: the linear-layer kernels, fp32 attention, the element-wise /
#: row-wise operations between a block's layers (GELU, residual add + LayerNorm) and a whole encoder block in one call.
_SOURCES = ("lowbit_kernels.cpp", "lowbit_attention.cpp", "lowbit_elementwise.cpp", "lowbit_block.cpp")
_SRCS = [pathlib.Path(__file__).with_name(n) for n in _SOURCES]
#: Headers the sources include: part of the cache key, so editing one rebuilds the library.
_HEADERS = [pathlib.Path(__file__).with_name(n) for n in ("lowbit_exp.h", "lowbit_omp.h", "lowbit_amx.h")]
_CXX = os.environ.get("CXX", "g++")
#: -Werror=return-type: a function that can fall off its end without its result is a build error, not a crash.
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17", "-Werror=return-type"]
_FLAGS_PORTABLE = [f for f in _FLAGS if f != "-march=native"]  # retry when -march=native is refused
#: LOWBIT_KERNELS=avx2: this CPU's instructions without AVX-512 (the AVX2 paths on a CPU that has AVX-512 VNNI).
_FLAGS_NO_AVX512 = [*_FLAGS, "-mno-avx512f"]

_lib = None
_reason = ""
_info: dict = {"path": None, "seconds": 0.0, "cached": False, "isa": None, "flags": None}
COMPILE_SECONDS = 0.0


def _cache_dir() -> pathlib.Path:
    root = os.environ.get("LOWBIT_CACHE_DIR")
    base = pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "lowbit"
    return base / "kernels"


def _cpu_flags() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            key = line.split(":", 1)[0].strip().lower()
            if key in ("flags", "features"):  # x86 / ARM
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine


def _compiler_version() -> str:
    out = subprocess.run([_CXX, "--version"], capture_output=True, text=True, timeout=30, check=True)
    return out.stdout


T = TypeVar("T")


def open_cached(path: pathlib.Path, build: Callable[[], None], load: Callable[[str], T]) -> tuple[T, bool]:
    """``load(path)``, after ``build()`` when the file is missing; a cached file the loader calls damaged (too short,
    unreadable, not a valid ELF file) is built again once, in place, and loaded. Other load errors (a missing shared
    library, say) are raised as they are: a build would not cure them, and every process would pay it. Returns what
    ``load`` gave and whether it was built now. (A file cut inside its segments can crash the loader with SIGBUS
    before it reports anything; the cache is written by rename, so only outside damage leaves one.)"""
    if not path.exists():
        build()
        return load(str(path)), True
    try:
        return load(str(path)), False
    except (OSError, ImportError) as exc:
        if not any(sign in str(exc) for sign in ("too short", "ELF", "cannot read file data", "truncated")):
            raise
        build()  # (atomic: a temp file renamed over the damaged one)
        return load(str(path)), True


def _compile(flags: list[str], dest: pathlib.Path, sources: list[pathlib.Path] | None = None) -> None:
    """Compile ``sources`` (default: the kernel library's) into a temporary file next to dest, then atomically rename
    it into place."""
    fd, tmp = tempfile.mkstemp(prefix=dest.stem + ".", suffix=".tmp.so", dir=dest.parent)
    os.close(fd)
    try:
        cmd = [_CXX, *flags, "-o", tmp, *map(str, sources or _SRCS)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            raise RuntimeError(f"{_CXX} failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _bind(lib: ctypes.CDLL) -> None:
    P, I64, I, F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    sig = {
        "lb_isa": ([], I),
        "lb_amx": ([I], I),
        "lb_amx_bf16": ([], I),
        "lb_panel_rows": ([I], I),
        "lb_abi_version": ([], I),
        "lb_w8a32": ([P, I64, I64, P, P, I64, I64, P, I], None),
        "lb_w8a8": ([P, P, I64, I64, P, P, I64, I64, P, I], None),
        "lb_w8a8_panel": ([P, P, I64, I64, P, P, P, I64, I64, P, I], None),
        "lb_wn_panel": ([P, P, I64, I64, P, P, P, I64, I64, I64, P, I], None),
        "lb_f32_panel": ([P, I64, I64, P, P, I64, I64, I64, P, I, I], I),
        "lb_f32_panel_rows": ([], I),
        "lb_wna8": ([P, P, I64, I64, P, I64, I64, I, I, P, I], I),
        "lb_wna32": ([P, I64, I64, P, I64, I64, I, I, P, I], I),
        "lb_ternary": ([P, P, I64, I64, P, P, I64, P, I], None),
        "lb_w1a1": ([P, P, I64, I64, P, P, I64, P, I, P], I),
        "lb_pack_signs": ([P, I64, I64, P], None),
        "lb_quantize_rows_i8": ([P, I64, I64, ctypes.c_float, ctypes.c_float, ctypes.c_float, P, P], None),
        "lb_sign_rows": ([P, I64, I64, P, P, ctypes.c_float, ctypes.c_float], None),
        "lb_fake_quant_rows_i8": ([P, I64, I64, ctypes.c_float, ctypes.c_float, ctypes.c_float, P], None),
        "lb_fake_quant_rows_fp": ([P, I64, I64, I, I, I, F, F, F, P], None),
        "lb_w1a8": ([P, P, I64, I64, P, P, I64, P, I], None),
        "lb_w1a32": ([P, I64, I64, P, P, I64, P, I], None),
        "lb_layer_size": ([], I),
        "lb_linear": ([P, P, I64, P, I, P], I),
        "lb_im2col": ([P, P, P, I], None),
        "lb_conv": ([P, P, P, P, I, P], I),
        "lb_attention": ([P, P, P, P, I64, I64, I64, I64, I64, I64, P, P, I, F, I, I], I),
        "lb_gelu": ([P, I64, I, I], None),
        "lb_add_layer_norm": ([P, P, I64, I64, P, P, F, P, P, I], None),
        "lb_embed_layer_norm": ([P, I64, P, P, I64, P, P, I64, P, I64, I64, I64, P, P, F, P, I], I),
        "lb_block_size": ([], I),
        "lb_encoder_block": ([P, P, I64, I64, I64, P, I, P, P, I], I),
        "lb_encoder_stack": ([P, I, P, I64, I64, I64, P, I, P, P, I], I),
        "lb_bert_encoder": ([P, I64, P, P, I64, P, P, I64, P, P, P, F, P, P, I, I64, I64, I64, P, I], I),
    }
    for name, (args, res) in sig.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res


def _load() -> None:
    """Find or build the shared library; on any failure record the reason and stay unavailable."""
    global _lib, _reason, COMPILE_SECONDS
    if os.environ.get("LOWBIT_KERNELS", "").lower() == "reference":
        _reason = "disabled by LOWBIT_KERNELS=reference"
        return
    try:
        cc_version = _compiler_version()
    except (OSError, subprocess.SubprocessError) as exc:
        _reason = f"no C++ compiler ({_CXX}): {exc}"
        return
    try:
        source = "\0".join(src.read_text() for src in (*_SRCS, *_HEADERS))
        cache = _cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _reason = f"cannot read source or create cache dir: {exc}"
        return
    errors = []
    choice = os.environ.get("LOWBIT_KERNELS", "").lower()
    if choice == "portable":  # what a CPU without AVX2 gets
        builds: tuple[list[str], ...] = (_FLAGS_PORTABLE,)
    elif choice == "avx2":  # the AVX2 paths on a CPU with AVX-512
        builds = (_FLAGS_NO_AVX512, _FLAGS_PORTABLE)
    else:
        builds = (_FLAGS, _FLAGS_PORTABLE)
    for flags in builds:
        key = hashlib.sha256("\0".join([source, " ".join(flags), cc_version, _cpu_flags()]).encode()).hexdigest()[:24]
        path = cache / f"lowbit_kernels-{key}.so"
        t0 = os.times().elapsed
        try:
            lib, built = open_cached(path, lambda flags=flags, path=path: _compile(flags, path), ctypes.CDLL)
            cached = not built
            _bind(lib)
        except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as exc:
            errors.append(str(exc))
            continue
        seconds = 0.0 if cached else os.times().elapsed - t0
        COMPILE_SECONDS = seconds
        sizes = (lib.lb_layer_size(), lib.lb_block_size()) == (ctypes.sizeof(LayerDesc), ctypes.sizeof(BlockDesc))
        if lib.lb_abi_version() != ABI_VERSION or not sizes:
            errors.append(f"{path.name}: ABI {lib.lb_abi_version()} does not match this lowbit ({ABI_VERSION})")
            continue
        isa = ISA_NAMES.get(lib.lb_isa(), "scalar")
        _info.update(path=str(path), seconds=seconds, cached=cached, isa=isa, flags=" ".join(flags))
        _lib = lib
        if errors:
            warnings.warn(f"lowbit kernels built without -march=native (isa={isa}): {errors[0][:200]}", stacklevel=2)
        return
    _reason = "compile failed: " + " | ".join(errors)[:4000]


_load()


def available() -> bool:
    """True when the native library is loaded and usable."""
    return _lib is not None


def unavailable_reason() -> str:
    """Why available() is False ('' when available)."""
    return _reason


def build_info() -> dict:
    """dict(path, seconds (compile time in this process, 0 if loaded from cache), cached, isa, flags, reason, amx:
    whether the many-row int8 kernels run on AMX tiles, see `amx`; amx_bf16: whether many-row FP8 layers with
    low-bit float activations do, on AMX-BF16)."""
    bf16 = bool(_lib is not None and _lib.lb_amx_bf16())
    on = amx()
    return dict(_info, reason=_reason, amx=on, amx_bf16=on and bf16)


def amx(on: bool | None = None) -> bool:
    """Whether the many-row int8 panel kernels (W8A8, ternary, W1A8, W4/W2A8 from 16 rows on, convolutions' maps; W1A1
    from 32 rows on) run on AMX tiles, and FP8 layers with low-bit float (FP8 / FP6 / FP4) activations (from 10
    rows on) and weight-only layers with fp32 inputs (three bf16 parts of each input; from 16) on AMX-BF16 ones (exact
    products; fp32 sums in another order than the fp32 kernels'): built where the compiler targets a CPU with
    AMX-INT8 (Sapphire Rapids on), allowed by the OS, and not turned off by ``LOWBIT_AMX=0`` (or ``off``). ``on``
    turns them on or off first (off: the VNNI / popcount kernels, same results bit for bit, and the fp32 kernels; a
    W1A1 layer first called while they were off keeps no ±1 panels). The first query (or many-row call, or W1A1
    layer call) asks Linux for the tile state, after which it refuses a new signal stack too small for it. False
    without the native library.

    Example:
        >>> from lowbit.kernels import native
        >>> isinstance(native.amx(), bool)
        True
    """
    if _lib is None:
        return False
    return bool(_lib.lb_amx(-1 if on is None else int(on)))


def _need() -> ctypes.CDLL:
    if _lib is None:
        raise RuntimeError(f"lowbit native kernels unavailable: {_reason}")
    return _lib


def empty_f32(*sizes: int) -> torch.Tensor:
    """An uninitialised fp32 tensor for a C entry to write, whatever the default dtype. Sizes as separate ints and
    no dtype keyword where the default is fp32: the fastest torch.empty call here (throw-away timeit: 0.8-0.9 µs;
    a tuple or torch.Size argument 1.3-2.1, the dtype keyword +0.3)."""
    if torch.get_default_dtype() is torch.float32:
        return torch.empty(*sizes)
    return torch.empty(*sizes, dtype=torch.float32)


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _as(t, dtype: torch.dtype) -> torch.Tensor:
    """t as a contiguous CPU tensor of dtype (no copy when it already is one: this is on the hot path)."""
    if not (isinstance(t, torch.Tensor) and t.dtype == dtype and t.is_cpu and t.is_contiguous()):
        t = torch.as_tensor(t).to(device="cpu", dtype=dtype).contiguous()
    return t


def _int8_call(xq, sx, p) -> tuple[torch.Tensor, torch.Tensor, int, int, torch.Tensor]:
    """Checked int8 activations (M, K), their per-row fp32 scales, M, K and the output buffer for prepared ``p``."""
    xq, sx = _as(xq, torch.int8), _vec(sx)
    M, K = xq.shape
    assert K == p.K and sx.numel() == M, f"activations {tuple(xq.shape)} / {sx.numel()} scales do not fit K={p.K}"
    return xq, sx, M, K, _out(M, p.N)


def _vec(t) -> torch.Tensor:
    """Per-row scale vector as contiguous fp32 1-D."""
    t = _as(t, torch.float32)
    return t if t.dim() == 1 else t.reshape(-1)


def _out(m: int, n: int) -> torch.Tensor:
    return torch.empty(m, n, dtype=torch.float32)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def _rup(v: int, m: int) -> int:
    return (v + m - 1) // m * m


# ------------------------------------------------------------------------------------------------
# Activation helpers
# ------------------------------------------------------------------------------------------------


def quantize_rows_symmetric(
    x: torch.Tensor, qmax: float, min_scale: float, max_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 codes and fp32 scales, bit-identical to lowbit's per-token activation quantizer
    (``s = max|x|/qmax`` guarded to ``[min_scale, …]``, ``q = clamp(round(x/s), −qmax−1, qmax)``), in one C pass."""
    lib = _need()
    x = _as(x, torch.float32)
    M, K = x.shape
    xq = torch.empty(M, K, dtype=torch.int8)
    sx = torch.empty(M, dtype=torch.float32)
    lib.lb_quantize_rows_i8(_ptr(x), M, K, qmax, min_scale, max_scale, _ptr(xq), _ptr(sx))
    return xq, sx


def fake_quantize_rows_symmetric(x: torch.Tensor, qmax: float, min_scale: float, max_scale: float) -> torch.Tensor:
    """`quantize_rows_symmetric` dequantized (code · scale, fp32) in one C pass: bit-identical to the simulated
    per-token activation quantizer's output (NaN entries stay NaN)."""
    lib = _need()
    x = _as(x, torch.float32)
    out = torch.empty_like(x)
    lib.lb_fake_quant_rows_i8(_ptr(x), x.shape[0], x.shape[1], qmax, min_scale, max_scale, _ptr(out))
    return out


def fake_quantize_rows_fp(
    x: torch.Tensor, man_bits: int, emin: int, emax: int, max_value: float, min_scale: float, max_scale: float
) -> torch.Tensor:
    """Per-row low-bit float (ExMy) fake quantization in one C pass: bit-identical to `lowbit.formats.lowfloat`'s
    ``fit`` (run-time scales) → ``encode`` → ``decode`` for ``man_bits`` mantissa bits, normal exponents
    ``emin`` … ``emax`` and largest value ``max_value``."""
    lib = _need()
    x = _as(x, torch.float32)
    out = torch.empty_like(x)
    lib.lb_fake_quant_rows_fp(
        _ptr(x), x.shape[0], x.shape[1], man_bits, emin, emax, max_value, min_scale, max_scale, _ptr(out)
    )
    return out


def sign_rows(
    x: torch.Tensor, min_scale: float | None = None, max_scale: float = 65504.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Signs of fp32 rows (x >= 0 → 1) packed in the `pack_signs` layout, in one C pass; with ``min_scale`` also
    each row's mean |x| guarded as a run-time scale (accumulated in double: it may differ from torch's fp32 mean
    in the last bit)."""
    lib = _need()
    x = _as(x, torch.float32)
    R, K = x.shape
    out = torch.empty(R, _rup(K, 256) // 64, dtype=torch.int64)
    scale = None if min_scale is None else torch.empty(R, dtype=torch.float32)
    lib.lb_sign_rows(_ptr(x), R, K, _ptr(out), None if scale is None else _ptr(scale), min_scale or 0.0, max_scale)
    return out, scale


def pack_signs(b: torch.Tensor) -> torch.Tensor:
    """Bool (R, K) -> int64 (R, W), W = ceil(K/256)*4: bit i of word j is b[:, 64j+i] (True = 1), zero padded.

    This is the activation layout of matmul_w1a1 (and the 'a1' weight layout). Uses the C packer when
    the library is available, torch otherwise.
    """
    b = _as(b, torch.bool)
    R, K = b.shape
    W = _rup(K, 256) // 64
    out = torch.empty(R, W, dtype=torch.int64)
    if _lib is not None:
        _lib.lb_pack_signs(_ptr(b), R, K, _ptr(out))
        return out
    bp = torch.zeros(R, W * 64, dtype=torch.uint8)
    bp[:, :K] = b
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    packed = (bp.view(R, W * 8, 8) * weights).sum(-1, dtype=torch.int32).to(torch.uint8)
    return packed.view(torch.int64).reshape(R, W).clone()


# ------------------------------------------------------------------------------------------------
# int8 per-channel weights
# ------------------------------------------------------------------------------------------------


class PreparedW8:
    """w: int8 (N, Kp) row-major, Kp = K rounded up to 32 (zero padded); s: fp32 (N,)."""

    def __init__(self, w, s, N, K, Kp):
        self.w, self.s, self.N, self.K, self.Kp = w, s, N, K, Kp

    @property
    def nbytes(self) -> int:
        return self.w.numel() + 4 * self.s.numel()


def prepare_w8(q: torch.Tensor, s: torch.Tensor) -> PreparedW8:
    """q int8 (N, K) in [-128, 127], s fp32 (N,)."""
    q = _as(q, torch.int8)
    N, K = q.shape
    Kp = _rup(K, 32)
    w = torch.zeros(N, Kp, dtype=torch.int8)
    w[:, :K] = q
    return PreparedW8(w, _as(s, torch.float32).reshape(N), N, K, Kp)


def matmul_w8a32(x: torch.Tensor, p: PreparedW8, threads: int = 1) -> torch.Tensor:
    """y = s[n] * sum_k x[m,k] q[n,k] (fp32)."""
    lib = _need()
    x = _as(x, torch.float32)
    M, K = x.shape
    assert K == p.K, f"K mismatch {K} != {p.K}"
    y = _out(M, p.N)
    lib.lb_w8a32(_ptr(x), M, K, _ptr(p.w), _ptr(p.s), p.N, p.Kp, _ptr(y), threads)
    return y


def matmul_w8a8(xq: torch.Tensor, sx: torch.Tensor, p: PreparedW8, threads: int = 1) -> torch.Tensor:
    """y = (sx[m]*s[n]) * float32(sum_k xq q) with xq int8 in [-127, 127]."""
    lib = _need()
    xq, sx, M, K, y = _int8_call(xq, sx, p)
    lib.lb_w8a8(_ptr(xq), _ptr(sx), M, K, _ptr(p.w), _ptr(p.s), p.N, p.Kp, _ptr(y), threads)
    return y


# The 2 / 3 / 4-bit code chunks shared by the group-wise layouts (`group_layout`) and the ternary one.
def _encode_chunks(q: np.ndarray, bits: int) -> np.ndarray:
    """q uint8 (N, C*128) -> (N, C, 16*bits): chunks of 128 k, one 256-bit load = 2 (int4) / 4 (int2) units.

    bits 4: two halves of 32 bytes, half h byte i = q[64h+i] | q[64h+32+i] << 4
    bits 2: byte i = q[i] | q[32+i] << 2 | q[64+i] << 4 | q[96+i] << 6
    bits 3: bits-2 encoding of q & 3, then per unit u a little-endian uint32 with bit i = q[32u+i] >> 2
    """
    N = q.shape[0]
    u = q.reshape(N, -1, 4, 32).astype(np.uint8)  # (N, C, unit, i)
    if bits == 4:
        return np.concatenate([u[:, :, 0] | (u[:, :, 1] << 4), u[:, :, 2] | (u[:, :, 3] << 4)], axis=-1)
    lo = u & 3
    two = lo[:, :, 0] | (lo[:, :, 1] << 2) | (lo[:, :, 2] << 4) | (lo[:, :, 3] << 6)
    if bits == 2:
        return two
    hi = np.packbits((u >> 2) & 1, axis=-1, bitorder="little").reshape(N, -1, 16)  # (N, C, 4 units * 4 bytes)
    return np.concatenate([two, hi], axis=-1)


# ------------------------------------------------------------------------------------------------
# Ternary (BitNet b1.58)
# ------------------------------------------------------------------------------------------------


class PreparedTernary:
    """w: uint8 (N, Kp/4) 2-bit codes t+1 in int2-chunk layout, Kp = K rounded up to 128; sw fp32 (N,)."""

    def __init__(self, w, sw, N, K):
        self.w, self.sw, self.N, self.K = w, sw, N, K

    @property
    def nbytes(self) -> int:
        return self.w.numel() + 4 * self.sw.numel()


def prepare_ternary(t: torch.Tensor, sw) -> PreparedTernary:
    """t int8 (N, K) in {-1, 0, 1}; sw fp32 scalar (per tensor) or (N,) (per row). Any K."""
    tn = _as(t, torch.int8).numpy()
    N, K = tn.shape
    assert np.abs(tn.astype(np.int16)).max(initial=0) <= 1
    c = np.zeros((N, _rup(K, 128)), np.uint8)
    c[:, :K] = (tn + 1).astype(np.uint8)
    w = _encode_chunks(c, 2).reshape(N, -1)
    swt = _as(sw, torch.float32).reshape(-1)
    swt = swt.expand(N).contiguous() if swt.numel() == 1 else swt
    assert swt.numel() == N
    return PreparedTernary(_t(w), swt, N, K)


def matmul_ternary(xq: torch.Tensor, sx: torch.Tensor, p: PreparedTernary, threads: int = 1) -> torch.Tensor:
    """y = (sx[m]*sw[n]) * float32(sum_k xq t)."""
    lib = _need()
    xq, sx, M, K, y = _int8_call(xq, sx, p)
    lib.lb_ternary(_ptr(xq), _ptr(sx), M, K, _ptr(p.w), _ptr(p.sw), p.N, _ptr(y), threads)
    return y


# ------------------------------------------------------------------------------------------------
# Binary weights
# ------------------------------------------------------------------------------------------------


class PreparedBinary:
    """blocked: uint8 (ceil(N/64), Kp/8, 64) or None (for w1a1): rows in blocks of 64, byte r of step p = byte p of
    row 64·block + r's signs (bit i = k 8p + i; N padded with zero rows);
    inter: uint8 (N, Kp/8) interleaved layout (for w1a8 / w1a32) or None; a: fp32 (N,); Kp = K rounded up to 256."""

    def __init__(self, blocked, inter, a, N, K):
        self.blocked, self.inter, self.a, self.N, self.K = blocked, inter, a, N, K

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.blocked, self.inter) if t is not None) + 4 * self.N


def prepare_binary(b: torch.Tensor, a: torch.Tensor, layouts=("a1", "a8")) -> PreparedBinary:
    """b bool (N, K) (True = +1), a fp32 (N,). layouts: 'a1' -> blocked bytes (w1a1), 'a8' or 'a32' ->
    interleaved bits (w1a8 and w1a32 share it): per 256-k block, uint32 lane i bit j = b[base + 8j + i]."""
    bn = _as(b, torch.bool).numpy()
    N, K = bn.shape
    Kp = _rup(K, 256)
    blocked = inter = None
    bp = np.zeros((_rup(N, 64) if "a1" in layouts else N, Kp), np.bool_)
    bp[:N, :K] = bn
    if "a1" in layouts:
        rows = np.packbits(bp, axis=-1, bitorder="little")  # (N64, Kp/8): byte p holds k = 8p .. 8p+7
        blocked = _t(np.ascontiguousarray(rows.reshape(-1, 64, Kp // 8).transpose(0, 2, 1)))
    if "a8" in layouts or "a32" in layouts:
        lanes = bp[:N].reshape(N, Kp // 256, 32, 8).transpose(0, 1, 3, 2)  # (N, block, lane i, bit j)
        inter = _t(np.packbits(lanes, axis=-1, bitorder="little").reshape(N, Kp // 8))
    return PreparedBinary(blocked, inter, _as(a, torch.float32).reshape(N), N, K)


def matmul_w1a1(
    xbits: torch.Tensor, bx: torch.Tensor, p: PreparedBinary, threads: int = 1, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """xbits: bool (M, K) signs (packed here) or int64 (M, W) from pack_signs; bx fp32 (M,).
    y = (bx[m]*a[n]) * float32(K - 2*popcount(bw ^ bx)) (+ bias[n], one more fp32 rounding)."""
    lib = _need()
    assert p.blocked is not None, "prepare_binary(..., layouts) without 'a1'"
    xb = pack_signs(xbits) if xbits.dtype == torch.bool else _as(xbits, torch.int64)
    bx = _vec(bx)
    M = xb.shape[0]
    assert xb.shape[1] == _rup(p.K, 256) // 64 and bx.numel() == M
    bias = None if bias is None else _vec(bias)
    assert bias is None or bias.numel() == p.N
    y = _out(M, p.N)
    b = None if bias is None else _ptr(bias)
    rc = lib.lb_w1a1(_ptr(xb), _ptr(bx), M, p.K, _ptr(p.blocked), _ptr(p.a), p.N, _ptr(y), threads, b)
    if rc:
        raise MemoryError("lb_w1a1: out of memory for the activation tables")
    return y


def matmul_w1a8(xq: torch.Tensor, sx: torch.Tensor, p: PreparedBinary, threads: int = 1) -> torch.Tensor:
    """y = (sx[m]*a[n]) * float32(2*sum_{bit=1} xq - sum_k xq)."""
    lib = _need()
    assert p.inter is not None, "prepare_binary(..., layouts) without 'a8'/'a32'"
    xq, sx, M, K, y = _int8_call(xq, sx, p)
    lib.lb_w1a8(_ptr(xq), _ptr(sx), M, K, _ptr(p.inter), _ptr(p.a), p.N, _ptr(y), threads)
    return y


def matmul_w1a32(x: torch.Tensor, p: PreparedBinary, threads: int = 1) -> torch.Tensor:
    """y = a[n] * (2*sum_{bit=1} x - sum_k x) (fp32)."""
    lib = _need()
    assert p.inter is not None, "prepare_binary(..., layouts) without 'a8'/'a32'"
    x = _as(x, torch.float32)
    M, K = x.shape
    assert K == p.K
    y = _out(M, p.N)
    lib.lb_w1a32(_ptr(x), M, K, _ptr(p.inter), _ptr(p.a), p.N, _ptr(y), threads)
    return y
