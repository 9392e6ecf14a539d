"""Group-wise weights for the native kernels: int2 / int3 / int4 asymmetric codes with a scale and zero point per
group, and FP4 (E2M1) codes read through a table, in the row layout of ``lb_wna32`` / ``lb_wna8``
(`lowbit.kernels.native` loads the library).

    prepare_wn(q, s, z, bits, group)   -> PreparedWN ; matmul_wna32(x, p, threads), matmul_wna8(xq, sx, p, threads)
    prepare_wn(q, s, z, 2, group, planes=True) -> PreparedWN (int2 as bit planes, fp32 activations: matmul_wna32)
    prepare_e2m1(v2, half_scale, group) -> PreparedWN (fp32 activations: matmul_wna32)

Exact final expression of the integer kernel (wna8): exact int32 per-group sums d_g, then
y = sx[m] * sum_g s_g*float32(d_g) in fp32 (order unspecified); wna32 accumulates in fp32 in an unspecified order.
"""

from __future__ import annotations

import numpy as np
import torch

from lowbit.kernels.native import _as, _encode_chunks, _int8_call, _need, _out, _ptr, _rup, _t


class PreparedWN:
    """blob: uint8 (N, row_bytes); see _encode_chunks / prepare_wn for the byte layout."""

    def __init__(self, blob, N, K, bits, group, row_bytes):
        self.blob, self.N, self.K, self.bits, self.group, self.row_bytes = blob, N, K, bits, group, row_bytes

    @property
    def nbytes(self) -> int:
        return self.blob.numel()


#: ``PreparedWN.bits`` of int2 codes stored as bit planes (`prepare_wn` with ``planes=True``): per unit of 32 codes,
#: a uint32 of their bits 0 then one of their bits 1 -- the write masks of the AVX-512 fp32 kernel's masked adds.
W2_PLANES_BITS = -2


def prepare_wn(
    q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int, group: int, planes: bool = False
) -> PreparedWN:
    """q uint8 (N, K) in [0, 2^bits-1]; s fp32 (N, K/group); z (N, K/group) integer-valued in [0, 2^bits-1].

    Constraints: bits in {2, 3, 4}, group in {32, 64, 128}, K % group == 0.
    Layout per row: blocks of up to 8 groups, each [codes of the block (chunks of 128 k, 16*bits bytes)]
    [8 fp32 scales][8 u8 zero points] (missing groups of the last block are zero); rows padded to 64 bytes.
    ``planes`` (int2, fp32 activations only): each chunk's 4 units of 32 codes as bit planes instead (unit r: the
    codes' bits 0 as a little-endian uint32, then their bits 1), ``bits`` = `W2_PLANES_BITS`; same sizes.

    Example:
        >>> import torch
        >>> q = torch.randint(0, 4, (3, 64), dtype=torch.uint8)
        >>> s, z = torch.rand(3, 1) + 0.5, torch.ones(3, 1)
        >>> p = prepare_wn(q, s, z, 2, 64, planes=True)
        >>> (p.bits, p.row_bytes, prepare_wn(q, s, z, 2, 64).row_bytes)
        (-2, 128, 128)
    """
    assert bits in (2, 3, 4) and group in (32, 64, 128)
    assert not planes or bits == 2, "bit planes: int2 codes only"
    qn = _as(q, torch.uint8).numpy()
    N, K = qn.shape
    assert K % group == 0, f"K={K} must be a multiple of group={group}"
    G, GU = K // group, group // 32
    sn = _as(s, torch.float32).numpy().reshape(N, G)
    zn = _as(z, torch.float32).numpy().reshape(N, G)
    assert qn.max(initial=0) < (1 << bits) and zn.min(initial=0) >= 0 and zn.max(initial=0) < (1 << bits)
    NB = (G + 7) // 8
    qp = np.zeros((N, _rup(K, 128)), np.uint8)
    qp[:, :K] = qn
    chunks = _plane_chunks(qp) if planes else _encode_chunks(qp, bits)  # (N, C, 16*bits)
    sp = np.zeros((N, NB * 8), np.float32)
    sp[:, :G] = sn
    zp = np.zeros((N, NB * 8), np.uint8)
    zp[:, :G] = np.rint(zn).astype(np.uint8)
    parts = []
    cpb = 2 * GU  # chunks per full block (8 groups * GU units / 4 units per chunk)
    for b in range(NB):
        nb = min(8, G - 8 * b)
        nch = (nb * GU + 3) // 4
        parts += [
            chunks[:, b * cpb : b * cpb + nch].reshape(N, -1),
            sp[:, 8 * b : 8 * b + 8].view(np.uint8),
            zp[:, 8 * b : 8 * b + 8],
        ]
    body = np.concatenate(parts, axis=1)
    row_bytes = _rup(body.shape[1], 64)
    blob = np.zeros((N, row_bytes), np.uint8)
    blob[:, : body.shape[1]] = body
    return PreparedWN(_t(blob), N, K, W2_PLANES_BITS if planes else bits, group, row_bytes)


