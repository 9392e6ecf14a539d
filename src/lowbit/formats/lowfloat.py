"""Low-bit floating point formats ExMy: FP8 E4M3/E5M2, FP6 E3M2/E2M3, FP4 E2M1 (methods.md G3).

A unit (tensor / channel / group) is scaled so its absolute maximum lands on the format's largest finite value,
then each element is rounded to the nearest representable value (ties to even mantissa, as torch's float8 casts
do): ``e = clamp(floor(log2|v|), e_min, e_max)``, ``step = 2^(e - m)``, ``round(v / step)·step``, clipped to ±max.
Codes are the format's bit patterns (sign | exponent | mantissa), so a packed model stores them as they are.

Example:
    >>> import torch
    >>> from lowbit.formats.lowfloat import grid, round_to_format
    >>> grid("e2m1")[grid("e2m1") >= 0].tolist()
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    >>> round_to_format(torch.tensor([2.4, 2.6, 5.0, 7.0]), "e2m1").tolist()
    [2.0, 3.0, 4.0, 6.0]
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from lowbit.formats.scales import runtime_scale, stored_scale
from lowbit.formats.spec import FP_LAYOUTS


@dataclass(frozen=True)
class FloatLayout:
    """Exponent/mantissa widths, bias and the exponent range of normal numbers."""

    exp_bits: int
    man_bits: int
    bias: int
    emax: int  # largest exponent of a finite normal number (unbiased)
    max_value: float

    @property
    def emin(self) -> int:
        """Smallest normal exponent (unbiased); subnormals share its step."""
        return 1 - self.bias


@cache
def layout(name: str) -> FloatLayout:
    """Layout of a named format. E4M3 follows OCP 'fn' (no inf, max 448); E5M2 is IEEE-like (max 57344)."""
    e, m = FP_LAYOUTS[name]
    bias = 2 ** (e - 1) - 1
    if name == "e4m3":  # top exponent is used for finite values, only S.1111.111 is NaN
        emax, max_value = 2**e - 1 - bias, 2.0 ** (2**e - 1 - bias) * (1 + (2**m - 2) / 2**m)
    elif name == "e5m2":  # top exponent reserved for inf/NaN
        emax = 2**e - 2 - bias
        max_value = 2.0**emax * (1 + (2**m - 1) / 2**m)
    else:  # FP6 / FP4 (OCP MX): no inf or NaN, every pattern is finite
        emax = 2**e - 1 - bias
        max_value = 2.0**emax * (1 + (2**m - 1) / 2**m)
    return FloatLayout(e, m, bias, emax, max_value)


def max_value(name: str) -> float:
    """Largest finite magnitude of the format."""
    return layout(name).max_value


@cache
def _code_table(name: str) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """All finite (value, code) pairs of the format, the negative zero and NaN patterns excluded."""
    lay = layout(name)
    values, codes = [], []
    for sign in (0, 1):
        for ebits in range(2**lay.exp_bits):
            for mbits in range(2**lay.man_bits):
                if ebits == 0:
                    mag = 2.0**lay.emin * (mbits / 2**lay.man_bits)
                else:
                    mag = 2.0 ** (ebits - lay.bias) * (1 + mbits / 2**lay.man_bits)
                if mag > lay.max_value or (sign and mag == 0):
                    continue
                values.append(-mag if sign else mag)
                codes.append((sign << (lay.exp_bits + lay.man_bits)) | (ebits << lay.man_bits) | mbits)
    return tuple(values), tuple(codes)


def grid(name: str) -> torch.Tensor:
    """Sorted tensor of every finite value of the format (used by tests and by encoding)."""
    values, _ = _code_table(name)
    return torch.tensor(sorted(values), dtype=torch.float32)


def decode_table(name: str) -> torch.Tensor:
    """Value of every bit pattern, indexed by code (NaN / -0 patterns map to 0)."""
    lay = layout(name)
    table = torch.zeros(2 ** (1 + lay.exp_bits + lay.man_bits), dtype=torch.float32)
    values, codes = _code_table(name)
    table[list(codes)] = torch.tensor(values, dtype=torch.float32)
    return table


def round_to_format(v: torch.Tensor, name: str) -> torch.Tensor:
    """Round already-scaled values to the nearest representable value (ties to even), saturating at ±max."""
    lay = layout(name)
    mag = v.abs().clamp(max=lay.max_value)
    e = torch.floor(torch.log2(mag.clamp_min(2.0**lay.emin))).clamp(lay.emin, lay.emax)
    step = torch.exp2(e - lay.man_bits)
    out = torch.round(mag / step) * step
    return torch.copysign(out.clamp(max=lay.max_value), v)


def fit(u: torch.Tensor, *, name: str, store: bool = True) -> torch.Tensor:
    """Scale per unit so the unit's absmax maps to the format's max value. Shape ``(R, G, 1)``."""
    guard = stored_scale if store else runtime_scale
    return guard(u.abs().amax(dim=-1, keepdim=True) / layout(name).max_value)


def encode(x: torch.Tensor, s: torch.Tensor, *, name: str) -> torch.Tensor:
    """Bit-pattern codes (int64) of ``x / s`` rounded to the format."""
    values, codes = _code_table(name)
    order = sorted(range(len(values)), key=values.__getitem__)
    sorted_vals = torch.tensor([values[i] for i in order], dtype=torch.float32)
    sorted_codes = torch.tensor([codes[i] for i in order], dtype=torch.int64)
    r = round_to_format(x / s, name)
    idx = torch.searchsorted(sorted_vals, r.contiguous()).clamp(max=len(order) - 1)
    return sorted_codes[idx]


def decode(codes: torch.Tensor, s: torch.Tensor, *, name: str) -> torch.Tensor:
    """Real values of bit-pattern codes."""
    return decode_table(name)[codes.long()] * s
