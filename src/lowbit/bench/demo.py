"""``lowbit demo``: every embedded workload through fp32 and the demo presets, one table per workload.

Writes ``<out>/results.jsonl`` (one object per workload × recipe) and ``<out>/pareto.png`` (quality vs size).

Example:
    >>> from lowbit.bench.demo import run_demo  # doctest: +SKIP
    >>> rows = run_demo(["digits-cnn"], ["w8a8", "w4g128"], out_dir="lowbit-report")  # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from lowbit.bench.evaluate import compress_and_measure, measure_variant
from lowbit.recipe import DEMO_PRESETS, Recipe
from lowbit.report.jsonl import write_results
from lowbit.report.plot import pareto_plot
from lowbit.report.table import print_table
from lowbit.zoo import get_workload, list_workloads

DEFAULT_CALIBRATION_SAMPLES = 128


def _resolve(recipe: str | Recipe) -> tuple[str, str | Recipe]:
    return (recipe.name, recipe) if isinstance(recipe, Recipe) else (recipe, recipe)


def run_demo(
    workloads: Sequence[str] | None = None,
    recipes: Sequence[str | Recipe] = DEMO_PRESETS,
    *,
    out_dir: str | Path = "lowbit-report",
    threads: int = 1,
    repeats: int = 20,
    batch_size: int = 1,
    calibration_samples: int = DEFAULT_CALIBRATION_SAMPLES,
    console: Console | None = None,
) -> list[dict[str, Any]]:
    """Run the demo grid and write the report files; returns the result rows."""
    console = console or Console()
    names = list(workloads or list_workloads())
    rows: list[dict[str, Any]] = []
    out = Path(out_dir)
    torch.set_num_threads(threads)
    t_all = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        wl = get_workload(name)
        console.print(f"[bold]{name}[/bold]: preparing model and data ...")
        base = wl.build()
        calib = wl.calibration_batches(calibration_samples)
        batch = wl.example_batch(batch_size)
        base_row = measure_variant(wl, base, base, "fp32", batch=batch, threads=threads, repeats=repeats)
        wl_rows = [base_row]
        needs_training = any(isinstance(r, Recipe) and r.stages[0].method == "qat" for r in recipes)
        train = wl.training_data(None) if needs_training and wl.training_data is not None else None
        for recipe in recipes:
            label, recipe = _resolve(recipe)
            console.print(f"  {name} · {label} ...")
            qat = isinstance(recipe, Recipe) and recipe.stages[0].method == "qat"
            wl_rows.append(
                compress_and_measure(
                    wl,
                    base,
                    recipe,
                    calib=train if qat else calib,
                    batch=batch,
                    threads=threads,
                    repeats=repeats,
                    fp32_quality=base_row["quality"],
                )
            )
        rows.extend(wl_rows)
        metrics = list(base_row["quality"])
        print_table(
            wl_rows,
            title=f"{name} — {wl.description} (batch {batch_size}, {threads} thread(s), "
            f"{time.perf_counter() - t0:.0f} s)",
            metrics=metrics,
            console=console,
        )
    out.mkdir(parents=True, exist_ok=True)
    write_results(out / "results.jsonl", rows)
    primary = {n: get_workload(n).primary_metric for n in names}
    pareto_plot(rows, out / "pareto.png", metric=primary)
    console.print(
        f"Wrote {out / 'results.jsonl'} ({len(rows)} rows) and {out / 'pareto.png'} in "
        f"{time.perf_counter() - t_all:.0f} s. Latency is of the packed model (native kernels wherever "
        "dispatch measured them faster than the dense path; `lowbit inspect MODEL --recipe R --packed` per layer)."
    )
    return rows
