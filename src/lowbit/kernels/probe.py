"""A probe of a fused path on every layer's kernel that leaves nothing in what dispatch reports (`native_probe`).

Example:
    >>> from torch import nn
    >>> from lowbit.kernels.probe import native_probe
    >>> with native_probe(nn.Linear(2, 2)):
    ...     pass
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from lowbit.kernels.dispatch import LayerDispatch, use_mode


@contextlib.contextmanager
def native_probe(root: Any) -> Iterator[None]:
    """``use_mode("native")`` for a probe through ``root`` (a fused path checked against the module's own forward with
    every layer on its kernel, `lowbit.nn.fused_blocks`) that leaves nothing in what dispatch reports: the rows such
    calls add without timings are dropped afterwards (the kernels they prepared stay, as a first call would leave
    them)."""

    def dispatches() -> list[Any]:
        return [m._dispatch for m in root.modules() if isinstance(getattr(m, "_dispatch", None), LayerDispatch)]

    before = {id(d): set(d.choice) for d in dispatches()}
    try:
        with use_mode("native"):
            yield
    finally:
        for d in dispatches():
            seen = before.get(id(d), set())
            for key in [k for k, c in d.choice.items() if k not in seen and c.get("native_ms") is None]:
                del d.choice[key]
