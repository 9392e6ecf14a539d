"""Terminal table of result rows (rich), one per workload.

Example:
    >>> from lowbit.report.table import render_table
    >>> row = {"workload": "w", "recipe": "fp32", "quality": {"accuracy": 0.9}, "size_bytes": 4_000_000,
    ...        "fp32_size_bytes": 4_000_000, "bits_per_weight": 32.0, "bitops": 10**9, "latency_ms": 1.0,
    ...        "fp32_latency_ms": 1.0, "env": {}}
    >>> render_table([row], title="t", metrics=["accuracy"]).row_count
    1
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _eng(x: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def render_table(rows: list[dict[str, Any]], *, title: str, metrics: list[str]) -> Table:
    t = Table(title=title, title_justify="left")
    t.add_column("recipe", style="bold")
    for m in metrics:
        t.add_column(m, justify="right")
    timed = any("compress_seconds" in r for r in rows)
    for col in ("size MB", "× smaller", "bits/w", "BitOPs", "latency ms", "vs fp32") + (
        ("compress s",) if timed else ()
    ):
        t.add_column(col, justify="right")
    for r in rows:
        fp32_size = r.get("fp32_size_bytes") or r["size_bytes"]
        lat = f"{r['latency_ms']:.2f}"
        if "latency_p10_ms" in r and "latency_p90_ms" in r:
            lat += f" ±{(r['latency_p90_ms'] - r['latency_p10_ms']) / 2:.2f}"
        t.add_row(
            r["recipe"],
            *[f"{r['quality'][m]:.4f}" if m in r["quality"] else "-" for m in metrics],
            f"{r['size_bytes'] / 1e6:.3f}",
            f"{fp32_size / max(r['size_bytes'], 1):.1f}",
            f"{r['bits_per_weight']:.2f}",
            _eng(r["bitops"]),
            lat,
            f"{r['fp32_latency_ms'] / max(r['latency_ms'], 1e-9):.2f}×",
            *((f"{r['compress_seconds']:.1f}" if "compress_seconds" in r else "-",) if timed else ()),
        )
    return t


def print_table(rows: list[dict[str, Any]], *, title: str, metrics: list[str], console: Console | None = None) -> None:
    (console or Console()).print(render_table(rows, title=title, metrics=metrics))
