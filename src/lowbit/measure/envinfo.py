"""The environment a measurement was taken in: CPU model, threads, library versions, CPU features.

Example:
    >>> from lowbit.measure.envinfo import environment
    >>> sorted(environment())[:3]
    ['cpu', 'cpu_count', 'cpu_flags']
"""

from __future__ import annotations

import os
import platform
import sys
from functools import lru_cache
from importlib import metadata
from typing import Any

import torch

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "fma", "asimd", "neon")


@lru_cache(maxsize=1)
def _cpu() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model") and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    have = set(value.split())
                    flags = [f for f in FLAGS if f in have]
    except OSError:
        pass
    return model, flags


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict[str, Any]:
    """A JSON-able description of this machine and software."""
    cpu, flags = _cpu()
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpu_flags": flags,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy": _version("numpy"),
        "lowbit": _version("lowbit"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
