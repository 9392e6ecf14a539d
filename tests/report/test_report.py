"""Atomic writers, results.jsonl schema, terminal table, Pareto plot."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from lowbit.errors import LowbitError
from lowbit.report.atomic import atomic_dir, atomic_write_text
from lowbit.report.jsonl import read_results, write_results
from lowbit.report.plot import pareto_front, pareto_plot
from lowbit.report.table import print_table

ROW = {
    "workload": "w",
    "recipe": "fp32",
    "quality": {"accuracy": 0.9},
    "size_bytes": 4_000_000,
    "fp32_size_bytes": 4_000_000,
    "bits_per_weight": 32.0,
    "bitops": 10**9,
    "latency_ms": 1.0,
    "fp32_latency_ms": 1.0,
    "env": {},
}


def test_atomic_write_keeps_old_file_on_error(tmp_path) -> None:
    p = tmp_path / "f.txt"
    atomic_write_text(p, "old")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "d") as d:
        (d / "x").write_text("partial")
        raise RuntimeError("interrupted")
    assert p.read_text() == "old" and not (tmp_path / "d").exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["f.txt"]


def test_results_roundtrip_and_schema(tmp_path) -> None:
    rows = [ROW, {**ROW, "recipe": "w4", "size_bytes": 600_000, "quality": {"accuracy": 0.88}}]
    write_results(tmp_path / "r.jsonl", rows)
    assert read_results(tmp_path / "r.jsonl") == rows
    bad = dict(ROW)
    del bad["bitops"]
    with pytest.raises(LowbitError, match="bitops"):
        write_results(tmp_path / "bad.jsonl", [bad])
    assert not (tmp_path / "bad.jsonl").exists()


def test_table_and_plot(tmp_path) -> None:
    rows = [ROW, {**ROW, "recipe": "w4g128", "size_bytes": 600_000, "quality": {"accuracy": 0.88}}]
    buf = io.StringIO()
    print_table(rows, title="t", metrics=["accuracy"], console=Console(file=buf, width=160))
    assert "w4g128" in buf.getvalue() and "6.7" in buf.getvalue()
    pareto_plot(rows, tmp_path / "p.png", metric="accuracy")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_pareto_front() -> None:
    pts = [(1.0, 0.5), (2.0, 0.9), (3.0, 0.8), (2.0, 0.9), (0.5, 0.1)]
    assert pareto_front(pts) == [4, 0, 1, 3]
