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


def parse_cpuinfo(text: str, fallback: str = "") -> tuple[str, list[str]]:
    """CPU model and the SIMD features of `FLAGS` from the text of ``/proc/cpuinfo`` (first processor). A model
    name that does not say which generation it is (virtual machines report e.g. "AMD EPYC") gets the x86 family /
    model numbers appended, which do: family 23 is AMD Zen 1 / Zen 2, 25 Zen 3 / Zen 4, by model.

    >>> parse_cpuinfo("cpu family : 25\\nmodel : 1\\nmodel name : AMD EPYC\\nflags : fma avx2")
    ('AMD EPYC (family 25, model 1)', ['avx2', 'fma'])
    """
    model, flags, family, number = fallback, [], "", ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key in ("model name", "Model") and model in ("", fallback):
            model = value
        elif key == "cpu family" and not family:
            family = value
        elif key == "model" and not number:
            number = value
        elif key in ("flags", "Features") and not flags:
            have = set(value.split())
            flags = [f for f in FLAGS if f in have]
    if family and number and not any(ch.isdigit() for ch in model):
        model = f"{model} (family {family}, model {number})"
    return model, flags


@lru_cache(maxsize=1)
def _cpu() -> tuple[str, list[str]]:
    fallback = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            return parse_cpuinfo(f.read(), fallback)
    except OSError:
        return fallback, []


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict[str, Any]:
    """A JSON-able description of this machine and software."""
    from lowbit.kernels import native

    cpu, flags = _cpu()
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpu_flags": flags,
        # the native library's build: avx512vnni / avx2 / scalar (+amx: many-row int8 kernels on AMX tiles), or why
        # there is none
        "kernels": (native.build_info()["isa"] + ("+amx" if native.amx() else ""))
        if native.available()
        else f"none ({native.unavailable_reason()})",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy": _version("numpy"),
        "lowbit": _version("lowbit"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
