"""Giving freed heap pages back to the operating system after a layer's first calls.

A packed layer's first calls race its kernel against the dense path and build its kernel layouts: large temporaries
(a dequantized fp32 weight, outputs of thousands of rows) freed between tensors the layer keeps. glibc's allocator
keeps such freed pages resident where a kept tensor sits above them, so the process's resident memory after a first
forward could exceed the fp32 model's (README, "In memory"). `release_free_heap` returns them (``malloc_trim(0)``,
which also releases free pages inside the heap); it does nothing where the C library has no such call.

Example:
    >>> from lowbit.kernels.heap import release_free_heap
    >>> release_free_heap() in (True, False)
    True
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any

_trim: Any = None  # malloc_trim once looked up; False where the C library has none


def release_free_heap() -> bool:
    """Return the free pages of the C heap to the OS (glibc's ``malloc_trim(0)``); False where that call is missing
    (not Linux, or a C library without it).

    The call walks the heap: its cost grows with the heap's size (tens of milliseconds on a fragmented heap of GBs).
    The pages come back (zero-filled, on first touch) when the heap grows into them again: a one-time cost after a
    race, not a per-call one."""
    global _trim
    if _trim is None:
        _trim = False
        if sys.platform.startswith("linux"):
            try:
                fn = ctypes.CDLL(None).malloc_trim
                fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
                _trim = fn
            except (AttributeError, OSError, TypeError):
                pass
    if _trim is False:
        return False
    _trim(0)
    return True
