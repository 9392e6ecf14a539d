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

import math

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
    """Inverse of `pack_codes`: codes of ``shape`` as int8 (signed) or uint8 (unsigned).

    Torch operations only (packed layers unpack their codes on demand, `lowbit.nn.packed`, also inside a graph
    ``torch.compile`` traces, ``fullgraph=True`` included). Widths that divide 8 (1, 2, 4, 8 bits) are shifted out of
    each byte; other widths eight codes at a time, which fill ``bits`` whole bytes (read as one 64-bit word)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"codes of {bits} bits cannot be unpacked (1 to 8 bits)")
    n = math.prod(shape)  # (a Python int, also while tracing)
    needed = (n * bits + 7) // 8
    if packed.numel() != needed:
        raise ValueError(f"packed tensor has {packed.numel()} bytes, {needed} expected for {n} {bits}-bit codes")
    raw = packed.detach().reshape(-1).to(torch.uint8)
    mask = (1 << bits) - 1
    if bits == 8:
        u = raw.clone()
    elif 8 % bits == 0:  # 8 / bits codes a byte, the first in the low bits
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=raw.device)
        u = ((raw.unsqueeze(1) >> shifts) & mask).reshape(-1)[:n]
    else:  # eight codes take `bits` bytes: each such run as a little-endian word, the codes shifted out of it
        words = -(-n // 8)
        runs = torch.cat([raw, raw.new_zeros(words * bits - raw.numel())]).reshape(words, bits).to(torch.int64)
        word = (runs << torch.arange(0, 8 * bits, 8, dtype=torch.int64, device=raw.device)).sum(1, keepdim=True)
        shifts = torch.arange(0, 8 * bits, bits, dtype=torch.int64, device=raw.device)
        u = ((word >> shifts) & mask).reshape(-1)[:n].to(torch.uint8)
    if bits == 1 and signed:  # 0 / 1 → −1 / +1
        q = u.to(torch.int8) * 2 - 1
    elif signed:
        q = (u.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
    else:
        q = u
    return q.reshape(shape)


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes taken by ``numel`` codes of ``bits`` bits."""
    return (numel * bits + 7) // 8
