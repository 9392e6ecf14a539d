"""``results.jsonl``: one JSON object per (workload, recipe), validated, written atomically.

Example:
    >>> import tempfile, pathlib
    >>> from lowbit.report.jsonl import read_results, write_results
    >>> row = {"workload": "w", "recipe": "r", "quality": {"accuracy": 0.9}, "size_bytes": 10,
    ...        "bits_per_weight": 4.0, "bitops": 1, "latency_ms": 1.0, "fp32_latency_ms": 1.0, "env": {}}
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "results.jsonl"
    >>> write_results(p, [row]); read_results(p)[0]["recipe"]
    'r'
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError
from lowbit.report.atomic import atomic_write_text

REQUIRED = (
    "workload",
    "recipe",
    "quality",
    "size_bytes",
    "bits_per_weight",
    "bitops",
    "latency_ms",
    "fp32_latency_ms",
    "env",
)


def validate_row(row: dict[str, Any]) -> None:
    for key in REQUIRED:
        if key not in row:
            raise LowbitError(f"result row for {row.get('workload')}/{row.get('recipe')} lacks the key '{key}'")
    if not isinstance(row["quality"], dict):
        raise LowbitError("result row 'quality' must map metric names to values")


def write_results(path: str | Path, rows: list[dict[str, Any]]) -> None:
    for r in rows:
        validate_row(r)
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=False) + "\n" for r in rows))


def read_results(path: str | Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    for r in rows:
        validate_row(r)
    return rows
