"""Reshape a 2-D tensor into quantization units (tensor, channel, group, token) and back.

Every format computes its scales over the last axis of a ``(rows, units, unit_len)`` view. Groups that do not
divide the row length are padded by repeating the row's last value, which changes neither the group's minimum,
maximum nor absolute maximum, and the padding is dropped again by `from_units`.

Example:
    >>> import torch
    >>> from lowbit.formats.layout import to_units, from_units
    >>> x = torch.arange(10.0).reshape(2, 5)
    >>> u = to_units(x, "group", 2)
    >>> tuple(u.shape)
    (2, 3, 2)
    >>> torch.equal(from_units(u, x.shape), x)
    True
"""

from __future__ import annotations

import torch


def to_units(x: torch.Tensor, granularity: str, group_size: int | None = None) -> torch.Tensor:
    """View a 2-D tensor as ``(rows, units, unit_len)`` for the given granularity."""
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D tensor, got shape {tuple(x.shape)}")
    rows, cols = x.shape
    if granularity == "tensor":
        return x.reshape(1, 1, rows * cols)
    if granularity in ("channel", "token"):
        return x.reshape(rows, 1, cols)
    if granularity != "group":
        raise ValueError(f"unknown granularity {granularity!r}")
    g = int(group_size or cols)
    if g >= cols:
        return x.reshape(rows, 1, cols)
    pad = (-cols) % g
    if pad:
        x = torch.cat([x, x[:, -1:].expand(rows, pad)], dim=1)
    return x.reshape(rows, (cols + pad) // g, g)


def from_units(u: torch.Tensor, shape: torch.Size | tuple[int, int]) -> torch.Tensor:
    """Invert `to_units`: back to the original 2-D ``shape`` (padding removed)."""
    rows, cols = int(shape[0]), int(shape[1])
    if (u.shape[0] == 1 and u.shape[1] == 1 and rows != 1) or u.numel() == 0:  # per tensor, or no rows at all
        return u.reshape(rows, cols)
    return u.reshape(rows, -1)[:, :cols]


def num_units(shape: tuple[int, int], granularity: str, group_size: int | None = None) -> tuple[int, int]:
    """Shape ``(rows, units)`` of the scale tensor for a 2-D tensor of ``shape``."""
    rows, cols = shape
    if granularity == "tensor":
        return (1, 1)
    if granularity in ("channel", "token"):
        return (rows, 1)
    g = int(group_size or cols)
    return (rows, 1) if g >= cols else (rows, -(-cols // g))


def as_matrix(w: torch.Tensor) -> torch.Tensor:
    """Flatten a Linear (out, in) or Conv (out, in/groups, kh, kw) weight to ``(out, in·kh·kw)``."""
    return w.reshape(w.shape[0], -1)