def _plane_chunks(qp: np.ndarray) -> np.ndarray:
    """int2 codes (N, C·128) as chunks (N, C, 32) of 4 units: the 32 codes' bits 0, then bits 1, 4 bytes each."""
    n = qp.shape[0]
    units = qp.reshape(n, -1, 4, 32)
    bit0 = np.packbits(units & 1, axis=-1, bitorder="little")
    bit1 = np.packbits((units >> 1) & 1, axis=-1, bitorder="little")
    return np.concatenate([bit0, bit1], axis=-1).reshape(n, -1, 32)


#: ``PreparedWN.bits`` of FP4 E2M1 codes (`prepare_e2m1`): the int4 layout, read through a table of values × 2.
E2M1_BITS = -4
#: E2M1 values times 2 in code order (bit 3: sign; bits 0-2: magnitude 0, 0.5, 1, 1.5, 2, 3, 4, 6).
E2M1_X2 = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


def prepare_e2m1(v2: torch.Tensor, half_scale: torch.Tensor, group: int) -> PreparedWN:
    """FP4 E2M1 weights for the row kernel of ``lb_wna32``: ``v2`` (N, K) their values times 2 (integers in
    ``E2M1_X2``), ``half_scale`` (N, K/group) the group scales halved, so ``v2 · half_scale`` is the weight. Stored
    as E2M1 codes in the int4 layout of `prepare_wn` (zero points 0), with ``bits = E2M1_BITS``."""
    wrong = "prepare_e2m1: values must be E2M1 values times 2 (0, ±1, ±2, ±3, ±4, ±6, ±8, ±12)"
    if not bool(torch.isfinite(v2).all()):
        raise ValueError(wrong + ", got NaN / Inf")
    v = _as(v2, torch.float32).round().to(torch.int64)
    index = torch.full((25,), -1, dtype=torch.int64)
    for code, value in enumerate(E2M1_X2[:8]):
        index[value + 12] = code
        index[12 - value] = code + 8 if value else 0
    integral = bool((v.to(torch.float32) == _as(v2, torch.float32)).all())
    if not integral or v.abs().max().item() > 12 or bool((index[v.clamp(-12, 12) + 12] < 0).any()):
        raise ValueError(wrong)
    codes = index[v + 12].to(torch.uint8)
    p = prepare_wn(codes, half_scale, torch.zeros_like(half_scale, dtype=torch.float32), 4, group)
    p.bits = E2M1_BITS
    return p


def matmul_wna32(x: torch.Tensor, p: PreparedWN, threads: int = 1) -> torch.Tensor:
    """y = sum_g s_g (sum_{k in g} x_k q_k - z_g sum_{k in g} x_k) (fp32)."""
    lib = _need()
    x = _as(x, torch.float32)
    M, K = x.shape
    assert K == p.K
    y = _out(M, p.N)
    rc = lib.lb_wna32(_ptr(x), M, K, _ptr(p.blob), p.row_bytes, p.N, p.bits, p.group, _ptr(y), threads)
    if rc:
        raise ValueError(f"unsupported bits={p.bits} group={p.group}")
    return y


def matmul_wna8(xq: torch.Tensor, sx: torch.Tensor, p: PreparedWN, threads: int = 1) -> torch.Tensor:
    """y = sx[m] * sum_g s_g * float32(sum_{k in g} xq_k q_k - z_g sum_{k in g} xq_k)."""
    lib = _need()
    xq, sx, M, K, y = _int8_call(xq, sx, p)
    rc = lib.lb_wna8(_ptr(xq), _ptr(sx), M, K, _ptr(p.blob), p.row_bytes, p.N, p.bits, p.group, _ptr(y), threads)
    if rc:
        raise ValueError(f"unsupported bits={p.bits} group={p.group}")
    return y
