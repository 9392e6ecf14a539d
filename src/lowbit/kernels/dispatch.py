"""Shape-aware dispatch: per packed layer and batch size, run the native kernel or the dense reference path,
whichever measured faster on this machine.

The first call of a layer at a new batch-size bucket (1, 2, 4, …, 4096 rows) times both paths on that very
input (one warm-up, then the best of ``REPEATS``) and remembers the winner for the layer, so the cost is paid
once per shape; `layer_report` returns what was measured (``lowbit inspect --packed``). The mode comes from
``LOWBIT_KERNELS`` or `use_mode`: ``auto`` (measure, the default), ``native`` (always the native kernel where one
exists: parity tests), ``portable`` (like ``native``, with the library built without SIMD: what a CPU without AVX2
gets) or ``reference`` (never: the plain PyTorch reference kernel).

Example:
    >>> import torch
    >>> from torch import nn
    >>> import lowbit
    >>> from lowbit.kernels.dispatch import layer_report, use_mode
    >>> q = lowbit.pack(lowbit.compress(nn.Sequential(nn.Linear(512, 512)), "w1a1", progress=False))
    >>> with use_mode("native"):
    ...     _ = q(torch.randn(1, 512))
    >>> layer_report(q[0])[0]["path"] in ("w1a1", "reference")
    True
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from lowbit.kernels.routes import Route, route_for

MODES = ("auto", "native", "reference", "portable")
REPEATS = 3
_mode_override: list[str] = []
_warned: set[str] = set()


def mode() -> str:
    """The active dispatch mode (``use_mode`` beats ``LOWBIT_KERNELS``; default ``auto``)."""
    if _mode_override:
        return _mode_override[-1]
    value = os.environ.get("LOWBIT_KERNELS", "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"LOWBIT_KERNELS={value!r} is not one of {', '.join(MODES)}")
    return value


@contextlib.contextmanager
def use_mode(value: str) -> Iterator[None]:
    """Temporarily force a dispatch mode (``auto``, ``native`` or ``reference``)."""
    if value not in MODES:
        raise ValueError(f"kernel mode {value!r} is not one of {', '.join(MODES)}")
    _mode_override.append(value)
    try:
        yield
    finally:
        _mode_override.pop()


def bucket(rows: int) -> int:
    """Batch-size bucket: the next power of two, capped at 4096."""
    return min(4096, 1 << max(0, rows - 1).bit_length())


def _native_ready() -> bool:
    from lowbit.kernels import native

    if native.available():
        isa = native.build_info()["isa"]
        if isa != "avx2" and "isa" not in _warned:
            _warned.add("isa")
            warnings.warn(
                f"lowbit: this CPU or compiler gives no AVX2 ({isa} build): native kernels run their portable "
                "path and dispatch keeps the reference kernel wherever that is faster",
                stacklevel=3,
            )
        return True
    reason = native.unavailable_reason()
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"lowbit: fast CPU kernels unavailable ({reason}); using the reference kernel", stacklevel=3)
    return False


def _best_ms(fn: Callable[[], Any]) -> float:
    fn()
    best = float("inf")
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


class LayerDispatch:
    """Per-layer state: the route, its prepared weights (built once) and the decision per batch bucket."""

    def __init__(self, route: Route) -> None:
        self.route = route
        self.state: Any = None
        self.choice: dict[tuple[int, int], dict[str, Any]] = {}

    def native(self, layer: Any, x2d: torch.Tensor) -> torch.Tensor:
        if self.state is None:
            self.state = self.route.prepare(layer)
        return self.route.run(x2d, self.state, torch.get_num_threads())


def dispatch_linear(
    layer: Any, x: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor], dense: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """Output of packed linear ``layer`` on ``x``: native kernel or ``dense()`` (the reference forward).

    ``transform`` applies the layer's input scale / shift (everything before activation quantization).
    """
    current = mode()
    if current == "reference" or (x.requires_grad and torch.is_grad_enabled()) or x.device.type != "cpu":
        return dense()
    disp: LayerDispatch | None | bool = getattr(layer, "_dispatch", False)
    if disp is False:
        route = route_for(layer)
        disp = LayerDispatch(route) if route is not None and _native_ready() else None
        layer._dispatch = disp
    if disp is None:
        return dense()
    k = x.shape[-1]
    x2d = transform(x).reshape(-1, k).float().contiguous()

    def native() -> torch.Tensor:
        y = disp.native(layer, x2d)
        if layer.bias is not None:
            y.add_(layer.bias)
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)

    key = (bucket(x2d.shape[0]), torch.get_num_threads())
    if current in ("native", "portable"):
        disp.choice.setdefault(key, {"native_ms": None, "dense_ms": None, "native": True})
        return native()
    decided = disp.choice.get(key)
    if decided is None or decided["native_ms"] is None:
        native_ms, dense_ms = _best_ms(native), _best_ms(dense)
        decided = {"native_ms": native_ms, "dense_ms": dense_ms, "native": native_ms < dense_ms}
        disp.choice[key] = decided
        # Keep only the weights the chosen paths need: the dequantized fp32 cache or the kernel layout.
        if decided["native"]:
            layer._cache = None
        elif not any(c["native"] for c in disp.choice.values()):
            disp.state = None
    return native() if decided["native"] else dense()


def layer_report(layer: Any) -> list[dict[str, Any]]:
    """What dispatch measured and chose for ``layer``: one row per (batch bucket, threads) seen so far."""
    disp = getattr(layer, "_dispatch", None)
    if not disp:
        return [{"path": "reference", "kernel": None}]
    if not disp.choice:
        return [{"path": "not run yet", "kernel": disp.route.kernel}]
    return [
        {
            "rows": rows,
            "threads": threads,
            "kernel": disp.route.kernel,
            "path": disp.route.kernel if c["native"] else "reference",
            "native_ms": c["native_ms"],
            "dense_ms": c["dense_ms"],
        }
        for (rows, threads), c in sorted(disp.choice.items())
    ]
