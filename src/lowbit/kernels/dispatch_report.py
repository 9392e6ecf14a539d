"""What dispatch measured and chose per packed layer (`layer_report`: the rows of ``lowbit inspect --packed``).

Example:
    >>> from torch import nn
    >>> from lowbit.kernels.dispatch_report import layer_report
    >>> layer_report(nn.Linear(4, 4))
    [{'path': 'reference', 'kernel': None}]
"""

from __future__ import annotations

from typing import Any


def layer_report(layer: Any) -> list[dict[str, Any]]:
    """What dispatch measured and chose for ``layer``: one row per (batch bucket, threads) seen so far."""
    disp = getattr(layer, "_dispatch", None)
    if not disp:
        return [{"path": "reference", "kernel": None}]
    if not disp.choice:
        return [{"path": "not run yet", "kernel": disp.route.kernel}]
    many, st = disp.route.panel_rows, disp.state
    panels = bool(many and st is not None and st.has_panels)
    rowless = bool(st is not None and st.has_panels and not st.desc.w)  # (FP8, VNNI W8A8: panels at any rows)
    return [
        {
            "rows": rows,
            "threads": threads,
            "kernel": disp.route.kernel,
            # the many-row layout (`kernels.panels`) ran for these rows
            "panels": bool(c["native"]) and (rowless or (panels and c.get("rows_seen", 0) >= many)),
            "path": disp.route.kernel if c["native"] else "reference",
            "native_ms": c["native_ms"],
            "dense_ms": c["dense_ms"],
            "fp32_ms": c["fp32_ms"],
        }
        for (rows, threads), c in sorted(disp.choice.items())
    ]
