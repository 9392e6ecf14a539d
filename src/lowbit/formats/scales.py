"""Helpers shared by every format: storing scales as fp16 and guarding degenerate units.

Example:
    >>> import torch
    >>> from lowbit.formats.scales import stored_scale
    >>> stored_scale(torch.tensor([0.0, 1e-30, 0.1])).tolist()[0] > 0
    True
"""

from __future__ import annotations

import torch

#: Smallest scale lowbit stores. An all-zero unit gets this scale and quantizes to exact zeros.
MIN_SCALE = 2.0**-20
#: Largest finite fp16 value.
MAX_SCALE = 65504.0


def stored_scale(s: torch.Tensor) -> torch.Tensor:
    """Clamp a scale into fp16's safe range and round it to fp16, the precision lowbit stores it at.

    Rounding *before* the codes are chosen keeps the simulated and the packed model identical.
    """
    s = torch.nan_to_num(s.float(), nan=MIN_SCALE, posinf=MAX_SCALE).clamp(MIN_SCALE, MAX_SCALE)
    return s.to(torch.float16).to(torch.float32)


def runtime_scale(s: torch.Tensor) -> torch.Tensor:
    """Guard a scale computed at run time (dynamic activations): positive, finite, kept in fp32."""
    return torch.nan_to_num(s.float(), nan=MIN_SCALE, posinf=MAX_SCALE).clamp_min(MIN_SCALE)


#: Bits used to store one scale or zero point (fp16).
SCALE_BITS_STORED = 16
