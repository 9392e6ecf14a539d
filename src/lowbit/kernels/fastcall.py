"""A CPython entry for the per-call kernels (``lb_linear``, ``lb_conv``): the ctypes binding's arguments, at a tenth of
its cost.

ctypes converts each argument through generic machinery: about 0.6 µs for the six of ``lb_linear``, as long as a
small layer's whole kernel (a 10 × 128 W8A8 head runs in ~0.4 µs). `lowbit_fastcall.cpp` is a four-function CPython
extension bound to the kernel library's functions by address; it is compiled on first use with the machine's C++
compiler against this Python's headers and cached next to the kernels (`native._cache_dir`). Where it cannot be built
(no ``Python.h``, no compiler, no native library) ``linear`` and ``conv`` are None and callers keep the ctypes
functions; ``reason`` says why.

>>> from lowbit.kernels import fastcall, native
>>> (fastcall.linear is not None) or bool(fastcall.reason) or not native.available()
True
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import pathlib
import subprocess
import sys
import sysconfig
from typing import Any

from lowbit.kernels import native

_SRC = pathlib.Path(__file__).with_name("lowbit_fastcall.cpp")
_FLAGS = ["-O2", "-shared", "-fPIC", "-std=c++17"]

#: ``linear(layer_addr, x_ptr, rows, y_ptr, threads, bias_ptr | None) -> int`` (lb_linear), or None.
linear: Any = None
#: ``conv(layer_addr, x_ptr, geometry_addr, y_ptr, threads, bias_ptr | None) -> int`` (lb_conv), or None.
conv: Any = None
#: Why ``linear`` / ``conv`` are None ('' when they are not).
reason = ""
#: Seconds this process spent compiling the entry (0 when it came from the cache).
seconds = 0.0


def _import(path: str) -> Any:
    """The extension module built at ``path`` (ImportError where it does not load)."""
    spec = importlib.util.spec_from_file_location("lowbit_fastcall", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load() -> None:
    global linear, conv, reason, seconds
    if not native.available():
        reason = f"no native kernels ({native.unavailable_reason()})"
        return
    include = sysconfig.get_paths().get("include") or ""
    if not os.path.exists(os.path.join(include, "Python.h")):
        reason = f"no Python.h in {include!r} (a python3-dev package): ctypes calls, ~0.5 µs more per layer call"
        return
    try:
        key = "\0".join([_SRC.read_text(), include, sys.version, " ".join(_FLAGS), native._compiler_version()])
        suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
        path = native._cache_dir() / f"lowbit_fastcall-{hashlib.sha256(key.encode()).hexdigest()[:24]}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        t0 = os.times().elapsed
        build = lambda: native._compile([*_FLAGS, f"-I{include}"], path, [_SRC])  # noqa: E731
        module, built = native.open_cached(path, build, _import)
        seconds = os.times().elapsed - t0 if built else 0.0
        lib = native._need()
        address = [ctypes.cast(fn, ctypes.c_void_p).value for fn in (lib.lb_linear, lib.lb_conv)]
        module.bind(*address)
    except (OSError, ImportError, RuntimeError, subprocess.SubprocessError) as exc:
        reason = f"fast call entry not built: {exc}"[:2000]
        return
    linear, conv = module.linear, module.conv


_load()
