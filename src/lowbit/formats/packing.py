"""Bit packing: store integer codes at their real bit width (1–8 bits), bit-exact round trip.

Codes of any width are laid out LSB-first, row by row, as a contiguous little-endian bit stream (numpy's
``packbits(bitorder="little")``), so 3-bit codes take exactly 3 bits. Signed codes are offset to unsigned first
(``q + 2^(b−1)``; binary {−1, +1} becomes {0, 1}; ternary {−1, 0, 1} becomes {0, 1, 2} in 2 bits).

Example:
    >>> import torch
    >>> from lowbit.formats.packing import pack_codes, unpack_codes
    >>> q = torch.tensor([[-4, 3, 0, -1, 2]], dtype=torch.int8)
    >>> packed = pack_codes(q, bits=3, signed=True)
    >>> packed.numel()  # 15 bits → 2 bytes
    2
    >>> torch.equal(unpack_codes(packed, (1, 5), bits=3, signed=True), q)
    True
"""

from __future__ import annotations

import numpy as np
import torch

from lowbit.formats.spec import QuantSpec


def code_offset(spec: QuantSpec) -> tuple[int, bool]:
    """``(bits, signed)`` used to pack the codes of ``spec``: signed grids are stored offset to unsigned."""
    if spec.kind == "binary":
        return 1, True
    if spec.kind == "ternary":
        return 2, True
    if spec.kind == "fp":
        return spec.bits, False
    return spec.bits, spec.symmetric


def pack_codes(codes: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Pack integer codes into a flat uint8 tensor of ``ceil(numel·bits/8)`` bytes."""
    q = codes.detach().to(torch.int64).reshape(-1)
    if bits == 1 and signed:  # binary ±1 → 1 / 0
        u = (q > 0).to(torch.int64)
    else:
        u = q + (1 << (bits - 1)) if signed else q
    if bool((u < 0).any()) or bool((u >= (1 << bits)).any()):
        raise ValueError(f"codes do not fit in {bits} bits")
    arr = u.numpy().astype(np.uint16 if bits > 8 else np.uint8)
    bit_planes = ((arr[:, None] >> np.arange(bits, dtype=arr.dtype)) & 1).astype(np.uint8)
    return torch.from_numpy(np.packbits(bit_planes.reshape(-1), bitorder="little").copy())


def unpack_codes(packed: torch.Tensor, shape: tuple[int, ...], bits: int, signed: bool) -> torch.Tensor:
    """Inverse of `pack_codes`: codes of ``shape`` as int8 (signed) or uint8 (unsigned)."""
    n = int(np.prod(shape))
    needed = (n * bits + 7) // 8
    if packed.numel() != needed:
        raise ValueError(f"packed tensor has {packed.numel()} bytes, {needed} expected for {n} {bits}-bit codes")
    flat = np.unpackbits(packed.numpy(), bitorder="little")[: n * bits].reshape(n, bits).astype(np.int64)
    u = (flat << np.arange(bits, dtype=np.int64)).sum(axis=1)
    q = torch.from_numpy(u)
    if bits == 1 and signed:
        q = q * 2 - 1
    elif signed:
        q = q - (1 << (bits - 1))
    return q.reshape(shape).to(torch.int8 if signed else torch.uint8)


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes taken by ``numel`` codes of ``bits`` bits."""
    return (numel * bits + 7) // 8
