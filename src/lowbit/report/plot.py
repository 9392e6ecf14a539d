"""Pareto plot of quality vs size, one panel per workload, written atomically as PNG.

Example:
    >>> from lowbit.report.plot import pareto_front
    >>> pareto_front([(1.0, 0.5), (2.0, 0.9), (3.0, 0.8)])
    [0, 1]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowbit.report.atomic import atomic_path


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of (size, quality) points not dominated by a smaller-or-equal, better-or-equal point."""
    front = []
    for i, (s, q) in enumerate(points):
        dominated = any((s2 <= s and q2 >= q) and (s2 < s or q2 > q) for j, (s2, q2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def pareto_plot(rows: list[dict[str, Any]], path: str | Path, *, metric: dict[str, str] | str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = plt.subplots(1, len(workloads), figsize=(5.5 * len(workloads), 4.5), squeeze=False)
    for ax, wl in zip(axes[0], workloads, strict=True):
        m = metric[wl] if isinstance(metric, dict) else metric
        rs = [r for r in rows if r["workload"] == wl and m in r["quality"]]
        pts = [(r["size_bytes"] / 1e6, r["quality"][m]) for r in rs]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="tab:blue", zorder=3)
        for r, (x, y) in zip(rs, pts, strict=True):
            ax.annotate(r["recipe"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        front = pareto_front(pts)
        ax.step(
            [pts[i][0] for i in front],
            [pts[i][1] for i in front],
            where="post",
            color="tab:orange",
            label="Pareto front",
            zorder=2,
        )
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("model size (MB, log scale)")
        ax.set_ylabel(m)
        ax.set_title(wl)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
